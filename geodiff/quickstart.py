"""``geodiff quickstart``: the whole product on the bundled North-America temperatures.

Trains the ``quickstart`` recipe, generates 32 members for every held-out (year, scenario),
writes them as NetCDF and Zarr, scores them against the held-out fields and the analog
baseline of ``shared/EVAL.md``, and draws maps and diagnostics.  Every number in the
README's quality table comes from the ``report/scores.json`` this writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from geodiff.config import Recipe, load_recipe
from geodiff.io import ZARR_FORMAT

ANALOG_HALF_WINDOW = 10
"""Analog baseline: training fields of the same scenario within +- this many years."""


def analog_ensemble(train: xr.Dataset, test: xr.Dataset, variable: str,
                    half_window: int = ANALOG_HALF_WINDOW) -> xr.Dataset:
    """The analog baseline of EVAL.md as a NaN-padded ensemble over the test cells.

    For each held-out (scenario, time) the members are the training fields of the same
    scenario whose year is within ``half_window`` years (13 to 18 members here); cells with
    fewer members are padded with NaN members, which the scores skip.
    """
    from geodiff.io import MEMBER

    tr = train[variable]
    years_tr = train["year"].values
    cells = []
    for s in test["scenario"].values:
        row = []
        for y in test["year"].values:
            pick = np.abs(years_tr - y) <= half_window
            row.append(tr.sel(scenario=s).isel(time=np.flatnonzero(pick)).values)
        cells.append(row)
    m = max(c.shape[0] for row in cells for c in row)
    shape = (m, test.sizes["scenario"], test.sizes["time"], *tr.shape[-2:])
    arr = np.full(shape, np.nan, np.float32)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            arr[: c.shape[0], i, j] = c
    da = xr.DataArray(arr, dims=(MEMBER, "scenario", "time", *tr.dims[-2:]),
                      coords={"scenario": test["scenario"], "time": test["time"],
                              "year": test["year"], tr.dims[-2]: tr[tr.dims[-2]],
                              tr.dims[-1]: tr[tr.dims[-1]]}, attrs=tr.attrs)
    return da.to_dataset(name=variable)


def run_quickstart(out: str | Path = "geodiff-quickstart", *, overrides: list[str] | None = None,
                   device: str | None = None, resume: bool = False,
                   recipe: Recipe | None = None) -> dict[str, Any]:
    """Train, generate, evaluate and plot; returns the report summary."""
    from geodiff.ensemble import generate_ensemble
    from geodiff.grid import restore
    from geodiff.train import Trainer

    t_start = time.perf_counter()
    out = Path(out)
    recipe = recipe or load_recipe("quickstart", overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    _say(f"geodiff quickstart -> {out.resolve()}")
    _say("1/5 training (progress bar below; checkpoints in run/checkpoints)")
    trainer = Trainer(recipe, run_dir, device=device, resume=resume)
    result = trainer.fit()
    data = trainer.data
    var = recipe.data.variables[0]
    test = data.splits["test"]
    train = data.splits["train"]
    obs = restore(test[[var]].load(), data.grid)
    obs_path = _atomic_netcdf(obs, out / "heldout_obs.nc")
    analog = restore(analog_ensemble(train.load(), test.load(), var), data.grid)
    analog_path = _atomic_netcdf(analog, out / "analog_baseline.nc")

    _say(f"2/5 generating {recipe.sampling.members} members x {test.sizes['scenario']} "
         f"scenarios x {test.sizes['time']} held-out years ({recipe.sampling.sampler}, "
         f"{recipe.sampling.steps} steps)")
    t_gen = time.perf_counter()
    formats = recipe.output.formats  # generated as the first, copied to the second
    ens_path = out / ("ensemble.nc" if "netcdf" in formats else "ensemble.zarr")
    generate_ensemble(run_dir, recipe.sampling.members, test, seed=recipe.training.seed,
                      out=ens_path, overwrite=True, device=device)
    gen_seconds = time.perf_counter() - t_gen
    written = [ens_path]
    if "zarr" in formats and "netcdf" in formats:
        written.append(out / "ensemble.zarr")
        _to_zarr(ens_path, written[-1])

    _say("3/5 evaluating against the held-out years and the analog baseline")
    report = quickstart_scores(ens_path, obs_path, analog_path, out / "report", var)
    report["summary"]["train_steps"] = result.steps
    report["summary"]["train_seconds"] = round(result.seconds, 1)
    report["summary"]["generate_seconds"] = round(gen_seconds, 1)
    report["summary"]["seconds_per_member"] = round(
        gen_seconds / (recipe.sampling.members * test.sizes["scenario"] * test.sizes["time"]), 4)
    _write_json(out / "report" / "scores.json", report)

    _say("4/5 drawing maps and diagnostics")
    figures = quickstart_figures(ens_path, obs_path, out / "figures", var,
                                 recipe.output.threshold)
    total = time.perf_counter() - t_start
    _say(f"5/5 done in {total:.0f} s")
    s = report["summary"]
    lines = [
        f"  checkpoint        {result.checkpoint}",
        f"  ensemble          {'  and  '.join(map(str, written))}",
        f"  held-out truth    {obs_path}",
        f"  analog baseline   {analog_path}",
        f"  report            {out / 'report' / 'scores.json'}  {out / 'report' / 'scores.md'}",
        f"  figures           {out / 'figures'} ({len(figures)} PNG)",
        "",
        f"  fair CRPS {s['crps_fair']:.3f} K vs analog {s['crps_fair_analog']:.3f} K -> "
        f"ratio {s['crps_ratio_vs_analog']:.3f} (90% CI {s['crps_ratio_ci_low']:.3f}-"
        f"{s['crps_ratio_ci_high']:.3f})",
        f"  spread-skill {s['spread_skill']:.3f}   |bias| {s['abs_bias_K']:.3f} K   "
        f"spectra max rel. error {s['spectra_max_rel_error']:.3f}   rank histogram flat: "
        f"{s['rank_histogram_flat']}",
    ]
    print("\n".join(lines), flush=True)
    return report["summary"]


def quickstart_scores(ens_path: Path, obs_path: Path, analog_path: Path, out_dir: Path,
                      var: str) -> dict[str, Any]:
    """EVAL.md scores of the quickstart ensemble, with the analog baseline ratio."""
    from geodiff import analysis

    ens = xr.open_dataset(ens_path)
    obs = xr.open_dataset(obs_path)
    analog = xr.open_dataset(analog_path)
    # fields are paired by label (the files may order their condition dims differently),
    # the ragged analog ensemble is scored over its finite members at each field
    report = analysis.evaluate(ens, obs, reference=analog, variables=[var], out_dir=None)
    s = report["summary"]
    s.update({
        "crps_fair_analog": s["crps_fair_reference"],
        "crps_ratio_vs_analog": s["crps_ratio_vs_reference"],
        "abs_bias_K": float(abs(s["bias"])),
        "members": int(ens.sizes["member"]),
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "scores.json", report)
    _atomic_text(out_dir / "scores.md", _markdown(s))
    return report



def quickstart_figures(ens_path: Path, obs_path: Path, fig_dir: Path, var: str,
                       threshold: float | None) -> list[Path]:
    """Maps (mean, spread, exceedance, members next to the truth) and diagnostics."""
    from geodiff import plot

    fig_dir.mkdir(parents=True, exist_ok=True)
    ens = xr.open_dataset(ens_path)
    obs = xr.open_dataset(obs_path)
    if threshold is None:
        threshold = float(np.round(obs[var].mean().values))
    sel = {"scenario": "A1B", "time": ens["time"].values[-1]}
    figs = [plot.plot_ensemble(ens, kind, fig_dir / f"{kind}.png", variable=var, sel=sel,
                               threshold=threshold, obs=obs)
            for kind in ("mean", "spread", "exceedance", "members")]
    figs.append(plot.rank_histogram_figure(ens[var], obs[var], fig_dir / "rank_histogram.png"))
    figs.append(plot.spectra_figure(ens[var], obs[var], fig_dir / "spectra.png"))
    figs.append(plot.spread_skill_figure(ens[var], obs[var], fig_dir / "spread_skill.png"))
    return [Path(f) for f in figs]


def _markdown(s: dict[str, Any]) -> str:
    rows = [("fair CRPS (K)", "crps_fair"), ("analog fair CRPS (K)", "crps_fair_analog"),
            ("CRPS ratio vs analog", "crps_ratio_vs_analog"),
            ("ratio 90% CI low", "crps_ratio_ci_low"), ("ratio 90% CI high", "crps_ratio_ci_high"),
            ("spread-skill", "spread_skill"), ("|bias| (K)", "abs_bias_K"),
            ("spectra max rel. error", "spectra_max_rel_error"),
            ("rank histogram max rel. dev.", "rank_histogram_max_rel_dev"),
            ("rank histogram tolerance", "rank_histogram_tolerance")]
    body = "\n".join(f"| {label} | {s[key]:.4g} |" for label, key in rows if key in s)
    return "# geodiff quickstart scores\n\n| score | value |\n|---|---|\n" + body + "\n"


def _to_zarr(nc_path: Path, zarr_path: Path) -> None:
    import shutil

    tmp = zarr_path.with_name(zarr_path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    with xr.open_dataset(nc_path, chunks={"member": 1}) as ds:
        for v in ds.variables.values():
            v.encoding.pop("chunksizes", None)
            v.encoding.pop("zlib", None)
            v.encoding.pop("complevel", None)
            v.encoding.pop("shuffle", None)
            v.encoding.pop("contiguous", None)
        ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=ZARR_FORMAT)
    if zarr_path.exists():
        shutil.rmtree(zarr_path)
    os.replace(tmp, zarr_path)


def _atomic_netcdf(ds: xr.Dataset, path: Path) -> Path:
    tmp = path.with_name(path.name + ".partial")
    ds.to_netcdf(tmp, encoding={v: {"zlib": True, "complevel": 4} for v in ds.data_vars})
    os.replace(tmp, path)
    return path


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, json.dumps(obj, indent=1, default=float))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _say(msg: str) -> None:
    print(f"[geodiff] {msg}", flush=True)
