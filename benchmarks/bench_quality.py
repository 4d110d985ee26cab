"""What a cheaper run costs in quality: scores vs sampler steps and vs training time.

Not a test. The script trains the bundled ``quickstart`` recipe (North-America annual air
temperature, conditioned on year and scenario; ``shared/EVAL.md``) with a checkpoint every
``--checkpoint-every`` optimizer steps, then scores ensembles for a subset of the held-out
(year, scenario) cells against the held-out truth and against the analog baseline of
EVAL.md (training fields of the same scenario within +-10 years):

* **steps sweep** - the final checkpoint sampled with each sampler and step count of
  ``--steps-list`` (default Heun 5/10/25/50, DPM-Solver++(2M) 10/25/50/250 and ancestral DDPM
  250/1000 on the Karras et al. (2022) noise levels);
* **training sweep** - every intermediate checkpoint sampled with the recipe's default sampler
  (``recipe.sampling``), against the training step and the elapsed training seconds read from
  ``run_dir/metrics.jsonl`` (resumed sessions are chained onto the clock of the session they
  resumed).

For every setting it records the network evaluations per sample (NFE; Heun 2N - 1, the others
N, as counted by :class:`geodiff.sampling.CountingDenoiser`), the wall seconds per member
(generation including inverse scaling, divided by members x cells), and the EVAL.md scores:
lat-weighted fair CRPS (K), ``crps_ratio_vs_analog`` (mean over fields of geodiff's weighted
fair CRPS / the analog's on the same fields) with a 90 % bootstrap interval over fields,
spread-skill ratio, absolute weighted bias (K) and the largest relative error of the zonal
power spectrum over wavenumbers 1..24.

To bound the cost the scores use every ``--year-stride``-th held-out year (default 2: 12 years
x 2 scenarios = 24 fields) and ``--members`` members (default 8, EVAL.md uses 32). The fair
CRPS is unbiased whatever the ensemble size, so the ratio is comparable with the 32-member
quickstart report, only noisier: with 24 fields its 90 % interval is about +-3 %, so
differences smaller than that between rows are noise. Every row uses the same member seeds.

Cost of the default full run on 2 CPU cores (one network evaluation of one sample ~5-8 ms):
300 s of training, ~1760 NFE x 192 samples for the steps sweep (~35-45 min, two thirds of
it the 1000-step DDPM row) and ~12 NFE x 192 samples per checkpoint for the training sweep
(~15 s each): allow about 45-60 minutes. The script prints its estimate before starting and
a running estimate after every row. On a GPU it takes a few minutes.

Writes ``benchmarks/results/bench_quality.json`` (``summary``, ``settings``, ``steps_sweep``,
``training_sweep``) and ``benchmarks/results/bench_quality.png`` (ratio vs NFE per sampler,
ratio vs training seconds), atomically. ``--smoke`` (tiny network, ~10 s of training, one
thread, 2 cells, 2 members, 2-4 sampler steps) checks the script end to end in under a minute
and writes its outputs to a temporary directory unless ``--results-dir`` is given.

Usage::

    python benchmarks/bench_quality.py --smoke
    python benchmarks/bench_quality.py                        # full run (45-60 min on 2 cores)
    python benchmarks/bench_quality.py --device cuda --members 32 --year-stride 1
    python benchmarks/bench_quality.py --run RUN_DIR          # reuse a run's checkpoints
    python benchmarks/bench_quality.py --run RUN_DIR --resume --train-seconds 600
    python benchmarks/bench_quality.py --steps-list "heun:10,25;dpmpp:12,25"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from geodiff import analysis  # noqa: E402
from geodiff.checkpoint import list_checkpoints, load_meta  # noqa: E402
from geodiff.config import Recipe, load_recipe  # noqa: E402
from geodiff.ensemble import ENSEMBLE_SAMPLERS, generate_ensemble  # noqa: E402
from geodiff.grid import restore  # noqa: E402
from geodiff.pipeline import LoadedModel, load_model, prepare_data  # noqa: E402
from geodiff.quickstart import analog_ensemble  # noqa: E402
from geodiff.runtime import resolve_device  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
NAME = "bench_quality"
DEFAULT_STEPS = "heun:5,10,25,50;dpmpp:10,25,50,250,1000;ddpm:250,1000"
SMOKE_STEPS = "heun:2,3;dpmpp:2,3;ddpm:3"
SMOKE_OVERRIDES = ("model.channels=[8,16,32]", "training.steps=40", "training.warmup_steps=5",
                   "training.ema_halflife_steps=5", "training.val_every=1000",
                   "training.log_every=1", "sampling.steps=4")
SMOKE_TRAIN_SECONDS = 10.0
SMOKE_CHECKPOINT_EVERY = 10
SEC_PER_EVAL_GUESS = {"cpu": 6.5e-3, "cuda": 3e-4}
"""Seconds per network evaluation of one quickstart sample, for the up-front estimate only
(CPU: measured on 2 cores, 5-8 ms; CUDA: a guess). The running estimate uses measured rates."""


# ---------------------------------------------------------------------------------------
# settings


def parse_steps_list(text: str) -> list[tuple[str, int]]:
    """``"heun:5,10;dpmpp:10"`` -> ``[("heun", 5), ("heun", 10), ("dpmpp", 10)]``."""
    out: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        sampler, sep, steps = part.partition(":")
        sampler = sampler.strip()
        if not sep or sampler not in ENSEMBLE_SAMPLERS:
            raise ValueError(f"--steps-list entry {part!r}: write SAMPLER:N,N,... with SAMPLER "
                             f"one of {list(ENSEMBLE_SAMPLERS)}, e.g. 'heun:10,25;dpmpp:25'")
        for s in steps.split(","):
            if not s.strip().isdigit() or int(s) < 1:
                raise ValueError(f"--steps-list entry {part!r}: step count {s!r} must be an "
                                 f"integer >= 1")
            out.append((sampler, int(s)))
    if not out:
        raise ValueError(f"--steps-list={text!r} names no sampler; e.g. 'heun:10,25'")
    return out


def network_evaluations(sampler: str, steps: int) -> int:
    """Denoiser calls per sample: Heun 2N - 1 (no correction on the last step), others N."""
    return 2 * steps - 1 if sampler == "heun" else steps


def select_cells(test: xr.Dataset, year_stride: int, max_years: int | None) -> xr.Dataset:
    """Every ``year_stride``-th held-out time (all scenarios), at most ``max_years`` of them."""
    idx = np.arange(0, test.sizes["time"], year_stride)
    if max_years is not None:
        idx = idx[:max_years]
    return test.isel(time=idx)


# ---------------------------------------------------------------------------------------
# training


def train_or_reuse(args: argparse.Namespace, run_dir: Path, overrides: list[str]
                   ) -> tuple[Recipe, Any, float | None]:
    """Train into ``run_dir`` (or resume, or reuse its checkpoints) -> (recipe, data, seconds)."""
    from geodiff.train import Trainer

    existing = list_checkpoints(run_dir)
    saved = run_dir / "recipe.yaml"
    if existing and not args.resume:
        recipe = load_recipe(saved) if saved.is_file() else load_recipe("quickstart", overrides)
        print(f"reusing {len(existing)} checkpoints of {run_dir} (no training; --resume to "
              "continue training)", flush=True)
        return recipe, prepare_data(recipe), None
    base = (load_recipe(saved) if existing and saved.is_file() else load_recipe("quickstart"))
    recipe = base.override(overrides)
    print(f"training {recipe.name} into {run_dir} for up to {recipe.training.max_time_s} s "
          f"({recipe.training.steps} steps max, checkpoint every "
          f"{recipe.training.checkpoint_every})", flush=True)
    trainer = Trainer(recipe, run_dir, device=args.device, resume=bool(existing),
                      progress=not args.smoke)
    result = trainer.fit()
    print(f"trained to step {result.steps} in {result.seconds:.0f} s", flush=True)
    return recipe, trainer.data, result.seconds


def training_clock(run_dir: Path, checkpoint_steps: list[int]) -> Callable[[int], float]:
    """Elapsed training seconds at an optimizer step, from ``metrics.jsonl``.

    Each training session's ``elapsed_s`` restarts at 0; a session that resumed from
    checkpoint ``s`` is placed after the previous session's clock at step ``s``. Between logged
    steps the clock is interpolated, beyond the last one extrapolated at the last rate; NaN
    when nothing was logged.
    """
    path = run_dir / "metrics.jsonl"
    steps, seconds = [0.0], [0.0]
    if path.is_file():
        prev = -math.inf
        offset = 0.0
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else {}
            if "step" not in rec or "elapsed_s" not in rec:
                continue
            if rec["elapsed_s"] < prev:  # a resumed session
                start = max([s for s in checkpoint_steps if s < rec["step"]], default=0)
                offset = float(np.interp(start, steps, seconds))
                keep = [i for i, s in enumerate(steps) if s <= start]
                steps, seconds = [steps[i] for i in keep], [seconds[i] for i in keep]
                if steps[-1] < start:
                    steps.append(float(start))
                    seconds.append(offset)
            if rec["step"] > steps[-1]:
                steps.append(float(rec["step"]))
                seconds.append(offset + float(rec["elapsed_s"]))
            prev = rec["elapsed_s"]

    def clock(step: int) -> float:
        if len(steps) < 2:
            return math.nan
        if step <= steps[-1]:
            return float(np.interp(step, steps, seconds))
        rate = (seconds[-1] - seconds[-2]) / (steps[-1] - steps[-2])
        return seconds[-1] + rate * (step - steps[-1])

    return clock


# ---------------------------------------------------------------------------------------
# scores


class Scorer:
    """EVAL.md scores of ensembles over fixed held-out cells, against the analog baseline."""

    def __init__(self, train: xr.Dataset, cells: xr.Dataset, grid: Any, variable: str):
        self.variable = variable
        self.cells = cells
        self.obs = restore(cells[[variable]].load(), grid)[variable]
        self.spatial = list(analysis.lat_lon_dims(self.obs))
        self.fields = analysis.sample_dims(self.obs)
        analog = restore(analog_ensemble(train.load(), cells.load(), variable), grid)[variable]
        self.analog_field = self._per_field(analysis.crps_fair(analog, self.obs))
        self.analog_members = int(analog.notnull().all(self.spatial).sum("member").min())

    def _per_field(self, crps: xr.DataArray) -> np.ndarray:
        """Lat-weighted spatial mean per field -> (F,) in the obs' field order."""
        return analysis.weighted_mean(crps, self.spatial).transpose(*self.fields).values.ravel()

    def __call__(self, ens: xr.DataArray) -> dict[str, float]:
        per_field = self._per_field(analysis.crps_fair(ens, self.obs))  # (F,)
        ratio = float(per_field.mean() / self.analog_field.mean())
        rng = np.random.default_rng(0)
        idx = rng.integers(0, per_field.size, size=(2000, per_field.size))  # (boot, F)
        boot = per_field[idx].mean(1) / self.analog_field[idx].mean(1)
        return {
            "crps_fair": float(per_field.mean()),
            "crps_ratio_vs_analog": ratio,
            "crps_ratio_ci_low": float(np.quantile(boot, 0.05)),
            "crps_ratio_ci_high": float(np.quantile(boot, 0.95)),
            "spread_skill": float(analysis.spread_skill_ratio(ens, self.obs)),
            "abs_bias_K": abs(float(analysis.weighted_bias(ens, self.obs))),
            "spectra_max_rel_error": float(analysis.spectra_relative_error(ens, self.obs)),
        }


def run_setting(model: LoadedModel, scorer: Scorer, *, sampler: str, steps: int,
                members: int, batch_size: int) -> dict[str, Any]:
    """Generate ``members`` members for every scored cell with one sampler and score them."""
    n_samples = members * scorer.cells.sizes["scenario"] * scorer.cells.sizes["time"]
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    t0 = time.perf_counter()
    ens = generate_ensemble(model, members, scorer.cells, sampler=sampler, steps=steps, seed=0,
                            batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    nfe = network_evaluations(sampler, steps)
    return {"sampler": sampler, "steps": steps, "nfe": nfe,
            "seconds_per_member": seconds / n_samples,
            "seconds_per_evaluation": seconds / (n_samples * nfe),
            **scorer(ens[scorer.variable])}


# ---------------------------------------------------------------------------------------
# reporting


def _ratio(r: dict[str, Any]) -> str:
    return (f"{r['crps_ratio_vs_analog']:.3f} ({r['crps_ratio_ci_low']:.3f}-"
            f"{r['crps_ratio_ci_high']:.3f})")


def _scores_cells(r: dict[str, Any]) -> str:
    return (f"{r['crps_fair']:.3f} | {_ratio(r)} | {r['spread_skill']:.3f} | "
            f"{r['abs_bias_K']:.3f} | {r['spectra_max_rel_error']:.3g}")


SCORE_HEAD = "fair CRPS (K) | ratio vs analog (90% CI) | spread-skill | abs bias (K) | spectra err"


def steps_table(rows: list[dict[str, Any]]) -> str:
    head = (f"| sampler | steps | NFE | s / member | {SCORE_HEAD} |\n"
            "|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['seconds_per_member']:.4f} | "
            f"{_scores_cells(r)} |" for r in rows]
    return "\n".join([head, *body])


def training_table(rows: list[dict[str, Any]]) -> str:
    head = (f"| train step | train s | sampler | NFE | s / member | {SCORE_HEAD} |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['train_step']} | {r['train_seconds']:.0f} | {r['sampler']} {r['steps']} | "
            f"{r['nfe']} | {r['seconds_per_member']:.4f} | {_scores_cells(r)} |" for r in rows]
    return "\n".join([head, *body])


def summarize(steps_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]],
              tolerance: float = 0.02) -> dict[str, Any]:
    """At the final checkpoint: the best ratio, the cheapest setting within ``tolerance`` of it,
    the default sampler's ratio and cost; and the first checkpoint within ``tolerance`` of the
    final one's ratio."""
    rows = steps_rows + train_rows[-1:]
    best = min(rows, key=lambda r: r["crps_ratio_vs_analog"])
    near = [r for r in rows if r["crps_ratio_vs_analog"] <= best["crps_ratio_vs_analog"]
            * (1 + tolerance)]
    cheapest = min(near, key=lambda r: r["nfe"])
    default = train_rows[-1]

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("sampler", "steps", "nfe", "seconds_per_member",
                                  "crps_ratio_vs_analog", "crps_ratio_ci_low",
                                  "crps_ratio_ci_high", "spread_skill",
                                  "spectra_max_rel_error")}

    return {
        "best_at_final_checkpoint": brief(best),
        "cheapest_within_2pct_of_best": brief(cheapest),
        "default_sampler": brief(default),
        "ratio_at_default": default["crps_ratio_vs_analog"],
        "seconds_per_member_at_default": default["seconds_per_member"],
        "train_steps": default["train_step"],
        "train_seconds": default["train_seconds"],
        "first_checkpoint_within_2pct_of_final": next(
            ({"train_step": r["train_step"], "train_seconds": r["train_seconds"],
              "crps_ratio_vs_analog": r["crps_ratio_vs_analog"]} for r in train_rows
             if r["crps_ratio_vs_analog"] <= default["crps_ratio_vs_analog"] * (1 + tolerance)),
            None),
    }


def plot(steps_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], path: Path,
         title: str) -> None:
    """CRPS ratio (top) and spectra error (bottom) vs NFE per sampler on the final checkpoint
    (left) and vs training seconds with the default sampler (right); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", constrained_layout=True)
    default = train_rows[-1]
    for sampler in dict.fromkeys(r["sampler"] for r in steps_rows):
        rows = sorted((r for r in steps_rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        _curves(axes[:, 0], [r["nfe"] for r in rows], rows, label=sampler)
    _curves(axes[:, 0], [default["nfe"]], [default], label=(
        f"default: {default['sampler']} {default['steps']}"), marker="*", ms=11, ls="none")
    _curves(axes[:, 1], [r["train_seconds"] for r in train_rows], train_rows,
            label=f"{default['sampler']} {default['steps']} steps")
    axes[0, 0].set_title("final checkpoint, by sampler")
    axes[0, 1].set_title("by checkpoint, default sampler")
    axes[1, 0].set_xscale("log")
    axes[1, 0].set_xticks(sorted({r["nfe"] for r in steps_rows + [default]}))
    axes[1, 0].xaxis.set_major_formatter(ScalarFormatter())
    axes[1, 0].xaxis.set_minor_formatter(NullFormatter())
    axes[1, 0].set_xlabel("network evaluations per sample")
    axes[1, 1].set_xlabel("training time (s)")
    for col, rows in ((0, [*steps_rows, default]), (1, train_rows)):
        axes[0, col].axhline(1.0, color="0.4", lw=1, ls="--", label="analog baseline")
        axes[0, col].set_ylabel("fair CRPS / analog fair CRPS (90% CI)")
        axes[1, col].set_ylabel("spectra max rel. error (k = 1..24)")
        for ax, key in ((axes[0, col], "crps_ratio_vs_analog"),
                        (axes[1, col], "spectra_max_rel_error")):
            values = [r[key] for r in rows]
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")
    for ax in axes.ravel():
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _curves(axes: Any, x: list[float], rows: list[dict[str, Any]], label: str,
            **style: Any) -> None:
    """Ratio with its interval on ``axes[0]``, spectra error on ``axes[1]``."""
    y = np.array([r["crps_ratio_vs_analog"] for r in rows])
    err = np.array([[r["crps_ratio_vs_analog"] - r["crps_ratio_ci_low"] for r in rows],
                    [r["crps_ratio_ci_high"] - r["crps_ratio_vs_analog"] for r in rows]])
    style = {"marker": "o", "ms": 4, **style}
    line = axes[0].errorbar(x, y, yerr=err, capsize=2, label=label, **style)
    axes[1].plot(x, [r["spectra_max_rel_error"] for r in rows], label=label,
                 color=line.lines[0].get_color(), **style)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny end-to-end check (< 1 min): small net, 2 cells, 2 members")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--run", "--out-dir", dest="run", type=Path, default=None,
                   help="run directory (default: a temporary one, deleted at the end); "
                        "existing checkpoints are reused without training unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue training the run in --run before scoring")
    p.add_argument("--keep-run", action="store_true", help="keep the temporary run directory")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="training.max_time_s (default: the recipe's, 300 s)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="optimizer steps between checkpoints (default 100)")
    p.add_argument("--members", type=int, default=None, help="members per cell (default 8)")
    p.add_argument("--year-stride", type=int, default=2,
                   help="score every N-th held-out year (both scenarios; default 2)")
    p.add_argument("--years", type=int, default=None, help="at most this many held-out years")
    p.add_argument("--steps-list", default=None,
                   help=f"samplers and steps of the steps sweep (default {DEFAULT_STEPS!r})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --smoke)")
    p.add_argument("--sec-per-eval", type=float, default=None,
                   help="seconds per network evaluation of one sample for the up-front "
                        "estimate (default 6.5e-3 on CPU, 3e-4 on CUDA)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help=f"where the JSON and PNG go (default {RESULTS_DIR}, or a temporary "
                        "directory with --smoke)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra recipe override (repeatable)")
    args = p.parse_args(argv)
    for name in ("members", "year_stride", "years", "batch_size", "checkpoint_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    if args.train_seconds is not None and args.train_seconds <= 0:
        raise ValueError(f"--train-seconds={args.train_seconds} must be > 0")
    if args.resume and args.run is None:
        raise ValueError("--resume needs --run RUN_DIR (the run to continue)")
    if args.smoke:
        args.members = args.members or 2
        args.years = args.years or 1
        args.steps_list = args.steps_list or SMOKE_STEPS
        args.train_seconds = args.train_seconds or SMOKE_TRAIN_SECONDS
        args.checkpoint_every = args.checkpoint_every or SMOKE_CHECKPOINT_EVERY
        args.threads = args.threads or 1
    args.members = args.members or 8
    args.steps_list = args.steps_list or DEFAULT_STEPS
    args.checkpoint_every = args.checkpoint_every or 100
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings_steps = parse_steps_list(args.steps_list)
    device = resolve_device(None if args.device == "auto" else args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = str(device)
    overrides = [*(SMOKE_OVERRIDES if args.smoke else ()),
                 f"training.checkpoint_every={args.checkpoint_every}", "training.keep_last=1000",
                 *([f"training.max_time_s={args.train_seconds}"] if args.train_seconds else []),
                 *args.override]
    results_dir = args.results_dir or (Path(tempfile.mkdtemp(prefix="geodiff-bench-quality-out-"))
                                       if args.smoke else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    temp_run = args.run is None
    run_dir = (Path(tempfile.mkdtemp(prefix="geodiff-bench-quality-run-")) if temp_run
               else args.run)

    planned = load_recipe("quickstart", overrides)
    n_years_est = len(range(0, 24, args.year_stride))
    n_years_est = min(n_years_est, args.years) if args.years else n_years_est
    n_samples = args.members * 2 * n_years_est
    per_eval = args.sec_per_eval or SEC_PER_EVAL_GUESS[device.type]
    sweep_nfe = sum(network_evaluations(s, n) for s, n in settings_steps)
    n_ckpt = math.ceil(planned.training.steps / args.checkpoint_every)
    default_nfe = network_evaluations(planned.sampling.sampler, planned.sampling.steps)
    train_est = 0.0 if list_checkpoints(run_dir) and not args.resume else float(
        planned.training.max_time_s or 0.0)
    estimate = train_est + per_eval * n_samples * (sweep_nfe + n_ckpt * default_nfe)
    print(f"# {NAME}: {'smoke' if args.smoke else 'full'} run on {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"estimate: {train_est:.0f} s training + {n_samples} samples x ({sweep_nfe} NFE steps "
          f"sweep + up to {n_ckpt} checkpoints x {default_nfe} NFE) x {per_eval * 1e3:.2g} ms "
          f"= about {estimate / 60:.1f} min", flush=True)
    try:
        report = measure(args, run_dir, overrides, settings_steps, device, results_dir)
    except BaseException:
        if temp_run:
            print(f"failed; the run directory {run_dir} is kept: reuse its checkpoints with "
                  f"--run {run_dir}", file=sys.stderr)
        raise
    if temp_run and not args.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"run directory kept: {run_dir} (reuse with --run)")
    return report


def measure(args: argparse.Namespace, run_dir: Path, overrides: list[str],
            settings_steps: list[tuple[str, int]], device: torch.device, results_dir: Path
            ) -> dict[str, Any]:
    """Train (or reuse), run both sweeps, print the tables, write the JSON and the plot."""
    t_start = time.perf_counter()
    recipe, data, trained_s = train_or_reuse(args, run_dir, overrides)
    var = recipe.data.variables[0]
    cells = select_cells(data.splits["test"], args.year_stride, args.years)
    scorer = Scorer(data.splits["train"], cells, data.grid, var)
    n_samples = args.members * cells.sizes["scenario"] * cells.sizes["time"]
    print(f"scoring {cells.sizes['scenario']} scenarios x {cells.sizes['time']} held-out years "
          f"{cells['year'].values.tolist()} x {args.members} members; analog fair CRPS "
          f"{scorer.analog_field.mean():.4f} K on these fields", flush=True)

    checkpoints = list_checkpoints(run_dir)
    ckpt_steps = [int(load_meta(c)["step"]) for c in checkpoints]
    clock = training_clock(run_dir, ckpt_steps)
    default_nfe = network_evaluations(recipe.sampling.sampler, recipe.sampling.steps)
    nfe_left = (sum(network_evaluations(s, n) for s, n in settings_steps)
                + len(checkpoints) * default_nfe)
    measured: list[float] = []

    def progress(row: dict[str, Any], label: str) -> None:
        nonlocal nfe_left
        nfe_left -= row["nfe"]
        measured.append(row["seconds_per_evaluation"])
        eta = nfe_left * n_samples * float(np.median(measured))
        print(f"  {label}: ratio {_ratio(row)}, {row['seconds_per_member']:.4f} s/member "
              f"({row['seconds_per_evaluation'] * 1e3:.2f} ms/eval); about {eta / 60:.1f} min "
              "left", flush=True)

    print(f"steps sweep on {checkpoints[-1].name}", flush=True)
    final = load_model(checkpoints[-1], device=device)
    steps_rows = []
    for sampler, steps in settings_steps:
        row = run_setting(final, scorer, sampler=sampler, steps=steps, members=args.members,
                          batch_size=args.batch_size)
        row["train_step"] = ckpt_steps[-1]
        steps_rows.append(row)
        progress(row, f"{sampler} {steps}")

    print(f"training sweep over {len(checkpoints)} checkpoints "
          f"({recipe.sampling.sampler} {recipe.sampling.steps})", flush=True)
    train_rows = []
    for path, step in zip(checkpoints, ckpt_steps):
        model = final if path == checkpoints[-1] else load_model(path, device=device)
        row = run_setting(model, scorer, sampler=model.recipe.sampling.sampler,
                          steps=model.recipe.sampling.steps, members=args.members,
                          batch_size=args.batch_size)
        row.update(train_step=step, train_seconds=clock(step))
        train_rows.append(row)
        progress(row, f"step {step}")

    total = time.perf_counter() - t_start
    summary = summarize(steps_rows, train_rows)
    report = {
        "summary": summary,
        "settings": {
            "mode": "smoke" if args.smoke else "full",
            "recipe": recipe.name, "overrides": overrides, "device": str(device),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor(),
            "members": args.members, "seed": 0, "batch_size": args.batch_size,
            "year_stride": args.year_stride,
            "years": [int(y) for y in cells["year"].values],
            "scenarios": [str(s) for s in cells["scenario"].values],
            "n_fields": int(scorer.analog_field.size),
            "analog_crps_fair": float(scorer.analog_field.mean()),
            "analog_min_members": scorer.analog_members,
            "steps_list": args.steps_list,
            "default_sampler": {"sampler": recipe.sampling.sampler,
                                "steps": recipe.sampling.steps},
            "checkpoint_every": recipe.training.checkpoint_every,
            "train_max_time_s": recipe.training.max_time_s,
            "trained_seconds_this_run": trained_s,
            "wall_seconds": total,
        },
        "steps_sweep": steps_rows,
        "training_sweep": train_rows,
    }
    json_path = results_dir / f"{NAME}.json"
    png_path = results_dir / f"{NAME}.png"
    write_json(json_path, report)
    plot(steps_rows, train_rows, png_path,
         f"geodiff quickstart ({device}): {args.members} members x "
         f"{scorer.analog_field.size} held-out fields; analog fair CRPS "
         f"{scorer.analog_field.mean():.3f} K")

    print(f"\n## Steps sweep (checkpoint at step {ckpt_steps[-1]}, "
          f"{clock(ckpt_steps[-1]):.0f} s of training)\n")
    print(steps_table(steps_rows))
    print(f"\n## Training sweep ({recipe.sampling.sampler}, {recipe.sampling.steps} steps)\n")
    print(training_table(train_rows))
    best, cheap = summary["best_at_final_checkpoint"], summary["cheapest_within_2pct_of_best"]
    print(f"\nfinal checkpoint, best: {best['sampler']} {best['steps']} (NFE {best['nfe']}) ratio "
          f"{best['crps_ratio_vs_analog']:.3f}; cheapest within 2 %: {cheap['sampler']} "
          f"{cheap['steps']} (NFE {cheap['nfe']}, {cheap['seconds_per_member']:.4f} s/member) "
          f"ratio {cheap['crps_ratio_vs_analog']:.3f}; default "
          f"{recipe.sampling.sampler} {recipe.sampling.steps}: ratio "
          f"{summary['ratio_at_default']:.3f}")
    print(f"wrote {json_path} and {png_path} in {total:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
