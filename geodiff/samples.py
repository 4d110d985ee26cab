"""Which samples and what the model is told about them: time splits and condition vectors.

:func:`split_dataset` divides the samples by time (never shuffled); :class:`ConditionSpec`
turns a sample's coordinates (year, day of year, categorical labels such as a scenario)
into the condition vector the network is conditioned on, and checks that a request stays
within what training saw.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cftime
import numpy as np
import xarray as xr

from geodiff.config import ConditioningConfig, SplitConfig

TIME = "time"
_YEAR_TOLERANCE_FRACTION = 0.1
"""Years up to 10 % of the training span (at least 1 year) outside the training range pass."""



# -- splits ----------------------------------------------------------------------------------
def split_dataset(ds: xr.Dataset, split: SplitConfig,
                  sample_dims: Sequence[str]) -> dict[str, xr.Dataset]:
    """Divide ``ds`` along ``time`` into ``{"train", "val", "test"}`` (never shuffled).

    ``year_modulo``: test = times whose year satisfies ``year % modulo == remainder``, val =
    the last ``val_fraction`` of the remaining times; ``fraction``: chronological, the last
    ``test_fraction`` is test and the ``val_fraction`` before it val; ``time_ranges``:
    inclusive ``[start, end]`` date strings (any calendar). Val and test may be empty, train
    may not.
    """
    if TIME not in ds.dims or TIME not in sample_dims:
        raise ValueError(f"splits are along 'time', but {list(sample_dims)=} and "
                         f"ds.dims={sorted(map(str, ds.dims))}; add a time sample dimension")
    n = ds.sizes[TIME]
    if split.kind == "year_modulo":
        years = np.asarray(_year_coord(ds).values).astype(np.int64)
        is_test = years % split.modulo == split.remainder
        rest, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        n_val = _count(split.val_fraction, rest.size)
        parts = {"train": rest[:rest.size - n_val], "val": rest[rest.size - n_val:],
                 "test": test}
    elif split.kind == "fraction":
        order = np.argsort(np.asarray(ds[TIME].values), kind="stable")
        n_test, n_val = _count(split.test_fraction, n), _count(split.val_fraction, n)
        n_train = n - n_test - n_val
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                 "test": order[n_train + n_val:]}
    else:
        parts = {name: _range_positions(ds, getattr(split, name), name)
                 for name in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = np.intersect1d(parts[a], parts[b])
            if both.size:
                raise ValueError(f"split.{a}={getattr(split, a)} and split.{b}="
                                 f"{getattr(split, b)} overlap in {both.size} times; make the "
                                 f"time ranges disjoint")
    if parts["train"].size == 0:
        raise ValueError(f"the train split is empty ({split=}, {n} times); adjust the split")
    return {name: ds.isel({TIME: np.sort(idx)}) for name, idx in parts.items()}


def _count(fraction: float, n: int) -> int:
    """Number of times for a fraction: rounded, at least 1 when the fraction is positive."""
    return 0 if fraction <= 0 or n == 0 else max(1, round(fraction * n))


def _range_positions(ds: xr.Dataset, bounds: tuple[str, str] | None, name: str) -> np.ndarray:
    """Positions of times within the inclusive partial-date bounds, e.g. ``("1860", "1999")``.

    Compares ``(year, month, day, hour, minute, second)`` tuples truncated to the resolution
    of each bound, so any calendar (360_day, noleap, ...) and datetime64 work alike.
    """
    if bounds is None:
        return np.zeros(0, dtype=np.int64)
    return time_positions(ds[TIME].values, bounds, f"split.{name}")


def time_positions(times: np.ndarray, bounds: Sequence[Any], key: str) -> np.ndarray:
    """Positions of ``times`` (datetime64 or cftime, any calendar) within the inclusive
    partial-date ``bounds`` ``(start, stop)``, e.g. ``("1860", "1999-12-31")``; ``None`` is
    an open end.

    Compares ``(year, month, day, hour, minute, second)`` tuples truncated to the resolution
    of each bound, so a bound need not be a valid date of the calendar (``"1999-12-31"`` on
    a 360_day calendar ends at 1999-12-30). ``key`` names the bounds in error messages.
    """
    lo, hi = (None if b is None else _date_parts(b, key) for b in bounds)
    keys = [_time_parts(t, key) for t in np.ravel(times)]
    keep = [(lo is None or lo <= k[:len(lo)]) and (hi is None or k[:len(hi)] <= hi)
            for k in keys]
    return np.flatnonzero(keep)


def _date_parts(text: str, key: str) -> tuple[int, ...]:
    """``(year, month, ...)`` of a partial date; a leading ``-`` is the sign of the year
    (``"-0500-06"``: June of year -500, as in cftime's proleptic calendars)."""
    body = str(text).strip()
    sign = -1 if body.startswith("-") else 1
    parts = body.lstrip("-").replace("T", " ").replace(":", " ").replace("-", " ").split()
    try:
        values = [int(p) for p in parts[:6]]
        if values:
            values[0] *= sign
        return tuple(values)
    except ValueError:
        raise ValueError(f"{key}: {text!r} is not a date string such as '1860', "
                         f"'1860-06' or '1860-06-01'") from None


_GREGORIAN = ("standard", "gregorian", "proleptic_gregorian")


def parse_times(texts: Sequence[Any], calendar: str, key: str) -> np.ndarray:
    """ISO date strings (``"2050-07-16"``, ``"2050-07-16T12:00"``, ``"2050-07"`` = the 1st)
    as times of ``calendar``: ``datetime64[ns]`` on the standard calendars, cftime objects
    on the others (so ``"2050-02-30"`` is a date of a 360_day model). ValueError naming
    ``key`` for a string that is not a date of that calendar."""
    out = []
    for text in np.ravel(np.asarray(texts, dtype=object)):
        parts = _date_parts(text, key)
        parts = parts + (1,) * max(0, 3 - len(parts))
        try:
            out.append(cftime.datetime(*parts, calendar=calendar))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{key}={text!r} is not a date of the model's {calendar!r} "
                             f"calendar ({err}); give e.g. '2050-07-16' or '2050-07-16T12:00', "
                             "or a Dataset/file with a decoded time coordinate") from None
    if calendar in _GREGORIAN and all(1678 <= t.year <= 2261 for t in out):
        return np.array([np.datetime64(t.isoformat(), "ns") for t in out])
    return np.array(out, dtype=object)


def _time_parts(t: Any, key: str) -> tuple[int, ...]:
    if isinstance(t, np.datetime64):
        t = t.astype("datetime64[s]").astype(object)
    try:
        return (t.year, t.month, t.day, t.hour, t.minute, t.second)
    except AttributeError:
        raise ValueError(f"{key}: a date range needs decoded times (datetime64 or cftime), "
                         f"got {t!r}") from None


def _year_coord(ds: xr.Dataset) -> xr.DataArray:
    if "year" in ds.coords:
        return ds.coords["year"]
    if TIME in ds.coords:
        try:
            return ds[TIME].dt.year
        except (AttributeError, TypeError):
            pass
    raise ValueError(f"a 'year' coordinate is needed; ds has coords {sorted(map(str, ds.coords))}"
                     f" and no decoded time; assign one with ds.assign_coords(year=...)")


# -- condition vector ------------------------------------------------------------------------
_SPEC_VERSION = 2
"""2: ``calendar`` recorded whenever the training times are decoded (1: with day_of_year)."""


@dataclass(frozen=True)
class ConditionSpec:
    """Layout of the condition vector: ``[year_norm] [sin, cos day of year] [one-hot labels]``.

    ``year_norm = (year - year_center) / year_scale`` (about [-1, 1] on the training years);
    the day-of-year phase is ``2 pi (dayofyear - 1) / days_in_year`` for ``calendar``; each
    label (e.g. ``scenario``) is one-hot over ``label_values`` in training order.
    """

    year: bool = False
    year_center: float = 0.0
    year_scale: float = 1.0
    year_min: float = 0.0
    year_max: float = 0.0
    year_tolerance: float = 0.0
    day_of_year: bool = False
    calendar: str | None = None
    """Calendar of the training times (recorded whenever they are decoded); ``None``: not
    known (no decoded time, or a checkpoint written before geodiff recorded it)."""
    labels: tuple[str, ...] = ()
    label_values: tuple[tuple[Any, ...], ...] = ()

    @property
    def dim(self) -> int:
        """Length K of the condition vector."""
        return int(self.year) + 2 * int(self.day_of_year) + sum(map(len, self.label_values))

    @property
    def names(self) -> list[str]:
        """Name of each component of the vector, ``(K,)``."""
        out = ["year"] if self.year else []
        out += ["sin_dayofyear", "cos_dayofyear"] if self.day_of_year else []
        for label, values in zip(self.labels, self.label_values, strict=True):
            out += [f"{label}={v}" for v in values]
        return out

    def vector(self, coords: Mapping[str, Any]) -> np.ndarray:
        """Condition vector ``(K,)`` float32 of one sample from its coordinate values."""
        out: list[float] = []
        if self.year:
            out.append((_scalar_time_feature(coords, "year") - self.year_center)
                       / self.year_scale)
        if self.day_of_year:
            doy, year = (_scalar_time_feature(coords, k) for k in ("dayofyear", "year"))
            calendar = self.calendar or "standard"
            days = 360 if calendar == "360_day" else 365 + cftime.is_leap_year(
                int(year), calendar)
            phase = 2 * math.pi * (doy - 1) / days
            out += [math.sin(phase), math.cos(phase)]
        for label, values in zip(self.labels, self.label_values, strict=True):
            value = self._label_value(coords, label)
            if value not in values:
                raise ValueError(f"{label}={value!r} was not seen in training; known "
                                 f"{label} values are {list(values)}")
            out += [float(value == v) for v in values]
        return np.asarray(out, dtype=np.float32)

    def check(self, coords: Mapping[str, Any]) -> None:
        """Raise ValueError for labels not seen, or years too far outside the training range.

        ``coords`` maps names to scalars or arrays (e.g. ``ds.coords`` of requested cells).
        """
        for label, values in zip(self.labels, self.label_values, strict=True):
            unseen = sorted({_plain(v) for v in np.ravel(self._label_value(coords, label))}
                            - set(values), key=str)
            if unseen:
                raise ValueError(f"{label}={unseen} not seen in training; the model knows "
                                 f"{label} values {list(values)}")
        if self.year:
            years = np.ravel(np.asarray(_time_feature_values(coords, "year"), dtype=np.float64))
            lo, hi = self.year_min - self.year_tolerance, self.year_max + self.year_tolerance
            bad = years[(years < lo) | (years > hi)]
            if bad.size:
                raise ValueError(f"year={sorted(set(bad.tolist()))} outside the training range "
                                 f"{self.year_min:g}..{self.year_max:g}; allowed {lo:g}..{hi:g} "
                                 f"(tolerance {self.year_tolerance:g} years)")
        if self.day_of_year:
            _time_feature_values(coords, "dayofyear")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = _SPEC_VERSION
        d["labels"] = list(self.labels)
        d["label_values"] = [list(v) for v in self.label_values]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionSpec:
        d = dict(d)
        if d.pop("version", 1) < 2 and not d.get("day_of_year"):
            d["calendar"] = None  # version 1 wrote "standard" without knowing the calendar
        d["labels"] = tuple(d.get("labels", ()))
        d["label_values"] = tuple(tuple(v) for v in d.get("label_values", ()))
        return cls(**d)

    @classmethod
    def from_config(cls, cfg: ConditioningConfig, train_ds: xr.Dataset) -> ConditionSpec:
        """The spec for ``cfg``: year range, calendar and label values of the train split."""
        kwargs: dict[str, Any] = {"year": cfg.year, "day_of_year": cfg.day_of_year}
        if cfg.year or cfg.day_of_year:
            years = np.asarray(_year_coord(train_ds).values, dtype=np.float64)
            if years.size == 0:
                raise ValueError("the training split has no years to normalise the year with")
            lo, hi = float(years.min()), float(years.max())
            kwargs.update(year_center=(lo + hi) / 2, year_scale=(hi - lo) / 2 if hi > lo else 1.0,
                          year_min=lo, year_max=hi,
                          year_tolerance=max(_YEAR_TOLERANCE_FRACTION * (hi - lo), 1.0))
        if cfg.day_of_year:
            kwargs["calendar"] = _calendar(train_ds)
        elif TIME in train_ds.coords and train_ds[TIME].dtype.kind in "MO":
            # recorded anyway, so that dates given as text at generation parse in the data's
            # calendar (None when the times are not dates)
            with contextlib.suppress(ValueError):
                kwargs["calendar"] = _calendar(train_ds)
        missing = [lab for lab in cfg.labels if lab not in train_ds.coords]
        if missing:
            raise ValueError(f"conditioning.labels={list(cfg.labels)}: {missing} are not "
                             f"coordinates of the data (coords: "
                             f"{sorted(map(str, train_ds.coords))})")
        kwargs["labels"] = tuple(cfg.labels)
        kwargs["label_values"] = tuple(
            _label_values(train_ds.coords[lab].values, lab, "conditioning.labels")
            for lab in cfg.labels)
        return cls(**kwargs)

    @staticmethod
    def _label_value(coords: Mapping[str, Any], label: str) -> Any:
        if label not in coords:
            raise ValueError(f"the condition needs label {label!r}, but the coordinates have "
                             f"only {sorted(map(str, coords))}")
        value = coords[label]
        value = getattr(value, "values", value)
        if np.ndim(value) == 0:
            return _plain(value.item() if isinstance(value, np.ndarray) else value)
        return value


def _time_feature_values(coords: Mapping[str, Any], name: str) -> Any:
    """``year`` or ``dayofyear`` from ``coords``, derived from ``time`` when absent."""
    if name in coords:
        return getattr(coords[name], "values", coords[name])
    if TIME in coords:
        t = np.ravel(np.asarray(getattr(coords[TIME], "values", coords[TIME])))
        if t.dtype.kind == "M":
            t = t.astype("datetime64[s]").astype(object)
        try:
            if name == "year":
                return np.array([v.year for v in t])
            return np.array([v.timetuple().tm_yday for v in t])  # cftime: calendar-aware
        except AttributeError:
            pass
    raise ValueError(f"the condition needs {name!r} (or a decoded 'time'), but the coordinates "
                     f"have only {sorted(map(str, coords))}")


def _scalar_time_feature(coords: Mapping[str, Any], name: str) -> float:
    values = np.ravel(np.asarray(_time_feature_values(coords, name), dtype=np.float64))
    if values.size != 1:
        raise ValueError(f"{name} must be a single value for one sample, got {values.size}")
    return float(values[0])


def _calendar(ds: xr.Dataset) -> str:
    if TIME not in ds.coords:
        raise ValueError("conditioning.day_of_year needs a decoded 'time' coordinate")
    t = ds[TIME]
    if t.dtype.kind == "M":
        return "proleptic_gregorian"
    first = np.ravel(t.values)[0] if t.size else None
    calendar = getattr(first, "calendar", None) or t.encoding.get("calendar")
    if calendar is None:
        raise ValueError(f"conditioning.day_of_year needs a decoded time; got {t.dtype}")
    return str(calendar)


def _unique_in_order(values: np.ndarray) -> list:
    seen: dict = {}
    for v in values:
        seen.setdefault(_plain(v), None)
    return list(seen)


def _plain(v: Any) -> Any:
    """Python value of a numpy scalar; bytes (a NetCDF char-array label such as ``b'A1B'``)
    decoded to ``str``, so labels compare, look up and store in JSON as text."""
    if isinstance(v, np.generic):
        v = v.item()
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def _label_values(values: Any, name: str, key: str) -> tuple:
    """Distinct values of label coordinate ``name`` in order of appearance, as plain ``str``,
    ``int``, ``float`` or ``bool`` (they go into the checkpoint's JSON); ``key`` names the
    setting in the error raised for any other type (dates, objects)."""
    out = tuple(_unique_in_order(np.ravel(np.asarray(values))))
    bad = [v for v in out if not isinstance(v, (str, int, float, bool))]
    if bad:
        raise ValueError(f"{key}: coordinate {name!r} has values {bad[:3]} of type "
                         f"{type(bad[0]).__name__}; labels must be strings or numbers (they "
                         f"are stored in the checkpoint). Convert them first, e.g. "
                         f"ds.assign_coords({name}=ds[{name!r}].astype(str))")
    return out
