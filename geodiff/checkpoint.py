"""Checkpoints: safetensors weights + a JSON of everything needed to generate later.

Layout of one checkpoint directory ``step_000500/``::

    model.safetensors   network weights ("model.*") and their EMA ("ema.*")
    state.pt            optimizer / LR-scheduler / RNG state, loadable with weights_only=True
    meta.json           recipe, scaler statistics, grid, condition spec, padding, versions

A checkpoint is written into ``step_000500.tmp-<pid>/`` and renamed when complete, so a
kill never leaves a half-written checkpoint under a final name.  ``meta.json`` alone (plus
``model.safetensors``) is enough to generate: the training data is not needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geodiff._version import __version__

STEP_PREFIX = "step_"
META = "meta.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"


def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on (recorded for provenance)."""
    import numpy
    import xarray

    return {"geodiff": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "xarray": xarray.__version__, "python": platform.python_version()}


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir()
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
            and (p / META).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                    ema: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep_last``."""
    final = step_dir(run_dir, step)
    remove_stale_temporaries(run_dir)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                    for k, v in ema.state_dict().items()})
    save_file(tensors, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    _write_json(tmp / META, {**meta, "step": step})
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete ``step_*.tmp-<pid>`` directories left by saves that were killed.

    A save writes into ``step_N.tmp-<pid>`` and renames it when complete; a process killed
    mid-save leaves that directory (a full weights file) behind, named after a pid that no
    longer runs. Directories of a live pid other than this one are left alone (another
    process may be saving). Returns the removed paths.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f"{STEP_PREFIX}*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG state (only tensors and plain containers: weights_only=True)."""
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=True)


def load_weights(ckpt: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The ``model`` or ``ema`` state dict of a checkpoint."""
    if which not in ("model", "ema"):
        raise ValueError(f"{which=} must be 'model' or 'ema'")
    tensors = load_file(str(Path(ckpt) / WEIGHTS))
    prefix = f"{which}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_meta(ckpt: str | Path) -> dict[str, Any]:
    with open(Path(ckpt) / META, encoding="utf-8") as fh:
        return json.load(fh)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / META).is_file() and (p / WEIGHTS).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(
            f"checkpoint={str(p)!r} is neither a checkpoint directory (with {META} and {WEIGHTS})"
            " nor a run directory with checkpoints/step_*; train first with `geodiff train`")
    return latest


def checkpoint_hash(ckpt: str | Path) -> str:
    """SHA-256 of the weights file (recorded in generated files for provenance)."""
    h = hashlib.sha256()
    with open(Path(ckpt) / WEIGHTS, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


@dataclass(frozen=True)
class RunPaths:
    """Files of one training run directory."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"
