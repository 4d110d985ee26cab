"""Small synthetic gridded Datasets that reproduce the quirks of real files.

Every factory returns an in-memory :class:`xarray.Dataset` whose field values are an exact,
known function of the coordinates, so tests can check where each value went; ``write``
puts it in a real NetCDF file (or Zarr store) under ``tmp_path``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}


def field_values(time: int, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Exact test field ``250 + t + lat / 10 + cos(lon)``, shape (time, lat, lon)."""
    t = np.arange(time, dtype=np.float64)[:, None, None]
    return (250.0 + t + lat[None, :, None] / 10.0
            + np.cos(np.deg2rad(lon))[None, None, :]).astype(np.float32)


def make_grid(*, lat=None, lon=None, n_time: int = 4, lat_name: str = "lat",
              lon_name: str = "lon", lat_attrs: dict | None = None,
              lon_attrs: dict | None = None, var: str = "tas",
              level: float | list[float] | None = None, level_name: str = "plev",
              calendar: str | None = "standard", time_units: str = "days since 2000-01-01",
              time_step: float = 1.0, time_name: str = "time") -> xr.Dataset:
    """A (time, [level,] lat, lon) Dataset with coordinates exactly as given.

    ``lat``/``lon`` default to a 5 x 8 regional grid; ``level`` adds a level dimension
    (a float gives a singleton); ``calendar=None`` writes no time coordinate attributes.
    """
    lat = np.asarray(lat if lat is not None else [10.0, 12.5, 15.0, 17.5, 20.0])
    lon = np.asarray(lon if lon is not None else np.arange(8) * 2.5 + 100.0)
    values = field_values(n_time, lat, lon)  # (time, lat, lon)
    dims = (time_name, lat_name, lon_name)
    coords = {lat_name: (lat_name, lat, dict(LAT_ATTRS if lat_attrs is None else lat_attrs)),
              lon_name: (lon_name, lon, dict(LON_ATTRS if lon_attrs is None else lon_attrs))}
    time_attrs = {"units": time_units, "standard_name": "time", "axis": "T"}
    if calendar is not None:
        time_attrs["calendar"] = calendar
    coords[time_name] = (time_name, np.arange(n_time) * time_step, time_attrs)
    if level is not None:
        levels = np.atleast_1d(np.asarray(level, dtype=np.float64))
        values = np.repeat(values[:, None], levels.size, axis=1)  # (time, level, lat, lon)
        values = values + 0.5 * np.arange(levels.size)[None, :, None, None]
        dims = (time_name, level_name, lat_name, lon_name)
        coords[level_name] = (level_name, levels,
                              {"units": "hPa", "positive": "down", "axis": "Z"})
    attrs = {"units": "K", "long_name": "air temperature", "standard_name": "air_temperature"}
    return xr.Dataset({var: (dims, values.astype(np.float32), attrs)}, coords=coords)


def write(ds: xr.Dataset, path: Path, encoding: dict | None = None) -> Path:
    """Write ``ds`` to ``path`` (NetCDF4, or a Zarr store when the suffix is ``.zarr``)."""
    if path.suffix == ".zarr":
        with warnings.catch_warnings():  # zarr 3: consolidated metadata is not in the spec
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            ds.to_zarr(path, mode="w")
    else:
        ds.to_netcdf(path, encoding=encoding)
    return path


def open_raw(path: Path, **kw) -> xr.Dataset:
    """Open a NetCDF file lazily with dask, decoding as xarray does by default."""
    return xr.open_dataset(path, chunks={}, **kw)
