"""The ``.geodiff`` accessor on ``xr.Dataset`` and ``xr.DataArray``.

Registered when :mod:`geodiff.analysis` (or this module) is imported::

    import geodiff.analysis
    ens.geodiff.mean()                       # ensemble mean over "member"
    ens.geodiff.crps(obs)                    # fair CRPS per point
    ens.geodiff.evaluate(obs, out_dir="rep") # the full report
    ens.geodiff.plot("spread", "spread.png")

Each method is a thin call of the function of the same name in :mod:`geodiff.analysis` or
:mod:`geodiff.plot` with the object as the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from geodiff import analysis


class GeodiffAccessor:
    """Ensemble summaries, scores and maps of an object with a ``member`` dimension."""

    def __init__(self, obj: xr.Dataset | xr.DataArray) -> None:
        self._obj = obj

    @property
    def lat_lon_dims(self) -> tuple[str, str]:
        """Names of the latitude and longitude dimensions."""
        return analysis.lat_lon_dims(self._obj)

    @property
    def sample_dims(self) -> list[str]:
        """Dimensions indexing fields (all but member, lat, lon)."""
        return analysis.sample_dims(self._obj)

    def weighted_mean(self, dim: str | Sequence[str] | None = None) -> Any:
        """cos(lat)-weighted mean over ``dim`` (see :func:`analysis.weighted_mean`)."""
        return analysis.weighted_mean(self._obj, dim)

    def mean(self) -> Any:
        """Ensemble mean over ``member``."""
        return analysis.ensemble_mean(self._obj)

    def spread(self) -> Any:
        """Ensemble standard deviation (ddof = 1)."""
        return analysis.ensemble_spread(self._obj)

    def quantiles(self, q: float | Sequence[float]) -> Any:
        """Quantiles over members."""
        return analysis.ensemble_quantiles(self._obj, q)

    def exceedance_probability(self, threshold: float | xr.DataArray, *,
                               below: bool = False) -> Any:
        """Fraction of members above (below) ``threshold``."""
        return analysis.exceedance_probability(self._obj, threshold, below=below)

    def return_period(self, threshold: float | xr.DataArray, *, below: bool = False) -> Any:
        """Empirical return period ``1 / p`` in fields."""
        return analysis.empirical_return_period(self._obj, threshold, below=below)

    def crps(self, obs: Any, *, fair: bool = True) -> Any:
        """Fair (default) or ordinary CRPS per point against ``obs``."""
        return (analysis.crps_fair if fair else analysis.crps_ensemble)(self._obj, obs)

    def spread_skill(self, obs: Any, dim: str | Sequence[str] | None = None) -> Any:
        """Spread-skill ratio with the ``sqrt((M+1)/M)`` correction."""
        return analysis.spread_skill_ratio(self._obj, obs, dim)

    def rank_histogram(self, obs: Any, rng: np.random.Generator, *,
                       dim: str | Sequence[str] | None = None) -> Any:
        """Rank histogram counts ``(rank, ...)`` over ``dim`` (default all obs dims), ties
        broken by ``rng``."""
        return analysis.rank_histogram(self._obj, obs, rng, dim=dim)

    def spectrum(self, *, keep: Sequence[str] = ()) -> Any:
        """Zonal power spectrum averaged over latitudes, fields and members."""
        return analysis.zonal_power_spectrum(self._obj, keep=keep)

    def evaluate(self, obs: Any, **kwargs: Any) -> dict[str, Any]:
        """:func:`analysis.evaluate` of this ensemble against ``obs``."""
        return analysis.evaluate(self._obj, obs, **kwargs)

    def plot(self, kind: str, out: str | Path, **kwargs: Any) -> Path:
        """:func:`geodiff.plot.plot_ensemble` of this ensemble."""
        from geodiff.plot import plot_ensemble

        return plot_ensemble(self._obj, kind, out, **kwargs)


xr.register_dataset_accessor("geodiff")(GeodiffAccessor)
xr.register_dataarray_accessor("geodiff")(GeodiffAccessor)
