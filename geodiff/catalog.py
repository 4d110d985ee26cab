"""The data catalog: named, documented datasets and one lazy opener for all of them.

``data_catalog.yaml`` (bundled, or a user file passed as ``catalog=``) lists entries that
are parsed into frozen :class:`CatalogEntry` objects; unknown keys and malformed values
raise :class:`CatalogError` naming the key path and the allowed keys.  The YAML schema is
documented at the top of the bundled file.

:func:`open_dataset` opens a catalog entry or a user's own NetCDF file / Zarr store
(local path or fsspec URL) lazily with dask, selects variables, combines several sources
(``concat`` along a labelled dim, otherwise ``merge``), runs :func:`geodiff.grid.standardize`
and applies the subset in canonical coordinates.  Everything that can be checked without
reading data (entry name, packages, files, variables, subset keys) is checked first.

Times are decoded (cftime for non-standard calendars); when xarray cannot decode them the
file is reopened with ``decode_times=False`` and a warning names the problem.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import glob
import importlib.util
import itertools
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from geodiff import grid
from geodiff.cfcheck import REFERENCE_ATTRS

DEFAULT_CATALOG = Path(__file__).resolve().with_name("data_catalog.yaml")
ENGINES = ("netcdf", "zarr")
READERS = ("dask", "tensorstore")
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")
_PROTOCOL_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "http": "aiohttp",
                      "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}
_ANONYMOUS = {"gs": {"token": "anon"}, "gcs": {"token": "anon"}, "s3": {"anon": True}}


class CatalogError(ValueError):
    """A catalog entry, variable or subset is unknown or malformed."""


class MissingPackageError(CatalogError, ModuleNotFoundError):
    """A package needed by a catalog source is not installed (message has the pip line)."""


class MissingFileError(CatalogError, FileNotFoundError):
    """A catalog source file or store does not exist."""


@dataclass(frozen=True)
class Source:
    """One file or store: ``package`` + ``path``, a ``path``, or a ``url``."""

    package: str | None = None
    """Importable package holding the file (``path`` is then inside it)."""
    path: str | None = None
    """File path: inside ``package``, else relative to the catalog file, or absolute."""
    url: str | None = None
    """fsspec URL (``gs://``, ``s3://``, ``https://``) of a Zarr store or NetCDF file."""
    pip: str | None = None
    """What to ``pip install`` when ``package`` is missing (default: the package name)."""


@dataclass(frozen=True)
class Subset:
    """Selection in canonical coordinates, applied after standardisation."""

    time: tuple[Any, Any] | None = None
    """Inclusive ``[start, stop]`` (date strings or years; ``None`` = open end)."""
    lat: tuple[float, float] | None = None
    """Inclusive ``[south, north]`` in degrees north."""
    lon: tuple[float, float] | None = None
    """Inclusive ``[west, east]`` going east, in degrees (any convention, taken mod 360)."""
    levels: tuple[float, ...] | None = None
    """Level values to keep."""


@dataclass(frozen=True)
class Concat:
    """Concatenate the sources along ``dim`` (new dim with ``labels``, or an existing one)."""

    dim: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog dataset (see the schema at the top of ``data_catalog.yaml``)."""

    name: str
    description: str
    license: str
    attribution: str
    sources: tuple[Source, ...]
    engine: str | None = None
    variables: tuple[str, ...] | None = None
    subset: Subset = field(default_factory=Subset)
    concat: Concat | None = None
    chunks: dict[str, int] | None = None
    needs_network: bool = False
    catalog_path: Path | None = None
    """The catalog file the entry came from (relative paths resolve next to it)."""


# ---------------------------------------------------------------------------------------
# parsing


def load_catalog(catalog: str | Path | None = None) -> dict[str, CatalogEntry]:
    """Parse and validate a catalog YAML file (bundled one when ``None``), by entry name."""
    path = Path(catalog).expanduser().resolve() if catalog is not None else DEFAULT_CATALOG
    if not path.is_file():
        raise MissingFileError(f"catalog file {str(path)!r} does not exist; pass catalog=None "
                               "for the bundled catalog or the path of a catalog YAML")
    data = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    _check_keys(data, {"version", "entries"}, where)
    entries = data.get("entries") or []
    if not isinstance(entries, list):
        raise CatalogError(f"{where}: 'entries' must be a list of mappings, got "
                           f"{type(entries).__name__}")
    out: dict[str, CatalogEntry] = {}
    for i, raw in enumerate(entries):
        entry = _parse_entry(raw, f"{where}: entries[{i}]", path)
        if entry.name in out:
            raise CatalogError(f"{where}: entries[{i}].name={entry.name!r} is used twice")
        out[entry.name] = entry
    return out


def list_entries(catalog: str | Path | None = None) -> list[CatalogEntry]:
    """All entries of a catalog (bundled one when ``None``), in file order."""
    return list(load_catalog(catalog).values())


def _check_keys(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise CatalogError(f"{where} must be a mapping with keys {sorted(allowed)}, got "
                           f"{type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            raise CatalogError(f"{where}.{key}: unknown key {key!r}; allowed keys: "
                               f"{sorted(allowed)}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CatalogError(f"{where}={value!r} must be of type {names}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise CatalogError(f"{where}={value!r} must be a non-empty list of names")
    return tuple(str(_typed(v, (str, int, float), f"{where}[{i}]")) for i, v in enumerate(value))


def _parse_entry(raw: Any, where: str, path: Path) -> CatalogEntry:
    allowed = {f.name for f in fields(CatalogEntry)} - {"catalog_path"}
    _check_keys(raw, allowed, where)
    for key in ("name", "description", "license", "attribution", "sources"):
        if key not in raw:
            raise CatalogError(f"{where}: missing required key {key!r}")
    name = _typed(raw["name"], str, f"{where}.name")
    where = f"{where} ({name})"
    srcs = raw["sources"]
    if not isinstance(srcs, list) or not srcs:
        raise CatalogError(f"{where}.sources={srcs!r} must be a non-empty list")
    sources = tuple(_parse_source(s, f"{where}.sources[{i}]") for i, s in enumerate(srcs))
    engine = raw.get("engine")
    if engine is not None and engine not in ENGINES:
        raise CatalogError(f"{where}.engine={engine!r} must be one of {list(ENGINES)}")
    concat = None
    if raw.get("concat") is not None:
        c = raw["concat"]
        _check_keys(c, {"dim", "labels"}, f"{where}.concat")
        labels = _strings(c["labels"], f"{where}.concat.labels") if "labels" in c else None
        if labels is not None and len(labels) != len(sources):
            raise CatalogError(f"{where}.concat.labels={list(labels)} must have one label per "
                               f"source ({len(sources)})")
        concat = Concat(dim=_typed(c.get("dim"), str, f"{where}.concat.dim"), labels=labels)
    chunks = raw.get("chunks")
    if chunks is not None:
        _typed(chunks, dict, f"{where}.chunks")
        chunks = {str(k): _typed(v, int, f"{where}.chunks.{k}") for k, v in chunks.items()}
    return CatalogEntry(
        name=name,
        description=" ".join(_typed(raw["description"], str, f"{where}.description").split()),
        license=_typed(raw["license"], str, f"{where}.license"),
        attribution=" ".join(_typed(raw["attribution"], str, f"{where}.attribution").split()),
        sources=sources, engine=engine,
        variables=_strings(raw["variables"], f"{where}.variables")
        if raw.get("variables") is not None else None,
        subset=parse_subset(raw.get("subset") or {}, f"{where}.subset"),
        concat=concat, chunks=chunks,
        needs_network=_typed(raw.get("needs_network", False), bool, f"{where}.needs_network"),
        catalog_path=path,
    )


def _parse_source(raw: Any, where: str) -> Source:
    _check_keys(raw, {f.name for f in fields(Source)}, where)
    src = Source(**{k: _typed(v, str, f"{where}.{k}") for k, v in raw.items()})
    if (src.path is None) == (src.url is None):
        raise CatalogError(f"{where}: give exactly one of 'path' (optionally with 'package') "
                           f"or 'url', got {raw!r}")
    if src.url is not None and src.package is not None:
        raise CatalogError(f"{where}: 'package' goes with 'path', not with 'url'")
    return src


def parse_subset(raw: Mapping[str, Any], where: str = "subset") -> Subset:
    """Validate a subset mapping (keys ``time``, ``lat``, ``lon``, ``levels``)."""
    _check_keys(raw, {f.name for f in fields(Subset)}, where)
    kw: dict[str, Any] = {}
    for key in ("time", "lat", "lon"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise CatalogError(f"{where}.{key}={value!r} must be a [start, stop] pair")
        if key == "time":
            kw[key] = tuple(v.isoformat() if isinstance(v, _dt.date) else v for v in value)
        else:
            kw[key] = tuple(float(_typed(v, (int, float), f"{where}.{key}")) for v in value)
    if raw.get("levels") is not None:
        levels = raw["levels"]
        if not isinstance(levels, (list, tuple)) or not levels:
            raise CatalogError(f"{where}.levels={levels!r} must be a non-empty list of values")
        kw["levels"] = tuple(_typed(v, (int, float), f"{where}.levels") for v in levels)
    return Subset(**kw)


# ---------------------------------------------------------------------------------------
# resolving


def get_entry(name: str, catalog: str | Path | None = None) -> CatalogEntry:
    """The entry ``name``; an unknown name lists the close ones."""
    entries = load_catalog(catalog)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise CatalogError(f"unknown catalog entry {name!r}.{hint} Available: {list(entries)} "
                           f"(catalog {str(catalog or DEFAULT_CATALOG)!r}); or pass the path of "
                           "a NetCDF file or Zarr store")
    return entries[name]


def _is_path_like(s: str) -> bool:
    p = Path(s).expanduser()
    return "://" in s or p.exists() or "/" in s or "\\" in s \
        or p.suffix.lower() in (*_NETCDF_SUFFIXES, ".zarr")


def _user_entry(target: str) -> CatalogEntry:
    """The entry of a path or URL given directly (a local path may be a glob pattern, see
    :func:`_locate`)."""
    src = Source(url=target) if "://" in target else Source(path=str(Path(target).expanduser()))
    return CatalogEntry(name=target, description="user dataset", license="unknown",
                        attribution="unknown", sources=(src,),
                        needs_network="://" in target and not target.startswith("file://"))


def _locate(src: Source, entry: CatalogEntry) -> list[str | Path]:
    """Local paths or URL of a source; raises if a package, file or fsspec backend is missing.

    A local path with glob characters (``tas_day_*.nc``: a variable split into files of
    consecutive periods, as CMIP and ERA5 downloads are) gives every file it matches, in
    name order; :func:`open_dataset` concatenates them along time into one source."""
    if src.url is not None:
        protocol = src.url.split("://", 1)[0].lower()
        backend = _PROTOCOL_PACKAGES.get(protocol)
        if backend is not None and importlib.util.find_spec(backend) is None:
            err = MissingPackageError(
                f"catalog entry {entry.name!r} reads {src.url!r}, which needs the fsspec "
                f"backend {backend!r}: pip install {backend}"
                + (" (and internet access)" if entry.needs_network else ""))
            err.name = backend
            raise err
        return [src.url]
    assert src.path is not None
    if src.package is not None:
        try:
            spec = importlib.util.find_spec(src.package)
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            err = MissingPackageError(
                f"catalog entry {entry.name!r} needs the package {src.package!r}, which is "
                f"not installed: pip install {src.pip or src.package}")
            err.name = src.package
            raise err
        path = Path(list(spec.submodule_search_locations)[0]) / src.path
        where = f"inside package {src.package!r}"
    else:
        path = Path(src.path).expanduser()
        where = "given directly"
        if not path.is_absolute() and entry.catalog_path is not None:
            path = entry.catalog_path.parent / path
            where = f"relative to the catalog {str(entry.catalog_path)!r}"
    if glob.has_magic(str(path)):
        matches = sorted(Path(m) for m in glob.glob(str(path)))
        if not matches:
            raise MissingFileError(f"catalog entry {entry.name!r}: {str(path)!r} matches no "
                                   f"file (path {src.path!r} {where}); check the directory "
                                   "and the pattern (glob syntax: *, ?, [...])")
        return list(matches)
    if not path.exists():
        raise MissingFileError(f"catalog entry {entry.name!r}: file {str(path)!r} does not "
                               f"exist (path {src.path!r} {where})")
    return [path]


def _engine(location: str | Path, engine: str | None) -> str:
    if engine is not None:
        return engine
    text = str(location).rstrip("/")
    if text.lower().endswith(".zarr") or ".zarr/" in text.lower() or \
            (isinstance(location, Path) and location.is_dir()):
        return "zarr"
    if text.lower().endswith(_NETCDF_SUFFIXES) or isinstance(location, Path):
        return "netcdf"
    raise CatalogError(f"cannot tell the format of {text!r} from its name; set engine: "
                       f"one of {list(ENGINES)}")


# ---------------------------------------------------------------------------------------
# opening


def _open_one(location: str | Path, engine: str) -> xr.Dataset:
    """Lazily open one NetCDF file / Zarr store; undecodable times stay raw (with a warning)."""
    def attempt(decode_times: bool) -> xr.Dataset:
        kw: dict[str, Any] = dict(chunks="auto", mask_and_scale=True, decode_times=decode_times,
                                  decode_timedelta=False)
        if isinstance(location, str):
            protocol = location.split("://", 1)[0].lower()
            options = _ANONYMOUS.get(protocol, {})
            if engine == "zarr":
                return xr.open_zarr(location, storage_options=options, **kw)
            import fsspec

            return xr.open_dataset(fsspec.open(location, **options).open(), engine="h5netcdf",
                                   **kw)
        if engine == "zarr":
            return xr.open_zarr(location, **kw)
        return xr.open_dataset(location, **kw)

    try:
        with warnings.catch_warnings():  # e.g. "1-1-1": xarray pads it correctly, says so
            warnings.filterwarnings("ignore", "Ambiguous reference date string")
            return attempt(True)
    except (ValueError, TypeError, OverflowError) as err:
        ds = attempt(False)
        warnings.warn(f"could not decode the times of {str(location)!r} ({err}); they are kept "
                      "as raw numbers, so no year/dayofyear coordinates and no date subsets",
                      stacklevel=3)
        return ds


def _open_tensorstore(location: str | Path, engine: str, name: str) -> xr.Dataset:
    """Open a Zarr store with xarray-tensorstore: lazily indexed arrays, no dask."""
    if engine != "zarr":
        raise CatalogError(f"{name!r}: reader='tensorstore' reads Zarr stores only, and "
                           f"{str(location)!r} is {engine}; use reader='dask'")
    try:
        import xarray_tensorstore
    except ImportError as err:
        raise CatalogError("reader='tensorstore' needs the tensorstore and "
                           "xarray-tensorstore packages: pip install 'geodiff[fast]'") from err
    try:
        return xarray_tensorstore.open_zarr(str(location))
    except ValueError as err:  # packed / non-NaN fill values: not decoded by tensorstore
        raise CatalogError(f"{name!r}: reader='tensorstore' cannot read {str(location)!r} as "
                           f"is ({err}); use reader='dask'") from err


def _fields(ds: xr.Dataset) -> list[str]:
    """Data variables that are fields: not bounds, grid mappings, ancillary variables of
    another variable (CF 3.4: quality flags, uncertainties), flag variables (CF 3.5:
    categorical codes with ``flag_values`` / ``flag_masks``) or 0-d/1-d helpers."""
    referenced = set()
    for v in ds.variables.values():
        referenced.add(v.attrs.get("bounds"))
        referenced.update(str(v.attrs.get("ancillary_variables", "")).split())
    return [str(n) for n, v in ds.data_vars.items() if v.ndim >= 2 and n not in referenced
            and "grid_mapping_name" not in v.attrs
            and not {"flag_values", "flag_masks"} & set(v.attrs)]


def open_dataset(name_or_path: str, *, catalog: str | Path | None = None,
                 variables: Sequence[str] | None = None, chunks: dict | None = None,
                 reader: str = "dask", **subset: Any) -> xr.Dataset:
    """Open a catalog entry or a NetCDF file / Zarr store as a lazy standardised Dataset.

    Parameters
    ----------
    name_or_path
        Entry name of the catalog, or a path / fsspec URL of the user's own data.
    catalog
        Catalog YAML (``None``: the bundled ``data_catalog.yaml``).
    variables
        Data variables to keep (default: the entry's ``variables``, else every field).
    chunks
        dask chunks by canonical dim name (``lat``, ``lon``, ``time``...), overriding the
        entry's.
    reader
        ``"dask"`` (default): dask-backed arrays, any source. ``"tensorstore"``: Zarr
        sources read through tensorstore (``pip install 'geodiff[fast]'``), lazily indexed
        without dask; for streaming training data fast, pass the unscaled result and the
        scaler to :class:`geodiff.data.FieldDataset` (``scaler=``), which then reads each
        batch in one concurrent tensorstore call per variable (``bench_loader.py``: 3x the
        samples/s of the dask reader). Float data without packing or non-NaN fill values,
        and sources that are not concatenated; otherwise a clear error says to use dask.
    **subset
        ``time=[start, stop]``, ``lat=[south, north]``, ``lon=[west, east]``,
        ``levels=[...]``: override the entry's subset (canonical coordinates).

    Returns
    -------
    xr.Dataset
        dask-backed and already passed through :func:`geodiff.grid.standardize` (dims
        ``lat``/``lon``, maybe ``level``, plus sample dims such as ``time``/``scenario``);
        ``attrs["geodiff_source"]`` names the entry or path.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"{name_or_path=} must be a catalog entry name or a path")
    target = str(name_or_path)
    entries = load_catalog(catalog)
    if target in entries:
        entry = entries[target]
    elif _is_path_like(target):
        entry = _user_entry(target)
    else:
        entry = get_entry(target, catalog)
    sub = parse_subset({**_subset_dict(entry.subset), **subset}, "subset")
    if variables is not None and (isinstance(variables, str) or not variables):
        raise TypeError(f"{variables=} must be a non-empty list of names")
    chunks = chunks if chunks is not None else entry.chunks
    if reader not in READERS:
        raise CatalogError(f"reader={reader!r} must be one of {list(READERS)}")
    if reader == "tensorstore" and len(entry.sources) > 1 and entry.concat is not None:
        raise CatalogError(f"catalog entry {entry.name!r} concatenates {len(entry.sources)} "
                           f"sources along {entry.concat.dim!r}, which would load them "
                           "whole without dask; use reader='dask' for it")
    locations = [_locate(s, entry) for s in entry.sources]
    if reader == "tensorstore" and any(len(locs) > 1 for locs in locations):
        raise CatalogError(f"catalog entry {entry.name!r}: a glob source is concatenated along "
                           "time, which would load its files whole without dask; use "
                           "reader='dask' for it")
    opened: list[xr.Dataset] = []
    parts = []
    for locs in locations:
        files = [_open_one(loc, _engine(loc, entry.engine)) if reader == "dask"
                 else _open_tensorstore(loc, _engine(loc, entry.engine), entry.name)
                 for loc in locs]
        opened += files
        parts.append(files[0] if len(files) == 1 else _concat_files(files, locs, entry))

    wanted = list(variables) if variables is not None else \
        list(entry.variables) if entry.variables is not None else None
    available = list(dict.fromkeys(v for p in parts for v in _fields(p)))
    if wanted is None:
        wanted = available
    missing = [v for v in wanted if not any(v in p.data_vars for p in parts)]
    if missing:
        raise CatalogError(f"variables {missing} not found in {entry.name!r}; available: "
                           f"{available}")
    selected = [p[[v for v in wanted if v in p.data_vars]] for p in parts]
    if entry.concat is None:  # merged: a source with none of the variables adds nothing
        selected = [p for p in selected if p.data_vars]
    ds = _combine([grid.standardize(p) for p in selected], entry, wanted)
    ds = _drop_dangling_references(apply_subset(ds, sub, entry.name))
    if chunks and reader == "dask":
        unknown = sorted(set(chunks) - set(map(str, ds.dims)))
        if unknown:
            raise CatalogError(f"chunks: dims {unknown} not in {entry.name!r}, whose dims are "
                               f"{sorted(map(str, ds.dims))} (use canonical names lat/lon)")
        ds = ds.chunk(chunks)
    ds.attrs["geodiff_source"] = entry.name
    # standardize/subset/chunk build new Datasets, which forget the files behind them:
    # close() (or a with block) closes every opened source, so the files can be rewritten
    ds.set_close(lambda: [p.close() for p in opened])
    return ds


def _drop_dangling_references(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without the references (e.g. ``time: bounds = "time_bnds"``, ``tas:
    grid_mapping = "crs"``) to variables that were not selected: written back, they would
    name variables missing from the file (a CF error; :func:`geodiff.cfcheck.cf_problems`
    reports it). ``ancillary_variables`` and ``coordinates`` keep the names still present;
    ``bounds`` and ``grid_mapping`` (also the extended form ``"crs: lat lon"``) go when a
    name is missing."""
    names = set(map(str, ds.variables))
    out = None
    for name, var in ds.variables.items():
        attrs = dict(var.attrs)
        for key in REFERENCE_ATTRS:
            words = str(attrs.get(key, "")).split()
            kept = [w for w in words if w.rstrip(":") in names]
            if kept == words:
                continue
            if key in ("ancillary_variables", "coordinates") and kept:
                attrs[key] = " ".join(kept)
            else:  # bounds, or a grid mapping (also "crs: lat lon") naming a missing one
                del attrs[key]
        if attrs != var.attrs:
            out = ds.copy() if out is None else out
            out.variables[name].attrs = attrs
    return ds if out is None else out


def _subset_dict(s: Subset) -> dict[str, Any]:
    return {f.name: getattr(s, f.name) for f in fields(Subset) if getattr(s, f.name) is not None}


def _combine(parts: list[xr.Dataset], entry: CatalogEntry, variables: list[str]) -> xr.Dataset:
    """Merge or concatenate standardised ``parts`` (so sources that differ only in latitude
    order, wrap column or coordinate names combine); the result describes itself with the
    first source's :class:`geodiff.grid.GridInfo`, which :func:`geodiff.grid.restore`
    maps back to."""
    if len(parts) == 1:
        return parts[0]
    kw: dict[str, Any] = dict(join="exact", combine_attrs="drop_conflicts")
    info = grid.grid_info(parts[0])
    parts = [parts[0], *(_on_longitudes_of(p, parts[0]) for p in parts[1:])]
    try:
        if entry.concat is None:
            out = xr.merge(parts, compat="override", **kw)
        else:
            c = entry.concat
            if c.labels is not None:
                absent = [v for v in variables if not all(v in p.data_vars for p in parts)]
                if absent:
                    raise CatalogError(f"catalog entry {entry.name!r}: variables {absent} are "
                                       f"not in every source, so they cannot be stacked along "
                                       f"{c.dim!r}")
                dim: Any = xr.DataArray(np.array(c.labels), dims=c.dim, name=c.dim)
            else:  # an existing dim, by its canonical name (e.g. valid_time -> time)
                dim = {info.time_name: grid.TIME, info.level_name: grid.LEVEL,
                       info.lat_name: grid.LAT, info.lon_name: grid.LON}.get(c.dim, c.dim)
            if isinstance(dim, str) and dim == grid.TIME:  # consecutive periods, any order
                parts = _in_time_order(parts, [str(s.path or s.url) for s in entry.sources],
                                       entry.name)
            out = xr.concat(parts, dim=dim, data_vars=variables, coords="minimal",
                            compat="override", **kw)
    except ValueError as err:
        if isinstance(err, CatalogError):
            raise
        raise CatalogError(f"catalog entry {entry.name!r}: its sources do not share one grid "
                           f"and can't be combined ({err})") from err
    out.attrs[grid.ATTR] = parts[0].attrs[grid.ATTR]
    return grid.standardize(out)


def _in_time_order(parts: list[xr.Dataset], names: Sequence[str], entry_name: str
                   ) -> list[xr.Dataset]:
    """Standardised ``parts`` sorted by their first time; CatalogError naming the two
    (``names``) whose times overlap (the same period twice: a duplicate file, or files of
    different runs)."""
    if not all(grid.TIME in p.coords and p.sizes.get(grid.TIME, 0) for p in parts):
        return parts
    try:
        order = sorted(range(len(parts)), key=lambda i: parts[i][grid.TIME].values[0])
    except TypeError:  # undecoded or mixed calendars: keep the given order
        return parts
    for a, b in itertools.pairwise(order):
        if not parts[a][grid.TIME].values[-1] < parts[b][grid.TIME].values[0]:
            raise CatalogError(
                f"catalog entry {entry_name!r}: the times of {names[a]!r} "
                f"({parts[a][grid.TIME].values[0]} .. {parts[a][grid.TIME].values[-1]}) and "
                f"{names[b]!r} (from {parts[b][grid.TIME].values[0]}) overlap; concatenate "
                "files of consecutive periods only (drop duplicates or files of other runs)")
    return [parts[i] for i in order]


def _concat_files(files: list[xr.Dataset], locations: list[str | Path],
                  entry: CatalogEntry) -> xr.Dataset:
    """The files of one glob source as one Dataset: standardised, in time order, concatenated
    along time (variables without a time dimension, e.g. ``lat_bnds``, taken once)."""
    names = [str(loc) for loc in locations]
    parts = [grid.standardize(f) for f in files]
    missing = [n for n, p in zip(names, parts) if grid.TIME not in p.dims]
    if missing:
        raise CatalogError(f"catalog entry {entry.name!r}: a glob source is concatenated along "
                           f"time, but {missing[:3]} have no time dimension")
    try:
        out = xr.concat(_in_time_order(parts, names, entry.name), dim=grid.TIME,
                        data_vars="minimal", coords="minimal", compat="override",
                        join="exact", combine_attrs="drop_conflicts")
    except ValueError as err:
        raise CatalogError(f"catalog entry {entry.name!r}: the files {names[:3]}... of its "
                           f"glob source do not share one grid and can't be concatenated "
                           f"({err})") from err
    out.attrs[grid.ATTR] = parts[0].attrs[grid.ATTR]
    return out


def _on_longitudes_of(part: xr.Dataset, first: xr.Dataset) -> xr.Dataset:
    """``part`` with the longitudes of ``first`` when they are the same meridians written
    in another convention (0..360 vs -180..180, or another starting meridian): its columns
    reordered to ``first``'s, which its values then take. Otherwise unchanged (the exact
    join reports the different grids)."""
    want, have = first[grid.LON].values, part[grid.LON].values
    if want.shape != have.shape or np.array_equal(want, have):
        return part
    order = grid.match_values(want.astype(np.float64), have.astype(np.float64), 360.0,
                              atol=1e-6)
    if (order < 0).any() or np.unique(order).size != order.size:
        return part
    out = part.isel({grid.LON: order})
    return out.assign_coords({grid.LON: (grid.LON, want, first[grid.LON].attrs)})


# ---------------------------------------------------------------------------------------
# subsets


def apply_subset(ds: xr.Dataset, subset: Subset, name: str = "dataset") -> xr.Dataset:
    """Select ``subset`` from a standardised Dataset (canonical names; refreshes grid info).

    Longitudes are taken modulo 360 from ``west`` eastwards to ``east``; a range that crosses
    the end of the source window (e.g. ``lon=[-80, 20]`` on 0..360 data) comes back
    monotonic with values continuing past it (280..380), which :func:`geodiff.grid.restore`
    wraps back.
    """
    out = ds
    if subset.time is not None:
        if grid.TIME not in out.dims:
            raise CatalogError(f"subset time={list(subset.time)} but {name!r} has no time dim")
        if _numeric(out.indexes[grid.TIME]):  # undecoded times: raw numbers
            out = out.sel({grid.TIME: slice(*subset.time)})
        else:
            out = out.isel({grid.TIME: _time_positions(out, subset.time, name)})
        _nonempty(out, grid.TIME, f"time={list(subset.time)}", ds, name)
    if subset.lat is not None:
        south, north = sorted(subset.lat)
        out = out.sel({grid.LAT: slice(south, north)})
        _nonempty(out, grid.LAT, f"lat={list(subset.lat)}", ds, name)
    if subset.lon is not None:
        out = _select_lon(out, *subset.lon, name=name)
    if subset.levels is not None and not _is_scalar_level(out, subset.levels):
        if grid.LEVEL not in out.dims:
            raise CatalogError(f"subset levels={list(subset.levels)} but {name!r} has no "
                               "level dimension (absent, or a squeezed singleton)")
        have = out[grid.LEVEL].values
        absent = [v for v in subset.levels if not np.any(np.isclose(have, v))]
        if absent:
            raise CatalogError(f"subset levels {absent} not in {name!r}; available levels: "
                               f"{have.tolist()}")
        out = out.sel({grid.LEVEL: list(subset.levels)}, method="nearest")
    return grid.standardize(out) if out is not ds else out


def _time_positions(ds: xr.Dataset, bounds: tuple[Any, Any], name: str) -> slice | np.ndarray:
    """Positions of the times within the inclusive ``bounds`` of a time subset, compared as
    date tuples like the time splits (:func:`geodiff.samples.time_positions`), so that
    ``"1999-12-31"`` also ends a 360_day year; a slice when they are contiguous."""
    from geodiff.samples import time_positions

    try:
        pos = time_positions(ds[grid.TIME].values,
                             [None if b is None else str(b) for b in bounds],
                             f"subset time={list(bounds)}")
    except ValueError as err:
        try:
            calendar = ds[grid.TIME].dt.calendar
        except (AttributeError, TypeError):
            calendar = "unknown"
        raise CatalogError(f"{err} ({name!r}, calendar {calendar!r})") from None
    if pos.size and np.array_equal(pos, np.arange(pos[0], pos[0] + pos.size)):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


def _is_scalar_level(ds: xr.Dataset, levels: tuple[float, ...]) -> bool:
    """The levels asked for are exactly a squeezed singleton level (nothing to select)."""
    return grid.LEVEL in ds.coords and ds[grid.LEVEL].ndim == 0 and \
        all(np.isclose(float(ds[grid.LEVEL]), v) for v in levels)


def _numeric(index: Any) -> bool:
    return index.dtype.kind in "fiu"


def _nonempty(out: xr.Dataset, dim: str, what: str, ds: xr.Dataset, name: str) -> None:
    if out.sizes[dim] == 0:
        values = ds[dim].values
        raise CatalogError(f"subset {what} selects nothing from {name!r}, whose {dim} runs "
                           f"from {values[0]} to {values[-1]}")


def _select_lon(ds: xr.Dataset, west: float, east: float, name: str) -> xr.Dataset:
    lon = ds[grid.LON].values.astype(np.float64)
    lon_min = grid.grid_info(ds).lon_min
    width = 360.0 if east - west >= 360.0 else float(np.mod(east - west, 360.0))
    start = lon_min + float(np.mod(west - lon_min, 360.0))
    offset = np.mod(lon - start, 360.0)  # degrees east of the start, (n_lon,)
    keep = np.nonzero(offset <= width + 1e-9)[0]
    if keep.size == 0:
        raise CatalogError(f"subset lon={[west, east]} selects nothing from {name!r}, whose "
                           f"longitudes run from {lon[0]} to {lon[-1]}")
    idx = keep[np.argsort(offset[keep], kind="stable")]
    out = ds.isel({grid.LON: idx})
    values = out[grid.LON].values
    turns = np.floor((values.astype(np.float64) - start) / 360.0)  # from [start, start + 360)
    continued = np.where(turns == 0, values, values - 360.0 * turns)
    if not np.array_equal(continued, values):
        out = out.assign_coords({grid.LON: (grid.LON, continued.astype(values.dtype),
                                            out[grid.LON].attrs)})
    return out


# ---------------------------------------------------------------------------------------
# describing


def describe(name: str, catalog: str | Path | None = None) -> str:
    """Human-readable summary of a catalog entry (opens local data lazily, reads no values)."""
    entry = get_entry(name, catalog)
    wrap = textwrap.TextWrapper(width=88, initial_indent="  ", subsequent_indent="  ")
    lines = [entry.name, wrap.fill(entry.description),
             f"  licence:       {entry.license}", wrap.fill(f"attribution:   {entry.attribution}"),
             f"  needs network: {'yes' if entry.needs_network else 'no'}"]
    for src in entry.sources:
        text = src.url or (f"{src.path} in package {src.package} (pip install "
                           f"{src.pip or src.package})" if src.package else src.path)
        lines.append(f"  source:        {text}")
    if entry.concat is not None:
        lines.append(f"  stacked along: {entry.concat.dim} {list(entry.concat.labels or [])}")
    if entry.needs_network:
        lines.append("  (remote data: not opened here; open_dataset(name) reads it lazily)")
        if entry.variables:
            lines.append(f"  variables:     {', '.join(entry.variables)}")
        return "\n".join(lines)
    try:
        ds = open_dataset(name, catalog=catalog)
    except (MissingPackageError, MissingFileError) as err:
        lines.append(f"  not available: {err}")
        return "\n".join(lines)
    with ds:
        _describe_data(ds, lines)
    return "\n".join(lines)


def _describe_data(ds: xr.Dataset, lines: list[str]) -> None:
    lines.append("  variables:")
    for var in grid._field_names(ds):
        attrs = ds[var].attrs
        label = attrs.get("long_name") or attrs.get("standard_name") or ""
        lines.append(f"    {var:<20} [{attrs.get('units', '?')}] {label}".rstrip())
    lines.append("  dims:          " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()))
    info = grid.grid_info(ds)
    lines.append(f"  grid:          lat {_span(info.lat, 'N')}; lon {_span(info.lon, 'E')}; "
                 f"periodic in lon: {'yes' if info.periodic else 'no'}; "
                 f"pole to pole: {'yes' if info.global_lat else 'no'}")
    if grid.LEVEL in ds.coords:
        units = ds[grid.LEVEL].attrs.get("units", "")
        lines.append(f"  level:         {np.atleast_1d(ds[grid.LEVEL].values).tolist()} {units}")
    if grid.TIME in ds.coords:
        time = ds[grid.TIME]
        if time.dtype.kind == "M" or time.dtype.kind == "O":
            calendar = time.dt.calendar
        else:
            calendar = f"undecoded, units {time.attrs.get('units')!r}"
        lines.append(f"  time:          {_when(time.values[0])} .. {_when(time.values[-1])} "
                     f"({time.size} steps, calendar {calendar})")


def _span(values: Sequence[float], hemi: str) -> str:
    v = np.asarray(values)
    step = f", step {np.median(np.diff(v)):g} deg" if v.size > 1 else ""
    return f"{v[0]:g}..{v[-1]:g} deg{hemi} ({v.size} points{step})"


def _when(value: Any) -> str:
    if isinstance(value, np.datetime64):
        return str(value.astype("datetime64[s]"))
    return str(value)
