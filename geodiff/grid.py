"""CF latitude/longitude detection and standardisation to geodiff's canonical grid.

:func:`standardize` maps any 1-D latitude/longitude Dataset (regular or irregular, e.g.
Gaussian) onto the canonical form used inside geodiff, lazily (dask arrays stay dask):

* latitude/longitude/level found by CF attributes first (``standard_name``, ``units``,
  ``axis``, via cf-xarray), then by common names (``latitude``, ``LAT``, ``nav_lat``, ``y``
  ...), and renamed to :data:`LAT`, :data:`LON`, :data:`LEVEL`;
* latitude ascending; longitude ascending and monotonic in ``[lon_min, lon_min + 360)``,
  where ``lon_min`` is the source's own convention (``-180``, ``0``, ``20``...), so the
  coordinate values themselves are those of the source; a duplicated wrap-around column
  (last longitude = first + 360) is dropped.  A regional (not periodic) grid starts just
  after its largest longitude gap and continues eastward, so one across the window's end
  stays contiguous: ``170, 175, 180, -175, -170`` becomes ``170 .. 190`` and
  ``350, 355, 0, 5`` becomes ``350 .. 365``;
* a singleton level dimension is squeezed into a scalar ``level`` coordinate;
* a time dimension with another name (``valid_time``, ``t`` with ``axis='T'``) becomes
  ``time``;
* data variables are transposed to ``(..., level, lat, lon)``;
* undeclared fill values become NaN (declared ``_FillValue``/``missing_value`` and packed
  ``scale_factor``/``add_offset`` are decoded by xarray's ``mask_and_scale`` on opening).
  The rule: ``|x| >= 1e30`` is always missing; an exact ``-999`` or ``-9999`` is missing
  when, in a sample of the variable (first, middle and last index of every non-spatial
  dimension), it lies outside the other values and either the gap between it and the
  nearest of them exceeds their span ``max - min`` or they are all ``>= 0`` (so ``-999``
  in a 200..320 K field or a 50000..105000 Pa surface pressure field is fill, but not in
  an elevation field reaching below ``-999`` m);
* decoded times (datetime64 or any cftime calendar) get integer coordinates ``year`` and
  ``dayofyear`` along ``time``.

A :class:`GridInfo` describing the source convention is stored as JSON in
``ds.attrs["geodiff_grid"]``; :func:`restore` maps a canonical Dataset back to the source's
names, latitude order, longitude convention and squeezed level.  What does not come back:
the dropped wrap-around column, a descending or non-monotonic source longitude order (the
values come back sorted in the source window; a regional grid stored eastward across the
window's end, ``170, 175, 180, -175, -170``, does come back in that order), a source
dimension whose 1-D lat/lon coordinate had another name (``nav_lat(y)`` comes back as
dimension ``nav_lat``), and the source's order of dimensions within a variable (CF order
``..., level, lat, lon``).

Curvilinear (2-D lat/lon), rotated-pole, projected and unstructured grids are refused
with a :class:`ValueError` that suggests regridding.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import cf_xarray  # noqa: F401  (registers the ``.cf`` accessor)
import cftime
import numpy as np
import xarray as xr

try:  # lazily applied element-wise function: xarray's own tool for lazy CF decoding
    from xarray.coding.common import lazy_elemwise_func
except ImportError:  # xarray < 2025.1
    from xarray.coding.variables import lazy_elemwise_func

LAT, LON, LEVEL = "lat", "lon", "level"
TIME, YEAR, DAYOFYEAR = "time", "year", "dayofyear"
ATTR = "geodiff_grid"
"""Key of the JSON-serialised :class:`GridInfo` in ``Dataset.attrs``."""

LARGE_FILL = 1e30
"""Values with ``|x| >= LARGE_FILL`` are always treated as missing (e.g. ``-1e34``)."""
SENTINEL_FILLS = (-999.0, -9999.0)
"""Undeclared fill values recognised when they lie far outside the rest of the data, or
below data that is otherwise never negative."""

_ADDED = "added by geodiff.grid.standardize"
_SUPPORTED = (
    "geodiff supports grids with 1-D latitude and longitude coordinates (regular or "
    "irregular, e.g. Gaussian). Regrid to a regular latitude-longitude grid first, e.g. "
    "with xESMF (xesmf.Regridder(ds, target_grid, 'bilinear')) or CDO "
    "(cdo remapbil,r360x180 in.nc out.nc)."
)
_LAT_NAMES = ("lat", "latitude", "nav_lat", "lats", "xlat", "y")
_LON_NAMES = ("lon", "longitude", "nav_lon", "lons", "xlong", "long", "x")
_LEVEL_NAMES = ("level", "lev", "levels", "plev", "pressure", "pressure_level",
                "isobaricinhpa", "depth", "deptht", "height", "altitude", "z")
_LEVEL_STANDARD_NAMES = ("air_pressure", "height", "depth", "altitude", "model_level_number",
                         "atmosphere_hybrid_sigma_pressure_coordinate",
                         "atmosphere_sigma_coordinate", "atmosphere_ln_pressure_coordinate")
_PRESSURE_UNITS = ("pa", "hpa", "kpa", "mbar", "millibar", "millibars", "mb", "bar", "dbar")


@dataclass(frozen=True)
class GridInfo:
    """How a source grid maps onto the canonical one (JSON round trip via ``to_dict``)."""

    lat_name: str
    """Source name of the latitude coordinate."""
    lon_name: str
    """Source name of the longitude coordinate."""
    level_name: str | None
    """Source name of the vertical dimension, ``None`` when there is none."""
    lat_descending: bool
    """The source stores latitude north to south."""
    lon_min: float
    """Start of the source longitude window ``[lon_min, lon_min + 360)`` (e.g. -180, 0, 20):
    the source's smallest longitude."""
    wrap_column_dropped: bool
    """The source's last longitude duplicated the first + 360 and was dropped."""
    level_squeezed: bool
    """The source's level dimension had length 1 and was squeezed to a scalar coordinate."""
    periodic: bool
    """Global in longitude: ``n_lon * spacing`` covers 360 degrees within half a cell."""
    global_lat: bool
    """Latitudes reach within one grid spacing of both poles."""
    lat: tuple[float, ...]
    """Canonical (ascending) latitude values."""
    lon: tuple[float, ...]
    """Canonical (ascending) longitude values: in the source window, except a regional grid
    across the window's end, which continues past it (``170 .. 190`` for a -180..180
    source)."""
    lat_attrs: dict = field(default_factory=dict)
    """Source attributes of the latitude coordinate."""
    lon_attrs: dict = field(default_factory=dict)
    """Source attributes of the longitude coordinate."""
    level_value: float | None = None
    """Value of a squeezed singleton level (to re-expand it without the Dataset)."""
    level_attrs: dict = field(default_factory=dict)
    """Source attributes of the level coordinate."""
    time_name: str | None = None
    """Source name of a time dimension renamed to ``time`` (e.g. ``valid_time``), else None."""
    lon_rolled: bool = False
    """The source stores a regional grid eastward across the end of its longitude window
    (``170, 175, 180, -175, -170``): :func:`restore` keeps that order instead of sorting."""

    def to_dict(self) -> dict:
        """JSON-serialisable dict (``from_dict(to_dict(info)) == info``)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> GridInfo:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"GridInfo.from_dict: unknown keys {unknown}; allowed "
                             f"{sorted(allowed)}")
        kw = dict(d)
        kw["lat"] = tuple(float(v) for v in d["lat"])
        kw["lon"] = tuple(float(v) for v in d["lon"])
        return cls(**kw)


def area_weights(lat) -> np.ndarray:
    """Area weights ``cos(lat)`` normalised to mean 1.

    Parameters
    ----------
    lat : array-like, shape (n_lat,)
        Latitudes in degrees north.

    Returns
    -------
    np.ndarray, shape (n_lat,), float64, ``w.mean() == 1``.
    """
    lat = np.asarray(lat, dtype=np.float64)
    if lat.ndim != 1 or lat.size == 0 or np.any(np.abs(lat) > 90):
        raise ValueError(f"area_weights: {lat=} must be a non-empty 1-D array in [-90, 90]")
    w = np.where(np.abs(lat) == 90.0, 0.0, np.cos(np.deg2rad(lat)))  # exact 0 at the poles
    if w.sum() == 0:
        return np.ones_like(w)
    return w / w.mean()


def loss_area_weights(lat) -> np.ndarray:
    """Area weights of the training loss, mean 1: :func:`area_weights` (``cos(lat)``), except
    on grids with rows *at* a pole, where ``cos`` would give those rows no weight at all (the
    network would never learn them): there each row gets the area of its cell, ``sin(upper
    bound) - sin(lower bound)``, bounds half-way between rows and clipped to +-90. On equally
    spaced rows off the poles the two agree (the cell area is ``2 sin(d/2) cos(lat)``).
    """
    lat = np.asarray(lat, dtype=np.float64)
    if lat.size < 2 or not np.any(np.abs(lat) == 90.0):
        return area_weights(lat)
    order = np.argsort(lat)
    s = lat[order]
    mid = (s[1:] + s[:-1]) / 2
    lower = np.clip(np.concatenate([[2 * s[0] - mid[0]], mid]), -90.0, 90.0)
    upper = np.clip(np.concatenate([mid, [2 * s[-1] - mid[-1]]]), -90.0, 90.0)
    w = np.empty_like(s)
    w[order] = np.sin(np.deg2rad(upper)) - np.sin(np.deg2rad(lower))
    return w / w.mean()


def standardize(ds: xr.Dataset) -> xr.Dataset:
    """Canonical geodiff form of ``ds`` (see the module docstring); stays lazy.

    Returns a new Dataset with dims ``lat``/``lon`` (and ``level``), the :class:`GridInfo`
    JSON in ``attrs["geodiff_grid"]`` and, for decoded time, ``year``/``dayofyear``.
    A Dataset that is already standardised is returned with refreshed grid info.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"standardize expects an xarray.Dataset, got {type(ds).__name__}; "
                        "use da.to_dataset() for a DataArray")
    if ATTR in ds.attrs and LAT in ds.dims and LON in ds.dims:
        return _with_info(ds.copy(deep=False), grid_info(ds))
    ds, info = _canonicalise(ds)
    return _with_info(_mask_undeclared_fills(ds), info)


def _canonicalise(ds: xr.Dataset) -> tuple[xr.Dataset, GridInfo]:
    """Everything :func:`standardize` does except the fill-value rule; reads no data."""
    ds = ds.copy(deep=False)
    lat_name, lon_name = _find_lat_lon(ds)
    for name in (lat_name, lon_name):
        dim = ds[name].dims[0]
        if dim != name:
            ds = ds.swap_dims({dim: name})
    level_name = _find_level(ds, lat_name, lon_name)

    lat_src = np.asarray(ds[lat_name].values)
    lat_descending = _check_lat(lat_src, lat_name)
    if lat_descending:
        ds = ds.isel({lat_name: slice(None, None, -1)})
    order, lon_values, lon_min, wrap, rolled = _canonical_lon(np.asarray(ds[lon_name].values),
                                                              lon_name)
    if not np.array_equal(order, np.arange(ds.sizes[lon_name])):
        ds = ds.isel({lon_name: slice(0, order.size) if _is_prefix(order) else order})
    if lon_values is not None:
        ds = ds.assign_coords({lon_name: (lon_name, lon_values, ds[lon_name].attrs)})

    level_squeezed, level_value, level_attrs = False, None, {}
    if level_name is not None:
        level_attrs = _jsonable(dict(ds[level_name].attrs)) if level_name in ds.coords else {}
        if ds.sizes[level_name] == 1:
            level_squeezed = True
            if level_name in ds.coords:
                level_value = float(ds[level_name].values[0])
            ds = ds.squeeze(level_name)
    lat_attrs = _jsonable(dict(ds[lat_name].attrs))
    lon_attrs = _jsonable(dict(ds[lon_name].attrs))
    time_name = _find_time(ds)
    names = {lat_name: LAT, lon_name: LON, level_name: LEVEL, time_name: TIME}
    _check_free(ds, names)
    ds = ds.rename({k: v for k, v in names.items()
                    if k is not None and k != v and k in {*ds.variables, *ds.dims}})
    ds[LAT].attrs = {"standard_name": "latitude", "long_name": "latitude",
                     "units": "degrees_north", "axis": "Y"}
    ds[LON].attrs = {"standard_name": "longitude", "long_name": "longitude",
                     "units": "degrees_east", "axis": "X"}

    spatial = [d for d in (LEVEL, LAT, LON) if d in ds.dims]
    for name in _field_names(ds):
        ds[name] = ds[name].transpose(..., *[d for d in spatial if d in ds[name].dims])
    ds = _add_calendar_coords(ds)
    lat, lon = ds[LAT].values, ds[LON].values
    info = GridInfo(
        lat_name=str(lat_name), lon_name=str(lon_name),
        level_name=None if level_name is None else str(level_name),
        lat_descending=lat_descending, lon_min=lon_min, wrap_column_dropped=wrap,
        lon_rolled=rolled, level_squeezed=level_squeezed, periodic=_periodic(lon),
        global_lat=_global_lat(lat),
        lat=tuple(map(float, lat)), lon=tuple(map(float, lon)),
        lat_attrs=lat_attrs, lon_attrs=lon_attrs, level_value=level_value,
        level_attrs=level_attrs, time_name=None if time_name == TIME else time_name,
    )
    return ds, info


def grid_info(ds: xr.Dataset) -> GridInfo:
    """:class:`GridInfo` of a Dataset.

    For a standardised Dataset it is read from ``attrs["geodiff_grid"]`` and its ``lat``,
    ``lon``, ``periodic`` and ``global_lat`` are refreshed from the Dataset's coordinates
    (so a subset describes itself); otherwise it is detected from the metadata alone.
    """
    if ATTR not in ds.attrs:
        return _canonicalise(ds)[1]
    info = GridInfo.from_dict(json.loads(ds.attrs[ATTR]))
    if LAT in ds.coords and LON in ds.coords:
        lat, lon = ds[LAT].values, ds[LON].values
        if lat.shape != (len(info.lat),) or lon.shape != (len(info.lon),) or \
                not (np.array_equal(lat, info.lat) and np.array_equal(lon, info.lon)):
            info = replace(info, lat=tuple(map(float, lat)), lon=tuple(map(float, lon)),
                           periodic=_periodic(lon), global_lat=_global_lat(lat))
    return info


def restore(ds: xr.Dataset, info: GridInfo) -> xr.Dataset:
    """Map a canonical Dataset back to the source convention described by ``info``.

    Longitudes are put back into ``[info.lon_min, info.lon_min + 360)`` (values already in
    that window are kept bit for bit) and sorted ascending, unless the source stored them
    eastward across the window's end (:attr:`GridInfo.lon_rolled`: that order is kept, e.g.
    ``170, 175, 180, -175, -170``), latitude order reversed when the source was
    descending, a squeezed level re-expanded (from the scalar ``level`` coordinate, else
    ``info.level_value``), names and coordinate attributes of the source restored, and
    ``year``/``dayofyear`` added by :func:`standardize` dropped.  Dimensions the Dataset
    lacks (e.g. ``lon`` after a zonal mean) are skipped.
    """
    out = ds.copy(deep=False)
    if LON in out.dims:
        lon = np.asarray(out[LON].values)
        inside = (lon >= info.lon_min) & (lon < info.lon_min + 360.0)
        if not inside.all():
            moved = np.where(inside, lon, info.lon_min + np.mod(lon - info.lon_min, 360.0))
            out = out.assign_coords({LON: (LON, moved.astype(lon.dtype), out[LON].attrs)})
        if lon.size > 1 and not info.lon_rolled and not np.all(np.diff(out[LON].values) > 0):
            out = out.sortby(LON)
    if LAT in out.dims and info.lat_descending:
        out = out.isel({LAT: slice(None, None, -1)})
    if info.level_squeezed and LEVEL not in out.dims:
        out = _expand_level(out, info)
    added = [n for n in (YEAR, DAYOFYEAR) if n in out.coords
             and out[n].attrs.get("comment") == _ADDED]
    out = out.drop_vars(added)
    names = {LAT: info.lat_name, LON: info.lon_name, LEVEL: info.level_name,
             TIME: info.time_name}
    out = out.rename({k: v for k, v in names.items()
                      if v is not None and k != v and k in {*out.variables, *out.dims}})
    for canon, attrs in ((LAT, info.lat_attrs), (LON, info.lon_attrs),
                         (LEVEL, info.level_attrs)):
        name = names[canon]
        if name is not None and name in out.variables:
            out[name].attrs = {k: v for k, v in attrs.items()
                               if k != "bounds" or v in out.variables}
    out.attrs.pop(ATTR, None)
    return out


# ---------------------------------------------------------------------------------------
# detection


def _find_lat_lon(ds: xr.Dataset) -> tuple[str, str]:
    """Names of the 1-D latitude and longitude coordinates; refuse other grid kinds."""
    _refuse_rotated_or_projected(ds)
    found = {}
    for key, axis, names, bound, units in (("latitude", "Y", _LAT_NAMES, 90.0, "degrees_north"),
                                           ("longitude", "X", _LON_NAMES, 720.0, "degrees_east")):
        cands = list(ds.cf.coordinates.get(key, []))
        cands += [n for n, v in ds.variables.items() if n not in cands
                  and v.attrs.get("axis") == axis and _degrees(v.attrs.get("units"))]
        if not cands:
            cands = [n for n, v in ds.variables.items() if str(n).lower() in names
                     and v.dtype.kind in "fiu" and _degrees(v.attrs.get("units"), True)
                     and v.size > 0 and np.nanmax(np.abs(v.values)) <= bound]
            if any(ds[n].ndim > 1 for n in cands) and not any(
                    ds[n].ndim == 1 and "units" in ds[n].attrs for n in cands):
                # a 2-D lat/lon (nav_lat(y, x)) beside 1-D indices without units (y, x):
                # curvilinear, refused below, not a grid of index values
                cands = [n for n in cands if ds[n].ndim > 1]
        if not cands:
            raise ValueError(
                f"no {key} coordinate found among {sorted(map(str, ds.variables))}: geodiff "
                f"looks for CF standard_name='{key}', units='{units}', "
                f"axis='{axis}', or a name in {list(names)}; rename the coordinate or set "
                "its attributes")
        cands.sort(key=lambda n: (n not in ds.dims, ds[n].ndim != 1))
        found[key] = cands[0]
    lat, lon = found["latitude"], found["longitude"]
    if ds[lat].ndim == 0 or ds[lon].ndim == 0:
        raise ValueError(f"latitude {lat!r} / longitude {lon!r} is a scalar: a single point "
                         f"or a station series is not a grid. {_SUPPORTED}")
    if ds[lat].ndim != 1 or ds[lon].ndim != 1:
        raise ValueError(f"curvilinear grid: latitude {lat!r} has dims {ds[lat].dims} and "
                         f"longitude {lon!r} has dims {ds[lon].dims} (2-D). {_SUPPORTED}")
    if ds[lat].dims == ds[lon].dims:
        raise ValueError(f"unstructured grid: latitude {lat!r} and longitude {lon!r} share "
                         f"the single dimension {ds[lat].dims[0]!r}. {_SUPPORTED}")
    return str(lat), str(lon)


def _refuse_rotated_or_projected(ds: xr.Dataset) -> None:
    for name, var in ds.variables.items():
        mapping = var.attrs.get("grid_mapping_name")
        if mapping == "rotated_latitude_longitude" or str(name).lower() in ("rlat", "rlon") \
                or var.attrs.get("standard_name") in ("grid_latitude", "grid_longitude"):
            raise ValueError(f"rotated-pole grid (variable {name!r}, grid_mapping_name="
                             f"{mapping!r}, standard_name={var.attrs.get('standard_name')!r})."
                             f" {_SUPPORTED}")
        if mapping is not None and mapping != "latitude_longitude":
            raise ValueError(f"projected grid: {name!r} has grid_mapping_name={mapping!r}. "
                             f"{_SUPPORTED}")


def _degrees(units: Any, absent_ok: bool = False) -> bool:
    if units is None:
        return absent_ok
    return str(units).lower().replace(" ", "_").startswith(("degree", "deg"))


def _find_level(ds: xr.Dataset, lat: str, lon: str) -> str | None:
    """Name of the vertical dimension of the spatial fields, if any."""
    dims = [d for name in ds.data_vars if {lat, lon} <= set(ds[name].dims)
            for d in ds[name].dims if d not in (lat, lon)]
    for dim in dict.fromkeys(dims):
        if dim in ds.coords:
            var = ds[dim]
            if var.dtype.kind in "mMO" or var.attrs.get("axis") == "T":
                continue
            attrs = var.attrs
            if attrs.get("axis") == "Z" or attrs.get("positive") in ("up", "down") \
                    or attrs.get("standard_name") in _LEVEL_STANDARD_NAMES \
                    or str(attrs.get("units", "")).lower() in _PRESSURE_UNITS:
                return str(dim)
        if str(dim).lower() in _LEVEL_NAMES:
            return str(dim)
    return None


def _find_time(ds: xr.Dataset) -> str | None:
    """Name of the time dimension: ``time``, else a dim coordinate that holds dates or has
    CF ``axis='T'`` / ``standard_name='time'`` (e.g. ERA5's ``valid_time``)."""
    if TIME in ds.dims:
        return TIME
    for dim in ds.dims:
        if dim in ds.coords:
            var = ds[dim]
            if var.dtype.kind == "M" or _is_cftime(var) or var.attrs.get("axis") == "T" \
                    or var.attrs.get("standard_name") == "time":
                return str(dim)
    return None


def _is_cftime(var: xr.DataArray) -> bool:
    return var.dtype.kind == "O" and var.size > 0 and isinstance(var.values.flat[0],
                                                                 cftime.datetime)


def _check_lat(lat: np.ndarray, name: str) -> bool:
    """Validate 1-D latitudes; return whether they descend."""
    if lat.dtype.kind not in "fiu" or lat.size == 0 or not np.all(np.isfinite(lat)) \
            or np.any(np.abs(lat) > 90):
        raise ValueError(f"latitude {name!r} must be finite numbers in [-90, 90], got "
                         f"{lat.dtype} values {lat[:5]}...")
    step = np.diff(lat.astype(np.float64))
    if lat.size > 1 and not (np.all(step > 0) or np.all(step < 0)):
        raise ValueError(f"latitude {name!r} is not strictly monotonic; sort it first "
                         "(ds.sortby) and drop duplicates")
    return bool(lat.size > 1 and step[0] < 0)


def _canonical_lon(lon: np.ndarray, name: str):
    """Index order, new values (``None`` when unchanged), ``lon_min``, wrap and roll flags.

    The canonical longitudes are the source values sorted ascending inside the window
    ``[lon_min, lon_min + 360)``, ``lon_min`` the source's smallest longitude.  A grid that
    is not periodic starts just after its largest gap modulo 360 instead and continues
    eastward past the window's end, so that a region across the window's edge stays
    contiguous (``170, 175, 180, -175, -170`` becomes ``170 .. 190``, ``350, 355, 0, 5``
    becomes ``350 .. 365``).  The roll flag says that the source itself stored the
    longitudes in that eastward order (see :attr:`GridInfo.lon_rolled`).
    """
    if lon.dtype.kind not in "fiu" or lon.size == 0 or not np.all(np.isfinite(lon)):
        raise ValueError(f"longitude {name!r} must be finite numbers, got {lon[:5]}...")
    x = lon.astype(np.float64)
    order = np.arange(x.size)
    if x.size > 1 and np.all(np.diff(x) < 0):
        order = order[::-1]
    step = np.median(np.abs(np.diff(x))) if x.size > 1 else 360.0
    wrap = bool(x.size > 2 and abs(abs(x[order[-1]] - x[order[0]]) - 360.0) <= 1e-3 * step)
    if wrap:
        order = order[:-1]
    source_order = order
    lon_min = float(x[order].min())
    shifted = lon_min + np.mod(x[order] - lon_min, 360.0)
    inside = (x[order] >= lon_min) & (x[order] < lon_min + 360.0)
    values = np.where(inside, x[order], shifted)
    sort = np.argsort(values, kind="stable")
    order, values = order[sort], values[sort]
    if np.any(np.diff(values) <= 0):
        raise ValueError(f"longitude {name!r} has duplicate values modulo 360 in "
                         f"[{lon_min}, {lon_min + 360}); drop the duplicates first")
    rolled = False
    if values.size > 1 and not _periodic(values):
        gaps = np.diff(np.append(values, values[0] + 360.0))  # gaps[-1]: across the edge
        start = (values.size - int(np.argmax(gaps[::-1]))) % values.size  # ties: the edge
        if start:
            order = np.roll(order, -start)
            values = np.concatenate([values[start:], values[:start] + 360.0])
            rolled = bool(np.array_equal(order, source_order))
    new = None if np.array_equal(values, x[order]) else values.astype(lon.dtype)
    return order, new, lon_min, wrap, rolled


def _is_prefix(order: np.ndarray) -> bool:
    return bool(np.array_equal(order, np.arange(order.size)))


def _periodic(lon: np.ndarray) -> bool:
    if lon.size < 2:
        return False
    step = float(np.median(np.diff(lon.astype(np.float64))))
    return bool(abs(step * lon.size - 360.0) <= step / 2)


def _global_lat(lat: np.ndarray) -> bool:
    if lat.size < 2:
        return False
    lat = lat.astype(np.float64)
    tol = 1e-6
    return bool(lat[0] - (lat[1] - lat[0]) <= -90.0 + tol
                and lat[-1] + (lat[-1] - lat[-2]) >= 90.0 - tol)


def _check_free(ds: xr.Dataset, mapping: dict) -> None:
    for src, canon in mapping.items():
        if src is not None and src != canon and canon in ds.variables:
            raise ValueError(f"cannot rename {src!r} to {canon!r}: the Dataset already has "
                             f"a variable {canon!r}; rename or drop it first")


# ---------------------------------------------------------------------------------------
# values


def _field_names(ds: xr.Dataset) -> list[str]:
    """Data variables defined on the horizontal grid."""
    return [str(n) for n, v in ds.data_vars.items() if LAT in v.dims and LON in v.dims]


def _mask_undeclared_fills(ds: xr.Dataset) -> xr.Dataset:
    """NaN for ``|x| >= 1e30`` and for far-out exact ``-999``/``-9999`` (module docstring).

    In-memory data is masked at once; dask-backed data block by block and lazily indexed
    data without dask (``open_dataset(..., reader="tensorstore")``) whatever is read of it
    later, both through xarray's lazy element-wise wrapper, so opening reads nothing but the
    few fields that :func:`_sample` inspects.
    """
    for name in _field_names(ds):
        da = ds[name]
        if da.dtype.kind not in "fiu":
            continue
        declared = np.concatenate([np.atleast_1d(np.asarray(v, dtype=np.float64)).ravel()
                                   for k in ("_FillValue", "missing_value")
                                   if (v := da.encoding.get(k, da.attrs.get(k))) is not None]
                                  or [np.empty(0)])
        sample = _sample(da)
        finite = sample[np.isfinite(sample)]
        sentinels = [s for s in SENTINEL_FILLS
                     if s not in declared and _looks_like_fill(finite, s)]
        if sentinels:
            hits = [s for s in sentinels if np.any(finite == s)]
            if hits:
                warnings.warn(f"variable {name!r}: undeclared fill values {hits} treated as "
                              "missing (they lie far outside the rest of the data, or below "
                              "data that is otherwise never negative); declare _FillValue in "
                              "the file to silence this", stacklevel=3)
        if da.dtype.kind != "f" and not sentinels:
            continue
        out = (da.dtype if da.dtype.kind == "f"
               else np.dtype(np.float32 if da.dtype.itemsize <= 2 else np.float64))
        mask = functools.partial(_mask_fill_values, sentinels=tuple(sentinels), dtype=out)
        raw = da.variable._data
        data = mask(raw) if isinstance(raw, np.ndarray) else lazy_elemwise_func(raw, mask, out)
        ds[name] = xr.Variable(da.dims, data, da.attrs)
    return ds


def _mask_fill_values(x: np.ndarray, sentinels: tuple[float, ...], dtype: np.dtype
                      ) -> np.ndarray:
    """The mask of :func:`_mask_undeclared_fills` on a numpy block (ints with sentinels
    become ``dtype``).

    Clean data (the usual case) costs a minimum and a maximum and is returned as is.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        if not sentinels:
            return x
        x = x.astype(dtype)
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())  # NaN if x has one: then the full test
    if -LARGE_FILL < lo and hi < LARGE_FILL and not any(lo <= s <= hi for s in sentinels):
        return x
    wide = x.astype(np.float32) if x.dtype.itemsize < 4 else x  # 1e30 overflows float16
    with np.errstate(invalid="ignore"):
        bad = np.abs(wide) >= LARGE_FILL
    for value in sentinels:
        bad |= wide == value
    if bad.any():
        x = np.where(bad, np.nan, x).astype(x.dtype, copy=False)
    return x


def _sample(da: xr.DataArray) -> np.ndarray:
    """First, middle and last index of each non-spatial dim: a few fields, float64."""
    index = {d: np.unique(np.linspace(0, da.sizes[d] - 1, 3).astype(int))
             for d in da.dims if d not in (LAT, LON) and da.sizes[d] > 0}
    return np.asarray(da.isel(index).values, dtype=np.float64).ravel()


def _looks_like_fill(finite: np.ndarray, value: float) -> bool:
    """Whether the (negative) sentinel ``value`` lies outside the other values of the sample
    and either the gap to them exceeds their span or they are all >= 0."""
    others = finite[~np.isin(finite, SENTINEL_FILLS) & (np.abs(finite) < LARGE_FILL)]
    if others.size == 0:
        return bool(np.any(finite == value))
    lo, hi = others.min(), others.max()
    gap = lo - value if value < lo else value - hi if value > hi else -1.0
    return bool(gap > 0 and (gap > hi - lo or (value < 0 <= lo)))


def _add_calendar_coords(ds: xr.Dataset) -> xr.Dataset:
    if TIME not in ds.dims or TIME not in ds.coords or YEAR in ds.variables \
            or DAYOFYEAR in ds.variables:
        return ds
    time = ds[TIME]
    if not (time.dtype.kind == "M" or _is_cftime(time)):
        return ds
    attrs = {"comment": _ADDED}
    return ds.assign_coords({
        YEAR: (TIME, time.dt.year.values.astype(np.int64), {"long_name": "year", **attrs}),
        DAYOFYEAR: (TIME, time.dt.dayofyear.values.astype(np.int64),
                    {"long_name": "day of year", **attrs}),
    })


def _expand_level(ds: xr.Dataset, info: GridInfo) -> xr.Dataset:
    value = ds[LEVEL].values.item() if LEVEL in ds.coords else info.level_value
    ds = ds.drop_vars(LEVEL, errors="ignore")
    for name in _field_names(ds):
        da = ds[name].expand_dims(LEVEL)
        ds[name] = da.transpose(..., LEVEL, *[d for d in da.dims if d in (LAT, LON)])
    if LEVEL in ds.dims and value is not None:
        ds = ds.assign_coords({LEVEL: (LEVEL, [value], dict(info.level_attrs))})
    return ds


def _with_info(ds: xr.Dataset, info: GridInfo) -> xr.Dataset:
    ds.attrs = {**ds.attrs, ATTR: json.dumps(info.to_dict())}
    return ds


def _jsonable(obj: Any) -> Any:
    """Plain Python (JSON-serialisable) copy of attribute values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def match_values(want: np.ndarray, have: np.ndarray, period: float | None, atol: float = 1e-4
                 ) -> np.ndarray:
    """Index in ``have`` of the value nearest each value of ``want`` (modulo ``period``,
    e.g. 360 for longitudes) when within ``atol``, else -1; O(n log n), so grids of 7200
    longitudes match fast."""
    if period is not None:
        want, have = np.mod(want, period), np.mod(have, period)
    order = np.argsort(have, kind="stable")
    sorted_have = have[order]
    pos = np.searchsorted(sorted_have, want)
    best = np.full(want.shape, -1)
    best_err = np.full(want.shape, np.inf)
    for cand in (pos - 1, pos, 0, len(have) - 1):  # neighbours, and both ends (wrap-around)
        c = np.clip(cand, 0, len(have) - 1)
        err = np.abs(sorted_have[c] - want)
        if period is not None:
            err = np.minimum(err, period - err)
        better = err < best_err
        best, best_err = np.where(better, order[c], best), np.where(better, err, best_err)
    return np.where(best_err <= atol, best, -1)
