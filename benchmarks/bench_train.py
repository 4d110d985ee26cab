"""Training-step and generation throughput of a recipe under each precision / compile mode.

Not a test. Trains the recipe (default: the bundled ``quickstart``) for ``--steps`` optimizer
steps through :class:`geodiff.train.Trainer` once per *variant* and reads the per-step clock
from ``metrics.jsonl``:

* ``fp32``            - ``training.amp: off``, eager;
* ``bf16``            - ``training.amp: bf16`` (CUDA only: bf16 autocast of the network);
* ``fp32+compile`` / ``bf16+compile`` - the same with ``training.compile: true``.

For each it reports the first step (which includes ``torch.compile``'s build), the median
seconds per step over the second half of the run (steady state), samples/s, peak GPU memory
(CUDA) and the mean loss over the last quarter of the steps: every variant sees the same
batches and noise (per-step generators), so the losses show whether bf16 or compilation
changes what is learned, not only how fast. It then times ensemble generation from the last
variant's checkpoint (DPM-Solver++ at the recipe's step count, ``--members`` members for
every held-out cell, written to a temporary NetCDF file) in members per second.

Writes ``benchmarks/results/bench_train_<device>.json`` with a ``summary`` (steady-state
speed-ups of bf16 and of compile over fp32 eager) and prints a table.

Usage::

    python benchmarks/bench_train.py --device cpu --steps 60
    python benchmarks/bench_train.py --device cuda --steps 400
    python benchmarks/bench_train.py --device cuda --set model.channels=[64,128,256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from geodiff.config import load_recipe  # noqa: E402
from geodiff.ensemble import generate_ensemble  # noqa: E402
from geodiff.pipeline import load_model, prepare_data  # noqa: E402
from geodiff.runtime import resolve_device  # noqa: E402
from geodiff.train import Trainer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run_variant(recipe_name: str, overrides: list[str], variant: str, steps: int,
                device: torch.device, data: Any, workdir: Path) -> dict[str, Any]:
    """Train ``steps`` steps under ``variant``; timings and losses from ``metrics.jsonl``."""
    amp = "bf16" if variant.startswith("bf16") else "off"
    compile_ = variant.endswith("+compile")
    recipe = load_recipe(recipe_name, [
        *overrides, f"training.steps={steps}", f"training.amp={amp}",
        f"training.compile={str(compile_).lower()}", "training.max_time_s=null",
        "training.log_every=1", f"training.checkpoint_every={steps}",
        f"training.val_every={steps}"])
    run_dir = workdir / variant.replace("+", "_")
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(recipe, run_dir, device=str(device), progress=False, data=data)
    result = trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "elapsed_s" in r]
    clock = [0.0] + [r["elapsed_s"] for r in records]
    per_step = [b - a for a, b in zip(clock[:-1], clock[1:])]
    steady = statistics.median(per_step[len(per_step) // 2:])
    losses = [r["loss"] for r in records]
    tail = losses[-max(1, len(losses) // 4):]
    return {
        "variant": variant, "amp": amp, "compile": compile_, "steps": result.steps,
        "first_step_s": per_step[0], "steady_s_per_step": steady,
        "samples_per_s": recipe.training.batch_size / steady,
        "total_s": result.seconds,
        "peak_gpu_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                         if device.type == "cuda" else None),
        "loss_last_quarter": statistics.fmean(tail),
        "vlb_bits_per_dim": result.vlb_bits_per_dim,
        "run_dir": run_dir,
    }


def time_generation(run_dir: Path, device: torch.device, members: int, data: Any,
                    workdir: Path) -> dict[str, Any]:
    """Members per second of streamed generation for every held-out cell."""
    model = load_model(run_dir, device=str(device))
    conditions = data.splits.get("test", data.splits["train"])
    cells = int(torch.tensor([conditions.sizes[d] for d in data.sample_dims]).prod())
    sc = model.recipe.sampling
    out = workdir / "ensemble.nc"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    generate_ensemble(model, members, conditions, out=out, overwrite=True, progress=False,
                      batch_size=sc.batch_size)
    seconds = time.perf_counter() - t0
    return {"sampler": sc.sampler, "sampler_steps": sc.steps, "cells": cells,
            "members_per_cell": members, "seconds": seconds,
            "members_per_s": cells * members / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="quickstart", help="recipe name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    p.add_argument("--variants", default=None,
                   help="comma-separated (default: fp32,bf16,bf16+compile on CUDA, "
                        "fp32,fp32+compile on CPU)")
    p.add_argument("--members", type=int, default=32, help="members per cell for generation")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    variants = (args.variants.split(",") if args.variants else
                ["fp32", "bf16", "bf16+compile"] if device.type == "cuda" else
                ["fp32", "fp32+compile"])
    if device.type != "cuda" and any(v.startswith("bf16") for v in variants):
        raise SystemExit(f"--variants {args.variants}: bf16 autocast is CUDA only in geodiff "
                         "(training.amp: bf16); use fp32 variants on the CPU")
    data = prepare_data(load_recipe(args.recipe, args.set))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for variant in variants:
            row = run_variant(args.recipe, args.set, variant, args.steps, device, data,
                              Path(tmp))
            rows.append(row)
            print(f"{variant:>14}: first step {row['first_step_s']:7.2f} s, "
                  f"{row['steady_s_per_step'] * 1e3:8.2f} ms/step, "
                  f"{row['samples_per_s']:8.1f} samples/s, loss {row['loss_last_quarter']:.4f}",
                  flush=True)
        generation = time_generation(rows[-1]["run_dir"], device, args.members, data,
                                     Path(tmp))
    for row in rows:
        row.pop("run_dir")
    base = rows[0]["steady_s_per_step"]
    summary = {f"speedup_{r['variant']}_vs_{rows[0]['variant']}": base / r["steady_s_per_step"]
               for r in rows[1:]}
    summary["generation_members_per_s"] = generation["members_per_s"]
    report = {
        "summary": summary, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "recipe": args.recipe, "overrides": args.set, "steps": args.steps,
        "variants": rows, "generation": generation,
    }
    print(f"\n{'variant':>14} | {'ms/step':>9} | {'samples/s':>9} | {'peak MiB':>8} | loss")
    for r in rows:
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        print(f"{r['variant']:>14} | {r['steady_s_per_step'] * 1e3:9.2f} | "
              f"{r['samples_per_s']:9.1f} | {peak:>8} | {r['loss_last_quarter']:.4f}")
    print(f"generation: {generation['members_per_s']:.1f} members/s "
          f"({generation['sampler']} {generation['sampler_steps']} steps, "
          f"{generation['cells']} cells x {generation['members_per_cell']} members)")
    print(json.dumps(summary, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"bench_train_{device.type}.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp_path, path)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
