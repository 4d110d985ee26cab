"""Probabilistic verification and summaries of ensembles: xarray in, xarray out.

An ensemble is an ``xr.DataArray`` or ``xr.Dataset`` with a ``member`` dimension (CF
``standard_name = "realization"``), latitude/longitude dimensions under the source's own
names (found by CF attributes, then common names) and any number of *sample* dimensions
(``scenario``, ``time``, ``year``, ``level``...): each point of the sample dimensions is one
*field*.  Observations have the same dimensions without ``member``.

Every spatial mean is weighted by ``cos(lat)`` normalised to mean 1 and skips NaN (land
masks); scores are averaged with those weights over the grid, then plainly over the fields,
exactly as ``shared/EVAL.md`` defines them.  Everything is plain xarray arithmetic or
``xr.apply_ufunc(dask="parallelized")``, so dask-backed inputs stay lazy until a score is
computed.

Importing this module registers the ``.geodiff`` accessor on ``xr.Dataset`` and
``xr.DataArray`` (see :mod:`geodiff.accessor`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import dask
import dask.array
import numpy as np
import xarray as xr

from geodiff import accessor  # noqa: F401  (registers the .geodiff accessor)
from geodiff._version import __version__
from geodiff.grid import area_weights

MEMBER = "member"
RANK = "rank"
WAVENUMBER = "wavenumber"

XrObj = TypeVar("XrObj", xr.DataArray, xr.Dataset)

_LAT_NAMES = ("lat", "latitude", "y", "nav_lat")
_LON_NAMES = ("lon", "longitude", "x", "nav_lon")
_LAT_UNITS = ("degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn")
_LON_UNITS = ("degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese")


# ---------------------------------------------------------------------------------------
# grid helpers


def lat_lon_dims(obj: xr.DataArray | xr.Dataset) -> tuple[str, str]:
    """Names of the latitude and longitude dimensions of ``obj``.

    Looks at each dimension coordinate's CF ``standard_name``, then ``units``, then ``axis``
    (``Y``/``X``), then at common names (``lat``/``latitude``/``y``, case-insensitive).
    """
    dims = [str(d) for d in obj.dims]

    def find(kind: str, std: str, units: tuple[str, ...], axis: str,
             names: tuple[str, ...]) -> str:
        attrs = {d: obj[d].attrs if d in obj.coords else {} for d in dims}
        tests = (lambda d: attrs[d].get("standard_name") == std,
                 lambda d: str(attrs[d].get("units", "")).lower() in units,
                 lambda d: attrs[d].get("axis") == axis,
                 lambda d: d.lower() in names)
        for test in tests:
            hits = [d for d in dims if test(d)]
            if hits:
                return hits[0]
        raise ValueError(
            f"no {kind} dimension in dims={dims}; name it {names[0]!r} or give its coordinate "
            f"the CF attributes standard_name={std!r}, units={units[0]!r}")

    return (find("latitude", "latitude", _LAT_UNITS, "Y", _LAT_NAMES),
            find("longitude", "longitude", _LON_UNITS, "X", _LON_NAMES))


def lat_weights(obj: xr.DataArray | xr.Dataset) -> xr.DataArray:
    """Area weights ``cos(lat)`` normalised to mean 1 (:func:`geodiff.grid.area_weights`).

    Returns a DataArray along the latitude dimension ``(lat,)`` that broadcasts against
    ``obj``.
    """
    lat, _ = lat_lon_dims(obj)
    return xr.DataArray(area_weights(obj[lat].values), dims=[lat],
                        coords={lat: obj[lat].values})


def sample_dims(obj: xr.DataArray | xr.Dataset) -> list[str]:
    """The dimensions that index fields: all but ``member`` and latitude/longitude."""
    spatial = lat_lon_dims(obj)
    return [str(d) for d in obj.dims if d != MEMBER and d not in spatial]


def weighted_mean(x: XrObj, dim: str | Sequence[str] | None = None) -> XrObj:
    """Mean of ``x`` over ``dim`` (default all): cos(lat)-weighted over the grid, NaN skipped.

    The latitude/longitude dims in ``dim`` are averaged first with the area weights (so a
    masked point contributes nothing), then the remaining dims plainly (mean over fields).
    Of a Dataset, the variables on the grid are averaged (auxiliaries without the grid's
    dimensions, such as ``time_bnds``, are left out).
    """
    dims = [str(d) for d in x.dims] if dim is None else [dim] if isinstance(dim, str) else [
        str(d) for d in dim]
    spatial = [d for d in lat_lon_dims(x) if d in dims]
    if spatial and isinstance(x, xr.Dataset):
        # gridded variables only: CF auxiliaries (time_bnds, grid mappings) have no grid
        x = x[[v for v in x.data_vars if set(spatial) <= set(map(str, x[v].dims))]]
        if dim is None:
            dims = [str(d) for d in x.dims]
    if spatial:
        x = x.weighted(lat_weights(x)).mean(spatial)
    rest = [d for d in dims if d not in spatial]
    return x.mean(rest) if rest else x


def ensemble_variables(ens: XrObj) -> XrObj:
    """A Dataset's variables that have a ``member`` dimension; a DataArray as it is.

    CF files carry auxiliary variables (``time_bnds``, grid mappings, ``year``) that are not
    ensembles; the functions of this module score and summarise the ensemble variables only.
    """
    if isinstance(ens, xr.Dataset):
        keep = [v for v in ens.data_vars if MEMBER in ens[v].dims]
        if keep:
            return ens[keep]
    return ens


def require_member(obj: xr.DataArray | xr.Dataset, name: str) -> int:
    """Number of members of ``obj``; a ValueError naming the fix when there is no member dim."""
    if MEMBER not in obj.dims:
        raise ValueError(
            f"{name} has no {MEMBER!r} dimension (dims={list(map(str, obj.dims))}); an ensemble "
            f"needs one: rename the ensemble dimension, e.g. {name}.rename({{'realization': "
            f"'{MEMBER}'}}), or wrap a single deterministic field with "
            f"{name}.expand_dims('{MEMBER}') (then CRPS equals the absolute error)")
    return int(obj.sizes[MEMBER])


def _index_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating):
        return bool(np.allclose(a, b, rtol=0.0, atol=1e-6 * max(1.0, float(np.abs(a).max()))))
    return bool(np.array_equal(a, b))


def check_matching(ens: xr.DataArray | xr.Dataset, obs: XrObj, *, ens_name: str = "ens",
                   obs_name: str = "obs") -> XrObj:
    """``obs`` on the coordinates of ``ens``, after checking that they share grid and fields.

    The non-member dimensions must be the same, with the same sizes and coordinate values
    (floats to 1e-6 relative, so float32 and float64 copies of a grid match); a ValueError
    names the difference otherwise.  Along a sample dimension (not lat/lon) ``obs`` may hold
    more fields than ``ens``, e.g. a whole observation file: those with ``ens``'s labels are
    selected.  Returning ``obs`` with ``ens``'s index values keeps
    xarray's alignment from silently dropping points that differ only by rounding.
    """
    require_member(ens, ens_name)
    if isinstance(ens, xr.Dataset) and isinstance(obs, xr.Dataset):
        ens = ensemble_variables(ens)
        missing = [str(v) for v in ens.data_vars if v not in obs.data_vars]
        if missing:
            raise ValueError(f"{obs_name} lacks the variables {missing} of {ens_name} (has "
                             f"{list(map(str, obs.data_vars))}); rename them or select "
                             f"matching variables")
        obs = obs[list(ens.data_vars)]
    if MEMBER in obs.dims:
        raise ValueError(f"{obs_name} has a {MEMBER!r} dimension; observations are one field "
                         f"per sample: select or squeeze it, e.g. {obs_name}.isel({MEMBER}=0)")
    ens_dims = {str(d) for d in ens.dims} - {MEMBER}
    obs_dims = {str(d) for d in obs.dims}
    try:
        spatial = set(lat_lon_dims(ens))
    except ValueError:
        spatial = set()
    for d in sorted((ens_dims & obs_dims) - spatial):  # e.g. the whole observation file
        if d in ens.indexes and d in obs.indexes and obs.indexes[d].is_unique \
                and not _index_equal(ens.indexes[d], obs.indexes[d]) \
                and bool(ens.indexes[d].isin(obs.indexes[d]).all()):
            obs = obs.sel({d: np.asarray(ens.indexes[d])})
    if ens_dims != obs_dims:
        raise ValueError(
            f"{ens_name} and {obs_name} have different dims: {ens_name} (without {MEMBER!r}) "
            f"{sorted(ens_dims)} vs {obs_name} {sorted(obs_dims)}; rename or select so both "
            f"have the same grid and sample dims")
    for d in sorted(obs_dims):
        if ens.sizes[d] != obs.sizes[d]:
            raise ValueError(f"dim {d!r} has size {ens.sizes[d]} in {ens_name} but "
                             f"{obs.sizes[d]} in {obs_name}; regrid or select matching fields")
        if d in ens.indexes and d in obs.indexes and not _index_equal(ens.indexes[d],
                                                                      obs.indexes[d]):
            raise ValueError(
                f"coordinate {d!r} differs between {ens_name} and {obs_name} "
                f"({ens_name}: {np.asarray(ens.indexes[d])[:4]}..., {obs_name}: "
                f"{np.asarray(obs.indexes[d])[:4]}...); put both on the same grid/fields")
    return obs.assign_coords({d: ens[d] for d in sorted(obs_dims) if d in ens.indexes})


def _same(units: str | None) -> str | None:
    return units


def _squared(units: str | None) -> str | None:
    if units is None or units == "1":
        return units
    return f"({units})^2" if " " in units.strip() else f"{units}^2"


def _describe(out: XrObj, src: xr.DataArray | xr.Dataset, long_name: str,
              units: str | Callable[[str | None], str | None] | None) -> XrObj:
    """``out`` labelled as what it is: CF ``long_name`` and ``units`` (a fixed string or a
    function of the input's units) and nothing else.

    xarray may carry the input's attributes over (``keep_attrs``, the default in recent
    releases): ``units: K`` and ``standard_name: air_temperature`` on a probability, a count
    or a power spectrum are wrong, so they are replaced, not inherited. Applied per variable
    for Datasets.
    """
    def attrs(source: xr.DataArray | None) -> dict[str, Any]:
        old = source.attrs if source is not None else {}
        u = units(old.get("units")) if callable(units) else units
        return {"long_name": long_name} | ({"units": u} if u is not None else {})

    return _relabel(out, src, attrs)


def _with_cell_method(out: XrObj, src: xr.DataArray | xr.Dataset, method: str) -> XrObj:
    """``out`` with the input's attributes (a mean or a spread is still air temperature in
    K) and ``method`` appended to its CF ``cell_methods``."""
    def attrs(source: xr.DataArray | None) -> dict[str, Any]:
        old = dict(source.attrs) if source is not None else {}
        before = old.get("cell_methods")
        return old | {"cell_methods": f"{before} {method}" if before else method}

    return _relabel(out, src, attrs)


def _relabel(out: XrObj, src: xr.DataArray | xr.Dataset, attrs) -> XrObj:
    """``out`` with ``attrs(source variable)`` as the attributes of each of its variables."""
    out = out.copy(deep=False)
    if isinstance(out, xr.Dataset):
        for v in out.data_vars:
            has = isinstance(src, xr.Dataset) and v in src.data_vars
            out[v].attrs = attrs(src[v] if has else None)
    else:
        out.attrs = attrs(src if isinstance(src, xr.DataArray) else None)
    return out


def _is_dask(x: xr.DataArray | xr.Dataset) -> bool:
    return bool(x.chunks)


def _one_member_chunk(x: XrObj) -> XrObj:
    return x.chunk({MEMBER: -1}) if _is_dask(x) else x


# ---------------------------------------------------------------------------------------
# summaries


def ensemble_mean(ens: XrObj) -> XrObj:
    """Ensemble mean over ``member``: ``(member, ...) -> (...)``."""
    ens = ensemble_variables(ens)
    require_member(ens, "ens")
    return _with_cell_method(ens.mean(MEMBER), ens, "member: mean")


def ensemble_spread(ens: XrObj) -> XrObj:
    """Ensemble standard deviation over ``member`` (ddof = 1): ``(member, ...) -> (...)``."""
    ens = ensemble_variables(ens)
    if require_member(ens, "ens") < 2:
        raise ValueError("ensemble_spread needs at least 2 members (ddof=1); got 1")
    return _with_cell_method(ens.std(MEMBER, ddof=1), ens, "member: standard_deviation")


def ensemble_quantiles(ens: XrObj, q: float | Sequence[float]) -> XrObj:
    """Empirical quantiles over members (linear interpolation): ``-> (quantile, ...)``."""
    ens = ensemble_variables(ens)
    require_member(ens, "ens")
    qs = np.atleast_1d(np.asarray(q, dtype=float))
    if np.any((qs < 0) | (qs > 1)):
        raise ValueError(f"{q=} must lie in [0, 1]")
    return _one_member_chunk(ens).quantile(q, dim=MEMBER)


def exceedance_count(ens: XrObj, threshold: float | xr.DataArray, *,
                     below: bool = False) -> XrObj:
    """Number of members above ``threshold`` (below it with ``below=True``): ``-> (...)``."""
    ens = ensemble_variables(ens)
    require_member(ens, "ens")
    hit = ens < threshold if below else ens > threshold
    side = "below" if below else "above"
    return _describe(hit.sum(MEMBER), ens, f"number of members {side} the threshold", "1")


def exceedance_probability(ens: XrObj, threshold: float | xr.DataArray, *,
                           below: bool = False) -> XrObj:
    """Fraction of members with ``X > threshold`` (``X < threshold`` if ``below``).

    ``threshold`` is a number or a DataArray broadcasting against the fields (e.g. a
    climatological quantile map).  NaN members are left out; all-NaN points give NaN.
    """
    ens = ensemble_variables(ens)
    require_member(ens, "ens")
    hit = ens < threshold if below else ens > threshold
    side = "below" if below else "above"
    return _describe(hit.where(ens.notnull()).mean(MEMBER), ens,
                     f"probability of being {side} the threshold", "1")


def empirical_return_period(ens: XrObj, threshold: float | xr.DataArray, *,
                            below: bool = False) -> XrObj:
    """Empirical return period ``1 / p`` of exceeding ``threshold``, in fields.

    ``p`` is :func:`exceedance_probability`; for annual fields the result is in years.  Points
    where no member exceeds give ``inf`` (longer than the ensemble can resolve).
    """
    p = exceedance_probability(ens, threshold, below=below)
    return _describe(1.0 / p, ens, "empirical return period in fields", "1")


# ---------------------------------------------------------------------------------------
# CRPS


def _crps_kernel(x: np.ndarray, y: np.ndarray, fair: bool) -> np.ndarray:
    """CRPS of ensembles ``x (..., M)`` for observations ``y (...)`` in O(M log M).

    With sorted members ``x_(1) <= ... <= x_(M)`` the pair sum
    ``sum_{i,j} |x_i - x_j| = 2 sum_i (2 i - M - 1) x_(i)``, so
    ``CRPS = mean_i |x_i - y| - sum_i (2 i - M - 1) x_(i) / D`` with ``D = M (M - 1)`` (fair,
    Ferro 2014) or ``D = M^2`` (ordinary, Gneiting & Raftery 2007, energy form).

    Members that are NaN at a point are left out there: ``M`` is the number of finite
    members of that point (a ragged ensemble, e.g. the analog baseline padded with NaN
    members). Points with fewer than 2 (fair) or 1 (ordinary) finite members, or a NaN
    observation, give NaN.
    """
    d = x.astype(np.float64) - y.astype(np.float64)[..., None]  # (..., M), shift-invariant
    finite = np.isfinite(d)
    m = finite.sum(axis=-1)  # (...) finite members per point
    with np.errstate(invalid="ignore", divide="ignore"):
        abs_err = np.where(finite, np.abs(d), 0.0).sum(axis=-1) / m  # (...)
        ranks = np.arange(1, d.shape[-1] + 1)  # (M,)
        coef = np.where(ranks <= m[..., None], 2.0 * ranks - m[..., None] - 1, 0.0)
        d_sorted = np.sort(np.where(finite, d, np.inf), axis=-1)  # missing members last
        pair_half = (np.where(np.isfinite(d_sorted), d_sorted, 0.0) * coef).sum(axis=-1)
        crps = abs_err - pair_half / (m * (m - 1) if fair else m * m)
    return np.where(m >= (2 if fair else 1), crps, np.nan)


def _crps(ens: XrObj, obs: XrObj, fair: bool) -> XrObj:
    ens = ensemble_variables(ens)
    m = require_member(ens, "ens")
    if fair and m < 2:
        raise ValueError(f"fair CRPS needs at least 2 members, got {m}; use crps_ensemble "
                         f"(ordinary CRPS, equal to the absolute error for one member)")
    obs = check_matching(ens, obs)
    crps = xr.apply_ufunc(
        _crps_kernel, ens, obs, kwargs={"fair": fair},
        input_core_dims=[[MEMBER], []], dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"allow_rechunk": True})
    return _describe(crps, ens, "fair CRPS" if fair else "CRPS", _same)


def crps_fair(ens: XrObj, obs: XrObj) -> XrObj:
    """Fair CRPS per grid point and field (Ferro 2014, QJRMS 140, 1917-1923).

    ``mean_i |X_i - y| - sum_{i,j} |X_i - X_j| / (2 M (M - 1))``; ``ens (member, ...)``,
    ``obs (...)`` -> ``(...)``.  Unbiased for the CRPS of the distribution the members are
    drawn from, whatever M.  Members missing (NaN) at a point are left out there, ``M``
    counting the finite ones, so ragged ensembles padded with NaN members score correctly.
    """
    return _crps(ens, obs, fair=True)


def crps_ensemble(ens: XrObj, obs: XrObj) -> XrObj:
    """Ordinary ensemble CRPS per point: ``mean_i |X_i - y| - sum_{i,j}|X_i - X_j| / (2 M^2)``.

    The CRPS of the empirical distribution of the members (Gneiting & Raftery 2007);
    equals ``|X - y|`` for one member.  ``ens (member, ...)``, ``obs (...)`` -> ``(...)``.
    """
    return _crps(ens, obs, fair=False)


def crps_skill(ens: XrObj, obs: XrObj, reference: XrObj, *,
               dim: str | Sequence[str] | None = None, fair: bool = True) -> XrObj:
    """CRPS skill score ``1 - CRPS(ens) / CRPS(reference)``, CRPS weighted-averaged over ``dim``.

    ``reference`` is another ensemble (any member count) on the same grid and fields.
    """
    score = crps_fair if fair else crps_ensemble
    skill = 1.0 - weighted_mean(score(ens, obs), dim) / weighted_mean(score(reference, obs), dim)
    return _describe(skill, ens, "CRPS skill score", "1")


# ---------------------------------------------------------------------------------------
# moments: bias, RMSE, spread-skill


def weighted_bias(ens: XrObj, obs: XrObj, dim: str | Sequence[str] | None = None) -> XrObj:
    """Weighted mean of (ensemble mean - obs) over ``dim`` (default all): the mean error."""
    ens = ensemble_variables(ens)
    return _describe(weighted_mean(ens.mean(MEMBER) - check_matching(ens, obs), dim), ens,
                     "bias of the ensemble mean", _same)


def weighted_rmse(ens: XrObj, obs: XrObj, dim: str | Sequence[str] | None = None) -> XrObj:
    """Root of the weighted mean over ``dim`` of (ensemble mean - obs)^2."""
    ens = ensemble_variables(ens)
    rmse = np.sqrt(weighted_mean((ens.mean(MEMBER) - check_matching(ens, obs)) ** 2, dim))
    return _describe(rmse, ens, "root mean square error of the ensemble mean", _same)


def spread_skill_ratio(ens: XrObj, obs: XrObj,
                       dim: str | Sequence[str] | None = None) -> XrObj:
    """Spread-skill ratio ``sqrt((M+1)/M) sqrt(<var_ddof1>) / sqrt(<(mean - y)^2>)``.

    ``<.>`` is the weighted mean over grid and fields (``dim``, default all); the factor
    ``sqrt((M + 1) / M)`` makes 1 the ideal value for a finite exchangeable ensemble
    (Fortin et al. 2014, J. Hydrometeor. 15, 1708-1713).  Spread and error are averaged
    over the same points: those with an observation and at least 2 finite members (gaps in
    the observations, e.g. clouds, leave both out).  Members missing at a point are left
    out there, with ``M`` the number of finite members of that point.
    """
    ens = ensemble_variables(ens)
    obs = check_matching(ens, obs)
    n = ens.count(MEMBER)  # (...) finite members per point
    var = ens.var(MEMBER, ddof=1) * (n + 1) / n  # NaN where fewer than 2 members
    sq_err = (ens.mean(MEMBER) - obs) ** 2
    valid = var.notnull() & sq_err.notnull()
    spread2 = weighted_mean(var.where(valid), dim)
    skill2 = weighted_mean(sq_err.where(valid), dim)
    return _describe(np.sqrt(spread2 / skill2), ens, "spread-skill ratio", "1")


def spread_skill_bins(ens: xr.DataArray, obs: xr.DataArray, bins: int = 10) -> xr.Dataset:
    """Binned spread vs error: points grouped in ``bins`` quantile bins of the ensemble spread.

    Returns a Dataset over ``bin`` with ``spread`` (``sqrt((M+1)/M)`` times the root of the
    weighted mean variance in the bin), ``rmse`` of the ensemble mean and ``count``.  For a
    calibrated ensemble ``spread == rmse`` in every bin.
    """
    obs = check_matching(ens, obs)
    m = int(ens.sizes[MEMBER])
    var, sq_err = dask.compute(ens.var(MEMBER, ddof=1), (ens.mean(MEMBER) - obs) ** 2)
    w = lat_weights(obs).broadcast_like(obs).transpose(*obs.dims).values.ravel()
    v, e = var.transpose(*obs.dims).values.ravel(), sq_err.transpose(*obs.dims).values.ravel()
    ok = np.isfinite(v) & np.isfinite(e)
    v, e, w = v[ok], e[ok], w[ok]
    edges = np.quantile(v, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1)
    wsum = np.bincount(which, w, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.sqrt((m + 1) / m * np.bincount(which, w * v, bins) / wsum)
        rmse = np.sqrt(np.bincount(which, w * e, bins) / wsum)
    return xr.Dataset({"spread": ("bin", spread), "rmse": ("bin", rmse),
                       "count": ("bin", np.bincount(which, minlength=bins))},
                      coords={"bin": np.arange(bins)})


# ---------------------------------------------------------------------------------------
# rank histogram, energy score, spectra


def rank_histogram(ens: XrObj, obs: XrObj, rng: np.random.Generator, *,
                   dim: str | Sequence[str] | None = None) -> XrObj:
    """Rank histogram (Talagrand diagram; Hamill 2001): counts of the rank of y among members.

    The rank is ``#{X_i < y} + U``, with ``U`` uniform on ``0..#{X_i == y}`` drawn from
    ``rng`` (ties broken at random; for dask-backed ``obs`` a dask Generator seeded from
    ``rng`` draws them chunk by chunk).  Counts over ``dim`` (default all obs dims) -> ``(rank,
    ...)`` with ``M + 1`` bins; NaN points are not counted.  A Dataset gives a Dataset
    with one histogram per ensemble variable.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                        f"pass np.random.default_rng(seed)")
    if isinstance(ens, xr.Dataset):  # one histogram per ensemble variable
        ens = ensemble_variables(ens)
        obs = check_matching(ens, obs)
        return xr.Dataset({v: rank_histogram(ens[v], obs[v], rng, dim=dim)
                           for v in ens.data_vars})
    obs = check_matching(ens, obs)
    m = int(ens.sizes[MEMBER])
    n_less = (ens < obs).sum(MEMBER)
    n_tied = (ens == obs).sum(MEMBER)
    if obs.chunks:  # lazy uniforms, chunked like obs, seeded from rng
        u_data = dask.array.random.default_rng(int(rng.integers(2**63))).random(
            obs.shape, chunks=obs.chunks)
    else:
        u_data = rng.random(obs.shape)
    u = xr.DataArray(u_data, dims=obs.dims, coords=obs.coords)  # (...) uniform on [0, 1)
    ranks = n_less + np.floor(u * (n_tied + 1))
    ranks = ranks.where(obs.notnull() & ens.notnull().all(MEMBER))
    dims = list(obs.dims) if dim is None else [dim] if isinstance(dim, str) else list(dim)
    bins = xr.DataArray(np.arange(m + 1), dims=[RANK], coords={RANK: np.arange(m + 1)})
    return _describe((ranks == bins).sum(dims), ens, "rank histogram count", "1")


def rank_histogram_flatness(counts: xr.DataArray) -> tuple[float, float]:
    """``(max |count / expected - 1|, sqrt((bins - 1) / N))`` of a rank histogram.

    The second number is the relative standard error of one bin of a flat histogram of N
    independent ranks (shared/EVAL.md's flatness tolerance).
    """
    c = np.asarray(counts.values, dtype=np.float64)
    n, bins = c.sum(), c.size
    if n == 0:
        return float("nan"), float("nan")
    return float(np.abs(c / (n / bins) - 1.0).max()), float(np.sqrt((bins - 1) / n))


def energy_score(ens: xr.DataArray, obs: xr.DataArray, *, fair: bool = True) -> xr.DataArray:
    """Energy score of each field over the spatial grid (Gneiting & Raftery 2007, sec. 4.3).

    ``ES = mean_i ||X_i - y|| - sum_{i,j} ||X_i - X_j|| / (2 M (M - 1))`` (``2 M^2`` when
    ``fair=False``) with the area-weighted RMS norm ``||v|| = sqrt(sum w v^2 / sum w)`` over
    points valid in the obs and all members, so ES has the variable's units.
    ``ens (member, ..., lat, lon)``, ``obs (..., lat, lon)`` -> ``(...)``.
    """
    m = require_member(ens, "ens")
    if fair and m < 2:
        raise ValueError(f"the fair energy score needs at least 2 members, got {m}")
    obs = check_matching(ens, obs)
    spatial = list(lat_lon_dims(obs))
    valid = obs.notnull() & ens.notnull().all(MEMBER)  # (..., lat, lon)
    w = lat_weights(obs) * valid
    w = w / w.sum(spatial)
    a = (ens.astype(np.float64) - obs).where(valid, 0.0)  # (member, ..., lat, lon)
    a_j = a.rename({MEMBER: "member_j"})
    gram = xr.dot(a * w, a_j, dim=spatial)  # (member, member_j, ...)
    sq_norm = (a * a * w).sum(spatial)  # (member, ...)
    dist2 = sq_norm + sq_norm.rename({MEMBER: "member_j"}) - 2.0 * gram
    pair_sum = np.sqrt(dist2.clip(min=0.0)).sum([MEMBER, "member_j"])
    es = np.sqrt(sq_norm).mean(MEMBER) - pair_sum / (2 * m * (m - 1) if fair else 2 * m * m)
    return _describe(es, ens, "fair energy score" if fair else "energy score", _same)


def _row_power(a: np.ndarray) -> np.ndarray:
    """``|rfft|^2`` of each row of ``a (..., L)``; NaN points filled with the mean of the
    row's valid points (so they add no variance), all-NaN rows NaN."""
    valid = np.isfinite(a)
    n = valid.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_mean = np.where(valid, a, 0.0).sum(axis=-1, keepdims=True) / n
    power = np.abs(np.fft.rfft(np.where(valid, a, row_mean), axis=-1)) ** 2
    return np.where(n > 0, power, np.nan)


def zonal_power_spectrum(x: XrObj, *, keep: Sequence[str] = ()) -> XrObj:
    """Zonal power spectrum ``|rfft(x)|^2`` along longitude of each raw field.

    No detrending and no window.  Averaged over latitudes and over every other dimension
    (fields, members) except ``keep``.  NaN points (land, gaps) are filled with the mean of
    the valid points of their latitude row before the transform, so they add no variance;
    rows with no valid point are skipped.  Spectra compared with each other need the same
    mask (:func:`spectra_relative_error` and :func:`evaluate` apply the union of both
    masks).  Returns ``(wavenumber, *keep)`` where wavenumber ``k = 0 .. n_lon // 2``
    counts cycles per longitude extent of the grid (per circle of latitude for a global
    grid), in the input's units squared.
    """
    _, lon = lat_lon_dims(x)
    n_k = x.sizes[lon] // 2 + 1
    power = xr.apply_ufunc(
        _row_power, x,
        input_core_dims=[[lon]], output_core_dims=[[WAVENUMBER]], dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {WAVENUMBER: n_k}, "allow_rechunk": True})
    power = power.assign_coords({WAVENUMBER: np.arange(n_k)})
    power = power.mean([d for d in power.dims if d != WAVENUMBER and d not in keep])
    return _describe(power, x, "zonal power spectrum", _squared)


def _common_mask(ens: XrObj, obs: XrObj) -> tuple[XrObj, XrObj]:
    """``ens`` and ``obs`` NaN wherever either is (obs missing or any member missing)."""
    valid = obs.notnull() & ens.notnull().all(MEMBER)
    return ens.where(valid), obs.where(valid)


def spectra_relative_error(ens: XrObj, obs: XrObj, *, max_wavenumber: int = 24,
                           keep: Sequence[str] = ()) -> XrObj:
    """``max_k |P_members(k) / P_truth(k) - 1|`` over ``k = 1 .. min(max_wavenumber, nyquist)``.

    ``P`` is :func:`zonal_power_spectrum` of all members and of the observations, both on
    the points valid in the observations and in every member.
    """
    ens = ensemble_variables(ens)
    obs = check_matching(ens, obs)
    _, lon = lat_lon_dims(obs)
    k_max = min(max_wavenumber, obs.sizes[lon] // 2)
    if k_max < 1:
        raise ValueError(f"{k_max=}: the grid needs at least 2 longitudes for a spectrum")
    ens, obs = _common_mask(ens, obs)
    err = _max_rel_error(zonal_power_spectrum(ens, keep=keep),
                         zonal_power_spectrum(obs, keep=keep), k_max)
    return _describe(err, ens, "largest relative error of the zonal power spectrum", "1")


def _max_rel_error(p_ens: XrObj, p_obs: XrObj, k_max: int) -> XrObj:
    """``max |p_ens / p_obs - 1|`` over wavenumbers ``1..k_max``."""
    ks = {WAVENUMBER: slice(1, k_max)}
    return abs(p_ens.sel(ks) / p_obs.sel(ks) - 1.0).max(WAVENUMBER)


# ---------------------------------------------------------------------------------------
# evaluate: every score of one ensemble, as a report


def _as_dataset(obj: xr.DataArray | xr.Dataset, name: str) -> xr.Dataset:
    if isinstance(obj, xr.Dataset):
        return obj
    if isinstance(obj, xr.DataArray):
        return obj.to_dataset(name=obj.name if obj.name is not None else "variable")
    raise TypeError(f"{name} must be an xarray Dataset or DataArray, got {type(obj).__name__}")


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator,
                     n_boot: int = 2000) -> tuple[float, float]:
    """90 % percentile interval of ``mean(num) / mean(den)`` resampling fields with
    replacement."""
    ok = np.isfinite(num) & np.isfinite(den)
    num, den = num[ok], den[ok]
    if num.size == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, num.size, size=(n_boot, num.size))  # (n_boot, F)
    ratios = num[idx].mean(axis=1) / den[idx].mean(axis=1)
    return float(np.quantile(ratios, 0.05)), float(np.quantile(ratios, 0.95))


def _scores(ens: xr.DataArray, obs: xr.DataArray, reference: xr.DataArray | None,
            rank_rng: np.random.Generator, boot_rng: np.random.Generator) -> dict[str, Any]:
    """All scores of one variable (fields = points of the sample dims)."""
    fields = sample_dims(obs)
    spatial = list(lat_lon_dims(obs))
    m = int(ens.sizes[MEMBER])
    ens_masked, obs_masked = _common_mask(ens, check_matching(ens, obs))
    lazy: dict[str, Any] = {
        "crps": weighted_mean(crps_ensemble(ens, obs)),
        "crps_fair_field": weighted_mean(crps_fair(ens, obs), spatial),
        "spread_skill": spread_skill_ratio(ens, obs),
        "bias": weighted_bias(ens, obs),
        "rmse": weighted_rmse(ens, obs),
        "energy_score": energy_score(ens, obs).mean(),
        "rank_counts": rank_histogram(ens, obs, rank_rng),
        "spectrum_members": zonal_power_spectrum(ens_masked),
        "spectrum_truth": zonal_power_spectrum(obs_masked),
    }
    if reference is not None:
        lazy["crps_fair_reference_field"] = weighted_mean(crps_fair(reference, obs), spatial)
    done = dict(zip(lazy, dask.compute(*lazy.values())))

    # per-field scores in one field order (the obs'), whatever the order of each input
    per_field = done["crps_fair_field"].transpose(*fields).values.ravel()  # (F,)
    out: dict[str, Any] = {
        "n_members": m,
        "n_fields": int(np.prod([obs.sizes[d] for d in fields])),
        "units": str(obs.attrs.get("units", ens.attrs.get("units", ""))),
        "crps": float(done["crps"]),
        "crps_fair": float(np.nanmean(per_field)),
        "spread_skill": float(done["spread_skill"]),
        "bias": float(done["bias"]),
        "abs_bias": abs(float(done["bias"])),
        "rmse": float(done["rmse"]),
        "energy_score": float(done["energy_score"]),
    }
    max_dev, tol = rank_histogram_flatness(done["rank_counts"])
    out.update(rank_histogram_max_rel_dev=max_dev, rank_histogram_tolerance=tol,
               rank_histogram_flat=bool(max_dev <= tol))
    k_max = min(24, obs.sizes[spatial[1]] // 2)
    p_m, p_t = done["spectrum_members"], done["spectrum_truth"]
    out["spectra_max_rel_error"] = (float(_max_rel_error(p_m, p_t, k_max)) if k_max >= 1
                                    else float("nan"))
    if reference is not None:
        ref_field = done["crps_fair_reference_field"].transpose(*fields).values.ravel()
        # the ratio compares like with like: fields scored by both (a reference with no
        # member at all for a field leaves that field out of the ratio, not of crps_fair)
        both = np.isfinite(per_field) & np.isfinite(ref_field)
        out["n_fields_reference"] = int(both.sum())
        out["crps_fair_reference"] = (float(ref_field[both].mean()) if both.any()
                                      else float("nan"))
        out["crps_ratio_vs_reference"] = (float(per_field[both].mean())
                                          / out["crps_fair_reference"] if both.any()
                                          else float("nan"))
        out["crps_skill"] = 1.0 - out["crps_ratio_vs_reference"]
        lo, hi = _bootstrap_ratio(per_field, ref_field, boot_rng)
        out.update(crps_ratio_ci_low=lo, crps_ratio_ci_high=hi)
    out["rank_histogram_counts"] = [int(c) for c in done["rank_counts"].values]
    out["spectrum_members"] = p_m.values.tolist()
    out["spectrum_truth"] = p_t.values.tolist()
    return out


SUMMARY_KEYS = ("crps", "crps_fair", "spread_skill", "bias", "abs_bias", "rmse", "energy_score",
                "rank_histogram_max_rel_dev", "rank_histogram_tolerance", "rank_histogram_flat",
                "spectra_max_rel_error")
REFERENCE_KEYS = ("crps_fair_reference", "crps_ratio_vs_reference", "crps_skill",
                  "crps_ratio_ci_low", "crps_ratio_ci_high", "n_fields_reference")


def evaluate(ens: xr.Dataset | xr.DataArray, obs: xr.Dataset | xr.DataArray, *,
             reference: xr.Dataset | xr.DataArray | None = None,
             variables: Sequence[Hashable] | None = None,
             out_dir: str | Path | None = None, rng_seed: int = 0) -> dict[str, Any]:
    """Score an ensemble against observations with every score of shared/EVAL.md.

    Parameters
    ----------
    ens : ensemble ``(member, *sample_dims, lat, lon)``; obs : ``(*sample_dims, lat, lon)``.
    reference : optional reference ensemble on the same fields (e.g. the analog baseline).
    variables : variables to score (default: every variable of ``ens`` also in ``obs``);
        the first one is the headline of ``summary``.
    out_dir : when given, ``scores.json`` and ``scores.md`` are written there atomically.
    rng_seed : seeds the ``numpy.random.Generator`` streams of rank ties and the bootstrap.

    Returns
    -------
    ``{"summary": {variable, n_members, n_fields, units, *SUMMARY_KEYS[, *REFERENCE_KEYS]},
    "variables": {name: scores + rank_histogram_counts + spectra}, "meta": {...}}``.
    """
    ens_ds, obs_ds = _as_dataset(ens, "ens"), _as_dataset(obs, "obs")
    ref_ds = None if reference is None else _as_dataset(reference, "reference")
    require_member(ens_ds, "ens")
    if ref_ds is not None:
        require_member(ref_ds, "reference")
    names = ([v for v in ens_ds.data_vars if v in obs_ds.data_vars and MEMBER in ens_ds[v].dims]
             if variables is None else list(variables))
    if not names:
        raise ValueError(f"no variable to score: ens has {list(ens_ds.data_vars)}, obs has "
                         f"{list(obs_ds.data_vars)}; give them a common variable name")
    for v in names:
        for ds, label in ((ens_ds, "ens"), (obs_ds, "obs"), (ref_ds, "reference")):
            if ds is not None and v not in ds.data_vars:
                raise ValueError(f"variable {v!r} not in {label} (has {list(ds.data_vars)}); "
                                 f"pass variables= naming variables present in all inputs")
        check_matching(ens_ds[v], obs_ds[v])
        if ref_ds is not None:
            check_matching(ref_ds[v], obs_ds[v], ens_name="reference")
        if ens_ds[v].sizes[MEMBER] < 2:
            raise ValueError(f"ens[{v!r}] has 1 member; fair CRPS and spread need at least 2")

    # independent streams: rank ties (whose draws depend on numpy vs dask) and bootstrap
    rank_rng, boot_rng = map(np.random.default_rng, np.random.SeedSequence(rng_seed).spawn(2))
    per_var = {str(v): _scores(ens_ds[v], obs_ds[v], None if ref_ds is None else ref_ds[v],
                               rank_rng, boot_rng)
               for v in names}
    head = per_var[str(names[0])]
    keys = SUMMARY_KEYS + (REFERENCE_KEYS if ref_ds is not None else ())
    summary = {"variable": str(names[0]), "n_members": head["n_members"],
               "n_fields": head["n_fields"], "units": head["units"],
               **{k: head[k] for k in keys}}
    report = {"summary": summary, "variables": per_var,
              "meta": {"sample_dims": sample_dims(obs_ds[names[0]]),
                       "lat_lon_dims": list(lat_lon_dims(obs_ds[names[0]])),
                       "rng_seed": rng_seed, "geodiff_version": __version__,
                       "weights": "cos(lat), mean 1; grid mean then field mean"}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "scores.json",
                      json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
        _atomic_write(out / "scores.md", scores_markdown(report))
    return report


def _jsonable(x: Any) -> Any:
    """``x`` with NaN/inf floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def scores_markdown(report: dict[str, Any]) -> str:
    """A Markdown table of the scalar scores: one row per score, one column per variable."""
    per_var = report["variables"]
    names = list(per_var)
    keys = [k for k, v in per_var[names[0]].items() if isinstance(v, (int, float, bool, str))]
    lines = ["# geodiff scores", "",
             f"Headline variable: `{report['summary']['variable']}`; weights "
             f"{report['meta']['weights']}.", "",
             "| score | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for k in keys:
        cells = []
        for n in names:
            v = per_var[n][k]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
