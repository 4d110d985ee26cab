"""How flat can a rank histogram of spatially correlated fields be? A nearly exchangeable reference.

Not a test. shared/EVAL.md calls a rank histogram flat when every bin is within
``sqrt((bins - 1) / N)`` relative error of ``N / bins`` for ``N`` ranks, the standard error of
a bin if the ranks were independent. The quickstart's ranks are not: there is one per pixel
of 48 fields of 37 x 49 strongly correlated pixels. This script builds, from the quickstart
data itself, an ensemble that is exchangeable with its "truth" up to the slow trend:

* for each held-out (scenario, year) a training year within +-6 years is drawn as the truth,
  and ``--members`` other training years of the same scenario within +-10 years of it as the
  members (the analog construction of EVAL.md with the truth left out);

and reports its rank histogram's largest relative deviation next to EVAL.md's tolerance and
next to a bootstrap-over-fields standard error of one bin (the sampling error that respects
the spatial correlation). With ``--ensemble ENS.nc --obs OBS.nc`` it reports the same two
numbers for a geodiff ensemble (e.g. the quickstart's ``ensemble.nc`` and
``heldout_obs.nc``).

Writes ``benchmarks/results/bench_rank_reference.json``.

Usage::

    python benchmarks/bench_rank_reference.py --members 16
    python benchmarks/bench_rank_reference.py --ensemble DIR/ensemble.nc --obs DIR/heldout_obs.nc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from geodiff import analysis  # noqa: E402
from geodiff.catalog import open_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_rank_reference.json"


def flatness(ens: xr.DataArray, obs: xr.DataArray, spatial: list[str], boots: int = 2000,
             seed: int = 0) -> dict[str, float]:
    """Max relative bin deviation, EVAL.md tolerance, bootstrap (over fields) s.e. of a bin."""
    counts = analysis.rank_histogram(ens, obs, np.random.default_rng(seed + 1))
    dev, tol = analysis.rank_histogram_flatness(counts)
    per_field = analysis.rank_histogram(ens, obs, np.random.default_rng(seed + 1), dim=spatial)
    field_dims = [d for d in per_field.dims if d != "rank"]
    pf = per_field.stack(_field=field_dims).values if field_dims else per_field.values[:, None]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, pf.shape[1], size=(boots, pf.shape[1]))
    boot = pf[:, draw].sum(-1)                                       # (bins, boots)
    rel = boot / (boot.sum(0) / boot.shape[0]) - 1.0
    return {"max_rel_dev": dev, "eval_tolerance": tol,
            "bootstrap_se_of_a_bin": float(rel.std(1).mean()), "ranks": int(pf.sum()),
            "fields": int(pf.shape[1]), "bins": int(pf.shape[0])}


def analog_reference(members: int, seed: int = 0) -> dict[str, float]:
    """Flatness of the leave-one-out analog ensemble on the quickstart data."""
    ds = open_dataset("iris_north_america")
    da = ds["air_temperature"].load()                     # (scenario, time, lat, lon)
    years = np.asarray(ds["time"].dt.year.values)
    train = years % 10 != 5
    rng = np.random.default_rng(seed)
    ens_fields, obs_fields = [], []
    for s in range(da.sizes["scenario"]):
        v = da.isel(scenario=s).values
        for y in years[~train]:
            candidates = np.flatnonzero(train & (np.abs(years - y) <= 6))
            while True:
                i = int(rng.choice(candidates))
                pool = np.flatnonzero(train & (np.abs(years - years[i]) <= 10)
                                      & (years != years[i]))
                if pool.size >= members:
                    break
            ens_fields.append(v[rng.choice(pool, size=members, replace=False)])
            obs_fields.append(v[i])
    spatial = [d for d in da.dims if d not in ("scenario", "time")]
    coords = {d: da[d].values for d in spatial}
    ens = xr.DataArray(np.stack(ens_fields, 1), dims=("member", "field", *spatial),
                       coords=coords)
    obs = xr.DataArray(np.stack(obs_fields), dims=("field", *spatial), coords=coords)
    return {"members": members, **flatness(ens, obs, spatial, seed=seed)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=16, help="analog members (<= 16 fits all)")
    p.add_argument("--ensemble", type=Path, default=None, help="a geodiff ensemble file")
    p.add_argument("--obs", type=Path, default=None, help="its held-out truth")
    p.add_argument("--variable", default="air_temperature")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    report: dict = {"analog_leave_one_out": analog_reference(args.members)}
    print("nearly exchangeable analog reference:", report["analog_leave_one_out"])
    if args.ensemble is not None:
        if args.obs is None:
            raise SystemExit("--ensemble needs --obs (the held-out truth on the same cells)")
        ens = xr.open_dataset(args.ensemble)[args.variable].load()
        obs = xr.open_dataset(args.obs)[args.variable].load()
        spatial = [str(d) for d in analysis.lat_lon_dims(obs)]
        report["ensemble"] = {"path": str(args.ensemble), "members": int(ens.sizes["member"]),
                              **flatness(ens, obs, spatial)}
        print("geodiff ensemble:", report["ensemble"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
