"""Shared pytest set-up: run from a source checkout, deterministic single-process torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Never reach the network for coastlines or data; matplotlib without a display.
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Tests use tiny tensors: one intra-op thread is faster than two fighting for 2 cores, and
# it keeps in-process and subprocess (OMP_NUM_THREADS=1) runs numerically identical.
torch.set_num_threads(1)
