"""CF-1.10 conformance of the gridded ensemble files geodiff writes.

Why not the reference ``cfchecker``: it needs the UDUNITS-2 C library and downloads the CF
standard-name table at run time, neither of which an offline CI node or many HPC nodes
have. This module checks, on the raw (undecoded) file, the CF rules that apply to a
rectilinear lat-lon ensemble: global ``Conventions``; coordinate variables (1-D, named like
their dimension, strictly monotonic, no missing values); latitude/longitude recognisable by
``units`` (CF 4.1/4.2) with values in range; a time coordinate with CF ``units``
("<unit> since <date>") and a known ``calendar`` (CF 4.4); the ensemble dimension labelled
``standard_name = realization`` (CF standard-name table); data variables with ``units``;
``_FillValue`` of the variable's type; ``coordinates``, ``bounds``, ``grid_mapping`` and
``ancillary_variables`` attributes (of any variable) that name existing variables; attribute
types. cf_xarray then has to find the X and Y axes, which is how
downstream tools will read the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import xarray as xr

CALENDARS = {"standard", "gregorian", "proleptic_gregorian", "noleap", "365_day", "all_leap",
             "366_day", "360_day", "julian", "none"}
_TIME_UNITS = re.compile(r"^\s*(days?|d|hours?|hrs?|h|minutes?|mins?|seconds?|secs?|s|"
                         r"milliseconds?|ms|microseconds?|us)\s+since\s+"
                         r"-?\d{1,4}-\d{1,2}-\d{1,2}")
"""UDUNITS time units (singular, plural or abbreviated) since a reference date; ``months``
and ``years`` are left out (CF 4.4: they are not calendar months / years)."""
REFERENCE_ATTRS = ("coordinates", "bounds", "grid_mapping", "ancillary_variables")
"""Attributes whose words name other variables of the file (CF 5, 7.1, 5.6, 3.4)."""
_LAT_UNITS = {"degrees_north", "degree_north", "degree_N", "degrees_N", "degreeN", "degreesN"}
_LON_UNITS = {"degrees_east", "degree_east", "degree_E", "degrees_E", "degreeE", "degreesE"}


def cf_problems(path_or_ds: str | Path | xr.Dataset) -> list[str]:
    """Violations of the checked CF-1.10 rules (empty list = conforming).

    ``path_or_ds``: a NetCDF path or Zarr store (opened without decoding) or a raw Dataset
    opened with ``decode_cf=False``.
    """
    if isinstance(path_or_ds, xr.Dataset):
        return _problems(path_or_ds, xr.decode_cf(path_or_ds, decode_times=False,
                                                  decode_timedelta=False))
    p = Path(path_or_ds)
    zarr = p.suffix == ".zarr" or p.is_dir()
    opener = xr.open_zarr if zarr else xr.open_dataset
    # closed on return: a file left open (xarray's file cache) could not be rewritten
    with opener(p, decode_cf=False) as raw, \
            opener(p, decode_times=False, decode_timedelta=False) as decoded:
        return _problems(raw, decoded)


def _problems(ds: xr.Dataset, decoded: xr.Dataset) -> list[str]:
    """Problems of the raw Dataset ``ds``; ``decoded`` is it CF-decoded but for times (a
    legal time unit that xarray cannot decode must be reported, not raised)."""
    problems: list[str] = []
    conv = str(ds.attrs.get("Conventions", ""))
    if not re.search(r"CF-1\.\d+", conv):
        problems.append(f"global attribute Conventions={conv!r} does not name CF-1.x")
    for key in ("history", "source"):
        if not isinstance(ds.attrs.get(key), str):
            problems.append(f"global attribute {key!r} missing or not a string")
    for dim in ds.dims:
        if dim not in ds.variables:
            continue
        var = ds[dim]
        if var.ndim == 2 and var.dims[0] == dim and var.dtype.kind == "S" \
                and var.dtype.itemsize == 1:
            continue  # labels as a char array (netCDF classic): (dim, string length), CF 2.2
        if var.ndim != 1 or var.dims != (dim,):
            problems.append(f"coordinate variable {dim!r} must be 1-D along {dim!r}")
            continue
        values = var.values
        if values.dtype.kind in "fiu":
            if values.dtype.kind == "f" and np.isnan(values).any():
                problems.append(f"coordinate variable {dim!r} has missing values")
            d = np.diff(values.astype(np.float64))
            if values.size > 1 and not (np.all(d > 0) or np.all(d < 0)):
                problems.append(f"coordinate variable {dim!r} is not strictly monotonic")
        units = var.attrs.get("units")
        if units in _LAT_UNITS and not np.all(np.abs(values.astype(float)) <= 90):
            problems.append(f"latitude {dim!r} outside [-90, 90]")
        if var.attrs.get("standard_name") == "time" or dim == "time":
            if not isinstance(units, str) or not _TIME_UNITS.match(units):
                problems.append(f"time coordinate {dim!r} has units={units!r}; CF needs "
                                "'<unit> since <date>' with a unit of days, hours, minutes "
                                "or seconds (not months or years, CF 4.4)")
            cal = str(var.attrs.get("calendar", "standard")).lower()
            if cal not in CALENDARS:
                problems.append(f"time coordinate {dim!r} has unknown calendar={cal!r}")
    axes_units = {str(ds[d].attrs.get("units")) for d in ds.dims if d in ds.variables}
    if not axes_units & _LAT_UNITS:
        problems.append("no latitude coordinate with units degrees_north (CF 4.1)")
    if not axes_units & _LON_UNITS:
        problems.append("no longitude coordinate with units degrees_east (CF 4.2)")
    if "member" in ds.dims:
        if ds.variables.get("member") is None or \
                ds["member"].attrs.get("standard_name") != "realization":
            problems.append("ensemble dimension 'member' lacks standard_name='realization'")
    for name, var in ds.data_vars.items():
        if var.ndim >= 2 and "units" not in var.attrs:
            problems.append(f"data variable {name!r} has no units attribute")
        fill = var.attrs.get("_FillValue", var.encoding.get("_FillValue"))
        if fill is not None and np.asarray(fill).dtype.kind != var.dtype.kind:
            problems.append(f"{name!r}: _FillValue type {np.asarray(fill).dtype} differs from "
                            f"the variable's {var.dtype}")
        for key, value in var.attrs.items():
            if isinstance(value, (dict, list)) or value is None:
                problems.append(f"{name!r}: attribute {key!r} has non-netCDF type")
    for name, var in ds.variables.items():
        for key in REFERENCE_ATTRS:
            for ref in str(var.attrs.get(key, "")).split():
                ref = ref.rstrip(":")  # grid_mapping's extended form "crs: lat lon"
                if ref and ref not in ds.variables:
                    problems.append(f"{name!r}: {key} attribute names missing variable {ref!r}")
    problems += _cf_xarray_axes(decoded)
    return problems


def _cf_xarray_axes(decoded: xr.Dataset) -> list[str]:
    """cf_xarray (what downstream tools use) must find the X and Y axes of the decoded file."""
    import cf_xarray  # noqa: F401  (registers the .cf accessor)

    axes = decoded.cf.axes
    return [f"cf_xarray finds no {ax} axis" for ax in ("X", "Y") if not axes.get(ax)]
