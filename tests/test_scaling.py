"""Tests of geodiff.scaling.Scaler: exact statistics, anomalies, round trips, bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import cftime
import dask
import dask.array as dsa
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geodiff.config import ScalingConfig
from geodiff.scaling import Scaler

EPS32 = float(np.finfo(np.float32).eps)
ATTRS = {"units": "K", "standard_name": "air_temperature", "long_name": "Air temperature"}


def make_ds(*, n_scen: int = 2, n_time: int = 24, n_lat: int = 4, n_lon: int = 5,
            levels: tuple[float, ...] | None = None, nan_frac: float = 0.0, seed: int = 0,
            monthly: bool = False) -> xr.Dataset:
    """Canonical Dataset: dims (scenario, time, [level], lat, lon), coords year/dayofyear."""
    rng = np.random.default_rng(seed)
    if monthly:
        times = [cftime.Datetime360Day(2000 + i // 12, i % 12 + 1, 16) for i in range(n_time)]
    else:
        times = [cftime.Datetime360Day(1900 + i, 6, 1) for i in range(n_time)]
    lat = np.linspace(-60.0, 60.0, n_lat)
    lon = np.linspace(0.0, 300.0, n_lon)
    dims = ["scenario", "time", *(["level"] if levels else []), "lat", "lon"]
    shape = [n_scen, n_time, *([len(levels)] if levels else []), n_lat, n_lon]
    values = 280.0 + 10 * rng.standard_normal(shape)
    if nan_frac:
        values[rng.random(shape) < nan_frac] = np.nan
    coords = {"scenario": [f"S{i}" for i in range(n_scen)], "time": times, "lat": lat,
              "lon": lon, "year": ("time", [t.year for t in times]),
              "dayofyear": ("time", [t.dayofyr for t in times])}
    if levels:
        coords["level"] = list(levels)
    return xr.Dataset({"tas": (dims, values.astype(np.float32), dict(ATTRS))}, coords=coords)


def poly_residuals(x: np.ndarray, year: np.ndarray, degree: int) -> np.ndarray:
    """``x`` (scenario, time, lat, lon) minus its per-pixel least-squares polynomial in year
    (numpy's polyfit on the valid times of each pixel); NaN where ``x`` is NaN."""
    out = np.full_like(x, np.nan)
    for s in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                ok = np.isfinite(x[s, :, i, j])
                coef = np.polyfit(year[ok], x[s, ok, i, j], degree)
                out[s, :, i, j] = np.where(ok, x[s, :, i, j] - np.polyval(coef, year), np.nan)
    return out


def fit(ds: xr.Dataset, **cfg) -> Scaler:
    return Scaler.fit(ds, ScalingConfig(**cfg), ["tas"], ["scenario", "time"])


def anomaly(scaler: Scaler, ds: xr.Dataset) -> np.ndarray:
    """The anomaly ``x - mean field`` behind ``transform`` (minmax), up to float32 rounding."""
    stats = scaler.stats["tas"]
    return scaler.transform(ds)["tas"].values.astype(np.float64) * stats.half_range + stats.center


# -- range scaling, derived by hand -------------------------------------------------------
def test_minmax_maps_widened_range_to_unit_interval():
    ds = make_ds(n_scen=1, n_time=11, n_lat=1, n_lon=1)
    ds["tas"][:] = np.arange(11, dtype=np.float32).reshape(1, 11, 1, 1)  # 0..10
    z = fit(ds, method="minmax", margin=0.1).transform(ds)["tas"].values.ravel()
    # range [0, 10] widened by 1 on each side -> [-1, 11] -> [-1, 1]: z = (x - 5) / 6
    np.testing.assert_allclose(z, (np.arange(11) - 5) / 6, rtol=0, atol=EPS32)


def test_standard_maps_mean_plus_n_std_to_one():
    ds = make_ds(n_time=50, seed=1)
    z = fit(ds, method="standard", n_std=4.0).transform(ds)["tas"].values.astype(np.float64)
    assert abs(z.mean()) < 1e-6
    assert z.std() == pytest.approx(0.25, rel=1e-6)  # one std -> 1 / n_std


def test_quantile_range_matches_numpy_within_one_histogram_bin():
    ds = make_ds(n_time=60, nan_frac=0.1, seed=2)
    q = (0.01, 0.99)
    scaler = fit(ds, method="quantile", quantiles=q, margin=0.0)
    x = ds["tas"].values.astype(np.float64)
    lo, hi = np.nanquantile(x, q)
    bin_width = (np.nanmax(x) - np.nanmin(x)) / 2**16
    stats = scaler.stats["tas"]
    assert float(stats.center - stats.half_range) == pytest.approx(lo, abs=bin_width)
    assert float(stats.center + stats.half_range) == pytest.approx(hi, abs=bin_width)


def test_per_level_statistics_are_separate():
    ds = make_ds(n_scen=1, levels=(850.0, 500.0), seed=3)
    ds["tas"].loc[{"level": 500.0}] = ds["tas"].sel(level=500.0) * 10
    z = fit(ds, method="minmax", margin=0.0, per_level=True).transform(ds)["tas"]
    for lev in (850.0, 500.0):
        zl = z.sel(level=lev).values
        assert zl.min() == pytest.approx(-1.0, abs=4 * EPS32)
        assert zl.max() == pytest.approx(1.0, abs=4 * EPS32)
    z_all = fit(ds, method="minmax", margin=0.0, per_level=False).transform(ds)["tas"]
    assert float(z_all.sel(level=850.0).max()) < 0.0  # one range shared with the x10 level


def test_values_outside_training_range_are_not_clipped():
    ds = make_ds(seed=4)
    scaler = fit(ds, method="minmax", margin=0.0)
    hot = ds.copy(deep=True)
    hot["tas"][:] = float(ds["tas"].max()) + 100.0
    assert float(scaler.transform(hot)["tas"].min()) > 1.0


# -- anomalies --------------------------------------------------------------------------------
def test_trend_is_per_scenario_least_squares_polynomial_in_year():
    ds = make_ds(n_time=40, nan_frac=0.05, seed=5)
    year = ds["year"].values.astype(np.float64)
    ds["tas"] = ds["tas"] + xr.DataArray(
        np.stack([0.002 * (year - 1900) ** 2, -0.1 * (year - 1900)]), dims=("scenario", "time"))
    scaler = fit(ds, method="minmax", margin=0.0, anomaly="trend", trend_by="scenario",
                 trend_degree=3)
    stats = scaler.stats["tas"]
    a = anomaly(scaler, ds)
    expected = poly_residuals(ds["tas"].values.astype(np.float64), year, 3)
    np.testing.assert_allclose(a, expected, rtol=0, atol=4 * EPS32 * float(stats.half_range))


@pytest.mark.parametrize("lazy", [False, True])
def test_trend_smoothing_adds_leave_own_year_out_kernel_mean_of_residuals(lazy):
    ds = make_ds(n_time=40, nan_frac=0.05, seed=7)
    if lazy:
        ds = ds.chunk({"time": 7})
    b = 3.0
    scaler = fit(ds, method="minmax", margin=0.0, anomaly="trend", trend_by="scenario",
                 trend_degree=2, trend_smoothing=b)
    stats = scaler.stats["tas"]
    a = anomaly(scaler, ds)
    x = ds["tas"].values.astype(np.float64)
    year = ds["year"].values.astype(np.float64)
    resid = poly_residuals(x, year, 2)                            # (scenario, time, lat, lon)
    ok = np.isfinite(resid)
    d = year[:, None] - year[None, :]                              # (time k, time j)
    kern = np.exp(-0.5 * (d / b) ** 2) * (np.abs(d) <= 4 * b) * (d != 0)
    w = np.einsum("kj,sjab->skjab", kern, ok.astype(float))        # weights of j for k
    local = np.einsum("skjab,sjab->skab", w, np.where(ok, resid, 0.0)) / w.sum(2)
    expected = resid - local
    # local_field is stored as float32: relative 6e-8 of residuals ~10
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-5 * float(stats.half_range))
    # held-out years between and beyond the anchors: the closed form, nothing left out
    other = ds.isel(time=[3]).assign_coords(year=("time", [1903.5]))
    a_new = anomaly(scaler, other)
    s, i, j = 1, 2, 3
    ok = np.isfinite(x[s, :, i, j])
    r = x[s, :, i, j] - np.polyval(np.polyfit(year[ok], x[s, ok, i, j], 2), year)
    w = np.exp(-0.5 * ((year - 1903.5) / b) ** 2) * (np.abs(year - 1903.5) <= 4 * b) * ok
    trend = np.polyval(np.polyfit(year[ok], x[s, ok, i, j], 2), 1903.5)
    want = x[s, 3, i, j] - trend - (w * np.where(ok, r, 0)).sum() / w.sum()
    if np.isfinite(x[s, 3, i, j]):
        assert abs(a_new[s, 0, i, j] - want) < 1e-5 * float(stats.half_range)


def test_trend_smoothing_needs_trend_anomaly():
    from geodiff.config import ConfigError, recipe_from_dict
    with pytest.raises(ConfigError, match="trend_smoothing = 3.0 is invalid.*anomaly: trend"):
        recipe_from_dict({"name": "t", "data": {"source": "x.nc", "variables": ["tas"]},
                          "scaling": {"trend_smoothing": 3.0}})


def test_trend_without_trend_by_fits_one_curve_for_all_samples():
    ds = make_ds(n_time=30, seed=6)
    scaler = fit(ds, method="minmax", anomaly="trend", trend_degree=1)
    assert scaler.labels == ()
    assert scaler.stats["tas"].mean_field.shape == (1, 2, 4, 5)  # (label, degree + 1, lat, lon)


def test_climatology_subtracts_monthly_mean_per_pixel():
    ds = make_ds(n_scen=1, n_time=48, monthly=True, seed=7)
    scaler = fit(ds, method="minmax", margin=0.0, anomaly="climatology",
                 climatology_period="month")
    stats = scaler.stats["tas"]
    a = scaler.transform(ds)["tas"].values.astype(np.float64) * stats.half_range + stats.center
    x = ds["tas"].values.astype(np.float64).reshape(1, 4, 12, 4, 5)  # (scen, year, month, ...)
    expected = (x - x.mean(axis=1, keepdims=True)).reshape(1, 48, 4, 5)
    np.testing.assert_allclose(a, expected, rtol=0, atol=4 * EPS32 * float(stats.half_range))


def test_per_pixel_std_gives_unit_variance_anomaly_per_pixel():
    ds = make_ds(n_time=30, seed=8)
    ds["tas"] = ds["tas"] * xr.DataArray(np.arange(1, 6, dtype=np.float32), dims="lon")
    scaler = fit(ds, method="standard", n_std=1.0, anomaly="trend", trend_by="scenario",
                 per_pixel_std=True)
    z = scaler.transform(ds)["tas"].astype(np.float64)
    r = z * float(scaler.stats["tas"].half_range) + float(scaler.stats["tas"].center)
    np.testing.assert_allclose(r.std(["scenario", "time"]).values, 1.0, rtol=1e-5)


def test_log1p_round_trip_and_rejects_values_below_minus_one():
    ds = make_ds(seed=9)
    ds["tas"] = np.abs(ds["tas"] - 280.0) ** 2  # skewed, non-negative
    scaler = fit(ds, transform="log1p", method="minmax")
    back = scaler.inverse(scaler.transform(ds))["tas"].values
    np.testing.assert_allclose(back, ds["tas"].values, rtol=16 * EPS32, atol=1e-6)
    ds["tas"][0, 0, 0, 0] = -2.0
    with pytest.raises(ValueError, match="log1p"):
        fit(ds, transform="log1p")


# -- round trips --------------------------------------------------------------------------
CONFIGS = [
    dict(method="minmax"),
    dict(method="quantile", margin=0.0),
    dict(method="standard", anomaly="trend", trend_by="scenario", per_pixel_std=True,
         n_std=4.0, margin=0.0),
    dict(method="minmax", anomaly="climatology", climatology_period="dayofyear",
         per_pixel_std=True),
    dict(method="quantile", transform="log1p", anomaly="trend", trend_degree=2),
    dict(method="standard", anomaly="trend", trend_by="scenario", trend_smoothing=2.5,
         per_pixel_std=True),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16),
       nan_frac=st.sampled_from([0.0, 0.2]), scale=st.floats(1e-3, 1e4),
       offset=st.floats(0.0, 1e3))
def test_inverse_of_transform_is_identity_to_float32_precision(cfg, seed, nan_frac, scale,
                                                               offset):
    ds = make_ds(n_time=12, n_lat=3, n_lon=4, nan_frac=nan_frac, seed=seed)
    ds["tas"] = (np.abs(ds["tas"] - 280.0) * scale + offset).astype(np.float32)
    ds["tas"].attrs = dict(ATTRS)
    scaler = fit(ds, **cfg)
    back = scaler.inverse(scaler.transform(ds))["tas"]
    x = ds["tas"].values
    np.testing.assert_array_equal(np.isnan(back.values), np.isnan(x))
    # z is float32: |z| <~ 2 carries 2 eps relative error, mapped back through the pipeline
    tol = 32 * EPS32 * (np.nanmax(np.abs(x)) + 1.0)
    np.testing.assert_allclose(back.values, x, rtol=0, atol=tol)
    assert back.dtype == np.float32 and back.attrs == ATTRS


@pytest.mark.parametrize("cfg", CONFIGS)
def test_json_round_trip_gives_bit_identical_transforms(cfg):
    ds = make_ds(n_time=15, nan_frac=0.1, seed=11)
    ds["tas"] = np.abs(ds["tas"] - 280.0)
    ds["tas"].attrs = dict(ATTRS)
    scaler = fit(ds, **cfg)
    text = json.dumps(scaler.to_dict())
    again = Scaler.from_dict(json.loads(text))
    assert json.dumps(again.to_dict()) == text
    z1, z2 = scaler.transform(ds)["tas"].values, again.transform(ds)["tas"].values
    assert z1.tobytes() == z2.tobytes()
    i1, i2 = scaler.inverse(scaler.transform(ds)), again.inverse(again.transform(ds))
    assert i1["tas"].values.tobytes() == i2["tas"].values.tobytes()


def test_inverse_of_ensemble_with_member_dim_and_lazy_input():
    ds = make_ds(n_time=20, seed=12)
    scaler = fit(ds, method="standard", anomaly="trend", trend_by="scenario",
                 per_pixel_std=True)
    z = scaler.transform(ds)
    ens = xr.concat([z, z], dim="member").chunk({"time": 5})  # (member, scenario, time, ...)
    back = scaler.inverse(ens)
    assert back["tas"].chunks is not None  # stays lazy
    assert back["tas"].dims == ("member", "scenario", "time", "lat", "lon")
    np.testing.assert_allclose(back["tas"].isel(member=1).values, ds["tas"].values,
                               rtol=8 * EPS32)
    assert back["tas"].attrs["units"] == "K"


@pytest.mark.parametrize("smoothing", [None, 2.0])
def test_transform_of_one_level_subset(smoothing):
    ds = make_ds(n_scen=1, levels=(850.0, 500.0, 250.0), seed=13)
    scaler = fit(ds, method="minmax", per_level=True, anomaly="trend", per_pixel_std=True,
                 trend_smoothing=smoothing)
    full = scaler.transform(ds)["tas"].sel(level=[500.0])
    part = scaler.transform(ds.sel(level=[500.0]).chunk({"time": 5}))["tas"]
    assert part.values.tobytes() == full.values.tobytes()


# -- errors -----------------------------------------------------------------------------------
def test_inverse_without_needed_coordinate_names_it():
    ds = make_ds(seed=14)
    scaler = fit(ds, anomaly="trend", trend_by="scenario")
    z = scaler.transform(ds).drop_vars(["year", "time"])
    with pytest.raises(ValueError, match="'year'"):
        scaler.inverse(z)


def test_unseen_label_is_named_with_the_known_ones():
    ds = make_ds(seed=15)
    scaler = fit(ds, anomaly="trend", trend_by="scenario")
    z = scaler.transform(ds).assign_coords(scenario=["S0", "B2"])
    with pytest.raises(ValueError, match=r"\['B2'\].*\['S0', 'S1'\]"):
        scaler.inverse(z)


def test_unseen_month_and_other_grid_are_rejected():
    ds = make_ds(n_scen=1, n_time=6, monthly=True, seed=16)  # months 1..6 only
    scaler = fit(ds, anomaly="climatology")
    later = make_ds(n_scen=1, n_time=12, monthly=True, seed=16)
    with pytest.raises(ValueError, match="month=\\[7, 8, 9, 10, 11, 12\\]"):
        scaler.transform(later)
    with pytest.raises(ValueError, match="coordinate 'lat'"):
        scaler.transform(ds.assign_coords(lat=ds["lat"] + 1.0))
    with pytest.raises(ValueError, match="none of the fitted variables"):
        scaler.transform(ds.rename(tas="pr"))


def test_all_nan_variable_cannot_be_fitted():
    ds = make_ds(seed=17)
    ds["tas"][:] = np.nan
    with pytest.raises(ValueError, match="no finite values"):
        fit(ds)


@pytest.mark.parametrize("method", ["minmax", "standard", "quantile"])
def test_all_nan_level_names_the_level_and_the_levels_to_keep(method):
    """A level without data in the training split (below ground): a clear error, not
    numpy's 'supplied range of [nan, nan] is not finite' from the quantile histogram."""
    ds = make_ds(levels=(1000.0, 850.0, 500.0), seed=18)
    ds["tas"][:, :, 0] = np.nan
    with pytest.raises(ValueError, match=r"'tas' has no finite values in the training split at "
                                         r"level=\[1000.0\].*levels=\[850.0, 500.0\]"):
        fit(ds, method=method)


def _char_label_file(path) -> xr.Dataset:
    """A NetCDF file whose 'scenario' labels are a char array without ``_Encoding`` (as
    non-xarray tools write them): xarray opens them as bytes (dtype S3)."""
    import netCDF4

    rng = np.random.default_rng(19)
    with netCDF4.Dataset(path, "w") as nc:
        for dim, n in (("scenario", 2), ("time", 6), ("lat", 3), ("lon", 4), ("strlen", 3)):
            nc.createDimension(dim, n)
        s = nc.createVariable("scenario", "S1", ("scenario", "strlen"))
        s[:] = netCDF4.stringtochar(np.array(["A1B", "E1 "], "S3"))
        t = nc.createVariable("time", "f8", ("time",))
        t.units, t.calendar = "days since 2000-01-01", "360_day"
        t[:] = np.arange(6) * 360
        nc.createVariable("lat", "f8", ("lat",))[:] = [-10.0, 0.0, 10.0]
        nc.createVariable("lon", "f8", ("lon",))[:] = [0.0, 90.0, 180.0, 270.0]
        nc.createVariable("tas", "f4", ("scenario", "time", "lat", "lon"))[:] = (
            280 + rng.standard_normal((2, 6, 3, 4)))
    ds = xr.open_dataset(path)
    assert ds.scenario.dtype == "S3"
    return ds.assign_coords(year=ds.time.dt.year)


def test_char_array_labels_are_decoded_to_str_and_serialise(tmp_path):
    ds = _char_label_file(tmp_path / "scen.nc")
    scaler = fit(ds, anomaly="trend", trend_by="scenario", trend_degree=1)
    assert scaler.labels == ("A1B", "E1 ")
    back = Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert back.labels == ("A1B", "E1 ")
    z = back.transform(ds)  # bytes labels of the data find their str labels
    xr.testing.assert_allclose(back.inverse(z)["tas"], ds["tas"], rtol=0, atol=1e-4)
    # each scenario gets its own least-squares line: anomalies average to 0 over time
    np.testing.assert_allclose(anomaly(back, ds).mean(axis=1), 0.0, atol=1e-5)


def test_labels_that_cannot_be_stored_fail_at_fit_not_at_checkpoint():
    ds = make_ds(seed=20)
    runs = [cftime.Datetime360Day(2000, 1, 1), cftime.Datetime360Day(2001, 1, 1)]
    ds = ds.assign_coords(scenario=np.array(runs, dtype=object))
    with pytest.raises(ValueError, match=r"scaling.trend_by: coordinate 'scenario' has values "
                                         r".* of type Datetime360Day.*astype\(str\)"):
        fit(ds, anomaly="trend", trend_by="scenario", trend_degree=1)


# -- bounded memory on a larger-than-cap Zarr store ---------------------------------------
def test_fit_on_zarr_store_larger_than_memory_cap(tmp_path):
    """Fit streams a 210 MB store in 2 MB chunks; the traced peak stays under a 50 MB cap.

    tracemalloc sees every numpy buffer (numpy reports its allocations to it), so its peak
    bounds the arrays alive at once; a fit that loaded the store would need >= 420 MB (the
    float64 copy). Three passes run: trend normal equations, min/max, 65536-bin histogram.
    """
    n_time, n_lat, n_lon = 1600, 128, 256  # 1600 * 128 * 256 * 4 B = 210 MB of float32
    rng = dsa.random.default_rng(0)
    values = 280.0 + rng.standard_normal((n_time, n_lat, n_lon), chunks=(16, n_lat, n_lon),
                                         dtype=np.float32)
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), values, dict(ATTRS))},
        coords={"time": np.arange(n_time), "year": ("time", 1850 + np.arange(n_time) // 8),
                "lat": np.linspace(-89.0, 89.0, n_lat), "lon": np.linspace(0, 358.6, n_lon)})
    store = tmp_path / "big.zarr"
    ds.to_zarr(store, zarr_format=3, consolidated=False,
               encoding={"tas": {"compressors": None}})  # uncompressed: 210 MB on disk
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert store_bytes > 200e6
    lazy = xr.open_zarr(store, consolidated=False)
    cfg = ScalingConfig(method="quantile", anomaly="trend", trend_degree=1)
    with dask.config.set(num_workers=2):
        tracemalloc.start()
        scaler = Scaler.fit(lazy, cfg, ["tas"], ["time"])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"
    # N(0, 1) noise: the 0.1 % / 99.9 % quantiles are -+3.0902; with 5.2e7 values their
    # standard error is 0.0013 (0.04 %), a linear trend removes 0.06 % of the std: 0.5 % is
    # more than 10 standard errors, the histogram bin (1.7e-4) is far below it.
    stats = scaler.stats["tas"]
    assert float(stats.center) == pytest.approx(0.0, abs=0.015)
    assert float(stats.half_range) == pytest.approx(3.0902 * (1 + 2 * cfg.margin), rel=5e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_arrays_are_stored_exactly_as_base64(dtype):
    from geodiff.scaling import _decode, _encode
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((3, 50, 40)).astype(dtype) * 1e3
    arr[0, 1, 2] = np.nan
    enc = json.loads(json.dumps(_encode(arr)))
    assert "base64" in enc
    back = _decode(enc)
    assert back.dtype == dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()


# -- values no statistic may see -----------------------------------------------------------
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(per_pixel_std=True),
                                 dict(anomaly="trend", per_pixel_std=True),
                                 dict(anomaly="trend"), dict(anomaly="climatology",
                                                             climatology_period="dayofyear"),
                                 dict(method="standard")])
def test_one_infinite_value_is_named_not_a_silently_lost_pixel(cfg, lazy):
    """A single +inf used to turn its pixel's trend / std into NaN, so fit succeeded and the
    whole time series of that pixel came out NaN (or the error said "no finite values")."""
    ds = make_ds(n_time=12, seed=21)
    ds["tas"][0, 3, 1, 2] = np.inf
    if lazy:
        ds = ds.chunk({"time": 4})
    with pytest.raises(ValueError, match=r"variable 'tas' has 1 infinite values.*"
                                         r"where\(np.isfinite"):
        fit(ds, **cfg)


@pytest.mark.parametrize("cfg", [dict(transform="log1p"), dict()])
def test_fit_reads_a_dask_source_once_with_its_value_checks(cfg):
    """The log1p (> -1) and infinity checks ride along with the first statistic: a plain
    min-max fit reads every chunk of a dask source once (the log1p check was a pass)."""
    reads = []

    def source(block):
        if block.size:  # not dask's zero-size probe for the output type
            reads.append(block.shape)
        return np.abs(np.random.default_rng(len(reads)).standard_normal(block.shape)
                      ).astype(np.float32)

    base = dsa.zeros((12, 4, 5), chunks=(3, 4, 5), dtype=np.float32)
    ds = xr.Dataset({"tas": (("time", "lat", "lon"),
                             base.map_blocks(source, dtype=np.float32), dict(ATTRS))},
                    coords={"time": np.arange(12), "lat": np.linspace(-60, 60, 4),
                            "lon": np.linspace(0, 288, 5)})
    Scaler.fit(ds, ScalingConfig(**cfg), ["tas"], ["time"])
    assert len(reads) == 4
    ds = ds.load()
    ds["tas"][2, 1, 1] = -3.0
    if cfg:
        with pytest.raises(ValueError, match="log1p.*'tas' has 1 values <= -1"):
            Scaler.fit(ds.chunk({"time": 3}), ScalingConfig(**cfg), ["tas"], ["time"])


def test_other_latitude_order_or_longitude_convention_names_the_fix():
    """Descending latitude or -180..180 longitudes against a 0..360 fit used to say "regrid
    first", which is the wrong fix; the message now shows both grids and the conversion."""
    ds = make_ds(n_scen=1, n_time=6, seed=22)  # lat -60..60, lon 0..300
    scaler = fit(ds)
    with pytest.raises(ValueError, match=r"coordinate 'lat' has 4 values 60 \.\. -60, but the "
                                         r"scaler was fitted on 4 values -60 \.\. 60; the "
                                         r"same values in another order.*sortby\('lat'\)"):
        scaler.transform(ds.isel(lat=slice(None, None, -1)))
    west = ds.assign_coords(lon=(ds.lon + 180) % 360 - 180).sortby("lon")
    with pytest.raises(ValueError, match=r"'lon' has 5 values -135 \.\. 150.*another "
                                         r"convention.*lon=ds.lon % 360\)\.sortby\('lon'\)"):
        scaler.transform(west)
    fixed = west.assign_coords(lon=west.lon % 360).sortby("lon")  # the advice works
    np.testing.assert_array_equal(scaler.transform(fixed)["tas"].values,
                                  scaler.transform(ds)["tas"].values)
    with pytest.raises(ValueError, match="regrid to the fitted grid"):
        scaler.transform(ds.isel(lat=slice(1, None)))
