"""Figures of ensembles: cartopy maps with offline coastlines, matplotlib diagnostics.

Maps (:func:`plot_ensemble`, :func:`map_fields`) draw selected members, the ensemble mean,
the spread and exceedance probabilities on a PlateCarree data transform: regional grids
get their own extent, global grids a Robinson map.  Every grid is drawn cell by cell
(each cell filled up to the midpoints between its neighbours, a global grid's cells
closing the circle, so there is no seam at the date line and masked (NaN) cells such as
land leave their valid neighbours drawn).  Coastlines come from the Natural Earth 110m
coastline (public domain, naturalearthdata.com) shipped in ``geodiff/data/cartopy``, so
nothing is downloaded; a copy of that file in the user's ``CARTOPY_DATA_DIR`` /
``cartopy.config["pre_existing_data_dir"]`` or ``cartopy.config["data_dir"]`` wins.

Diagnostics (:func:`rank_histogram_figure`, :func:`spread_skill_figure`,
:func:`spectra_figure`) are plain matplotlib.  matplotlib and cartopy are imported inside
the functions; figures are ``matplotlib.figure.Figure`` objects (no pyplot state) saved as
PNG atomically.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from geodiff import analysis, grid
from geodiff.analysis import MEMBER, WAVENUMBER

KINDS = ("members", "mean", "spread", "exceedance")
STYLES = ("auto", "sequential", "diverging", "spread", "probability")
CARTOPY_DATA = Path(__file__).resolve().parent / "data" / "cartopy"
# whole words (of the name, long_name and standard_name split at non-letters) that mark a
# signed, anomaly-like field; substrings would also catch "diffuse" or "exchange"
_SIGNED_WORDS = frozenset({
    "anom", "anoms", "anomaly", "anomalies", "diff", "diffs", "difference", "differences",
    "error", "errors", "bias", "biases", "residual", "residuals", "change", "changes",
    "increment", "increments", "tendency", "delta", "departure", "departures"})
COASTLINE = Path("shapefiles/natural_earth/physical/ne_110m_coastline.shp")


def offline_coastlines() -> Path:
    """Make cartopy find Natural Earth files locally; returns the directory it will use.

    Sets ``cartopy.config["pre_existing_data_dir"]`` to geodiff's shipped data only when the
    user has set neither the ``CARTOPY_DATA_DIR`` environment variable nor a non-default
    ``pre_existing_data_dir``.  Cartopy's downloaders are left alone: it checks this
    directory before it would download anything.
    """
    import cartopy

    current = cartopy.config.get("pre_existing_data_dir")
    if "CARTOPY_DATA_DIR" not in os.environ and str(current or "") in ("", "."):
        cartopy.config["pre_existing_data_dir"] = CARTOPY_DATA
    return Path(cartopy.config["pre_existing_data_dir"])


def coastline_file() -> Path:
    """The Natural Earth 110m coastline to draw: the user's copy, else geodiff's.

    Looks where cartopy would (``pre_existing_data_dir``, then ``data_dir``) and falls back
    to the file shipped in :data:`CARTOPY_DATA` when neither holds it, so a
    ``CARTOPY_DATA_DIR`` set for other Natural Earth files never makes a map download.
    """
    import cartopy

    for key in ("pre_existing_data_dir", "data_dir"):
        folder = cartopy.config.get(key)
        if folder and str(folder) not in ("", ".") and (Path(folder) / COASTLINE).is_file():
            return Path(folder) / COASTLINE
    return CARTOPY_DATA / COASTLINE


@functools.lru_cache(maxsize=4)
def _coastline_geometries(path: str) -> tuple[Any, ...]:
    import cartopy.io.shapereader as shpreader

    return tuple(shpreader.Reader(path).geometries())


def _add_coastlines(ax: Any) -> None:
    """Coastlines from :func:`coastline_file` (never cartopy's downloader)."""
    import cartopy.crs as ccrs
    import cartopy.feature as cfeature

    feature = cfeature.ShapelyFeature(_coastline_geometries(str(coastline_file())),
                                      ccrs.PlateCarree(), facecolor="none", edgecolor="black")
    ax.add_feature(feature, linewidth=0.6)


# ---------------------------------------------------------------------------------------
# helpers


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out={str(out)!r} must be a .png path (figures are saved as PNG)")
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is an existing folder; give the path of a .png "
                         f"file, e.g. {str(out / 'map.png')!r}")
    return out


def _save(fig: Any, out: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``out`` atomically (temp file in the same folder + replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _on_grid(da: xr.DataArray, member: bool) -> bool:
    """Whether ``da`` is a field on a lat/lon grid (with a member dim when ``member``)."""
    try:
        analysis.lat_lon_dims(da)
    except ValueError:
        return False
    return MEMBER in da.dims or not member


def _variable(obj: xr.Dataset | xr.DataArray, variable: Hashable | None,
              name: str) -> xr.DataArray:
    """The DataArray to draw: ``obj`` itself, ``obj[variable]``, or by default the first
    data variable on the lat/lon grid (with a ``member`` dim for an ensemble ``ens``), so
    CF auxiliaries such as ``time_bnds`` or a grid mapping are skipped."""
    if isinstance(obj, xr.DataArray):
        return obj
    if not isinstance(obj, xr.Dataset):
        raise TypeError(f"{name} must be an xarray Dataset or DataArray, "
                        f"got {type(obj).__name__}")
    if variable is None:
        if not obj.data_vars:
            raise ValueError(f"{name} has no data variables")
        fields = [v for v in obj.data_vars if _on_grid(obj[v], member=name == "ens")]
        variable = fields[0] if fields else next(iter(obj.data_vars))
    if variable not in obj.data_vars:
        raise ValueError(f"{variable=} not in {name} (has {list(obj.data_vars)}); "
                         f"pass variable= naming one of them")
    return obj[variable]


def _as_label(coord: xr.DataArray | Any, value: Any) -> Any:
    """``value`` in the dtype of ``coord`` when it is text for a numeric coordinate (labels
    typed on the command line: ``--sel level=500``, ``--member 3``)."""
    kind = np.asarray(coord).dtype.kind
    if isinstance(value, str) and kind in "iuf":
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if kind in "iu" and number.is_integer() else number
    if isinstance(value, (list, tuple)):
        return [_as_label(coord, v) for v in value]
    return value


def _one_field(da: xr.DataArray, sel: Mapping[str, Any] | None) -> xr.DataArray:
    """``da`` at one field: ``sel`` (labels) for the given sample dims, index 0 for the rest.

    A key may also be a 1-D coordinate along a sample dim (e.g. ``year`` along ``time`` in
    the files of ``geodiff generate``): the first field where it equals the value.
    """
    lat, lon = analysis.lat_lon_dims(da)
    samples = analysis.sample_dims(da)
    sel = dict(sel or {})
    bad = [k for k in sel if k not in samples and not (
        k in da.coords and da[k].ndim == 1 and da[k].dims[0] in samples)]
    if bad:
        raise ValueError(f"sel keys {bad} are not sample dims of {da.name!r} (dims="
                         f"{list(map(str, da.dims))}); select with the sample dims {samples} "
                         f"or a 1-D coordinate along them (lat/lon and {MEMBER!r} are mapped "
                         "whole)")
    by_label = {k: _as_label(da[k], v) for k, v in sel.items() if k in da.dims}
    by_coord = {k: _as_label(da[k], v) for k, v in sel.items() if k not in da.dims}
    try:
        da = da.sel(by_label)
    except (KeyError, TypeError) as err:
        raise ValueError(f"sel={by_label} not found in the coordinates of {da.name!r}: "
                         f"{err}") from err
    for k, v in by_coord.items():
        hits = np.flatnonzero(np.isin(np.asarray(da[k].values), np.atleast_1d(v)))
        if hits.size == 0:
            raise ValueError(f"sel {k}={v!r}: no field of {da.name!r} has it (has "
                             f"{np.unique(da[k].values)[:8].tolist()}...)")
        da = da.isel({da[k].dims[0]: hits})
    return da.isel({d: 0 for d in da.dims if d not in (MEMBER, lat, lon)})


def _matching_field(obs: xr.DataArray, ens: xr.DataArray, field: xr.DataArray
                    ) -> xr.DataArray:
    """The field of ``obs`` at the sample-dim labels of ``field`` (one field of ``ens``).

    Matched by label where both carry a coordinate (the observations may cover more fields,
    or order them differently), else by the field's position in ``ens``; then put on the
    grid of ``field`` (:func:`_on_grid_of`).
    """
    pick: dict[str, Any] = {}
    for d in analysis.sample_dims(ens):
        if d not in obs.dims:
            raise ValueError(f"obs {obs.name!r} has no dim {d!r} (dims={list(obs.dims)}); "
                             f"give observations with the ensemble's sample dims")
        if d in obs.indexes and d in field.coords:
            label = field[d].values[()]
            try:
                pick[d] = obs.indexes[d].get_loc(label)
            except KeyError:
                raise ValueError(f"obs {obs.name!r} has no field {d}={label} (has "
                                 f"{np.asarray(obs.indexes[d])[:6].tolist()}...); give "
                                 f"observations covering the ensemble's fields") from None
        else:
            pick[d] = (int(ens.indexes[d].get_loc(field[d].values[()]))
                       if d in ens.indexes and d in field.coords else 0)
    return _on_grid_of(obs.isel(pick), field)


def _on_grid_of(obs: xr.DataArray, field: xr.DataArray) -> xr.DataArray:
    """``obs`` ``(lat, lon)`` on the latitudes and longitudes of ``field``, with its names.

    The observations may store the grid in float32 (values equal to 1e-6 relative), in the
    other longitude convention (-180..180 vs 0..360), in another order, under other dim
    names, or cover a larger area; every point of ``field`` must be among them.  Without
    this, ``mean - obs`` aligns on exact labels and silently loses the points that differ.
    """
    lat, lon = analysis.lat_lon_dims(field)
    o_lat, o_lon = analysis.lat_lon_dims(obs)
    pick, coords = {}, {}
    for d, od, circular in ((lat, o_lat, False), (lon, o_lon, True)):
        want = np.asarray(field[d].values, dtype=np.float64)
        have = np.asarray(obs[od].values, dtype=np.float64)
        j = grid.match_values(want, have, 360.0 if circular else None,
                              atol=1e-6 * max(1.0, float(np.abs(want).max())))
        missing = want[j < 0]
        if missing.size:
            raise ValueError(f"obs {obs.name!r} is not on the ensemble's grid: {d} "
                             f"{missing[:4].tolist()} of ens not in obs {od} "
                             f"({have[:4].tolist()}...); regrid the observations to the "
                             f"ensemble's grid")
        pick[od], coords[d] = j, field[d].values
    out = obs.isel(pick).rename({k: v for k, v in ((o_lat, lat), (o_lon, lon)) if k != v})
    out = out.drop_vars([c for c in out.coords if c not in out.dims], errors="ignore")
    return out.assign_coords(coords).transpose(lat, lon)


def _label(da: xr.DataArray) -> str:
    """Colorbar label ``long name [units]`` from the attributes."""
    name = da.attrs.get("long_name") or da.attrs.get("standard_name") or da.name or "value"
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units else str(name)


def _where(field: xr.DataArray, dims: Sequence[str]) -> str:
    """``scenario=A1B, time=2095-...``: the labels of the selected field along ``dims``."""
    parts = []
    for k in dims:
        if k in field.coords:
            value = field[k].values
            text = (np.datetime_as_string(value, unit="D")
                    if np.issubdtype(value.dtype, np.datetime64) else str(value))
            parts.append(f"{k}={text[:30]}")
    return ", ".join(parts)


def _is_signed(da: xr.DataArray, lo: float, hi: float) -> bool:
    """Anomaly-like: named so, or values on both sides of 0 with comparable magnitudes."""
    text = " ".join(str(x).lower() for x in (da.name, da.attrs.get("long_name"),
                                             da.attrs.get("standard_name")) if x)
    if _SIGNED_WORDS & set(re.split(r"[^a-z]+", text)):
        return True
    return lo < 0 < hi and min(-lo, hi) > 0.1 * max(-lo, hi)


def _style(style: str, da: xr.DataArray, lo: float, hi: float) -> dict[str, Any]:
    """Colormap and limits: sequential, diverging centred at 0, spread, probability 0..1."""
    if style == "auto":
        style = "diverging" if _is_signed(da, lo, hi) else "sequential"
    if style == "diverging":
        m = max(abs(lo), abs(hi)) or 1.0
        return {"cmap": "RdBu_r", "vmin": -m, "vmax": m}
    if style == "probability":
        return {"cmap": "Blues", "vmin": 0.0, "vmax": 1.0}
    return {"cmap": "YlOrRd" if style == "spread" else "viridis", "vmin": lo, "vmax": hi}


def _is_periodic(lon: np.ndarray) -> bool:
    """True when equally spaced longitudes cover the full circle."""
    if lon.size < 3:
        return False
    step = float(np.median(np.diff(lon)))
    return abs(lon.size * step - 360.0) < 0.5 * step


def _contiguous_lon(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, order)``: the longitudes ``lon[order]`` as one increasing, gap-free window.

    A regional grid may cross the date line or Greenwich in its own convention (stored as
    ``170 .. 180, -175 .. -170``, or ``350, 355, 0, 5``, or unsorted): taken as they are its
    columns would be drawn 340 deg apart across the whole globe. The window starts after
    the largest gap between neighbouring longitudes on the circle, so ``x`` runs e.g.
    ``170 .. 190``, and stays within ``[-180, 540)``.
    """
    x = np.mod(lon, 360.0)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    gaps = np.diff(np.append(xs, xs[0] + 360.0))  # gap after each longitude, around the circle
    start = (int(np.argmax(gaps)) + 1) % xs.size
    order, xs = np.roll(order, -start), np.roll(xs, -start)
    xs = np.where(np.arange(xs.size) >= xs.size - start, xs + 360.0, xs)
    if xs[0] >= 180.0:
        xs = xs - 360.0
    return xs, order


def _lon_window(lon: np.ndarray, periodic: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(x, order)``: the longitudes ``lon[order]`` increasing, as one gap-free window.

    A global grid keeps its convention (-180..180 when it has negative longitudes, else
    0..360) whatever the storage order (e.g. rolled ``180 .. 350, 0 .. 170``); a regional
    one is :func:`_contiguous_lon`.
    """
    if not periodic:
        return _contiguous_lon(lon)
    base = -180.0 if float(np.min(lon)) < 0.0 else 0.0
    x = np.mod(np.asarray(lon, dtype=np.float64) - base, 360.0) + base
    order = np.argsort(x, kind="stable")
    return x[order], order


def _edges(c: np.ndarray, *, periodic: bool = False, lat: bool = False) -> np.ndarray:
    """Cell edges ``(n + 1,)`` of centres ``c`` (in their order): midpoints between
    neighbours, half a spacing beyond the ends; periodic longitudes close the circle (the
    edges span exactly 360 deg) and latitudes stop at the poles."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = 0.5 * (c[:-1] + c[1:])
    if periodic:
        wrap = 0.5 * (c[-1] + c[0] + 360.0)
        return np.concatenate([[wrap - 360.0], mid, [wrap]])
    edges = np.concatenate([[c[0] - 0.5 * (c[1] - c[0])], mid, [c[-1] + 0.5 * (c[-1] - c[-2])]])
    return np.clip(edges, -90.0, 90.0) if lat else edges


def _map_axes(fig: Any, rows: int, cols: int, i: int, x_edges: np.ndarray,
              y_edges: np.ndarray, periodic: bool, robinson: bool) -> Any:
    """A GeoAxes on the data: Robinson for a global grid (``robinson``: periodic and more
    than 120 deg of latitude), else PlateCarree on its extent.

    A longitude-periodic map is centred half way round from the grid's western cell edge,
    so the cells (:func:`_cells_xy`) end exactly on the map edges and none straddles them.
    """
    import cartopy.crs as ccrs

    y0, y1 = float(np.min(y_edges)), float(np.max(y_edges))
    if periodic:
        centre = float(x_edges[0]) + 180.0
        if robinson:
            ax = fig.add_subplot(rows, cols, i + 1,
                                 projection=ccrs.Robinson(central_longitude=centre))
            ax.set_global()
            return ax
        proj = ccrs.PlateCarree(central_longitude=centre)
        x0, x1 = -180.0, 180.0
    else:
        centre = 0.5 * float(x_edges[0] + x_edges[-1])
        proj = ccrs.PlateCarree(central_longitude=centre)
        x0, x1 = float(x_edges[0]) - centre, float(x_edges[-1]) - centre
    ax = fig.add_subplot(rows, cols, i + 1, projection=proj)
    ax.set_extent([x0, x1, y0, y1], crs=proj)
    return ax


def _mesh_xy(field: xr.DataArray, periodic: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(lon, lat, data (lat, lon), shading)`` at the grid points (for ``contour``).

    The longitudes are :func:`_lon_window`; a global grid gets the cyclic column
    ``x[n] = x[0] + 360`` (as ``add_cyclic_point`` does, without its exact-spacing check,
    which float32 coordinates such as OSTIA's fail), so contours close around the globe.
    """
    lat, lon = analysis.lat_lon_dims(field)
    data = np.asarray(field.transpose(lat, lon).values, dtype=np.float64)  # (lat, lon)
    x, order = _lon_window(np.asarray(field[lon].values, dtype=np.float64), periodic)
    y = np.asarray(field[lat].values, dtype=np.float64)
    data = data[:, order]
    if periodic:
        data = np.concatenate([data, data[:, :1]], axis=1)  # (lat, lon + 1)
        x = np.append(x, x[0] + 360.0)
    return x, y, np.ma.masked_invalid(data), "nearest"


def _cells_xy(field: xr.DataArray, periodic: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lon edges (n_lon + 1,), lat edges (n_lat + 1,), data (lat, lon))`` for a flat
    ``pcolormesh``: every cell drawn, a NaN cell left blank without touching its neighbours.

    A global grid's edges span the circle exactly; the outer two are moved 1e-6 deg inwards
    (PROJ maps +180 deg from the map centre to -180, which would stretch the last column
    across the map).
    """
    lat, lon = analysis.lat_lon_dims(field)
    data = np.asarray(field.transpose(lat, lon).values, dtype=np.float64)  # (lat, lon)
    x, order = _lon_window(np.asarray(field[lon].values, dtype=np.float64), periodic)
    x_edges = _edges(x, periodic=periodic)
    if periodic:
        x_edges[0] += 1e-6
        x_edges[-1] -= 1e-6
    y_edges = _edges(np.asarray(field[lat].values, dtype=np.float64), lat=True)
    return x_edges, y_edges, np.ma.masked_invalid(data[:, order])


# ---------------------------------------------------------------------------------------
# maps


def map_fields(fields: Sequence[xr.DataArray], out: str | Path, **kwargs: Any) -> Path:
    """Save :func:`map_figure` of ``fields`` as a PNG at ``out`` (atomically)."""
    out = _check_out(out)
    return _save(map_figure(fields, **kwargs), out)


def map_figure(fields: Sequence[xr.DataArray], *, titles: Sequence[str] | None = None,
               style: str = "auto", label: str | None = None, suptitle: str | None = None,
               contour: xr.DataArray | None = None, contour_level: float | None = None,
               ncols: int = 3) -> Any:
    """Maps of 2-D fields ``(lat, lon)`` side by side with one shared colour scale.

    Parameters
    ----------
    fields : 2-D DataArrays on the same grid (source lat/lon names, any lon convention).
    style : ``"auto"`` (diverging centred at 0 for anomaly-like fields, else sequential),
        ``"sequential"``, ``"diverging"``, ``"spread"`` or ``"probability"`` (0..1).
    label : colorbar label; default ``long_name [units]`` of the first field.
    contour, contour_level : optional field drawn as a black contour at ``contour_level``
        on every panel (e.g. where the observation exceeds a threshold).

    Returns the ``matplotlib.figure.Figure`` (one GeoAxes per field, plus the colorbar).
    """
    if style not in STYLES:
        raise ValueError(f"{style=} must be one of {STYLES}")
    if not fields or any(f.ndim != 2 for f in fields):
        raise ValueError(f"fields must be 2-D (lat, lon) DataArrays, got dims "
                         f"{[f.dims for f in fields]}; select one field first")
    titles = list(titles) if titles is not None else [str(f.name or "") for f in fields]
    if len(titles) != len(fields):
        raise ValueError(f"{len(titles)=} must equal {len(fields)=}")

    import cartopy.crs as ccrs
    from matplotlib.figure import Figure

    values = [np.asarray(f.values, dtype=np.float64) for f in fields]
    finite = [v[np.isfinite(v)] for v in values]
    if not any(v.size for v in finite):
        raise ValueError(f"nothing to draw: every value of the panels {titles} is NaN (a "
                         "fully masked field); select a field with data (sel=, CLI --sel "
                         "DIM=VALUE)")
    offline_coastlines()
    lat_name, lon_name = analysis.lat_lon_dims(fields[0])
    lat = np.asarray(fields[0][lat_name].values, dtype=np.float64)
    lon = np.asarray(fields[0][lon_name].values, dtype=np.float64)
    periodic = _is_periodic(lon)
    lon = _lon_window(lon, periodic)[0]
    x_edges = _edges(lon, periodic=periodic)
    y_edges = _edges(lat, lat=True)
    lo = float(min(v.min() for v in finite if v.size))
    hi = float(max(v.max() for v in finite if v.size))
    kw = _style(style, fields[0], lo, hi)

    cols = min(ncols, len(fields))
    rows = -(-len(fields) // cols)
    aspect = (float(np.ptp(lat)) + 1.0) / (float(np.ptp(lon)) + 1.0)
    fig = Figure(figsize=(4.2 * cols, max(1.5, 4.2 * aspect) * rows + 1.0))
    axes, mesh = [], None
    for i, (field, title) in enumerate(zip(fields, titles)):
        ax = _map_axes(fig, rows, cols, i, x_edges, y_edges, periodic,
                       robinson=periodic and float(np.ptp(lat)) > 120.0)
        x, y, data = _cells_xy(field, periodic)
        mesh = ax.pcolormesh(x, y, data, transform=ccrs.PlateCarree(), shading="flat", **kw)
        if contour is not None and contour_level is not None:
            cx, cy, cdata, _ = _mesh_xy(contour, periodic)
            if cdata.count() and cdata.min() < contour_level < cdata.max():
                ax.contour(cx, cy, cdata, levels=[contour_level], colors="k",
                           linewidths=0.9, transform=ccrs.PlateCarree())
        _add_coastlines(ax)
        ax.set_title(title, fontsize=9)
        axes.append(ax)
    fig.colorbar(mesh, ax=axes, orientation="horizontal", shrink=0.7, pad=0.06,
                 label=label or _label(fields[0]))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def plot_ensemble(ens: xr.Dataset | xr.DataArray, kind: str, out: str | Path, *,
                  variable: Hashable | None = None, member: Any = None,
                  threshold: float | None = None, obs: xr.Dataset | xr.DataArray | None = None,
                  sel: Mapping[str, Any] | None = None) -> Path:
    """Save :func:`ensemble_figure` as a PNG at ``out`` (atomically); returns the path."""
    out = _check_out(out)
    return _save(ensemble_figure(ens, kind, variable=variable, member=member,
                                 threshold=threshold, obs=obs, sel=sel), out)


def ensemble_figure(ens: xr.Dataset | xr.DataArray, kind: str, *,
                    variable: Hashable | None = None, member: Any = None,
                    threshold: float | None = None,
                    obs: xr.Dataset | xr.DataArray | None = None,
                    sel: Mapping[str, Any] | None = None) -> Any:
    """Maps of one field of an ensemble; ``kind`` in ``("members", "mean", "spread",
    "exceedance")``.

    Parameters
    ----------
    ens : ensemble ``(member, *sample_dims, lat, lon)``; ``variable`` picks from a Dataset.
    member : member label(s) for ``"members"`` (default the first four).
    threshold : required for ``"exceedance"``: maps ``P(X > threshold)`` (0..1).
    obs : optional observations on the same grid: shown next to members/mean, as
        ``|mean - obs|`` next to the spread, and as a contour at ``threshold``.
    sel : labels of one field among the sample dims (default: the first of each).
    """
    if kind not in KINDS:
        raise ValueError(f"{kind=} must be one of {KINDS}")
    if kind == "exceedance" and threshold is None:
        raise ValueError("kind='exceedance' needs threshold=, e.g. threshold=290.0 (data units)")
    da = _variable(ens, variable, "ens")
    m = analysis.require_member(da, "ens")
    if MEMBER not in da.indexes:  # label members 0..M-1 when the file carries no labels
        da = da.assign_coords({MEMBER: np.arange(m)})
    if kind == "spread" and m < 2:
        raise ValueError("kind='spread' needs at least 2 members")
    field = _one_field(da, sel)
    truth = None if obs is None else _matching_field(_variable(obs, da.name, "obs"), da, field)
    suptitle = f"{da.name or ''} {_where(field, analysis.sample_dims(da))}"

    if kind == "members":
        labels = field[MEMBER].values
        picks = (labels[:4] if member is None
                 else np.atleast_1d(_as_label(labels, member))).tolist()
        missing = [p for p in picks if p not in labels]
        if missing:
            raise ValueError(f"member labels {missing} not in ens (has {labels[:8].tolist()}...)")
        panels = [field.sel({MEMBER: p}) for p in picks]
        titles = [f"member {p}" for p in picks]
        if truth is not None:
            panels, titles = [truth, *panels], ["observed", *titles]
        return map_figure(panels, titles=titles, suptitle=suptitle)
    if kind == "mean":
        panels, titles = [analysis.ensemble_mean(field)], [f"ensemble mean ({m} members)"]
        if truth is not None:
            panels, titles = [*panels, truth], [*titles, "observed"]
        return map_figure(panels, titles=titles, label=_label(da), suptitle=suptitle)
    if kind == "spread":
        panels, titles = [analysis.ensemble_spread(field)], [f"ensemble spread ({m} members)"]
        if truth is not None:
            panels.append(abs(analysis.ensemble_mean(field) - truth))
            titles.append("|ensemble mean - observed|")
        return map_figure(panels, titles=titles, style="spread",
                          label=f"std. dev. of {_label(da)}", suptitle=suptitle)
    prob = analysis.exceedance_probability(field, threshold)
    units = da.attrs.get("units", "")
    name = da.name if da.name is not None else "value"
    label = f"P({name} > {threshold:g} {units})".replace(" )", ")")
    return map_figure([prob], titles=[f"exceedance probability ({m} members)"],
                      style="probability", label=label, suptitle=suptitle,
                      contour=truth, contour_level=threshold)


# ---------------------------------------------------------------------------------------
# diagnostics


def rank_histogram_figure(ens: xr.Dataset | xr.DataArray, obs: xr.Dataset | xr.DataArray,
                          out: str | Path, *, variable: Hashable | None = None,
                          rng: np.random.Generator | None = None) -> Path:
    """Bar chart of rank-histogram counts / expected, with the ``sqrt((bins-1)/N)`` band.

    ``rng`` breaks ties (default ``np.random.default_rng(0)``).
    """
    out = _check_out(out)
    da = _variable(ens, variable, "ens")
    y = _variable(obs, da.name, "obs")
    counts = analysis.rank_histogram(da, y, rng if rng is not None else np.random.default_rng(0))
    max_dev, tol = analysis.rank_histogram_flatness(counts)
    c = counts.values.astype(np.float64)
    rel = c / (c.sum() / c.size)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ranks = np.arange(c.size)
    ax.bar(ranks, rel, width=0.9, color="tab:blue")
    ax.axhspan(1.0 - tol, 1.0 + tol, color="0.8", zorder=0,
               label=r"$\pm\sqrt{(bins-1)/N}$")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel(f"rank of the observation among {c.size - 1} members")
    ax.set_ylabel("count / expected")
    ax.set_title(f"rank histogram of {da.name}: max |rel. dev.| {max_dev:.3f} "
                 f"(tolerance {tol:.3f}, N = {int(c.sum())})", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out)


def spread_skill_figure(ens: xr.Dataset | xr.DataArray, obs: xr.Dataset | xr.DataArray,
                        out: str | Path, *, variable: Hashable | None = None,
                        bins: int = 10) -> Path:
    """Binned spread (``sqrt((M+1)/M)``-corrected) vs RMSE of the ensemble mean, 1:1 line."""
    out = _check_out(out)
    da = _variable(ens, variable, "ens")
    y = _variable(obs, da.name, "obs")
    binned = analysis.spread_skill_bins(da, y, bins=bins)
    ratio = float(analysis.spread_skill_ratio(da, y))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    top = float(np.nanmax([binned["spread"].max(), binned["rmse"].max()])) * 1.1
    ax.plot([0, top], [0, top], color="0.5", linestyle="--", label="calibrated")
    ax.plot(binned["spread"], binned["rmse"], "o-", color="tab:red", label="bins")
    units = da.attrs.get("units", "")
    ax.set_xlabel(f"ensemble spread [{units}]")
    ax.set_ylabel(f"RMSE of the ensemble mean [{units}]")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_title(f"spread-skill of {da.name}: ratio {ratio:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out)


def spectra_figure(ens: xr.Dataset | xr.DataArray, obs: xr.Dataset | xr.DataArray,
                   out: str | Path, *, variable: Hashable | None = None) -> Path:
    """Zonal power spectra, log-log: each member, the members' mean and the observations,
    with their ratio below."""
    out = _check_out(out)
    da = _variable(ens, variable, "ens")
    y = _variable(obs, da.name, "obs")
    y = analysis.check_matching(da, y)
    p_each = analysis.zonal_power_spectrum(da, keep=[MEMBER]).compute()  # (wavenumber, member)
    p_ens = p_each.mean(MEMBER)
    p_obs = analysis.zonal_power_spectrum(y).compute()
    k = p_ens[WAVENUMBER].values[1:]
    if k.size == 0:
        raise ValueError("spectra_figure needs at least 2 longitudes")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 5.6))
    ax, ax_ratio = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for mem in p_each[MEMBER].values:
        ax.loglog(k, p_each.sel({MEMBER: mem}).values[1:], color="0.75", linewidth=0.6)
    ax.loglog(k, p_ens.values[1:], color="tab:blue", label="members (mean)")
    ax.loglog(k, p_obs.values[1:], color="k", linestyle="--", label="observed")
    ax.set_ylabel(f"zonal power [({da.attrs.get('units', '')})$^2$]")
    ax.set_title(f"zonal power spectra of {da.name}", fontsize=9)
    ax.legend(fontsize=8)
    ax_ratio.semilogx(k, p_ens.values[1:] / p_obs.values[1:], color="tab:blue")
    ax_ratio.axhline(1.0, color="k", linewidth=0.8)
    ax_ratio.set_xlabel("zonal wavenumber (cycles per longitude extent)")
    ax_ratio.set_ylabel("members / observed")
    return _save(fig, out)
