"""Torch datasets over scaled xarray fields: padding, channels, masks, condition vectors.

Time splits and the condition-vector layout live in :mod:`geodiff.samples` (re-exported
here).

This module is one of the two crossings between the xarray world and the tensor world
(the other is :mod:`geodiff.ensemble`). A sample is one index along the (stacked) sample dims;
variables x levels become channels of a ``(C, H+, W+)`` tensor on the padded grid.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr

from geodiff.config import ConditioningConfig
from geodiff.grid import LAT, LEVEL, LON, loss_area_weights, match_values
from geodiff.samples import TIME, ConditionSpec, _plain, split_dataset
from geodiff.scaling import Scaler

__all__ = ["ConditionSpec", "FieldDataset", "Padding", "collate", "compute_padding",
           "split_dataset", "threaded_batches"]

_PAD_MODES = ("circular", "reflect", "replicate")

# -- padding ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Padding:
    """Pad ``(..., H, W)`` to a UNet-friendly size and crop back exactly.

    ``mode`` pads longitude (``circular`` for periodic grids), ``lat_mode`` latitude
    (``replicate`` or ``reflect``; the UNet handles pole-aware padding itself).
    """

    lat_before: int = 0
    lat_after: int = 0
    lon_before: int = 0
    lon_after: int = 0
    mode: str = "replicate"
    lat_mode: str = "replicate"

    def __post_init__(self) -> None:
        if self.mode not in _PAD_MODES or self.lat_mode not in ("reflect", "replicate"):
            raise ValueError(f"Padding mode={self.mode!r} must be one of {_PAD_MODES} and "
                             f"lat_mode={self.lat_mode!r} one of ('reflect', 'replicate')")
        if min(self.lat_before, self.lat_after, self.lon_before, self.lon_after) < 0:
            raise ValueError(f"padding widths must be >= 0, got {self}")

    def padded_shape(self, n_lat: int, n_lon: int) -> tuple[int, int]:
        return (n_lat + self.lat_before + self.lat_after,
                n_lon + self.lon_before + self.lon_after)

    def lat_index(self, n: int) -> np.ndarray:
        """Source row of every padded row, ``(H+,)``."""
        return _pad_index(n, self.lat_before, self.lat_after, self.lat_mode)

    def lon_index(self, n: int) -> np.ndarray:
        """Source column of every padded column, ``(W+,)``."""
        return _pad_index(n, self.lon_before, self.lon_after, self.mode)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., H, W) -> (..., H+, W+)`` by gathering rows and columns (exact copies)."""
        rows = torch.from_numpy(self.lat_index(t.shape[-2])).to(t.device)
        cols = torch.from_numpy(self.lon_index(t.shape[-1])).to(t.device)
        return t.index_select(-2, rows).index_select(-1, cols)

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., H+, W+) -> (..., H, W)``: inverse of :meth:`apply`."""
        h, w = t.shape[-2], t.shape[-1]
        return t[..., self.lat_before:h - self.lat_after, self.lon_before:w - self.lon_after]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Padding:
        return cls(**d)


def compute_padding(n_lat: int, n_lon: int, multiple: int, periodic: bool, *,
                    mode: str = "replicate") -> Padding:
    """Smallest padding making H and W multiples of ``multiple`` (split evenly on both sides).

    Longitude is padded circularly when ``periodic``, otherwise with ``mode`` (``replicate``
    or ``reflect``), and latitude always with ``mode``.
    """
    if multiple < 1 or n_lat < 1 or n_lon < 1:
        raise ValueError(f"{multiple=}, {n_lat=} and {n_lon=} must all be >= 1")
    if mode not in ("reflect", "replicate"):
        raise ValueError(f"{mode=} must be 'replicate' or 'reflect'")
    d_lat, d_lon = -n_lat % multiple, -n_lon % multiple
    return Padding(lat_before=d_lat // 2, lat_after=d_lat - d_lat // 2, lon_before=d_lon // 2,
                   lon_after=d_lon - d_lon // 2, mode="circular" if periodic else mode,
                   lat_mode=mode)


def _pad_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    i = np.arange(-before, n + after)
    if mode == "circular":
        return i % n
    if mode == "replicate" or n == 1:
        return np.clip(i, 0, n - 1)
    j = i % (2 * n - 2)  # reflect without repeating the edge: period 2 (n - 1)
    return np.where(j >= n, 2 * n - 2 - j, j)



# -- dataset ---------------------------------------------------------------------------------
class FieldDataset(torch.utils.data.Dataset):
    """Samples of scaled fields as padded tensors (in memory or streamed with dask).

    Item ``i`` is a dict of tensors: ``"x"`` ``(C, H+, W+)`` float32 (NaN -> 0);
    ``"weight"`` ``(C, H+, W+)`` = area weight (cos lat, mean 1 on the unpadded grid) x
    validity, 0 on NaN pixels and on padding; ``"fields"`` ``(F, H+, W+)`` = [sin lat, cos lat,
    sin lon, cos lon] (``coord_channels``), [validity mask of all channels] (``with_mask``;
    when ``None``: ``mask_channel`` and this data has NaNs; pass the training set's
    ``with_mask`` to the others so that every split has the same channels), static fields,
    conditioning fields (NaN -> 0); ``"cond"`` ``(K,)`` float32; ``"index"`` ``()`` int64.
    ``__getitems__`` reads a whole batch in one dask computation (used by ``DataLoader``).

    Static fields come from ``static`` when given (standardised like the data and taken at
    the data's latitudes and longitudes, modulo 360; a ValueError names the points it lacks),
    else from ``ds_scaled``.

    With ``scaler``, ``ds_scaled`` is the *unscaled* Dataset and the scaling is applied to
    each batch as it is read (``scaler.transform`` on the batch; in memory: once, on
    loading). This is how a Dataset opened with ``open_dataset(..., reader="tensorstore")``
    is streamed: one tensorstore read per variable and batch, its chunks fetched and decoded
    concurrently by tensorstore's C++ thread pool, no dask graph. Such a dataset must be read
    in the process that opened it (tensorstore's threads do not survive ``fork``: use
    ``DataLoader(num_workers=0)``; the training loop does).
    """

    def __init__(self, ds_scaled: xr.Dataset, variables: Sequence[str],
                 sample_dims: Sequence[str], cond_spec: ConditionSpec,
                 cond_config: ConditioningConfig, padding: Padding,
                 memory_budget_gb: float = 2.0, static: xr.Dataset | None = None, *,
                 with_mask: bool | None = None, scaler: Scaler | None = None) -> None:
        self.variables, self.sample_dims = list(variables), tuple(sample_dims)
        self.cond_spec, self.cond_config, self.padding = cond_spec, cond_config, padding
        missing = [d for d in (*self.sample_dims, LAT, LON) if d not in ds_scaled.dims]
        if missing:
            raise ValueError(f"dims {missing} (sample dims {list(self.sample_dims)} + lat/lon) "
                             f"not in ds_scaled.dims={sorted(map(str, ds_scaled.dims))}")
        self._sample_shape = tuple(ds_scaled.sizes[d] for d in self.sample_dims)
        self._n = int(np.prod(self._sample_shape))
        self._n_lat, self._n_lon = ds_scaled.sizes[LAT], ds_scaled.sizes[LON]
        arrays, self.channel_names = self._channel_arrays(ds_scaled, self.variables, "variables")
        cond_arrays, cond_names = self._channel_arrays(ds_scaled, cond_config.fields,
                                                       "conditioning.fields")
        self.condition_channels = cond_names
        """Channel names of ``cond_config.fields`` (``name`` or ``name@level``): the last
        fields, one per sample."""
        self._any_nan: bool | None = None  # streamed data: unknown until scanned
        # where each array's channels go: (0 = fields, 1 = condition fields, offset, count)
        self._dest, offsets = [], [0, 0]
        for t, a in [(0, a) for a in arrays] + [(1, a) for a in cond_arrays]:
            c = int(np.prod([a.sizes[d] for d in a.dims if d == LEVEL]))
            self._dest.append((t, offsets[t], c))
            offsets[t] += c
        self._lat_idx = padding.lat_index(self._n_lat)
        self._lon_idx = padding.lon_index(self._n_lon)
        self._rows = slice(padding.lat_before, padding.lat_before + self._n_lat)
        self._cols = slice(padding.lon_before, padding.lon_before + self._n_lon)
        n_bytes = 4 * self._n * self._n_lat * self._n_lon * (len(self.channel_names)
                                                              + len(cond_names))
        self.in_memory = n_bytes <= memory_budget_gb * 1e9
        self._scaler = None
        if scaler is not None and self.in_memory:
            scaled = scaler.transform(ds_scaled[[a.name for a in arrays + cond_arrays]])
            arrays = [scaled[a.name].transpose(*a.dims) for a in arrays]
            cond_arrays = [scaled[a.name].transpose(*a.dims) for a in cond_arrays]
        elif scaler is not None:
            self._scaler = scaler
        if self.in_memory:
            self._data = _load_channels(arrays, self._n)
            self._nan_samples = _nan_rows(self._data)  # (N,)
            self._cond_data = _load_channels(cond_arrays, self._n) if cond_arrays else None
        else:
            # Optimise (fuse and materialise) the lazy read -> scale graph once: otherwise
            # every batch re-culls and re-fuses the whole graph of the store, a cost that
            # grows with its number of chunks (measured: 16 samples from a 2560-chunk store
            # 245 ms per batch before, 49 ms after; 31 ms for the raw read alone).
            arrays = _optimized(arrays)
            cond_arrays = _optimized(cond_arrays)
            if self._scaler is None and not all(dask.is_dask_collection(a.data)
                                                for a in arrays + cond_arrays):
                lazy = [a.name for a in arrays + cond_arrays
                        if not dask.is_dask_collection(a.data)]
                raise ValueError(f"variables {lazy} are not dask arrays: streaming them "
                                 "(data above memory_budget_gb) needs either dask chunks "
                                 "(open_dataset's default reader) or the scaler passed as "
                                 "FieldDataset(..., scaler=scaler) with the unscaled data "
                                 "(reader='tensorstore'), so that each batch is scaled as it "
                                 "is read")
        self._arrays, self._cond_arrays = arrays, cond_arrays
        if with_mask is None:
            with_mask = cond_config.mask_channel and self._has_nan()
        self.with_mask = bool(with_mask)
        self._weight_base = self._zero_pad(np.broadcast_to(
            loss_area_weights(ds_scaled[LAT].values).astype(np.float32)[:, None],
            (self._n_lat, self._n_lon)))
        self._coord_fields = (self._coord_channels(ds_scaled) if cond_config.coord_channels
                              else np.zeros((0, *self._padded_shape), np.float32))
        self._static_fields, static_names = self._static(ds_scaled, static)
        self._fields_t = torch.from_numpy(np.concatenate([self._coord_fields,
                                                          self._static_fields]))  # (4 + S, ...)
        self._weight_t = torch.from_numpy(np.broadcast_to(
            self._weight_base, (len(self.channel_names), *self._padded_shape)).copy())
        self.field_names = (["sin_lat", "cos_lat", "sin_lon", "cos_lon"]
                            * cond_config.coord_channels + ["mask"] * self.with_mask
                            + static_names + cond_names)
        self._coords = _sample_coord_table(ds_scaled, self.sample_dims)
        self._cond = np.stack([cond_spec.vector(self.sample_coords(i)) for i in range(self._n)]
                              ) if cond_spec.dim and self._n else np.zeros((self._n, 0),
                                                                           np.float32)

    # -- public ------------------------------------------------------------------------------
    @property
    def n_fields(self) -> int:
        return len(self.field_names)

    @property
    def fork_safe(self) -> bool:
        """Whether DataLoader worker processes may read this dataset: not when it streams
        lazily indexed (tensorstore) arrays, whose threads do not survive ``fork``; read it
        with :func:`threaded_batches` instead."""
        return self.in_memory or all(dask.is_dask_collection(a.variable._data)
                                     for a in self._arrays + self._cond_arrays)

    def __len__(self) -> int:
        return self._n

    def sample_coords(self, i: int) -> dict[str, Any]:
        """Coordinate labels of sample ``i`` (sample dims and their 1-d coordinates)."""
        pos = dict(zip(self.sample_dims, np.unravel_index(self._check_index(i),
                                                          self._sample_shape), strict=True))
        return {name: _plain(values[tuple(pos[d] for d in dims)])
                for name, (dims, values) in self._coords.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.__getitems__([i])[0].items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Items of a whole batch, read in one go (``DataLoader`` calls this).

        Per-sample tensors are views of one ``(B, ...)`` tensor (in shared memory inside
        DataLoader workers) and parts equal for every sample (the weight when no pixel is
        NaN, coordinate and static fields) are one shared tensor, so :func:`collate` batches
        without copying; do not modify items in place.
        """
        idx = np.array([self._check_index(int(i)) for i in indices], dtype=np.int64)
        b, (h_p, w_p) = len(idx), self._padded_shape
        x = _batch_tensor((b, len(self.channel_names), h_p, w_p))
        has_nan, cond_block = self._read_into(idx, x.numpy())
        weight = fields = None
        if has_nan:
            interior = x.numpy()[..., self._rows, self._cols]
            invalid = np.isnan(interior)  # (B, C, H, W)
            x.numpy()[np.isnan(x.numpy())] = 0.0
            weight = _batch_tensor(tuple(x.shape), zero=True)  # (B, C, H+, W+)
            np.multiply(self._weight_base[self._rows, self._cols], ~invalid,
                        out=weight.numpy()[..., self._rows, self._cols])
        if self.with_mask or cond_block is not None:
            fields = _batch_tensor((b, self.n_fields, h_p, w_p), zero=True)  # (B, F, H+, W+)
            f, n_coord = fields.numpy(), len(self._coord_fields)
            f[:, :n_coord] = self._coord_fields
            k = n_coord
            if self.with_mask:
                f[:, k, self._rows, self._cols] = ~invalid.any(axis=1) if has_nan else 1.0
                k += 1
            f[:, k:k + len(self._static_fields)] = self._static_fields
            k += len(self._static_fields)
            if cond_block is not None:
                self._pad(np.nan_to_num(cond_block, nan=0.0), out=f[:, k:])
        cond = torch.from_numpy(self._cond[idx])  # (B, K)
        return [{"x": x[j], "weight": self._weight_t if weight is None else weight[j],
                 "fields": self._fields_t if fields is None else fields[j], "cond": cond[j],
                 "index": torch.tensor(i, dtype=torch.int64)} for j, i in enumerate(idx)]

    # -- reading -----------------------------------------------------------------------------
    def _read_into(self, idx: np.ndarray, out: np.ndarray) -> tuple[bool, np.ndarray | None]:
        """Write samples ``idx`` padded into ``out`` ``(B, C, H+, W+)``; NaNs kept.

        Returns whether any of them has a NaN and the ``(B, Fc, H, W)`` condition fields.
        """
        if self.in_memory:
            for j, i in enumerate(idx):  # one contiguous copy per sample (faster than take)
                self._pad(self._data[i], out=out[j])
            cond = self._cond_data[idx] if self._cond_data is not None else None
            return bool(self._nan_samples[idx].any()), cond
        arrays = self._arrays + self._cond_arrays
        b, (h, w) = len(idx), (self._n_lat, self._n_lon)
        cond = (np.empty((b, len(self.condition_channels), h, w), np.float32) if self._cond_arrays
                else None)
        targets = (out[..., self._rows, self._cols], cond)
        if self._scaler is not None:
            self._read_scaled(idx, targets)
        else:
            # one basic-indexed dask array per sample and array, computed together: cheaper
            # than a fancy-indexed batch (dask shuffles and concatenates the chunks, one
            # extra copy)
            pos = np.stack(np.unravel_index(idx, self._sample_shape), axis=1)  # (B, n_dims)
            picked = [a.data[tuple(int(k) for k in p)] for a in arrays for p in pos]
            scheduler = "synchronous" if torch.utils.data.get_worker_info() else None
            values = dask.compute(*picked, scheduler=scheduler)
            for a_i, (t, k, c) in enumerate(self._dest):
                for j in range(b):
                    targets[t][j, k:k + c] = np.asarray(values[a_i * b + j]).reshape(c, h, w)
        self._fill_halo(out)
        if self._any_nan is False:  # scanned at construction: no NaN anywhere
            return False, cond
        # the minimum is NaN iff a value is: one pass, no boolean temporary
        return bool(np.isnan(out[..., self._rows, self._cols].min())), cond

    def _read_scaled(self, idx: np.ndarray, targets: tuple[np.ndarray, np.ndarray | None]
                     ) -> None:
        """Read samples ``idx`` of every array and write them scaled into ``targets``
        (``(B, C, H, W)`` view of the batch, ``(B, Fc, H, W)`` condition fields).

        Samples sharing all sample dims but the last are read together: one outer-indexed
        read per variable (a single tensorstore call fetching its chunks concurrently).
        Affine scaling of float32 data is computed straight into the batch
        (:meth:`Scaler.affine_parameters`, same bits as ``Scaler.transform``); any other
        scaling goes through ``Scaler.transform`` on the batch.
        """
        arrays = self._arrays + self._cond_arrays
        names = [str(a.name) for a in arrays]
        *outer_dims, last = self.sample_dims
        pos = np.unravel_index(idx, self._sample_shape)               # n_dims x (B,)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j in range(len(idx)):
            groups.setdefault(tuple(int(p[j]) for p in pos[:-1]), []).append(j)
        h, w = self._n_lat, self._n_lon
        for key, members in groups.items():
            rows = np.array(members)
            order = np.argsort(pos[-1][rows], kind="stable")
            sel = {**dict(zip(outer_dims, key)), last: pos[-1][rows][order]}
            batch = xr.Dataset({n: a.isel(sel) for n, a in zip(names, arrays)})
            batch = batch[names].transpose(last, ...)
            params = [self._scaler.affine_parameters(batch[n]) for n in names]
            if any(p is None for p in params):
                batch = self._scaler.transform(_read_now(batch))
                params = [None] * len(names)
            else:
                batch = _read_now(batch)
            for a_i, (name, a) in enumerate(zip(names, arrays)):
                t, k, c = self._dest[a_i]
                dims = [d for d in a.dims if d in batch[name].dims]
                v = np.asarray(batch[name].transpose(*dims).values).reshape(-1, c, h, w)
                affine = (None if params[a_i] is None
                          else [p.reshape(-1, 1, 1) for p in params[a_i]])  # (c | 1, 1, 1)
                for r, j in enumerate(rows[order]):
                    dst = targets[t][j, k:k + c]                         # (c, H, W)
                    if affine is None:
                        dst[...] = v[r]
                    else:
                        np.subtract(v[r], affine[0], out=dst)
                        np.divide(dst, affine[1], out=dst)

    def _has_nan(self) -> bool:
        """Whether any field value is NaN (one pass over streamed data; remembered, so that
        streamed batches of data known to be NaN-free skip their NaN check)."""
        if self.in_memory:
            return bool(self._nan_samples.any())
        if self._any_nan is None:
            self._any_nan = self._scan_nan()
        return self._any_nan

    def _scan_nan(self) -> bool:
        if self._scaler is not None:  # blockwise over the last sample dim, bounded memory
            last, n_last = self.sample_dims[-1], self._sample_shape[-1]
            step = max(1, int(256e6 // max(1, 4 * self._n // n_last * self._n_lat
                                          * self._n_lon * len(self.channel_names))))
            for a in self._arrays:
                for start in range(0, n_last, step):
                    block = _read_now(a.isel({last: slice(start, start + step)}).to_dataset())
                    if bool(block[a.name].isnull().any()):
                        return True
            return False
        checks = [a.isnull().any().data for a in self._arrays]
        return bool(np.any(dask.compute(*checks)))

    def _check_index(self, i: int) -> int:
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"sample index {i} out of range for {self._n} samples")
        return j

    # -- padding and channels ----------------------------------------------------------------
    @property
    def _padded_shape(self) -> tuple[int, int]:
        return self.padding.padded_shape(self._n_lat, self._n_lon)

    def _pad(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(..., H, W) -> (..., H+, W+)`` with the padding's modes, into ``out`` if given
        (without ``out`` and without padding, ``a`` itself)."""
        if out is None:
            if self._padded_shape == (self._n_lat, self._n_lon):
                return a
            out = np.empty((*a.shape[:-2], *self._padded_shape), a.dtype)
        out[..., self._rows, self._cols] = a
        return self._fill_halo(out)

    def _fill_halo(self, out: np.ndarray) -> np.ndarray:
        """Fill the padding of ``out`` ``(..., H+, W+)`` from its interior, in place."""
        p, h, w = self.padding, self._n_lat, self._n_lon
        if self._padded_shape == (h, w):
            return out
        core = out[..., self._rows, :]
        core[..., :p.lon_before] = core[..., p.lon_before + self._lon_idx[:p.lon_before]]
        core[..., p.lon_before + w:] = core[..., p.lon_before + self._lon_idx[p.lon_before + w:]]
        out[..., :p.lat_before, :] = out[..., p.lat_before + self._lat_idx[:p.lat_before], :]
        out[..., p.lat_before + h:, :] = out[..., p.lat_before + self._lat_idx[p.lat_before + h:],
                                             :]
        return out

    def _zero_pad(self, a: np.ndarray) -> np.ndarray:
        """``(..., H, W) -> (..., H+, W+)`` float32, zero on the padding."""
        out = np.zeros((*a.shape[:-2], *self._padded_shape), np.float32)
        out[..., self._rows, self._cols] = a
        return out

    def _channel_arrays(self, ds: xr.Dataset, names: Sequence[str],
                        what: str) -> tuple[list[xr.DataArray], list[str]]:
        arrays, channels = [], []
        allowed = {*self.sample_dims, LEVEL, LAT, LON}
        for name in names:
            if name not in ds.data_vars:
                raise ValueError(f"{what}: {name!r} not in the Dataset; it has "
                                 f"{list(ds.data_vars)}")
            da = ds[name]
            if set(da.dims) - allowed or set(self.sample_dims) - set(da.dims):
                raise ValueError(f"{what}: {name!r} has dims {da.dims}; expected all of "
                                 f"{list(self.sample_dims)} plus lat, lon and optionally level")
            arrays.append(da.transpose(*self.sample_dims, *([LEVEL] * (LEVEL in da.dims)),
                                       LAT, LON))
            channels += _channel_names(name, da)
        return arrays, channels

    def _static(self, ds: xr.Dataset, static: xr.Dataset | None
                ) -> tuple[np.ndarray, list[str]]:
        """Padded static fields ``(S, H+, W+)`` and their channel names.

        Each channel is standardised over its finite points (mean 0, standard deviation 1;
        orography in metres and a 0/1 land mask alike), NaN -> 0: raw values of order 1000
        would swamp the scaled data channels the network sees beside them.
        """
        names = list(self.cond_config.static_fields)
        if not names:
            return np.zeros((0, *self._padded_shape), np.float32), []
        source = on_grid(static, ds) if static is not None else ds
        blocks, channels = [], []
        for name in names:
            if name not in source.data_vars:
                raise ValueError(f"conditioning.static_fields: {name!r} not found in "
                                 f"{'static' if static is not None else 'ds_scaled'} "
                                 f"(variables {list(source.data_vars)})")
            da = source[name]
            if set(da.dims) - {LEVEL, LAT, LON}:
                raise ValueError(f"static field {name!r} has dims {da.dims}; it must be "
                                 f"time-invariant (lat, lon and optionally level)")
            arr = np.asarray(da.transpose(*([LEVEL] * (LEVEL in da.dims)), LAT, LON).values,
                             np.float32)
            blocks.append(arr.reshape(-1, self._n_lat, self._n_lon))
            channels += _channel_names(name, da)
        return self._pad(_standardised(np.concatenate(blocks))), channels

    def _coord_channels(self, ds: xr.Dataset) -> np.ndarray:
        """[sin lat, cos lat, sin lon, cos lon] on the padded grid, ``(4, H+, W+)``."""
        p = self.padding
        lat = np.deg2rad(_extend(ds[LAT].values, p.lat_before, p.lat_after))
        lon = np.deg2rad(_extend(ds[LON].values, p.lon_before, p.lon_after))
        lat2, lon2 = np.meshgrid(lat, lon, indexing="ij")  # (H+, W+)
        return np.stack([np.sin(lat2), np.cos(lat2), np.sin(lon2), np.cos(lon2)]
                        ).astype(np.float32)


def _standardised(a: np.ndarray) -> np.ndarray:
    """``a (S, H, W)`` with each channel's finite points at mean 0 and standard deviation 1
    (a constant channel only centred), NaN -> 0, float32."""
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(a, axis=(-2, -1), keepdims=True)
        std = np.nanstd(a, axis=(-2, -1), keepdims=True)
    out = (a - mean) / np.where(std > 0, std, 1.0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def on_grid(other: xr.Dataset, ds: xr.Dataset, what: str = "static fields") -> xr.Dataset:
    """``other`` standardised like the data (:func:`geodiff.grid.standardize`: latitude
    ascending, canonical names) and selected at the latitudes and longitudes (modulo 360) of
    ``ds``, each matched within 1e-4 degrees; ValueError naming ``what`` and what does not
    match."""
    from geodiff.grid import standardize

    try:
        other = standardize(other)
    except ValueError as err:
        raise ValueError(f"{what}: cannot find their latitude/longitude ({err}); give "
                         "them lat/lon coordinates on the data grid") from None
    picks = {}
    for dim, period in ((LAT, None), (LON, 360.0)):
        want, have = ds[dim].values.astype(np.float64), other[dim].values.astype(np.float64)
        idx = match_values(want, have, period)
        if (idx < 0).any():
            missing = want[idx < 0]
            raise ValueError(
                f"{what} are not on the data grid: {missing.size} of the data's {want.size} "
                f"{dim} values (e.g. {missing[:3].tolist()}) are not among the {what}' {dim} "
                f"values ({have.size} in {have.min():g}..{have.max():g}); regrid the {what} "
                "to the data grid first")
        picks[dim] = idx
    return other.isel(picks)



def threaded_batches(dataset: FieldDataset, index_batches: Iterable[Sequence[int]],
                     threads: int = 2, ahead: int | None = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``dataset`` for each index list of ``index_batches``, in order,
    read by ``threads`` threads that work ``ahead`` batches in advance (default
    ``2 * threads``).

    The in-process counterpart of DataLoader workers for datasets that cannot be forked
    (:attr:`FieldDataset.fork_safe`): a tensorstore read releases the GIL while its chunks
    are fetched and decoded, and so do the numpy scaling and padding, so threads overlap
    reading with everything else (2 threads: 1.3-1.6x the samples/s of one on 2 cores).
    """
    if threads < 1:
        raise ValueError(f"{threads=} must be >= 1")
    ahead = 2 * threads if ahead is None else ahead
    if ahead < 1:
        raise ValueError(f"{ahead=} must be >= 1")
    with concurrent.futures.ThreadPoolExecutor(threads, "geodiff-read") as pool:
        pending: collections.deque = collections.deque()
        try:
            for indices in index_batches:
                pending.append(pool.submit(_collated, dataset, list(indices)))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early: drop what was not started yet
            for future in pending:
                future.cancel()


def _collated(dataset: FieldDataset, indices: list[int]) -> dict[str, torch.Tensor]:
    return collate(dataset.__getitems__(indices))


def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch :class:`FieldDataset` items: ``(B, ...)`` tensors per key.

    A tensor shared by every item (constant weight or fields, see
    :meth:`FieldDataset.__getitems__`) becomes a stride-0 expanded view instead of B copies;
    the rest is ``torch.utils.data.default_collate`` (shared memory in DataLoader workers).
    """
    out = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        first = tensors[0]
        if all(t is first for t in tensors):
            out[key] = first.unsqueeze(0).expand(len(tensors), *first.shape)
        else:
            stacked = _consecutive_views(tensors)
            out[key] = (stacked if stacked is not None
                        else torch.utils.data.default_collate(tensors))
    return out


def _consecutive_views(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``(B, ...)`` tensor whose rows are exactly ``tensors`` (views of one storage, in
    order), without copying; ``None`` if they are not laid out like that."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    ptr, n = first.untyped_storage().data_ptr(), first.numel()
    for j, t in enumerate(tensors):
        if (t.untyped_storage().data_ptr() != ptr or t.shape != first.shape
                or not t.is_contiguous()
                or t.storage_offset() != first.storage_offset() + j * n):
            return None
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                   (len(tensors), *first.shape))


def _batch_tensor(shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
    """Float32 batch tensor, in shared memory inside a DataLoader worker (sent without copy)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.zeros(shape) if zero else torch.empty(shape)
    # allocated in shared memory as torch's default_collate does in workers
    storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    t = torch.empty(0).new(storage).resize_(*shape)
    return t.zero_() if zero else t


def _read_now(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` loaded into memory; tensorstore-backed variables fetched concurrently."""
    try:
        import xarray_tensorstore
    except ImportError:
        return ds.load()
    return xarray_tensorstore.read(ds).load()


def _optimized(arrays: list[xr.DataArray]) -> list[xr.DataArray]:
    """``arrays`` with their dask graphs optimised once (numpy-backed ones unchanged)."""
    lazy = [i for i, a in enumerate(arrays) if dask.is_dask_collection(a.data)]
    done = dask.optimize(*[arrays[i].data for i in lazy])
    out = list(arrays)
    for i, data in zip(lazy, done):
        out[i] = arrays[i].copy(data=data)
    return out


def _load_channels(arrays: list[xr.DataArray], n: int) -> np.ndarray:
    """Stack DataArrays ``(*sample, [level], lat, lon)`` into ``(N, C, H, W)`` float32."""
    parts = []
    for a in arrays:
        v = np.ascontiguousarray(a.values, dtype=np.float32)
        parts.append(v.reshape(n, -1, *v.shape[-2:]))  # (N, c_v, H, W)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _nan_rows(data: np.ndarray, block: int = 256) -> np.ndarray:
    """Whether each sample of ``data`` ``(N, ...)`` has a NaN, ``(N,)``, in bounded memory."""
    return np.concatenate([np.isnan(data[i:i + block]).reshape(len(data[i:i + block]), -1)
                           .any(axis=1) for i in range(0, len(data), block)]
                          or [np.zeros(0, bool)])


def _extend(values: np.ndarray, before: int, after: int) -> np.ndarray:
    """Coordinate values continued linearly past both ends (edge spacing)."""
    v = np.asarray(values, dtype=np.float64)
    step_b = v[1] - v[0] if v.size > 1 else 1.0
    step_a = v[-1] - v[-2] if v.size > 1 else 1.0
    return np.concatenate([v[0] - step_b * np.arange(before, 0, -1), v,
                           v[-1] + step_a * np.arange(1, after + 1)])


def _sample_coord_table(ds: xr.Dataset, sample_dims: tuple[str, ...]
                        ) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Coordinates living on the sample dims (plus ``year``/``dayofyear`` from time)."""
    table = {}
    for name, c in ds.coords.items():
        if c.ndim and set(c.dims) <= set(sample_dims):
            table[str(name)] = (tuple(c.dims), np.asarray(c.values))
    if TIME in table:
        for feature in ("year", "dayofyear"):
            if feature not in table:
                try:
                    table[feature] = ((TIME,), np.asarray(getattr(ds[TIME].dt, feature).values))
                except (AttributeError, TypeError):
                    pass
    return table


def _channel_names(name: str, da: xr.DataArray) -> list[str]:
    """``[name]``, or ``name@level`` per level (``t@500``) for a variable with levels."""
    if LEVEL not in da.dims:
        return [name]
    levels = [_plain(v) for v in da[LEVEL].values]
    return [f"{name}@{int(v) if isinstance(v, float) and v.is_integer() else v}" for v in levels]


