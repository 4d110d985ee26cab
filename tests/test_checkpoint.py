"""Checkpoint files: atomic saves, and what a killed save leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from geodiff.checkpoint import list_checkpoints, save_checkpoint, step_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_saves_temporary_directory_is_removed_by_the_next_save(tmp_path):
    model = torch.nn.Linear(2, 3)
    folder = tmp_path / "checkpoints"
    stale = folder / f"{step_dir(tmp_path, 8).name}.tmp-{_dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)  # a half-written save
    busy = folder / f"{step_dir(tmp_path, 8).name}.tmp-{os.getppid()}"  # a live process
    busy.mkdir()
    saved = save_checkpoint(tmp_path, 8, model=model, ema=torch.nn.Linear(2, 3),
                            state={"step": 8}, meta={"note": "t"}, keep_last=2)
    assert list_checkpoints(tmp_path) == [saved]
    assert not stale.exists()
    assert busy.exists()  # another process may be saving: not ours to delete
    assert sorted(p.name for p in folder.iterdir()) == sorted([saved.name, busy.name])
