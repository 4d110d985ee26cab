"""Tests of geodiff.data: time splits, padding, condition vectors and FieldDataset items."""

from __future__ import annotations

import json
import math

import cftime
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from geodiff.config import ConditioningConfig, SplitConfig
from geodiff.data import (
    ConditionSpec,
    FieldDataset,
    Padding,
    collate,
    compute_padding,
    split_dataset,
)

SAMPLE_DIMS = ("scenario", "time")


def make_ds(*, n_scen: int = 2, n_time: int = 20, n_lat: int = 5, n_lon: int = 6,
            first_year: int = 1860, levels: tuple[float, ...] | None = None,
            nan_frac: float = 0.0, seed: int = 0, calendar: str = "360_day") -> xr.Dataset:
    """Canonical Dataset: (scenario, time, [level], lat, lon) with year/dayofyear coords."""
    rng = np.random.default_rng(seed)
    times = [cftime.datetime(first_year + i, 7, 1, calendar=calendar) for i in range(n_time)]
    dims = ["scenario", "time", *(["level"] if levels else []), "lat", "lon"]
    shape = [n_scen, n_time, *([len(levels)] if levels else []), n_lat, n_lon]
    values = rng.standard_normal(shape).astype(np.float32)
    if nan_frac:
        values[rng.random(shape) < nan_frac] = np.nan
    coords = {"scenario": [f"S{i}" for i in range(n_scen)], "time": times,
              "lat": np.linspace(-40.0, 40.0, n_lat), "lon": np.linspace(0.0, 50.0, n_lon),
              "year": ("time", [t.year for t in times]),
              "dayofyear": ("time", [t.dayofyr for t in times])}
    if levels:
        coords["level"] = list(levels)
    return xr.Dataset({"tas": (dims, values)}, coords=coords)


# -- splits -----------------------------------------------------------------------------------
def test_year_modulo_split_holds_out_years_ending_in_5_and_takes_val_from_the_end():
    ds = make_ds(n_time=30)  # 1860..1889
    parts = split_dataset(ds, SplitConfig(kind="year_modulo", modulo=10, remainder=5,
                                          val_fraction=0.1), SAMPLE_DIMS)
    assert parts["test"]["year"].values.tolist() == [1865, 1875, 1885]
    rest = [y for y in range(1860, 1890) if y % 10 != 5]
    assert parts["val"]["year"].values.tolist() == rest[-3:]  # round(0.1 * 27) = 3
    assert parts["train"]["year"].values.tolist() == rest[:-3]
    no_val = split_dataset(ds, SplitConfig(kind="year_modulo", val_fraction=0.0), SAMPLE_DIMS)
    assert no_val["val"].sizes["time"] == 0 and no_val["train"].sizes["time"] == 27


def test_fraction_split_is_chronological():
    ds = make_ds(n_time=20).isel(time=np.random.default_rng(0).permutation(20))
    parts = split_dataset(ds, SplitConfig(kind="fraction", val_fraction=0.1,
                                          test_fraction=0.2), SAMPLE_DIMS)
    years = {k: sorted(v["year"].values.tolist()) for k, v in parts.items()}
    assert years == {"train": list(range(1860, 1874)), "val": [1874, 1875],
                     "test": list(range(1876, 1880))}


@pytest.mark.parametrize("calendar", ["360_day", "noleap", "datetime64"])
def test_time_ranges_are_inclusive_and_calendar_aware(calendar):
    ds = make_ds(n_time=10, calendar="360_day" if calendar == "datetime64" else calendar)
    if calendar == "datetime64":
        ds = ds.assign_coords(time=[np.datetime64(f"{1860 + i}-07-01") for i in range(10)])
    split = SplitConfig(kind="time_ranges", train=("1860-01-01", "1865-12-30"),
                        test=("1866", "1869"))
    parts = split_dataset(ds, split, SAMPLE_DIMS)
    assert parts["train"]["year"].values.tolist() == list(range(1860, 1866))
    assert parts["test"]["year"].values.tolist() == list(range(1866, 1870))
    assert parts["val"].sizes["time"] == 0
    overlapping = SplitConfig(kind="time_ranges", train=("1860", "1866"), test=("1866", "1869"))
    with pytest.raises(ValueError, match="overlap"):
        split_dataset(ds, overlapping, SAMPLE_DIMS)


def test_empty_train_split_and_missing_time_are_errors():
    ds = make_ds(n_time=3)
    with pytest.raises(ValueError, match="train split is empty"):
        split_dataset(ds, SplitConfig(kind="time_ranges", train=("1900", "1950")), SAMPLE_DIMS)
    with pytest.raises(ValueError, match="along 'time'"):
        split_dataset(ds, SplitConfig(), ("scenario",))


# -- padding ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), multiple=st.sampled_from([1, 2, 4, 8, 16]),
       periodic=st.booleans(), mode=st.sampled_from(["replicate", "reflect"]))
def test_crop_of_apply_is_identity(h, w, multiple, periodic, mode):
    pad = compute_padding(h, w, multiple, periodic, mode=mode)
    t = torch.randn(2, 3, h, w)
    padded = pad.apply(t)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert padded.shape[-2] - h < multiple and padded.shape[-1] - w < multiple
    assert torch.equal(pad.crop(padded), t)
    assert pad.padded_shape(h, w) == tuple(padded.shape[-2:])


def test_padding_modes_match_torch_and_wrap_longitude():
    t = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    pad = Padding(lat_before=1, lat_after=2, lon_before=2, lon_after=1, mode="circular")
    out = pad.apply(t)
    expected = F.pad(F.pad(t, (2, 1, 0, 0), mode="circular"), (0, 0, 1, 2), mode="replicate")
    assert torch.equal(out, expected)
    assert torch.equal(out[0, 0, 1, :2], t[0, 0, 0, -2:])  # columns wrap around
    refl = Padding(1, 2, 2, 1, mode="reflect", lat_mode="reflect").apply(t)
    assert torch.equal(refl, F.pad(t, (2, 1, 1, 2), mode="reflect"))


def test_compute_padding_of_the_quickstart_grid():
    assert compute_padding(37, 49, 4, periodic=False) == Padding(1, 2, 1, 2, "replicate")
    assert compute_padding(36, 144, 4, periodic=True) == Padding(0, 0, 0, 0, "circular")
    p = compute_padding(37, 49, 4, periodic=True)
    assert Padding.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="mode"):
        compute_padding(5, 5, 2, False, mode="circular")


# -- condition spec -----------------------------------------------------------------------
def test_condition_vector_by_hand():
    ds = make_ds(n_time=11)  # years 1860..1870 -> center 1865, scale 5
    cfg = ConditioningConfig(year=True, day_of_year=True, labels=("scenario",))
    spec = ConditionSpec.from_config(cfg, ds)
    assert spec.dim == 5 and spec.calendar == "360_day"
    assert spec.names == ["year", "sin_dayofyear", "cos_dayofyear", "scenario=S0",
                          "scenario=S1"]
    v = spec.vector({"year": 1868, "dayofyear": 91, "scenario": np.str_("S1")})
    phase = 2 * math.pi * 90 / 360  # 360_day calendar: day 91 is a quarter of the year
    np.testing.assert_allclose(v, [0.6, math.sin(phase), math.cos(phase), 0.0, 1.0],
                               atol=1e-7)
    assert v.dtype == np.float32
    again = ConditionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_condition_vector_from_time_alone_uses_the_leap_year():
    spec = ConditionSpec(day_of_year=True, calendar="standard")
    v = spec.vector({"time": np.datetime64("2000-12-31")})  # day 366 of a leap year
    phase = 2 * math.pi * 365 / 366
    np.testing.assert_allclose(v, [math.sin(phase), math.cos(phase)], atol=1e-7)


def test_check_names_unseen_labels_and_years_outside_the_range():
    ds = make_ds(n_time=101)  # 1860..1960, tolerance 10 years
    spec = ConditionSpec.from_config(ConditioningConfig(year=True, labels=("scenario",)), ds)
    spec.check({"year": 1970, "scenario": "S0"})
    with pytest.raises(ValueError, match=r"scenario=\['B2'\].*\['S0', 'S1'\]"):
        spec.check({"year": 1900, "scenario": np.array(["S0", "B2"])})
    with pytest.raises(ValueError, match=r"year=\[1971.0\].*1850..1970"):
        spec.check({"year": [1900, 1971], "scenario": "S1"})
    with pytest.raises(ValueError, match="'scenario'"):
        spec.check({"year": 1900})
    with pytest.raises(ValueError, match="not seen"):
        spec.vector({"year": 1900, "scenario": "B2"})


def test_char_array_labels_are_str_in_the_spec_and_match_bytes_coordinates():
    """Labels stored as NetCDF char arrays open as bytes (dtype S2): the spec holds str (JSON)
    and still recognises the bytes values of the data."""
    ds = make_ds(n_time=4).assign_coords(scenario=np.array([b"S0", b"S1"]))
    cfg = ConditioningConfig(labels=("scenario",))
    spec = ConditionSpec.from_config(cfg, ds)
    assert spec.label_values == (("S0", "S1"),)
    assert ConditionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    np.testing.assert_array_equal(spec.vector({"scenario": np.bytes_(b"S1")}), [0.0, 1.0])
    np.testing.assert_array_equal(spec.vector({"scenario": b"S0"}), [1.0, 0.0])
    spec.check({"scenario": ds["scenario"]})
    fd = FieldDataset(ds, ["tas"], SAMPLE_DIMS, spec, cfg, Padding())
    assert fd.sample_coords(5)["scenario"] == "S1"
    np.testing.assert_array_equal(fd[5]["cond"].numpy(), [0.0, 1.0])
    dates = np.array([cftime.Datetime360Day(2000, 1, 1), cftime.Datetime360Day(2001, 1, 1)])
    with pytest.raises(ValueError, match=r"conditioning.labels: coordinate 'scenario' has "
                                         r"values .* of type Datetime360Day"):
        ConditionSpec.from_config(cfg, ds.assign_coords(scenario=dates))


# -- FieldDataset -----------------------------------------------------------------------------
def build(ds: xr.Dataset, *, multiple: int = 4, cond: ConditioningConfig | None = None,
          **kwargs) -> FieldDataset:
    cond = cond or ConditioningConfig(year=True, labels=("scenario",))
    spec = ConditionSpec.from_config(cond, ds)
    pad = compute_padding(ds.sizes["lat"], ds.sizes["lon"], multiple, periodic=False)
    return FieldDataset(ds, ["tas"], SAMPLE_DIMS, spec, cond, pad, **kwargs)


def test_item_shapes_values_weights_and_coordinate_channels():
    ds = make_ds(nan_frac=0.2, seed=1)
    fd = build(ds)
    assert len(fd) == 40 and fd.channel_names == ["tas"]
    assert fd.field_names == ["sin_lat", "cos_lat", "sin_lon", "cos_lon", "mask"]
    item = fd[23]  # scenario 1, time 3
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "x": (1, 8, 8), "weight": (1, 8, 8), "fields": (5, 8, 8), "cond": (3,), "index": ()}
    assert fd.sample_coords(23)["scenario"] == "S1" and fd.sample_coords(23)["year"] == 1863
    raw = ds["tas"].isel(scenario=1, time=3).values  # (5, 6) inside rows 1..5, cols 1..6
    inner = (slice(1, 6), slice(1, 7))
    x, w, f = item["x"][0].numpy(), item["weight"][0].numpy(), item["fields"].numpy()
    valid = ~np.isnan(raw)
    np.testing.assert_array_equal(x[inner], np.where(valid, raw, 0.0))
    cos = np.cos(np.deg2rad(ds["lat"].values))
    np.testing.assert_allclose(w[inner], (cos / cos.mean())[:, None] * valid, rtol=1e-6)
    assert w.sum() == pytest.approx(w[inner].sum()) and w[0].sum() == 0 == w[:, 0].sum()
    np.testing.assert_array_equal(f[4][inner], valid.astype(np.float32))
    lat = np.deg2rad(np.linspace(-60.0, 60.0, 7)[:, None])  # 20 deg steps, padded rows too
    np.testing.assert_allclose(f[0][:7], np.broadcast_to(np.sin(lat), (7, 8)), atol=1e-6)
    np.testing.assert_allclose(f[3][0, :7], np.cos(np.deg2rad(np.arange(-10, 60, 10))),
                               atol=1e-6)
    np.testing.assert_allclose(item["cond"].numpy(), [(1863 - 1869.5) / 9.5, 0, 1], atol=1e-6)
    assert int(item["index"]) == 23


def test_levels_become_channels_and_static_and_condition_fields_are_inputs():
    ds = make_ds(n_scen=1, levels=(850.0, 500.0), seed=2)
    ds["pr"] = ds["tas"].isel(level=0) * 2
    static = xr.Dataset({"orog": (("lat", "lon"), np.arange(30.0).reshape(5, 6))},
                        coords={"lat": ds["lat"], "lon": ds["lon"]})
    cond = ConditioningConfig(coord_channels=False, fields=("pr",), static_fields=("orog",))
    fd = build(ds, cond=cond, static=static)
    assert fd.channel_names == ["tas@850", "tas@500"]
    assert fd.field_names == ["orog", "pr"] and fd.n_fields == 2
    assert fd.condition_channels == ["pr"]  # the per-sample fields come last
    item = fd[4]
    assert item["x"].shape == (2, 8, 8) and item["cond"].shape == (0,)
    np.testing.assert_array_equal(item["x"][1, 1:6, 1:7].numpy(),
                                  ds["tas"].isel(scenario=0, time=4, level=1).values)
    orog = static["orog"].values
    orog_std = (orog - orog.mean()) / orog.std()  # static fields enter standardised
    np.testing.assert_allclose(item["fields"][0, 1:6, 1:7].numpy(), orog_std, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(item["fields"][1, 1:6, 1:7].numpy(),
                                  ds["pr"].isel(scenario=0, time=4).values)
    np.testing.assert_allclose(item["fields"][0, 0, 1:7].numpy(), orog_std[0], rtol=1e-5,
                               atol=1e-6)
    # streamed through dask (one chunk per sample): the same items, batch by batch
    streamed = build(ds.chunk({"time": 1}), cond=cond, static=static, memory_budget_gb=0.0)
    assert not streamed.in_memory
    for batch in ([4], [0, 7, 3], list(range(len(fd)))):
        for got, ref in zip(streamed.__getitems__(batch), fd.__getitems__(batch), strict=True):
            for key in ("x", "weight", "fields", "cond", "index"):
                assert torch.equal(got[key], ref[key]), key


def test_static_fields_are_standardised_and_taken_at_the_data_grid(tmp_path):
    """A global orography file stored north to south in -180..180 gives the data grid's
    values (regional, 0..50 E, south to north) in the right place; another grid is refused."""
    ds = make_ds(n_scen=1, seed=5)  # lat -40..40 (5), lon 0..50 (6)
    lat, lon = np.linspace(40.0, -40.0, 5), np.arange(-180.0, 180.0, 10.0)
    orog = 1000.0 * lat[:, None] + lon[None, :]  # (lat, lon): where each value comes from
    xr.Dataset({"orog": (("latitude", "longitude"), orog)},
               coords={"latitude": ("latitude", lat, {"units": "degrees_north"}),
                       "longitude": ("longitude", lon, {"units": "degrees_east"})}
               ).to_netcdf(tmp_path / "orog.nc")
    static = xr.open_dataset(tmp_path / "orog.nc")
    cond = ConditioningConfig(coord_channels=False, static_fields=("orog",))
    fd = build(ds, cond=cond, multiple=1, static=static)
    expect = 1000.0 * ds["lat"].values[:, None] + ds["lon"].values[None, :]
    expect = (expect - expect.mean()) / expect.std()  # standardised over the data grid
    got = fd[0]["fields"][0].numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert abs(float(got.mean())) < 1e-6 and float(got.std()) == pytest.approx(1.0, rel=1e-5)
    shifted = static.assign_coords(latitude=static["latitude"] + 1.0)
    with pytest.raises(ValueError, match=r"static fields are not on the data grid: 5 of the "
                                         r"data's 5 lat values \(e.g. \[-40.0, -20.0, 0.0\]\)"):
        build(ds, cond=cond, static=shifted)


def test_streamed_dataset_equals_in_memory_and_works_with_two_workers(tmp_path):
    ds = make_ds(n_time=24, nan_frac=0.1, seed=3)
    ds.to_zarr(tmp_path / "s.zarr", encoding={"tas": {"chunks": (1, 4, 5, 6)}},
               zarr_format=2, consolidated=False)  # v2: string labels without a v3 warning
    lazy = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    mem, streamed = build(ds), build(lazy, memory_budget_gb=0.0)
    assert mem.in_memory and not streamed.in_memory
    loader = torch.utils.data.DataLoader(streamed, batch_size=7, shuffle=True, num_workers=2,
                                         collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        ref = torch.utils.data.default_collate([mem[int(i)] for i in batch["index"]])
        for key in ("x", "weight", "fields", "cond"):
            assert torch.equal(batch[key], ref[key]), key
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(48))


def test_mask_channel_only_with_nans_unless_forced_and_index_errors():
    ds = make_ds(seed=4)
    assert build(ds).field_names[-1] == "cos_lon"
    assert build(ds, with_mask=True).n_fields == 5
    fd = build(ds)
    assert torch.equal(fd[-1]["x"], fd[39]["x"])
    with pytest.raises(IndexError):
        fd[40]
    with pytest.raises(ValueError, match="'pr' not in the Dataset"):
        build(ds, cond=ConditioningConfig(fields=("pr",)))
    with pytest.raises(ValueError, match="not seen in training"):
        spec = ConditionSpec.from_config(ConditioningConfig(labels=("scenario",)),
                                         ds.isel(scenario=[0]))
        FieldDataset(ds, ["tas"], SAMPLE_DIMS, spec, ConditioningConfig(labels=("scenario",)),
                     Padding(), memory_budget_gb=1.0)


def test_collate_expands_shared_constants_without_copying():
    ds = make_ds(seed=5)
    fd = build(ds)
    items = fd.__getitems__([3, 1, 2])
    batch = collate(items)
    ref = torch.utils.data.default_collate([fd[3], fd[1], fd[2]])
    assert batch["fields"].stride(0) == 0 and batch["weight"].stride(0) == 0  # shared
    assert batch["x"].data_ptr() == items[0]["x"].data_ptr()  # rows of one tensor: no copy
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    with_nan = make_ds(nan_frac=0.3, seed=6)
    batch = collate(build(with_nan).__getitems__([0, 1]))
    assert batch["weight"].stride(0) != 0  # per-sample weights where pixels are missing


# -- the tensorstore reader ------------------------------------------------------------------
def _zarr_pair(tmp_path, ds: xr.Dataset, scaling: dict | None = None):
    """``ds`` written as a Zarr v3 store, opened by both readers, and a scaler fitted on it."""
    from geodiff.catalog import open_dataset
    from geodiff.config import ScalingConfig
    from geodiff.scaling import Scaler

    pytest.importorskip("xarray_tensorstore")
    path = tmp_path / "fields.zarr"
    ds.to_zarr(path, zarr_format=3, consolidated=False,
               encoding={v: {"chunks": (1, 1, *ds[v].shape[2:])} for v in ds.data_vars})
    lazy = open_dataset(str(path))
    ts = open_dataset(str(path), reader="tensorstore")
    variables = list(ds.data_vars)
    scaler = Scaler.fit(lazy, ScalingConfig(**(scaling or {"method": "minmax"})), variables,
                        SAMPLE_DIMS)
    return lazy, ts, scaler


@pytest.mark.parametrize("scaling", [{"method": "minmax"}, {"method": "minmax",
                                                            "transform": "log1p"}])
def test_tensorstore_reader_equals_the_dask_reader_item_for_item(tmp_path, scaling):
    # levels, NaNs, a condition field and two sample dims; affine scaling is computed
    # straight into the batch, log1p goes through Scaler.transform: both bit-identical to
    # the dask graph, streamed or in memory, and through reader threads
    import dask

    from geodiff.data import threaded_batches
    ds = make_ds(n_time=9, levels=(850.0, 500.0), nan_frac=0.1, seed=5)
    ds["tas"] = np.abs(ds["tas"]) + 0.5
    ds["pr"] = ds["tas"].isel(level=0, drop=True) * 2
    lazy, ts, scaler = _zarr_pair(tmp_path, ds, scaling)
    assert not dask.is_dask_collection(ts["tas"].variable._data)
    cond = ConditioningConfig(coord_channels=True, fields=("pr",))

    def dataset(source, budget, **kw):
        return FieldDataset(source, ["tas"], SAMPLE_DIMS, ConditionSpec(), cond,
                            compute_padding(5, 6, 4, periodic=False),
                            memory_budget_gb=budget, **kw)

    ref = dataset(scaler.transform(lazy), 1.0)
    streamed = dataset(ts, 0.0, scaler=scaler)
    loaded = dataset(ts, 1.0, scaler=scaler)
    assert ref.in_memory and loaded.in_memory and not streamed.in_memory
    assert not streamed.fork_safe and loaded.fork_safe and ref.fork_safe
    assert streamed.field_names == ref.field_names and "mask" in ref.field_names
    batches = [[4], [17, 0, 9, 3, 12], list(range(len(ref)))[::-1]]
    for got in (streamed, loaded):
        for batch in batches:
            a, b = collate(got.__getitems__(batch)), collate(ref.__getitems__(batch))
            for key in ("x", "weight", "fields", "cond", "index"):
                assert torch.equal(a[key], b[key]), key
    for a, batch in zip(threaded_batches(streamed, batches, threads=2), batches, strict=True):
        b = collate(ref.__getitems__(batch))
        assert all(torch.equal(a[key], b[key]) for key in ("x", "weight", "fields", "cond"))


def test_tensorstore_reader_masks_undeclared_fills_like_dask(tmp_path):
    ds = make_ds(n_time=6, seed=6)
    values = ds["tas"].values.copy()
    values[0, 2, 1, 1] = -1e34   # undeclared fill values: NaN after standardisation
    values[1, 4, 3, 2] = 9.97e36
    ds["tas"] = (ds["tas"].dims, values)
    lazy, ts, _ = _zarr_pair(tmp_path, ds)
    a, b = lazy["tas"].values, ts["tas"].values
    np.testing.assert_array_equal(a, b)
    assert np.isnan(b[0, 2, 1, 1]) and np.isnan(b[1, 4, 3, 2]) and np.isnan(b).sum() == 2
    np.testing.assert_array_equal(ts["tas"].isel(time=[2, 4]).values, a[:, [2, 4]])


def test_tensorstore_reader_errors(tmp_path):
    from geodiff.catalog import CatalogError, open_dataset
    pytest.importorskip("xarray_tensorstore")
    ds = make_ds(n_time=4, seed=7)
    ds.to_netcdf(tmp_path / "f.nc")
    with pytest.raises(CatalogError, match="reads Zarr stores only.*use reader='dask'"):
        open_dataset(str(tmp_path / "f.nc"), reader="tensorstore")
    with pytest.raises(CatalogError, match=r"reader='lazy' must be one of \['dask', "):
        open_dataset(str(tmp_path / "f.nc"), reader="lazy")
    _, ts, _ = _zarr_pair(tmp_path, ds)
    with pytest.raises(ValueError, match=r"variables \['tas'\] are not dask arrays.*scaler"):
        FieldDataset(ts, ["tas"], SAMPLE_DIMS, ConditionSpec(), ConditioningConfig(),
                     Padding(), memory_budget_gb=0.0)
    with pytest.raises(ValueError, match="threads=0 must be >= 1"):
        next(iter(__import__("geodiff.data").data.threaded_batches(ts, [[0]], threads=0)))


def test_match_values_finds_each_value_modulo_the_period_or_minus_one():
    from geodiff.grid import match_values

    have = np.array([0.0, 90.0, 180.0, 270.0, 359.5])
    # -180 is 180, 360 is 0, -0.5 is 359.5 (wrapping past the sorted ends), 45 is absent
    idx = match_values(np.array([-180.0, 360.00005, -0.5, 45.0, 90.0]), have, 360.0)
    np.testing.assert_array_equal(idx, [2, 0, 4, -1, 1])
    # without a period nothing wraps, and the tolerance is absolute
    np.testing.assert_array_equal(match_values(np.array([-0.5, 850.0, 850.001]),
                                               np.array([1000.0, 850.0, 359.5]), None),
                                  [-1, 1, -1])


def test_parse_times_gives_datetime64_on_standard_calendars_and_cftime_otherwise():
    from geodiff.samples import parse_times

    std = parse_times(["2050-07-16", "2050-07-16T12:30", "2050-08"], "standard", "t")
    assert std.dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(std, np.array(["2050-07-16", "2050-07-16T12:30",
                                                 "2050-08-01"], "datetime64[ns]"))
    noleap = parse_times(["2052-03-01"], "noleap", "t")
    assert noleap[0].calendar == "noleap" and noleap[0].dayofyr == 60  # no Feb 29
    with pytest.raises(ValueError, match=r"t='2052-02-29' is not a date of the model's "
                                         r"'noleap' calendar"):
        parse_times(["2052-02-29"], "noleap", "t")
    with pytest.raises(ValueError, match="is not a date string"):
        parse_times(["July 2050"], "standard", "t")
