"""Invertible per-variable scaling of geophysical fields to about [-1, 1].

The forward map of one variable is the pipeline

    y = log1p(x)                       (``transform: log1p``; else y = x)
    a = y - m(pixel, sample)           (``anomaly``: climatology or per-label trend; else m = 0)
    r = a / s(pixel)                   (``per_pixel_std``; else s = 1)
    z = (r - center) / half_range      (range scaling, per variable or per variable and level)

and :meth:`Scaler.inverse` undoes it step by step. All statistics are fitted on the training
split only, NaN-aware, as dask reductions (bounded memory on larger-than-memory stores).

The trend is the per-pixel least-squares fit of a Legendre series of degree ``trend_degree`` in
the normalised coordinate ``t = (year - t_center) / t_scale`` (``t`` in [-1, 1] on the training
years), fitted separately for every value of ``trend_by`` (e.g. each scenario): the normal
equations ``(P^T W P) c = P^T W y`` with ``W`` the validity mask are accumulated chunk by chunk
and solved per pixel. Legendre polynomials keep ``P^T P`` well conditioned on [-1, 1].

With ``trend_smoothing = b`` the mean field adds a local term to the polynomial: a
Nadaraya-Watson (Gaussian kernel) average of the training residuals ``r_j`` around it,

    m(t) = poly(t) + sum_j K(t - t_j) n_j R_j / sum_j K(t - t_j) n_j,   K(d) = exp(-d^2 / 2b^2)

over the distinct training coordinate values ``t_j`` (``R_j`` the mean residual of the
``n_j`` samples at ``t_j``, per label and pixel), with ``K`` cut at ``4 b`` and **zero at
``d = 0``**: a sample's own year never enters its mean, so training anomalies keep the
spread of the held-out ones (a kernel that included it would shrink them by ``1 /
sum_j K``). Stored per anchor ``t_j``; evaluated in closed form for any ``t``.
"""

from __future__ import annotations

import base64
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr
from numpy.polynomial import legendre

from geodiff.config import ScalingConfig
from geodiff.grid import LEVEL
from geodiff.samples import _label_values, _plain

_DEGREE, _DEGREE2, _LABEL, _PERIOD = "_degree", "_degree2", "_label", "_period"
_FORMAT = "geodiff.Scaler"
_VERSION = 1
_HIST_BINS = 2**16
"""Histogram bins for quantiles: the quantile error is at most one bin, (max - min) / 65536."""
_PINV_RCOND = 1e-10
_TIME_FEATURES = ("year", "month", "dayofyear")
_DROP_ATTRS = ("units", "standard_name", "valid_range", "valid_min", "valid_max",
               "_FillValue", "missing_value", "scale_factor", "add_offset", "actual_range")


@dataclass
class VariableStats:
    """Fitted statistics of one variable (float64 arrays).

    ``pixel_dims`` are the variable's non-sample dims (e.g. ``("level", "lat", "lon")``) with
    their coordinate values in ``pixel_coords``; ``range_dims`` is ``()`` or ``("level",)``.
    ``mean_field`` is the climatology ``(n_period, *pixel)`` or the trend coefficients
    ``(n_label, degree + 1, *pixel)``; ``pixel_std`` is ``(*pixel)``.
    """

    pixel_dims: tuple[str, ...]
    pixel_coords: dict[str, list]
    range_dims: tuple[str, ...]
    center: np.ndarray
    half_range: np.ndarray
    mean_field: np.ndarray | None
    pixel_std: np.ndarray | None
    attrs: dict[str, Any]
    dtype: str
    local_field: np.ndarray | None = None
    """``trend_smoothing``: mean residual ``(n_label, n_anchor, *pixel)`` per training
    coordinate value (float32; NaN where no valid sample)."""
    local_count: np.ndarray | None = None
    """``trend_smoothing``: samples ``(n_label, n_anchor)`` behind each mean residual."""


class Scaler:
    """Per-variable invertible map between physical fields and scaled fields in about [-1, 1].

    Build it with :meth:`fit` on the training split; :meth:`transform` and :meth:`inverse`
    then work on any Dataset with the same grid (and the coordinates the anomaly needs, e.g.
    ``year`` and ``scenario``), with any extra dims such as ``member``.
    """

    def __init__(self, config: ScalingConfig, sample_dims: Sequence[str],
                 stats: Mapping[str, VariableStats], *, t_center: float = 0.0,
                 t_scale: float = 1.0, labels: Sequence[Any] = (),
                 periods: Sequence[int] = (), anchors: Sequence[float] = ()) -> None:
        self.config = config
        self.sample_dims = tuple(sample_dims)
        self.stats = dict(stats)
        self.t_center = float(t_center)
        self.t_scale = float(t_scale)
        self.labels = tuple(labels)
        self.periods = tuple(int(p) for p in periods)
        self.anchors = np.asarray(anchors, dtype=np.float64)
        """Distinct training values of ``trend_coord`` (``trend_smoothing`` only)."""

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(self.stats)

    def __repr__(self) -> str:
        c = self.config
        return (f"Scaler(variables={list(self.stats)}, method={c.method!r}, "
                f"transform={c.transform!r}, anomaly={c.anomaly!r}, "
                f"per_pixel_std={c.per_pixel_std})")

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, ds: xr.Dataset, config: ScalingConfig, variables: Sequence[str],
            sample_dims: Sequence[str]) -> Scaler:
        """Fit the statistics of ``variables`` on ``ds`` (the training split only).

        Parameters
        ----------
        ds : Dataset with each variable of dims ``(*sample_dims, [level], lat, lon)``;
            numpy- or dask-backed (dask reductions keep memory bounded by the chunk size).
        config : the scaling recipe section.
        variables : names of the data variables to scale.
        sample_dims : dims reduced over (e.g. ``("scenario", "time")``).
        """
        variables, sample_dims = list(variables), tuple(sample_dims)
        missing = [v for v in variables if v not in ds.data_vars]
        if not variables or missing:
            raise ValueError(f"variables={variables} must be non-empty data variables of ds; "
                             f"missing {missing}; ds has {list(ds.data_vars)}")
        for v in variables:
            if not any(d in sample_dims for d in ds[v].dims):
                raise ValueError(f"variable {v!r} has dims {ds[v].dims} and none of "
                                 f"{sample_dims=}; fit needs samples to reduce over")
        scaler = cls(config, sample_dims, {})
        if config.anomaly == "trend":
            scaler._fit_trend_axis(ds)
        elif config.anomaly == "climatology":
            scaler.periods = tuple(int(p) for p in np.unique(
                _time_feature(ds, config.climatology_period, "fit").values))
        for v in variables:
            scaler.stats[v] = scaler._fit_variable(ds, v)
        return scaler

    def _fit_trend_axis(self, ds: xr.Dataset) -> None:
        cfg = self.config
        t = np.asarray(_time_feature(ds, cfg.trend_coord, "fit").values, dtype=np.float64)
        if t.size == 0 or not np.all(np.isfinite(t)):
            raise ValueError(f"trend_coord={cfg.trend_coord!r} must have finite values in the "
                             f"training split, got {t!r}")
        lo, hi = float(t.min()), float(t.max())
        self.t_center = (lo + hi) / 2
        self.t_scale = (hi - lo) / 2 if hi > lo else 1.0
        if cfg.trend_by is not None:
            lab = _label_coord(ds, cfg.trend_by, "fit")
            self.labels = _label_values(lab.values, cfg.trend_by, "scaling.trend_by")
        if cfg.trend_smoothing is not None:
            self.anchors = np.unique(t)

    def _fit_variable(self, ds: xr.Dataset, name: str) -> VariableStats:
        cfg = self.config
        x = ds[name]
        reduce_dims = tuple(d for d in x.dims if d in self.sample_dims)
        pixel_dims = tuple(d for d in x.dims if d not in self.sample_dims)
        range_dims = (LEVEL,) if cfg.per_level and LEVEL in pixel_dims else ()
        stats = VariableStats(
            pixel_dims=pixel_dims,
            pixel_coords={d: _plain_list(x[d].values) for d in pixel_dims if d in x.coords},
            range_dims=range_dims, center=np.zeros(0), half_range=np.zeros(0),
            mean_field=None, pixel_std=None, attrs=_json_attrs(x.attrs, name),
            dtype=str(x.dtype) if np.issubdtype(x.dtype, np.floating) else "float32")
        y = x.astype(np.float64)
        # counted on y, the chunks the statistics read anyway (a second branch on x made
        # dask hold more source chunks at once)
        checks = _ValueChecks(y, name, log1p=cfg.transform == "log1p")
        if cfg.transform == "log1p":
            with np.errstate(invalid="ignore", divide="ignore"):  # values <= -1: raised
                y = np.log1p(y)
        if cfg.anomaly == "trend":
            stats.mean_field = self._fit_trend(ds, y, reduce_dims, pixel_dims, checks)
            if cfg.trend_smoothing is not None:
                resid = y - self._polynomial(stats, ds, y, "fit")
                stats.local_field, stats.local_count = self._fit_local(ds, resid, reduce_dims)
        elif cfg.anomaly == "climatology":
            stats.mean_field = self._fit_climatology(ds, y, reduce_dims, checks)
        a = y - self._mean_field(stats, ds, y, "fit") if cfg.anomaly != "none" else y
        if cfg.per_pixel_std:
            with warnings.catch_warnings():  # all-NaN (land) pixels: NaN std, by design
                warnings.simplefilter("ignore", RuntimeWarning)
                (s,) = checks.compute(a.std(reduce_dims, skipna=True))
                s = np.asarray(s.values)
            stats.pixel_std = np.where(s > 0, s, np.where(np.isnan(s), np.nan, 1.0))
            a = a / xr.DataArray(stats.pixel_std, dims=pixel_dims)
        stats.center, stats.half_range = self._fit_range(a, name, range_dims, checks)
        return stats

    def _fit_trend(self, ds: xr.Dataset, y: xr.DataArray, reduce_dims: tuple[str, ...],
                   pixel_dims: tuple[str, ...], checks: _ValueChecks) -> np.ndarray:
        """Legendre coefficients ``(n_label, degree + 1, *pixel)`` of the per-pixel trend."""
        cfg = self.config
        subsets = []
        for label in (self.labels if cfg.trend_by is not None else (None,)):
            sub = y if label is None else _select_label(y, ds, cfg.trend_by, label)
            basis = self._basis(_time_feature(sub, cfg.trend_coord, "fit"), sub)
            valid = sub.notnull().astype(np.float64)
            products = basis * basis.rename({_DEGREE: _DEGREE2})  # P_i(t) P_j(t)
            gram = xr.dot(valid, products, dim=reduce_dims)
            rhs = xr.dot(sub.fillna(0.0), basis, dim=reduce_dims)
            subsets.append((gram.transpose(*pixel_dims, _DEGREE, _DEGREE2),
                            rhs.transpose(*pixel_dims, _DEGREE)))
        (computed,) = checks.compute(subsets)
        coefs = []
        for gram, rhs in computed:
            g, b = np.asarray(gram.values), np.asarray(rhs.values)  # (*pix, D, D), (*pix, D)
            c = np.einsum("...ij,...j->...i", np.linalg.pinv(g, rcond=_PINV_RCOND), b)
            c[g[..., 0, 0] == 0] = np.nan  # pixels never valid in training
            coefs.append(np.moveaxis(c, -1, 0))  # (D, *pix)
        return np.stack(coefs)  # (n_label, D, *pix)

    def _fit_local(self, ds: xr.Dataset, resid: xr.DataArray, reduce_dims: tuple[str, ...]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Mean residual per (label, anchor, pixel) and samples per (label, anchor)."""
        cfg = self.config
        parts = []
        for label in (self.labels if cfg.trend_by is not None else (None,)):
            sub = resid if label is None else _select_label(resid, ds, cfg.trend_by, label)
            t = _time_feature(sub, cfg.trend_coord, "fit")
            if t.ndim != 1 or t.dims[0] not in reduce_dims:
                raise ValueError(f"trend_smoothing needs trend_coord={cfg.trend_coord!r} along "
                                 f"one sample dim, got dims {t.dims}; set trend_smoothing: "
                                 "null")
            other = [d for d in reduce_dims if d != t.dims[0]]
            pixel = [d for d in sub.dims if d not in reduce_dims]
            key = xr.DataArray(np.asarray(t.values, np.float64), dims=t.dims, name="_anchor")
            valid = sub.notnull()
            total = sub.fillna(0.0).sum(other).groupby(key).sum()     # (anchor, *pixel)
            count = valid.sum(other).groupby(key).sum()
            samples = valid.any(pixel).sum(other).groupby(key).sum()  # (anchor,)
            parts.append((total, count, samples))
        (computed,) = dask.compute(parts)
        fields, counts = [], []
        for total, count, samples in computed:
            where = np.searchsorted(self.anchors, total["_anchor"].values)
            field = np.full((self.anchors.size, *total.shape[1:]), np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                field[where] = np.where(count.values > 0, total.values / count.values, np.nan)
            n = np.zeros(self.anchors.size)
            n[where] = samples.values
            fields.append(field)
            counts.append(n)
        return np.stack(fields).astype(np.float32), np.stack(counts)

    def _local(self, field: np.ndarray, counts: np.ndarray, t: np.ndarray,
               label: np.ndarray) -> np.ndarray:
        """The kernel term ``(*t.shape, *pixel)`` at coordinate values ``t`` of labels ``label``
        from the mean residuals ``field`` ``(L, A, *pixel)`` of ``counts`` ``(L, A)`` samples.

        Rows whose window holds no valid anchor get 0 (the polynomial alone).
        """
        b = float(self.config.trend_smoothing)
        t, label = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(label))
        pixel_shape = field.shape[2:]
        out = np.zeros((t.size, int(np.prod(pixel_shape, dtype=int))))
        flat_t, flat_label = t.ravel(), label.ravel()
        for lab in np.unique(flat_label):
            rows = np.flatnonzero(flat_label == lab)
            d = flat_t[rows, None] - self.anchors[None, :]               # (n, A)
            k = np.exp(-0.5 * (d / b) ** 2)
            k[(np.abs(d) > 4 * b) | (np.abs(d) <= 1e-9 * b)] = 0.0        # window; own t left out
            k *= counts[lab][None, :]
            f = field[lab].reshape(self.anchors.size, -1).astype(np.float64)   # (A, P)
            ok = np.isfinite(f)
            num = k @ np.where(ok, f, 0.0)
            den = k @ ok.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[rows] = np.where(den > 0, num / den, 0.0)
        return out.reshape(*t.shape, *pixel_shape)

    def _fit_climatology(self, ds: xr.Dataset, y: xr.DataArray,
                         reduce_dims: tuple[str, ...], checks: _ValueChecks) -> np.ndarray:
        """Per-pixel mean ``(n_period, *pixel)`` for each month / day of year seen in training."""
        period = _time_feature(y, self.config.climatology_period, "fit")
        if period.ndim != 1:
            raise ValueError(f"climatology_period coordinate must be 1-d, got dims {period.dims}")
        values = np.asarray(period.values)
        means = [y.isel({period.dims[0]: np.flatnonzero(values == p)}).mean(reduce_dims,
                                                                           skipna=True)
                 for p in self.periods]
        (computed,) = checks.compute(means)
        return np.stack([np.asarray(m.values) for m in computed])

    def _fit_range(self, a: xr.DataArray, name: str, range_dims: tuple[str, ...],
                   checks: _ValueChecks) -> tuple[np.ndarray, np.ndarray]:
        """``center`` and ``half_range`` (shape of ``range_dims``) of the range scaling."""
        cfg = self.config
        dims = [d for d in a.dims if d not in range_dims]
        with warnings.catch_warnings():  # all-NaN levels: reported below
            warnings.simplefilter("ignore", RuntimeWarning)
            if cfg.method == "standard":
                mean, std = checks.compute(a.mean(dims, skipna=True), a.std(dims, skipna=True))
                center, half = mean.values, cfg.n_std * std.values
            else:
                lo, hi = (v.values for v in checks.compute(a.min(dims, skipna=True),
                                                           a.max(dims, skipna=True)))
                center = lo + hi  # NaN where there is no finite value
        _check_finite(np.asarray(center, np.float64), a, name, range_dims)
        if cfg.method != "standard":
            if cfg.method == "quantile":
                lo, hi = _histogram_quantiles(a, range_dims, lo, hi, cfg.quantiles)
            width = hi - lo
            lo, hi = lo - cfg.margin * width, hi + cfg.margin * width
            center, half = (lo + hi) / 2, (hi - lo) / 2
        center, half = np.asarray(center, np.float64), np.asarray(half, np.float64)
        return center, np.where(half > 0, half, 1.0)

    # -- mean field (anomaly) ----------------------------------------------------------------
    def _basis(self, coord: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
        """Legendre basis ``P_k(t)`` for k = 0..degree, dims ``(*coord.dims, _degree)``."""
        t = (np.asarray(coord.values, dtype=np.float64) - self.t_center) / self.t_scale
        p = legendre.legvander(t, self.config.trend_degree)  # (*coord.shape, D)
        basis = xr.DataArray(p, dims=(*coord.dims, _DEGREE))
        return _chunk_like(basis, like)

    def _mean_field(self, stats: VariableStats, ds: xr.Dataset, like: xr.DataArray,
                    action: str) -> xr.DataArray:
        """The fitted mean field (climatology or trend) at the samples of ``like``."""
        cfg = self.config
        pix = stats.pixel_dims
        field = self._pixel_array(stats, stats.mean_field, like)
        if cfg.anomaly == "climatology":
            period = _time_feature(ds, cfg.climatology_period, action)
            index = _index_of(period, self.periods, cfg.climatology_period, action)
            sizes = dict(zip(pix, field.shape[1:], strict=True))
            return xr.apply_ufunc(field.__getitem__, _chunk_like(index, like),
                                  output_core_dims=[list(pix)], dask="parallelized",
                                  output_dtypes=[np.float64],
                                  dask_gufunc_kwargs={"output_sizes": sizes})
        trend = self._polynomial(stats, ds, like, action)
        if stats.local_field is None:
            return trend
        t = _time_feature(ds, cfg.trend_coord, action)
        label = (xr.zeros_like(t, dtype=np.int64) if cfg.trend_by is None else
                 _index_of(_label_coord(ds, cfg.trend_by, action), self.labels, cfg.trend_by,
                           action))
        t, label = xr.broadcast(t.reset_coords(drop=True), label)
        local_field = self._pixel_array(stats, stats.local_field, like)
        sizes = dict(zip(pix, local_field.shape[2:], strict=True))
        local = xr.apply_ufunc(lambda tt, ll: self._local(local_field, stats.local_count, tt, ll),
                               _chunk_like(t, like), _chunk_like(label, like),
                               output_core_dims=[list(pix)], dask="parallelized",
                               output_dtypes=[np.float64],
                               dask_gufunc_kwargs={"output_sizes": sizes})
        return trend + local

    def _polynomial(self, stats: VariableStats, ds: xr.Dataset, like: xr.DataArray,
                    action: str) -> xr.DataArray:
        """The polynomial part of the trend at the samples of ``like``."""
        cfg = self.config
        pix = stats.pixel_dims
        field = self._pixel_array(stats, stats.mean_field, like)
        coefs = xr.DataArray(field, dims=(_LABEL, _DEGREE, *pix))
        if cfg.trend_by is None:
            coefs = coefs.isel({_LABEL: 0})
        else:
            label = _label_coord(ds, cfg.trend_by, action)
            coefs = coefs.isel({_LABEL: _index_of(label, self.labels, cfg.trend_by, action)})
        basis = self._basis(_time_feature(ds, cfg.trend_coord, action), like)
        # sum_k P_k(t) c_k(pixel), term by term: keeps the chunks of ``like`` (dask's einsum
        # would re-split them)
        terms = (basis.isel({_DEGREE: k}) * coefs.isel({_DEGREE: k})
                 for k in range(basis.sizes[_DEGREE]))
        return sum(terms, start=xr.zeros_like(basis.isel({_DEGREE: 0})))

    def _pixel_array(self, stats: VariableStats, arr: np.ndarray,
                     x: xr.DataArray) -> np.ndarray:
        """``arr`` (trailing axes = pixel dims) restricted to the levels present in ``x``."""
        if LEVEL not in stats.pixel_dims or LEVEL not in x.coords or LEVEL not in x.dims:
            return arr
        idx = _level_index(stats, x)
        axis = arr.ndim - len(stats.pixel_dims) + stats.pixel_dims.index(LEVEL)
        return np.take(arr, idx, axis=axis)

    # -- transform / inverse -----------------------------------------------------------------
    def transform(self, ds: xr.Dataset) -> xr.Dataset:
        """Physical -> scaled (float32) for every fitted variable in ``ds``; others unchanged."""
        out = ds.copy()
        for name in self._present(ds, "transform"):
            x = ds[name]
            stats = self._checked_stats(name, x)
            if self._affine_only(stats) and x.dtype.itemsize <= 4 and x.dtype.kind == "f":
                # (x - center) / half in float32 for float32 data: exact to one rounding of
                # the result like the float64 route, and half the memory traffic (the
                # streamed loader runs this per batch; measured 1.9 -> 0.4 ms per
                # 4 x 192 x 384 sample)
                center = self._range_da(stats, stats.center, x).astype(np.float32)
                half = self._range_da(stats, stats.half_range, x).astype(np.float32)
                z = (x.astype(np.float32, copy=False) - center) / half
            else:
                y = x.astype(np.float64)
                if self.config.transform == "log1p":
                    y = np.log1p(y)
                if self.config.anomaly != "none":
                    y = y - self._mean_field(stats, ds, y, "transform")
                if stats.pixel_std is not None:
                    y = y / self._pixel_da(stats, stats.pixel_std, x)
                z = (y - self._range_da(stats, stats.center, x)) / self._range_da(
                    stats, stats.half_range, x)
            z = z.transpose(*x.dims, ...).astype(np.float32, copy=False)
            attrs = {k: v for k, v in x.attrs.items() if k not in _DROP_ATTRS}
            z.attrs = {**attrs, "units": "1", "geodiff_scaled": 1}
            out[name] = z.drop_vars([c for c in z.coords if c not in x.coords])
        return out

    def inverse(self, ds: xr.Dataset) -> xr.Dataset:
        """Scaled -> physical for every fitted variable in ``ds`` (dtype and attrs restored)."""
        out = ds.copy()
        for name in self._present(ds, "inverse"):
            z = ds[name]
            stats = self._checked_stats(name, z)
            y = z.astype(np.float64) * self._range_da(stats, stats.half_range, z)
            y = y + self._range_da(stats, stats.center, z)
            if stats.pixel_std is not None:
                y = y * self._pixel_da(stats, stats.pixel_std, z)
            if self.config.anomaly != "none":
                y = y + self._mean_field(stats, ds, y, "inverse")
            if self.config.transform == "log1p":
                y = np.expm1(y)
            x = y.transpose(*z.dims, ...).astype(stats.dtype)
            x.attrs = dict(stats.attrs)
            out[name] = x.drop_vars([c for c in x.coords if c not in z.coords])
        return out

    def affine_parameters(self, x: xr.DataArray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(center, half)`` float32 arrays broadcastable to ``x.values`` when
        ``transform`` maps ``x`` by exactly ``(x - center) / half`` in float32 (affine
        scaling of float32 data: its fast route), else ``None``.

        Lets a reader scale straight into its own buffer with the same bits as
        :meth:`transform` (the streamed loader does, see :class:`geodiff.data.FieldDataset`).
        """
        if x.name not in self.stats:
            return None
        stats = self._checked_stats(str(x.name), x)
        if not (self._affine_only(stats) and x.dtype.itemsize <= 4 and x.dtype.kind == "f"):
            return None
        params = []
        for values in (stats.center, stats.half_range):
            da = self._range_da(stats, values, x).astype(np.float32)
            shape = [x.sizes[d] if d in da.dims else 1 for d in x.dims]
            params.append(np.asarray(da.transpose(*[d for d in x.dims if d in da.dims]).values
                                     ).reshape(shape))
        return params[0], params[1]

    def _affine_only(self, stats: VariableStats) -> bool:
        """Whether ``transform`` is just ``(x - center) / half_range`` for this variable."""
        return (self.config.transform != "log1p" and self.config.anomaly == "none"
                and stats.pixel_std is None)

    def _present(self, ds: xr.Dataset, action: str) -> list[str]:
        names = [v for v in self.stats if v in ds.data_vars]
        if not names:
            raise ValueError(f"cannot {action}: ds has none of the fitted variables "
                             f"{list(self.stats)}; it has {list(ds.data_vars)}")
        return names

    def _checked_stats(self, name: str, x: xr.DataArray) -> VariableStats:
        stats = self.stats[name]
        for d in stats.pixel_dims:
            if d not in x.dims:
                raise ValueError(f"variable {name!r} lacks dim {d!r}: the scaler was fitted "
                                 f"on dims {stats.pixel_dims} (+ samples); got {x.dims}")
            if d == LEVEL or d not in stats.pixel_coords or d not in x.coords:
                continue
            ref, got = np.asarray(stats.pixel_coords[d]), np.asarray(x[d].values)
            if ref.shape != got.shape or not np.allclose(ref, got, rtol=0, atol=1e-6):
                raise ValueError(_grid_mismatch(name, d, ref, got))
        return stats

    def _pixel_da(self, stats: VariableStats, arr: np.ndarray, x: xr.DataArray) -> xr.DataArray:
        return xr.DataArray(self._pixel_array(stats, arr, x), dims=stats.pixel_dims)

    def _range_da(self, stats: VariableStats, arr: np.ndarray, x: xr.DataArray) -> xr.DataArray:
        if stats.range_dims and LEVEL in x.coords and LEVEL in x.dims:
            arr = arr[_level_index(stats, x)]
        return xr.DataArray(arr, dims=stats.range_dims)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; floats are exact through ``json.dumps``/``json.loads`` (NaN -> None).

        Layout: ``{"format", "version", "config": ScalingConfig fields, "sample_dims",
        "t_center", "t_scale", "labels", "periods", "variables": {name: {"pixel_dims",
        "pixel_coords", "range_dims", "attrs", "dtype", "center", "half_range", "mean_field",
        "pixel_std"}}}`` with each array as ``{"shape": [...], "data": [flat floats]}``.
        """
        return {
            "format": _FORMAT, "version": _VERSION,
            "config": _plain_config(self.config), "sample_dims": list(self.sample_dims),
            "t_center": self.t_center, "t_scale": self.t_scale,
            "labels": _plain_list(np.asarray(self.labels, dtype=object)),
            "periods": list(self.periods), "anchors": self.anchors.tolist(),
            "variables": {name: {
                "pixel_dims": list(s.pixel_dims), "pixel_coords": s.pixel_coords,
                "range_dims": list(s.range_dims), "attrs": s.attrs, "dtype": s.dtype,
                "center": _encode(s.center), "half_range": _encode(s.half_range),
                "mean_field": _encode(s.mean_field), "pixel_std": _encode(s.pixel_std),
                "local_field": _encode(s.local_field), "local_count": _encode(s.local_count),
            } for name, s in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scaler:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} v{_VERSION} dict: format={d.get('format')!r}, "
                             f"version={d.get('version')!r}")
        cfg = dict(d["config"])
        cfg["quantiles"] = tuple(cfg["quantiles"])
        stats = {name: VariableStats(
            pixel_dims=tuple(s["pixel_dims"]), pixel_coords=dict(s["pixel_coords"]),
            range_dims=tuple(s["range_dims"]), center=_decode(s["center"]),
            half_range=_decode(s["half_range"]), mean_field=_decode(s["mean_field"]),
            pixel_std=_decode(s["pixel_std"]), attrs=dict(s["attrs"]), dtype=s["dtype"],
            local_field=_decode(s.get("local_field")), local_count=_decode(s.get("local_count")),
        ) for name, s in d["variables"].items()}
        return cls(ScalingConfig(**cfg), d["sample_dims"], stats, t_center=d["t_center"],
                   t_scale=d["t_scale"], labels=d["labels"], periods=d["periods"],
                   anchors=d.get("anchors", ()))


# -- helpers ---------------------------------------------------------------------------------
class _ValueChecks:
    """Counts of values of one variable that no statistic may see: +-inf (one would turn the
    trend, climatology or standard deviation of its whole pixel into NaN) and, for
    ``transform: log1p``, values <= -1.

    For numpy-backed data they are counted (and raised) at once; for dask-backed data they
    ride along with the first statistic of the fit (:meth:`compute`), so checking costs no
    extra pass over a larger-than-memory store.
    """

    def __init__(self, x: xr.DataArray, name: str, *, log1p: bool) -> None:
        self.name = name
        lazy = x.chunks is not None
        data = x.data if lazy else np.asarray(x.values)  # values: read a lazy backend once
        counts = {}
        if np.issubdtype(x.dtype, np.floating):
            counts["inf"] = np.isinf(data).sum()
        if log1p:
            counts["log1p"] = (data <= -1).sum()
        self.pending: dict[str, Any] | None = counts
        if not lazy:
            self._raise_if_bad(counts)

    def compute(self, *args: Any) -> tuple[Any, ...]:
        """``dask.compute(*args)``, with the pending counts the first time (then raised)."""
        if not self.pending:
            return dask.compute(*args)
        *out, counts = dask.compute(*args, self.pending)
        self._raise_if_bad(counts)
        return tuple(out)

    def _raise_if_bad(self, counts: Mapping[str, Any]) -> None:
        self.pending = None
        name = self.name
        n_log = int(counts.get("log1p", 0))
        if n_log:
            raise ValueError(f"transform='log1p' needs values > -1, but variable {name!r} "
                             f"has {n_log} values <= -1; use transform: none")
        n_inf = int(counts.get("inf", 0))
        if n_inf:
            raise ValueError(f"variable {name!r} has {n_inf} infinite values (+-inf) in the "
                             "training split; scaling needs finite values, with NaN for "
                             f"missing ones. Mask them first: ds[{name!r}] = ds[{name!r}]"
                             f".where(np.isfinite(ds[{name!r}]))")


def _time_feature(ds: xr.Dataset | xr.DataArray, name: str, action: str) -> xr.DataArray:
    """Coordinate ``name`` of ``ds``; ``year``/``month``/``dayofyear`` may come from ``time``."""
    if name in ds.coords:
        return ds.coords[name]
    if name in _TIME_FEATURES and "time" in ds.coords:
        try:
            return getattr(ds["time"].dt, name)
        except (AttributeError, TypeError):
            pass
    raise ValueError(f"cannot {action}: coordinate {name!r} is needed (scaling anomaly) but "
                     f"the Dataset has coords {sorted(map(str, ds.coords))} and no decoded "
                     f"'time'; assign it, e.g. ds.assign_coords({name}=...)")


def _label_coord(ds: xr.Dataset | xr.DataArray, name: str, action: str) -> xr.DataArray:
    if name not in ds.coords:
        raise ValueError(f"cannot {action}: coordinate trend_by={name!r} is needed (the trend "
                         f"is fitted per {name}) but the Dataset has coords "
                         f"{sorted(map(str, ds.coords))}")
    lab = ds.coords[name]
    if lab.ndim > 1:
        raise ValueError(f"trend_by={name!r} must be a 0-d or 1-d coordinate, got dims {lab.dims}")
    return lab


def _select_label(y: xr.DataArray, ds: xr.Dataset, name: str, label: Any) -> xr.DataArray:
    lab = _label_coord(ds, name, "fit")
    if lab.ndim == 0:
        return y
    return y.isel({lab.dims[0]: np.flatnonzero([_plain(v) == label for v in lab.values])})


def _index_of(coord: xr.DataArray, known: tuple, name: str, action: str) -> xr.DataArray:
    """Positions of the values of ``coord`` in ``known`` (same dims); error on unseen values."""
    lookup = {k: i for i, k in enumerate(known)}
    values = np.asarray(coord.values)
    unseen = _sorted({_plain(v) for v in values.ravel()} - set(lookup))
    if unseen:
        raise ValueError(f"cannot {action}: {name}={unseen} not seen when fitting the scaler; "
                         f"known {name} values are {list(known)}")
    idx = np.vectorize(lambda v: lookup[_plain(v)], otypes=[np.int64])(values)
    return xr.DataArray(idx.reshape(values.shape), dims=coord.dims)


def _grid_mismatch(name: str, dim: str, ref: np.ndarray, got: np.ndarray) -> str:
    """Error message for a coordinate that differs from the fitted one, with the fix."""
    def show(v: np.ndarray) -> str:
        return f"{v.size} values {v[0]:g} .. {v[-1]:g}" if v.size else "no values"

    head = (f"variable {name!r}: coordinate {dim!r} has {show(got)}, but the scaler was "
            f"fitted on {show(ref)}; ")
    if ref.dtype.kind in "fiu" and got.dtype.kind in "fiu" and ref.shape == got.shape:
        if np.allclose(np.sort(ref), np.sort(got), rtol=0, atol=1e-6):
            return head + (f"the same values in another order (e.g. a descending {dim}): "
                           "pass the data through geodiff.grid.standardize (as "
                           f"geodiff.open_dataset does), or ds.sortby({dim!r})")
        start = float(np.min(ref))
        wrapped = np.mod(got - start + 1e-6, 360.0) + start - 1e-6
        if np.allclose(np.sort(ref), np.sort(wrapped), rtol=0, atol=1e-6):
            shift = f"ds.{dim} % 360" if start == 0 else \
                f"(ds.{dim} - {start:g}) % 360 + {start:g}"
            return head + (f"the same longitudes in another convention (e.g. -180..180 "
                           f"against 0..360): convert them, e.g. ds.assign_coords({dim}="
                           f"{shift}).sortby({dim!r}), or open the data with "
                           f"geodiff.open_dataset(..., lon=[{start:g}, {start + 360:g}])")
    return head + "select the fitted region or regrid to the fitted grid first"


def _level_index(stats: VariableStats, x: xr.DataArray) -> np.ndarray:
    known = [float(v) for v in stats.pixel_coords.get(LEVEL, [])]
    got = [float(v) for v in np.asarray(x[LEVEL].values)]
    missing = [v for v in got if v not in known]
    if missing:
        raise ValueError(f"levels {missing} were not in the fitted data; known {known}")
    return np.array([known.index(v) for v in got])


def _chunk_like(small: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
    """Chunk ``small`` along the dims it shares with a dask-backed ``like``."""
    if like.chunks is None:
        return small
    sizes = like.variable.chunksizes  # the data's chunks (coordinates may differ)
    chunks = {d: sizes[d] for d in small.dims if d in sizes}
    return small.chunk(chunks) if chunks else small


def _check_finite(center: np.ndarray, a: xr.DataArray, name: str,
                  range_dims: tuple[str, ...]) -> None:
    """Raise ValueError naming the levels (or the variable) without any finite value."""
    bad = ~np.isfinite(center)
    if not bad.any():
        return
    if not range_dims:
        raise ValueError(f"variable {name!r} has no finite values in the training split; "
                         "cannot fit scaling. Check the split (split.*) and the variable's "
                         "missing values")
    dim = range_dims[0]
    values = (_plain_list(a[dim].values) if dim in a.coords
              else list(range(a.sizes[dim])))
    missing = [v for v, b in zip(values, np.ravel(bad)) if b]
    kept = [v for v, b in zip(values, np.ravel(bad)) if not b]
    raise ValueError(f"variable {name!r} has no finite values in the training split at "
                     f"{dim}={missing} (e.g. a pressure level below ground everywhere); "
                     f"cannot fit its scaling. Keep only levels with data: levels={kept} "
                     "(open_dataset(..., levels=...) or subset.levels of the catalog entry)")


def _histogram_quantiles(a: xr.DataArray, range_dims: tuple[str, ...], lo: np.ndarray,
                         hi: np.ndarray, q: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles ``q`` of ``a`` per ``range_dims`` from a 65536-bin histogram (dask, O(bins))."""
    import dask.array as dsa

    levels = [{}] if not range_dims else [{range_dims[0]: i} for i in range(lo.size)]
    hists = []
    for i, sel in enumerate(levels):
        data = a.isel(sel).data
        arr = data if isinstance(data, dsa.Array) else dsa.from_array(data, chunks=-1)
        edges_range = (float(lo.flat[i]), float(hi.flat[i]) if hi.flat[i] > lo.flat[i]
                       else float(lo.flat[i]) + 1.0)
        hists.append(dsa.histogram(arr.ravel(), bins=_HIST_BINS, range=edges_range))
    (computed,) = dask.compute(hists)
    out = np.empty((2, lo.size))
    for i, (counts, edges) in enumerate(computed):
        cum = np.concatenate([[0], np.cumsum(counts)])  # values below each edge, (bins + 1,)
        for j, qj in enumerate(q):
            rank = qj * (cum[-1] - 1)  # numpy's "linear" definition on sorted values
            k = math.floor(rank)
            v_k, v_k1 = _order_statistic(cum, edges, k), _order_statistic(cum, edges, k + 1)
            out[j, i] = v_k + (rank - k) * (v_k1 - v_k)
    return out[0].reshape(lo.shape), out[1].reshape(hi.shape)


def _order_statistic(cum: np.ndarray, edges: np.ndarray, k: int) -> float:
    """The k-th smallest value (0-based), placed uniformly inside its histogram bin."""
    k = min(k, int(cum[-1]) - 1)
    b = int(np.searchsorted(cum, k, side="right")) - 1
    n_bin = cum[b + 1] - cum[b]
    return float(edges[b] + (k - cum[b] + 0.5) / n_bin * (edges[b + 1] - edges[b]))


def _sorted(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=str)




def _plain_list(values: np.ndarray) -> list:
    return [_plain(v) for v in np.asarray(values).ravel()]


def _json_attrs(attrs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Attrs as JSON-able values (numpy scalars/arrays to Python numbers/lists)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            v = _plain_list(v)
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            continue
        if not isinstance(v, (str, int, float, bool, list)):
            raise TypeError(f"attribute {k!r} of variable {name!r} is {type(v).__name__}, "
                            f"which cannot be stored in the scaler; drop or stringify it")
        out[str(k)] = v
    return out


def _plain_config(cfg: ScalingConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["quantiles"] = list(d["quantiles"])
    return d


_B64_MIN_SIZE = 4096
"""Arrays this large are stored as base64 of their little-endian bytes (exact, ~4x smaller
than a JSON list of float64 reprs); smaller ones as readable lists."""


def _encode(arr: np.ndarray | None) -> dict[str, Any] | None:
    if arr is None:
        return None
    if np.asarray(arr).dtype == np.float32:
        a = np.asarray(arr, dtype="<f4")
    else:
        a = np.asarray(arr, dtype=np.float64)
    if a.size >= _B64_MIN_SIZE:
        return {"shape": list(a.shape), "dtype": a.dtype.str,
                "base64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}
    return {"shape": list(a.shape), "dtype": a.dtype.str,
            "data": [None if math.isnan(v) else v for v in a.ravel().tolist()]}


def _decode(d: Mapping[str, Any] | None) -> np.ndarray | None:
    if d is None:
        return None
    dtype = np.dtype(d.get("dtype", "<f8"))
    if "base64" in d:
        flat = np.frombuffer(base64.b64decode(d["base64"]), dtype=dtype).copy()
    else:
        flat = np.array([np.nan if v is None else v for v in d["data"]], dtype=dtype)
    return flat.reshape(d["shape"])
