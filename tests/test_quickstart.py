"""Pieces of the quickstart and gap-filling experiments: analog baseline, scores,
artificial clouds, climatology ensemble (the full jobs are the README's first command)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from geodiff.gapfill_eval import climatology_ensemble, cloud_mask
from geodiff.quickstart import analog_ensemble


def _fields(years, scenarios=("A1B", "E1"), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(len(scenarios), len(years), 3, 4)).astype(np.float32)
    return xr.Dataset({"tas": (("scenario", "time", "lat", "lon"), data)},
                      coords={"scenario": list(scenarios), "time": np.arange(len(years)),
                              "year": ("time", np.asarray(years)), "lat": [0.0, 1.0, 2.0],
                              "lon": [0.0, 1.0, 2.0, 3.0]})


def test_analog_ensemble_uses_same_scenario_within_ten_years():
    years = list(range(1860, 1900))
    train_years = [y for y in years if y % 10 != 5]
    test_years = [y for y in years if y % 10 == 5]
    full = _fields(years)
    train = full.isel(time=[years.index(y) for y in train_years])
    test = full.isel(time=[years.index(y) for y in test_years])
    ana = analog_ensemble(train, test, "tas")
    counts = ana["tas"].notnull().all(("lat", "lon")).sum("member")
    # 1865: 1860..1875 minus 1865, 1875 held out -> 14; 1875: 1865..1885 minus 3 -> 18;
    # 1895 (data ends 1899): 1885..1899 minus 1885, 1895 -> 13
    assert counts.sel(scenario="A1B").values.tolist() == [14, 18, 18, 13]
    m = int(counts.sel(scenario="E1").values[1])
    got = np.sort(ana["tas"].sel(scenario="E1").isel(time=1).values[:m, 0, 0])
    want_years = [y for y in train_years if abs(y - 1875) <= 10]
    want = np.sort(full["tas"].sel(scenario="E1").isel(
        time=[years.index(y) for y in want_years]).values[:, 0, 0])
    np.testing.assert_array_equal(got, want)


def test_quickstart_scores_pair_fields_whatever_the_dim_order(tmp_path):
    # the same ensemble as "geodiff" (dims member, time, scenario) and as the analog
    # (member, scenario, time): every bootstrap resample of paired fields has ratio exactly 1
    from geodiff.quickstart import quickstart_scores
    rng = np.random.default_rng(4)
    ens = xr.DataArray(rng.normal(size=(6, 2, 5, 3, 4)) * rng.uniform(0.2, 3, (1, 2, 5, 1, 1)),
                       dims=("member", "scenario", "time", "lat", "lon"),
                       coords={"scenario": ["A1B", "E1"], "time": np.arange(5),
                               "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1.0, 2.0, 3.0]})
    obs = ens.isel(member=0) + rng.normal(size=ens.shape[1:])
    ens.transpose("member", "time", "scenario", "lat", "lon").to_dataset(name="tas").to_netcdf(
        tmp_path / "ens.nc")
    ens.to_dataset(name="tas").to_netcdf(tmp_path / "analog.nc")
    obs.to_dataset(name="tas").to_netcdf(tmp_path / "obs.nc")
    s = quickstart_scores(tmp_path / "ens.nc", tmp_path / "obs.nc", tmp_path / "analog.nc",
                          tmp_path / "report", "tas")["summary"]
    assert s["crps_ratio_vs_analog"] == pytest.approx(1.0, abs=1e-12)
    assert s["crps_ratio_ci_low"] == pytest.approx(1.0, abs=1e-12)
    assert s["crps_ratio_ci_high"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_cloud_mask_hides_the_requested_fraction_of_valid_pixels(fraction):
    valid = np.ones((18, 96), bool)
    valid[:, :20] = False  # land
    mask = cloud_mask(valid, fraction, np.random.default_rng(0), periodic=True)
    assert not (mask & ~valid).any()
    assert abs(mask[valid].mean() - fraction) <= 1.0 / valid.sum() + 1e-9
    # blobs, not salt-and-pepper: most hidden pixels have a hidden neighbour
    neighbour = np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
    assert (mask & neighbour).sum() > 0.8 * mask.sum()


def test_climatology_ensemble_takes_same_calendar_month():
    time = xr.date_range("2006-01-01", periods=36, freq="MS")
    da = xr.DataArray(np.arange(36.0)[:, None] * np.ones((1, 2)), dims=("time", "lon"),
                      coords={"time": time})
    train, test = da.isel(time=slice(0, 30)), da.isel(time=slice(30, 36))
    clim = climatology_ensemble(train, test)
    # test month 2008-07 (index 30): training Julys are indices 6 and 18
    assert sorted(clim.isel(time=0, lon=0).dropna("member").values.tolist()) == [6.0, 18.0]
    # 2008-01 is not in test; 2008-07..12 each have 2 training fields
    assert int(clim.notnull().all("lon").sum("member").min()) == 2


def test_quickstart_end_to_end_writes_the_formats_of_the_recipe(tmp_path):
    # the whole job on the real bundled data, shrunk to seconds: 2 training steps, 2 members,
    # 1 sampler step; output.formats = [zarr] gives the Zarr ensemble only
    from geodiff.quickstart import run_quickstart

    summary = run_quickstart(tmp_path / "qs", overrides=[
        "training.steps=2", "training.max_time_s=null", "training.checkpoint_every=2",
        "training.val_every=2", "sampling.members=2", "sampling.steps=1",
        "output.formats=[zarr]"], device="cpu")
    out = tmp_path / "qs"
    assert (out / "ensemble.zarr").is_dir() and not (out / "ensemble.nc").exists()
    ens = xr.open_zarr(out / "ensemble.zarr")
    assert ens.sizes["member"] == 2 and ens["air_temperature"].attrs["units"] == "K"
    assert summary["train_steps"] == 2 and np.isfinite(summary["crps_ratio_vs_analog"])
    assert len(list((out / "figures").glob("*.png"))) == 7
