"""The gap-filling experiment (``geodiff quickstart --recipe ostia_gapfill``).

Trains the recipe, hides artificial clouds (spatially correlated blobs covering
``gapfill.cloud_fraction`` of the valid pixels) in every held-out field, fills them with an
ensemble, and scores the filled pixels against the hidden truth: fair CRPS (cos-latitude
weighted over the hidden pixels), versus a monthly-climatology ensemble (the training fields
of the same calendar month) as baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from geodiff.config import Recipe, load_recipe
from geodiff.quickstart import _atomic_netcdf, _atomic_text, _say, _write_json


def cloud_mask(valid: np.ndarray, fraction: float, rng: np.random.Generator,
               periodic: bool, scale: float = 3.0) -> np.ndarray:
    """Boolean (lat, lon) mask of ``fraction`` of the ``valid`` pixels as smooth blobs.

    White noise smoothed with a Gaussian of ``scale`` grid cells (wrapping in longitude on
    periodic grids), thresholded at the quantile that hides ``fraction`` of valid pixels.
    """
    from scipy.ndimage import gaussian_filter

    noise = rng.standard_normal(valid.shape)
    smooth = gaussian_filter(noise, sigma=scale, mode=("nearest", "wrap" if periodic
                                                      else "nearest"))
    cut = np.quantile(smooth[valid], 1.0 - fraction)
    return (smooth > cut) & valid


def climatology_ensemble(train: xr.DataArray, test: xr.DataArray) -> xr.DataArray:
    """Training fields of the same calendar month as each test field, NaN-padded members."""
    months_tr = train["time"].dt.month.values
    blocks = [train.isel(time=np.flatnonzero(months_tr == m)).values
              for m in test["time"].dt.month.values]
    m = max(b.shape[0] for b in blocks)
    arr = np.full((m, *test.shape), np.nan, np.float32)
    for j, b in enumerate(blocks):
        arr[: b.shape[0], j] = b
    return xr.DataArray(arr, dims=("member", *test.dims), coords=test.coords)


def run_gapfill_experiment(out: str | Path = "geodiff-ostia", *,
                           overrides: list[str] | None = None, device: str | None = None,
                           resume: bool = False, recipe: Recipe | None = None
                           ) -> dict[str, Any]:
    """Train, hide clouds in the held-out fields, fill them, score vs climatology."""
    from geodiff import analysis
    from geodiff.gapfill import fill_gaps
    from geodiff.grid import restore
    from geodiff.train import Trainer

    t0 = time.perf_counter()
    out = Path(out)
    recipe = recipe or load_recipe("ostia_gapfill", overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    _say(f"geodiff gap-filling experiment ({recipe.name}) -> {out.resolve()}")
    _say("1/4 training")
    trainer = Trainer(recipe, out / "run", device=device, resume=resume)
    result = trainer.fit()
    data = trainer.data
    var = recipe.data.variables[0]
    test = data.splits["test"][var].load()
    train = data.splits["train"][var].load()
    rng = np.random.default_rng(recipe.training.seed)
    valid = test.notnull().values
    hidden = np.stack([cloud_mask(valid[i], recipe.gapfill.cloud_fraction, rng,
                                  data.grid.periodic) for i in range(test.sizes["time"])])
    hidden_da = xr.DataArray(hidden, dims=test.dims, coords=test.coords)
    cloudy = test.where(~hidden_da)
    truth_path = _atomic_netcdf(restore(test.to_dataset(), data.grid), out / "truth.nc")
    cloudy_path = _atomic_netcdf(restore(cloudy.to_dataset(), data.grid), out / "cloudy.nc")

    _say(f"2/4 filling {int(hidden.sum())} hidden pixels in {test.sizes['time']} fields with "
         f"{recipe.sampling.members} members")
    t_fill = time.perf_counter()
    filled_path = out / "filled.nc"
    fill_gaps(out / "run", xr.open_dataset(cloudy_path), recipe.sampling.members,
              seed=recipe.training.seed, out=filled_path, overwrite=True, device=device)
    fill_seconds = time.perf_counter() - t_fill

    _say("3/4 scoring the filled pixels against the hidden truth")
    from geodiff.grid import standardize

    filled = standardize(xr.open_dataset(filled_path))[var].load()
    clim = climatology_ensemble(train, test)
    truth_hidden = test.where(hidden_da)  # scored where the clouds were hidden, only

    def hidden_mean(crps: xr.DataArray) -> np.ndarray:  # per field, weighted over hidden px
        return analysis.weighted_mean(crps.where(hidden_da), ("lat", "lon")).values

    g = hidden_mean(analysis.crps_fair(filled, test))
    c = hidden_mean(analysis.crps_fair(clim, test))
    boot = np.random.default_rng(0).integers(0, g.size, (2000, g.size))
    ratios = g[boot].mean(1) / c[boot].mean(1)
    m = filled.sizes["member"]
    summary = {
        "gapfill_crps_fair": float(g.mean()),
        "gapfill_crps_fair_climatology": float(c.mean()),
        "gapfill_crps_ratio_vs_climatology": float(g.mean() / c.mean()),
        "gapfill_crps_ratio_ci_low": float(np.quantile(ratios, 0.05)),
        "gapfill_crps_ratio_ci_high": float(np.quantile(ratios, 0.95)),
        "gapfill_spread_skill": float(analysis.spread_skill_ratio(filled, truth_hidden)),
        "gapfill_rmse": float(analysis.weighted_rmse(filled, truth_hidden)),
        "hidden_pixels": int(hidden.sum()),
        "fields": int(test.sizes["time"]),
        "members": int(m),
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "fill_seconds": round(fill_seconds, 1),
    }
    report = {"summary": summary, "meta": {"recipe": recipe.name, "truth": str(truth_path),
                                           "cloudy": str(cloudy_path),
                                           "filled": str(filled_path)}}
    _write_json(out / "report" / "scores.json", report)
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in summary.items())
    _atomic_text(out / "report" / "scores.md",
                 f"# {recipe.name}: gap filling scores\n\n| score | value |\n|---|---|\n{rows}\n")

    _say("4/4 maps")
    from geodiff import plot

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    ens = xr.open_dataset(filled_path)
    sel = {"time": ens["time"].values[0]}
    plot.plot_ensemble(ens, "members", figs / "filled_members.png", obs=xr.open_dataset(
        truth_path), sel=sel)
    plot.plot_ensemble(ens, "spread", figs / "filled_spread.png", sel=sel)
    plot.plot_ensemble(xr.open_dataset(cloudy_path).expand_dims(member=[0]), "members",
                       figs / "cloudy_input.png", sel=sel)
    _say(f"done in {time.perf_counter() - t0:.0f} s: gap-fill fair CRPS {g.mean():.3f} K vs "
         f"climatology {c.mean():.3f} K -> ratio {g.mean() / c.mean():.3f} "
         f"(90% CI {summary['gapfill_crps_ratio_ci_low']:.3f}-"
         f"{summary['gapfill_crps_ratio_ci_high']:.3f}); report {out / 'report'}")
    return summary
