"""Tests of geodiff.cfcheck and geodiff.io on real NetCDF files / Zarr stores in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from geodiff.cfcheck import cf_problems


def _ensemble() -> xr.Dataset:
    """A small CF-conforming ensemble with a string label dimension."""
    return xr.Dataset(
        {"tas": (("member", "scenario", "time", "lat", "lon"),
                 np.zeros((2, 2, 2, 3, 4), np.float32), {"units": "K"})},
        coords={"member": ("member", np.arange(2, dtype=np.int32),
                           {"standard_name": "realization"}),
                "scenario": ["ssp126", "ssp585"],
                "time": pd.date_range("2000-01-01", periods=2),
                "lat": ("lat", [10.0, 0.0, -10.0],
                        {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
                "lon": ("lon", [0.0, 90.0, 180.0, 270.0],
                        {"units": "degrees_east", "standard_name": "longitude", "axis": "X"})},
        attrs={"Conventions": "CF-1.10", "history": "test", "source": "geodiff test"})


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_cf_problems_closes_the_file(tmp_path: Path, suffix: str) -> None:
    """The checked file can be rewritten in the same process (it stayed in xarray's file
    cache, and HDF5 then refused to open it for writing)."""
    path = tmp_path / f"ens{suffix}"
    if suffix == ".zarr":
        _ensemble().to_zarr(path, zarr_format=2)
    else:
        _ensemble().to_netcdf(path)
    assert cf_problems(path) == []
    if suffix == ".nc":
        netCDF4 = pytest.importorskip("netCDF4")
        with netCDF4.Dataset(path, "a") as nc:
            nc.setncattr("history", "checked")
        _ensemble().to_netcdf(path, mode="w")  # overwrite in place
        assert cf_problems(path) == []


def test_time_units_xarray_cannot_decode_are_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "months.nc"
    _ensemble().to_netcdf(path, encoding={"time": {"units": "days since 2000-01-01"}})
    raw = xr.open_dataset(path, decode_cf=False).load()
    raw["time"].attrs.update(units="months since 2000-01-01", calendar="standard")
    problems = cf_problems(raw)  # used to raise ValueError from decoding the times
    assert len(problems) == 1 and "units='months since 2000-01-01'" in problems[0]
    assert "not months or years" in problems[0]


@pytest.mark.parametrize("units", ["day since 2000-1-1", "d since 2000-01-01",
                                   "hours since 2000-01-01T00:00:00", "hour since 1-1-1",
                                   "seconds since 1970-01-01 00:00:00 UTC"])
def test_udunits_time_units_conform(tmp_path: Path, units: str) -> None:
    path = tmp_path / "ens.nc"
    _ensemble().to_netcdf(path)
    raw = xr.open_dataset(path, decode_cf=False).load()
    raw["time"].attrs["units"] = units
    assert cf_problems(raw) == []


@pytest.mark.parametrize("fmt", ["NETCDF4_CLASSIC", "NETCDF3_64BIT"])
def test_char_array_label_coordinate_conforms(tmp_path: Path, fmt: str) -> None:
    """netCDF classic stores string labels as (scenario, string6) char arrays (CF 2.2);
    they used to be reported as a coordinate variable that is not 1-D."""
    path = tmp_path / "classic.nc"
    ds = _ensemble()
    if fmt == "NETCDF3_64BIT":
        ds["member"] = ds["member"].astype(np.int32)
    ds.to_netcdf(path, format=fmt)
    assert cf_problems(path) == []


# -- EnsembleWriter ------------------------------------------------------------------------
def _write_ensemble(path: Path, value: float, *, fail_rename: bool = False,
                    monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Write a 2-member ensemble of constant ``value`` to ``path`` with EnsembleWriter."""
    import dask.array as dsa

    from geodiff import io

    ens = _ensemble().drop_vars("tas")
    ens["tas"] = (("member", "scenario", "time", "lat", "lon"),
                  dsa.full((2, 2, 2, 3, 4), np.nan, dtype=np.float32,
                           chunks=(1, 2, 2, 3, 4)), {"units": "K"})
    enc = ({"tas": {"_FillValue": np.float32(np.nan)}} if path.suffix == ".zarr" else
           {"tas": {"_FillValue": np.float32(np.nan), "dtype": "float32"}})
    writer = io.EnsembleWriter(path, {"value": value})
    writer.create(ens, enc)
    slab = _ensemble()
    slab["tas"] = slab["tas"] + value
    writer.write(slab, [0, 1])
    if fail_rename:
        assert monkeypatch is not None
        real = os.replace

        def failing(src, dst):
            if Path(src) == writer.partial:
                raise OSError("disk quota exceeded")
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", failing)
    writer.finalize(overwrite=True)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_overwrite_keeps_the_old_output_when_the_final_rename_fails(
        tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old output used to be deleted before the rename, so a failing rename left the
    final name empty; now a file is replaced atomically and a store is restored."""
    path = tmp_path / f"ens{suffix}"
    _write_ensemble(path, 1.0)
    with pytest.raises(OSError, match="quota"):
        _write_ensemble(path, 2.0, fail_rename=True, monkeypatch=monkeypatch)
    with xr.open_dataset(path, engine="zarr" if suffix == ".zarr" else None) as old:
        assert float(old["tas"].max()) == 1.0  # the previous, complete result
    monkeypatch.undo()
    _write_ensemble(path, 2.0)  # and a later overwrite works, leaving nothing aside
    with xr.open_dataset(path, engine="zarr" if suffix == ".zarr" else None) as new:
        assert float(new["tas"].max()) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
