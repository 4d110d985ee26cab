"""Streaming, atomic, resumable ensemble writers (NetCDF via netCDF4, Zarr via xarray).

An ensemble file is created from a *template* Dataset (all coordinates and attributes,
data variables with a ``member`` dimension of the final size) under a temporary name
``<out>.partial``.  Member slabs are then written in place one batch at a time, so peak
memory is one batch, whatever the ensemble size.  After each slab a small JSON ledger
(``<out>.partial.progress-r<rank>.json``) records the members written; a generation killed
midway and started again skips them.  When every member is written the ledger is removed
and the file renamed to its final name, so the final name only ever holds a complete file.

xarray cannot write a region of an existing NetCDF file, so slabs go through netCDF4
directly (the template, with all CF encoding, is still written by xarray).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

MEMBER = "member"
ZARR_FORMAT = 2
"""Zarr v2 stores: read by every Zarr implementation and xarray version in use today, and
with a specified fixed-length string type for labels such as ``scenario``."""
FORMATS = {".nc": "netcdf", ".nc4": "netcdf", ".netcdf": "netcdf", ".zarr": "zarr"}


def output_format(path: str | Path) -> str:
    """``netcdf`` or ``zarr`` from the suffix (error names the allowed suffixes)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"out={str(path)!r}: unknown suffix {suffix!r}; use one of "
                         f"{sorted(FORMATS)} (NetCDF or Zarr)")
    return FORMATS[suffix]


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite`` (raised before any work)."""
    p = Path(path)
    output_format(p)
    if p.exists() and not overwrite:
        raise FileExistsError(f"out={str(p)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it, or choose another path")
    if not p.parent.exists():
        raise FileNotFoundError(f"out={str(p)!r}: the folder {str(p.parent)!r} does not exist")
    return p


@dataclass
class EnsembleWriter:
    """Writes member slabs of one ensemble into ``<path>.partial`` and finalises it."""

    path: Path
    request: dict[str, Any]
    """What was asked (checkpoint hash, sampler, seed, ...); a ledger of another request is
    not resumed."""
    rank: int = 0

    @property
    def format(self) -> str:
        return output_format(self.path)

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def ledger_path(self, rank: int) -> Path:
        return self.partial.with_name(f"{self.partial.name}.progress-r{rank}.json")

    # -- set-up ----------------------------------------------------------------------------
    def members_done(self, world: int = 1) -> set[int]:
        """Members already in a partial file of the same request (empty if none)."""
        if not self.partial.exists():
            return set()
        done: set[int] = set()
        for r in range(world):
            ledger = self.ledger_path(r)
            if not ledger.exists():
                continue
            info = json.loads(ledger.read_text())
            if info.get("request") != _plain(self.request):
                return set()
            done.update(int(m) for m in info["members"])
        return done

    def create(self, template: xr.Dataset, encoding: dict[str, dict[str, Any]]) -> None:
        """Write the template under the partial name (replacing a stale partial)."""
        self.discard()
        if self.format == "zarr":
            template.to_zarr(self.partial, mode="w", compute=False, encoding=encoding,
                             consolidated=True, zarr_format=ZARR_FORMAT)
        else:
            template.to_netcdf(self.partial, engine="netcdf4", encoding=encoding)

    def discard(self) -> None:
        for p in [self.partial, *self.partial.parent.glob(self.partial.name + ".progress-r*")]:
            _remove(p)

    # -- slabs -----------------------------------------------------------------------------
    def write(self, slab: xr.Dataset, members: list[int]) -> None:
        """Write ``slab`` (dims: member, ...) at the given member indices, then the ledger."""
        assert len(members) == slab.sizes[MEMBER]
        if self.format == "zarr":
            self._write_zarr(slab, members)
        else:
            self._write_netcdf(slab, members)
        ledger = self.ledger_path(self.rank)
        done = set()
        if ledger.exists():
            done = set(json.loads(ledger.read_text())["members"])
        done.update(members)
        _atomic_text(ledger, json.dumps({"request": _plain(self.request),
                                         "members": sorted(done)}))

    def _write_zarr(self, slab: xr.Dataset, members: list[int]) -> None:
        data_vars = [v for v in slab.data_vars if MEMBER in slab[v].dims]
        for start, stop in _runs(members):
            part = slab[data_vars].isel({MEMBER: slice(members.index(start),
                                                       members.index(start) + stop - start)})
            part = part.drop_vars([c for c in part.coords])
            part.to_zarr(self.partial, region={MEMBER: slice(start, stop)}, mode="r+")

    def _write_netcdf(self, slab: xr.Dataset, members: list[int]) -> None:
        import netCDF4

        with netCDF4.Dataset(self.partial, "a") as nc:
            for name in slab.data_vars:
                da = slab[name]
                if MEMBER not in da.dims:
                    continue
                var = nc.variables[name]
                da = da.transpose(*var.dimensions)
                values = np.asarray(da.values, dtype=var.dtype)
                axis = var.dimensions.index(MEMBER)
                for start, stop in _runs(members):
                    i0 = members.index(start)
                    index = [slice(None)] * values.ndim
                    index[axis] = slice(start, stop)
                    src = [slice(None)] * values.ndim
                    src[axis] = slice(i0, i0 + stop - start)
                    var[tuple(index)] = np.ma.masked_invalid(values[tuple(src)])
            nc.sync()

    def finalize(self, overwrite: bool) -> Path:
        """Rename the complete partial file to the final name and drop the ledgers.

        A replaced output is removed only after the rename: a file is replaced atomically,
        a Zarr store (a directory, which cannot be renamed onto) is first moved aside to
        ``<out>.replaced`` and restored if the rename fails, so an error never leaves the
        final name without the old or the new result."""
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"out={str(self.path)!r} appeared while generating; "
                                  "nothing was overwritten (the result is in "
                                  f"{str(self.partial)!r})")
        if self.format == "zarr":
            import zarr

            zarr.consolidate_metadata(str(self.partial))
        aside = None
        if self.path.is_dir():
            aside = self.path.with_name(self.path.name + ".replaced")
            _remove(aside)
            os.replace(self.path, aside)
        try:
            os.replace(self.partial, self.path)
        except BaseException:
            if aside is not None:
                os.replace(aside, self.path)
            raise
        for ledger in self.partial.parent.glob(self.partial.name + ".progress-r*"):
            ledger.unlink()
        if aside is not None:
            _remove(aside)
        return self.path


def _remove(p: Path) -> None:
    """Delete a file or a directory tree, if there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _runs(members: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, stop)`` of a sorted member list."""
    runs: list[tuple[int, int]] = []
    for m in members:
        if runs and runs[-1][1] == m:
            runs[-1] = (runs[-1][0], m + 1)
        else:
            runs.append((m, m + 1))
    return runs


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
