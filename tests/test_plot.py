"""Figures of geodiff.plot: real PNGs (Agg), offline Natural Earth coastlines, no download."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import cartopy
import cartopy.crs as ccrs
import cartopy.feature as cfeature
import cartopy.io
import cartopy.io.shapereader as shpreader
import numpy as np
import pytest
import xarray as xr
from cartopy.mpl.feature_artist import FeatureArtist
from cartopy.mpl.geoaxes import GeoAxes
from matplotlib.image import imread

from geodiff import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No user cartopy data dir, an empty download dir, and any download attempt fails."""
    monkeypatch.delenv("CARTOPY_DATA_DIR", raising=False)
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", Path("."))
    monkeypatch.setitem(cartopy.config, "data_dir", tmp_path / "cartopy_downloads")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(shpreader.NEShpDownloader, "acquire_resource", refuse)
    monkeypatch.setattr(cartopy.io.Downloader, "acquire_resource", refuse)
    monkeypatch.setattr(cartopy.io.Downloader, "_urlopen", refuse)
    monkeypatch.setattr(cartopy.io, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def make_ensemble(lat, lon, m=6, times=3, seed=0):
    """Temperature-like ensemble (member, time, lat, lon) in K and obs (time, lat, lon)."""
    rng = np.random.default_rng(seed)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    base = 250.0 + 40.0 * np.cos(np.deg2rad(la)) + 3.0 * np.sin(np.deg2rad(lo))  # (lat, lon)
    coords = {"member": np.arange(m), "time": np.arange(times), "lat": lat, "lon": lon}
    attrs = {"units": "K", "long_name": "air temperature"}
    ens = xr.DataArray(base + rng.normal(size=(m, times, lat.size, lon.size)),
                       dims=("member", "time", "lat", "lon"), coords=coords, name="tas",
                       attrs=attrs)
    obs = xr.DataArray(base + rng.normal(size=(times, lat.size, lon.size)),
                       dims=("time", "lat", "lon"),
                       coords={k: v for k, v in coords.items() if k != "member"}, name="tas",
                       attrs=attrs)
    return ens.to_dataset(), obs.to_dataset()


@pytest.fixture
def regional():
    return make_ensemble(np.linspace(15.0, 60.0, 10), np.linspace(225.0, 315.0, 13))


@pytest.fixture
def global_grid():
    return make_ensemble(np.linspace(-90.0, 90.0, 19), np.arange(0.0, 360.0, 10.0), m=3)


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def geo_axes(fig):
    return [ax for ax in fig.axes if isinstance(ax, GeoAxes)]


def data_mesh(ax):
    return next(c for c in ax.collections if not isinstance(c, FeatureArtist))


# --------------------------------------------------------------------------------------
# offline coastlines


def test_coastlines_come_from_the_shipped_files(offline):
    assert plot.offline_coastlines() == plot.CARTOPY_DATA
    path = Path(shpreader.natural_earth(resolution="110m", category="physical",
                                        name="coastline"))
    assert path == plot.CARTOPY_DATA / "shapefiles/natural_earth/physical/ne_110m_coastline.shp"
    coast = cfeature.NaturalEarthFeature("physical", "coastline", "110m")
    assert len(list(coast.geometries())) > 100  # 134 lines in Natural Earth 110m


def test_user_cartopy_data_dir_wins(monkeypatch, tmp_path):
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", tmp_path)
    assert plot.offline_coastlines() == tmp_path
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", Path("."))
    monkeypatch.setenv("CARTOPY_DATA_DIR", str(tmp_path))
    plot.offline_coastlines()
    assert cartopy.config["pre_existing_data_dir"] == Path(".")


# --------------------------------------------------------------------------------------
# maps


@pytest.mark.parametrize("kind, n_maps, cmap", [
    ("members", 5, "viridis"),      # observed + 4 members
    ("mean", 2, "viridis"),         # mean + observed
    ("spread", 2, "YlOrRd"),        # spread + |mean - observed|
    ("exceedance", 1, "Blues"),
])
def test_regional_maps(offline, regional, tmp_path, kind, n_maps, cmap):
    ens, obs = regional
    fig = plot.ensemble_figure(ens, kind, threshold=280.0, obs=obs)
    maps = geo_axes(fig)
    assert len(maps) == n_maps and len(fig.axes) == n_maps + 1  # + the colorbar
    west, east, south, north = maps[0].get_extent(ccrs.PlateCarree())
    # extent of the cells: lon 225 - 3.75 .. 315 + 3.75 (as -138.75..-41.25), lat 12.5..62.5
    assert (west % 360, east % 360) == pytest.approx((221.25, 318.75), abs=0.01)
    assert (south, north) == pytest.approx((12.5, 62.5), abs=0.01)
    mesh = data_mesh(maps[0])
    assert mesh.get_cmap().name == cmap
    if kind == "exceedance":
        assert mesh.get_clim() == (0.0, 1.0)
        assert fig.axes[-1].get_xlabel() == "P(tas > 280 K)"
    else:
        assert fig.axes[-1].get_xlabel().endswith("air temperature [K]")
    for ax in maps:  # every map has its coastline
        assert any(isinstance(c, FeatureArtist) for c in ax.collections)
    out = plot.plot_ensemble(ens, kind, tmp_path / "maps" / f"{kind}.png", threshold=280.0,
                             obs=obs)
    assert_png(out)


def test_sel_picks_the_field_and_member_labels(offline, regional):
    ens, obs = regional
    fig = plot.ensemble_figure(ens, "mean", sel={"time": 2})
    assert "time=2" in fig._suptitle.get_text()
    expected = ens.tas.sel(time=2).mean("member").values  # (lat, lon)
    np.testing.assert_allclose(data_mesh(geo_axes(fig)[0]).get_array().ravel(),
                               expected.ravel())
    fig = plot.ensemble_figure(ens.drop_vars("member"), "members", member=[5, 1])
    assert [ax.get_title() for ax in geo_axes(fig)] == ["member 5", "member 1"]
    np.testing.assert_allclose(data_mesh(geo_axes(fig)[0]).get_array().ravel(),
                               ens.tas.isel(time=0).sel(member=5).values.ravel())


def test_anomalies_get_a_diverging_map_centred_at_zero(offline, regional):
    ens, obs = regional
    anomaly = (ens.tas.mean("member") - obs.tas).isel(time=0).rename("tas_anomaly")
    fig = plot.map_figure([anomaly])
    mesh = data_mesh(geo_axes(fig)[0])
    vmin, vmax = mesh.get_clim()
    assert mesh.get_cmap().name == "RdBu_r"
    assert vmin == -vmax and vmax > 0


def test_global_map_has_no_seam(offline, global_grid, tmp_path):
    ens, _ = global_grid
    fig = plot.ensemble_figure(ens, "mean")
    (ax,) = geo_axes(fig)
    assert isinstance(ax.projection, ccrs.Robinson)
    mesh = data_mesh(ax)
    assert mesh.get_array().shape == (19, 36)  # one cell per point, edges close the circle
    out = plot.plot_ensemble(ens, "mean", tmp_path / "global.png")
    assert_png(out)
    # The widest painted row of the image is the map's equator: from the left edge of the
    # map to the right one every pixel carries colour (viridis, black outline/coastline).
    # Without the cyclic column the last 10 degrees before the map edge stay white.
    rgb = imread(out)[..., :3]  # (H, W, 3) in 0..1
    painted = (rgb < 0.9).any(axis=-1)  # (H, W)
    rows = [np.flatnonzero(r) for r in painted]
    widths = [r[-1] - r[0] if r.size else 0 for r in rows]
    row = rows[int(np.argmax(widths))]
    span = painted[int(np.argmax(widths)), row[0]:row[-1] + 1]
    assert row[-1] - row[0] > 200 and span.all()


def test_global_grid_in_minus_180_and_masked_points(offline, tmp_path):
    ens, obs = make_ensemble(np.linspace(-60.0, 60.0, 13), np.arange(-180.0, 180.0, 10.0), m=3)
    ens = ens.where(ens.lat < 40)  # a masked band, as over land
    out = plot.plot_ensemble(ens, "spread", tmp_path / "masked.png", obs=obs)
    assert_png(out)


def test_observed_panel_is_the_ensemble_fields_observation(offline, regional):
    ens, obs = regional
    shuffled = obs.isel(time=[2, 0, 1])  # same fields, another order
    fig = plot.ensemble_figure(ens, "mean", obs=shuffled, sel={"time": 1})
    observed = data_mesh(geo_axes(fig)[1]).get_array().ravel()
    np.testing.assert_allclose(observed, obs.tas.sel(time=1).values.ravel())
    with pytest.raises(ValueError, match="no field time=1"):
        plot.ensemble_figure(ens, "mean", obs=obs.isel(time=[0, 2]), sel={"time": 1})


@pytest.mark.parametrize("lon", [
    [170.0, 175.0, 180.0, -175.0, -170.0],     # across the date line in -180..180
    [-170.0, -175.0, 180.0, 175.0, 170.0],     # the same, stored east to west
    [350.0, 355.0, 0.0, 5.0, 10.0],            # across Greenwich in 0..360
])
def test_regional_map_across_the_date_line_or_greenwich_stays_one_block(offline, lon):
    ens, obs = make_ensemble(np.linspace(20.0, 40.0, 5), np.asarray(lon), m=3)
    fig = plot.ensemble_figure(ens, "mean", obs=obs)
    ax = geo_axes(fig)[0]
    west, east, _, _ = ax.get_extent()  # in the map's own PlateCarree, centred on the region
    assert east - west == pytest.approx(25.0, abs=0.01)  # 5 cells of 5 deg, not the globe
    centre = ax.projection.proj4_params.get("pm", 0.0) % 360
    assert centre == pytest.approx(180.0 if lon[0] in (170.0, -170.0) else 0.0, abs=0.01)
    field = ens.tas.isel(member=0, time=0)
    x, _, data, _ = plot._mesh_xy(field, periodic=False)
    assert np.all(np.diff(x) == 5.0)  # one gap-free window, e.g. 170..190 or -10..10
    source = [int(np.flatnonzero(np.mod(lon, 360) == np.mod(xk, 360))[0]) for xk in x]
    np.testing.assert_array_equal(data, field.values[:, source])


# --------------------------------------------------------------------------------------
# diagnostics


def test_diagnostic_figures(regional, tmp_path):
    ens, obs = regional
    paths = [plot.rank_histogram_figure(ens, obs, tmp_path / "a" / "rank.png",
                                        rng=np.random.default_rng(0)),
             plot.spread_skill_figure(ens.tas, obs.tas, tmp_path / "b" / "spread_skill.png",
                                      bins=5),
             plot.spectra_figure(ens, obs, tmp_path / "c" / "spectra.png")]
    for path in paths:
        assert_png(path, min_bytes=5_000)


# --------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "median"}, "kind='median' must be one of"),
    ({"kind": "exceedance"}, "needs threshold="),
    ({"kind": "mean", "out_name": "map.pdf"}, "must be a .png path"),
    ({"kind": "mean", "variable": "pr"}, "variable='pr' not in ens"),
    ({"kind": "mean", "sel": {"year": 1}}, r"sel keys \['year'\]"),
    ({"kind": "members", "member": [99]}, r"member labels \[99\] not in ens"),
])
def test_bad_input_is_refused_before_any_file(regional, tmp_path, kwargs, message):
    ens, _ = regional
    out = tmp_path / kwargs.pop("out_name", "map.png")
    with pytest.raises(ValueError, match=message):
        plot.plot_ensemble(ens, out=out, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_member_dim_is_refused(regional, tmp_path):
    _, obs = regional
    with pytest.raises(ValueError, match="no 'member' dimension"):
        plot.plot_ensemble(obs, "mean", tmp_path / "x.png")


# --------------------------------------------------------------------------------------
# regressions: masked global fields, observations on another grid encoding, CF auxiliaries,
# coastlines with a user data dir, colour styles, labels, sel


def painted_pixels(fig, ax) -> int:
    """Strongly coloured pixels (not white/grey/black) inside ``ax`` once ``fig`` is drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255.0  # (H, W, 3)
    box = ax.get_window_extent()
    h = rgb.shape[0]
    crop = rgb[int(h - box.y1):int(h - box.y0), int(box.x0):int(box.x1)]
    return int(((crop.max(-1) - crop.min(-1)) > 0.25).sum())


def test_isolated_valid_cells_of_a_masked_global_field_are_drawn(offline):
    """Gouraud shading left out every triangle touching a NaN point: valid cells next to
    land vanished, a field valid only on isolated cells (lakes, a narrow sea) drew nothing."""
    lat, lon = np.arange(-87.5, 90.0, 5.0), np.arange(0.0, 360.0, 5.0)
    ens, _ = make_ensemble(lat, lon, m=3, times=1)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    valid = (lo % 40 == 20) & (la % 20 == 12.5)  # 81 isolated cells
    ens = ens.where(xr.DataArray(valid, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}))
    fig = plot.ensemble_figure(ens, "mean")
    (ax,) = geo_axes(fig)
    assert np.ma.count(data_mesh(ax).get_array()) == int(valid.sum())
    assert painted_pixels(fig, ax) > 200
    field = ens.tas.isel(member=0, time=0)
    x, y, data = plot._cells_xy(field, periodic=True)  # cell edges: the whole globe
    assert (y[0], y[-1]) == (-90.0, 90.0) and x[-1] - x[0] == pytest.approx(360.0)
    assert data.shape == (36, 72) and np.ma.count(data) == int(valid.sum())


def test_global_grid_stored_rolled_keeps_its_cells(offline):
    ens, _ = make_ensemble(np.linspace(-85.0, 85.0, 18), np.arange(0.0, 360.0, 10.0), m=2)
    rolled = ens.roll(lon=18, roll_coords=True).isel(lat=slice(None, None, -1))
    field = rolled.tas.isel(member=0, time=0)
    x, y, data = plot._cells_xy(field, periodic=True)
    assert np.all(np.diff(x) > 0) and x[-1] - x[0] == pytest.approx(360.0)
    np.testing.assert_array_equal(data, ens.tas.isel(member=0, time=0).values[::-1])


@pytest.mark.parametrize("variant", ["float32", "lon 0..360", "names", "larger"])
def test_observations_are_put_on_the_ensemble_grid(offline, variant):
    """|mean - obs| aligned on exact labels: obs with float32 coordinates or the other
    longitude convention lost every point (zero-size array error)."""
    ens, obs = make_ensemble(np.linspace(15.1, 60.1, 10), np.linspace(-135.1, -45.1, 13))
    o = {"float32": obs.assign_coords(lat=obs.lat.astype("float32"),
                                      lon=obs.lon.astype("float32")),
         "lon 0..360": obs.assign_coords(lon=obs.lon % 360).sortby("lon"),
         "names": obs.rename(lat="latitude", lon="longitude"),
         "larger": obs.reindex(lat=np.concatenate([[10.1], obs.lat.values]))}[variant]
    fig = plot.ensemble_figure(ens, "spread", obs=o)
    error = data_mesh(geo_axes(fig)[1]).get_array()
    expected = abs(ens.tas.isel(time=0).mean("member") - obs.tas.isel(time=0))
    np.testing.assert_allclose(np.ma.filled(error, np.nan), expected.values, rtol=1e-6)
    with pytest.raises(ValueError, match="not on the ensemble's grid"):
        plot.ensemble_figure(ens, "spread", obs=obs.assign_coords(lat=obs.lat + 1.0))


def test_cf_auxiliary_variables_are_not_taken_for_the_ensemble(offline, regional, tmp_path):
    ens, obs = regional
    bounds = xr.Dataset({"time_bnds": (("time", "bnds"), np.zeros((3, 2)))})
    ens_cf = bounds.merge(ens)
    assert list(ens_cf.data_vars)[0] == "time_bnds"
    fig = plot.ensemble_figure(ens_cf, "mean", obs=bounds.merge(obs))
    assert fig._suptitle.get_text().startswith("tas ")
    assert_png(plot.rank_histogram_figure(ens_cf, bounds.merge(obs), tmp_path / "rank.png"),
               min_bytes=5_000)


def test_a_user_data_dir_without_the_coastline_does_not_download(offline, regional,
                                                                  monkeypatch, tmp_path):
    """A CARTOPY_DATA_DIR holding other Natural Earth files (not the 110m coastline) made
    ax.coastlines() download it."""
    user = tmp_path / "user_cartopy"
    user.mkdir()
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", user)
    assert plot.coastline_file() == plot.CARTOPY_DATA / plot.COASTLINE
    ens, _ = regional
    out = plot.plot_ensemble(ens, "mean", tmp_path / "maps" / "mean.png")  # no download
    assert_png(out)
    fig = plot.ensemble_figure(ens, "mean")
    assert any(isinstance(c, FeatureArtist) for c in geo_axes(fig)[0].collections)
    copy = user / plot.COASTLINE  # a user's own copy wins
    copy.parent.mkdir(parents=True)
    for part in (plot.CARTOPY_DATA / plot.COASTLINE).parent.glob("ne_110m_coastline.*"):
        (copy.parent / part.name).write_bytes(part.read_bytes())
    assert plot.coastline_file() == copy


def test_signed_style_matches_whole_words(offline, regional):
    ens, _ = regional
    diffuse = (ens.tas - 200.0).rename("rsdsdiff").assign_attrs(
        standard_name="surface_diffuse_downwelling_shortwave_flux_in_air", units="W m-2",
        long_name="Surface Diffuse Downwelling Shortwave Radiation")
    mesh = data_mesh(geo_axes(plot.ensemble_figure(diffuse, "mean"))[0])
    assert mesh.get_cmap().name == "viridis" and mesh.get_clim()[0] > 0
    change = diffuse.rename("tas").assign_attrs(long_name="temperature change", units="K")
    mesh = data_mesh(geo_axes(plot.ensemble_figure(change, "mean"))[0])
    assert mesh.get_cmap().name == "RdBu_r"


def test_unnamed_dataarray_labels(offline, regional):
    ens, _ = regional
    fig = plot.ensemble_figure(ens.tas.rename(None), "exceedance", threshold=280.0)
    assert fig.axes[-1].get_xlabel() == "P(value > 280 K)"


def test_sel_by_coordinate_along_a_dim_and_labels_typed_as_text(offline, regional):
    ens, _ = regional
    ens = ens.assign_coords(year=("time", [2050, 2060, 2070]))
    fig = plot.ensemble_figure(ens, "mean", sel={"year": "2060"})
    assert "time=1" in fig._suptitle.get_text()
    np.testing.assert_allclose(data_mesh(geo_axes(fig)[0]).get_array().ravel(),
                               ens.tas.sel(time=1).mean("member").values.ravel())
    fig = plot.ensemble_figure(ens, "members", sel={"time": "2"}, member=["5", "1"])
    assert [ax.get_title() for ax in geo_axes(fig)] == ["member 5", "member 1"]
    assert "time=2" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="sel year=1999: no field"):
        plot.ensemble_figure(ens, "mean", sel={"year": 1999})
    with pytest.raises(ValueError, match=r"sel keys \['lat'\] are not sample dims"):
        plot.ensemble_figure(ens, "mean", sel={"lat": 15.0})


def test_fully_masked_field_and_folder_out_are_refused_before_any_file(regional, tmp_path):
    ens, _ = regional
    with pytest.raises(ValueError, match="every value of the panels .* is NaN"):
        plot.plot_ensemble(ens.where(ens.time > 0), "mean", tmp_path / "nan.png")
    (tmp_path / "maps.png").mkdir()
    with pytest.raises(ValueError, match="is an existing folder"):
        plot.plot_ensemble(ens, "mean", tmp_path / "maps.png")
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]
    assert list((tmp_path / "maps.png").iterdir()) == []


def test_observations_across_the_date_line_in_the_other_convention(offline):
    ens, obs = make_ensemble(np.linspace(20.0, 40.0, 5),
                             np.array([170.0, 175.0, 180.0, -175.0, -170.0]), m=3)
    o = obs.assign_coords(lon=obs.lon % 360).sortby("lon")  # 170 .. 190
    fig = plot.ensemble_figure(ens, "spread", obs=o)
    error = np.ma.filled(data_mesh(geo_axes(fig)[1]).get_array(), np.nan)
    expected = abs(ens.tas.isel(time=0).mean("member") - obs.tas.isel(time=0))
    _, order = plot._contiguous_lon(ens.lon.values)
    np.testing.assert_allclose(error, expected.values[:, order])
