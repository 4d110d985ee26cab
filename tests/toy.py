"""Tiny real NetCDF data sets and recipes for end-to-end tests (train in seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from geodiff.config import Recipe, load_recipe


def toy_field_file(path: Path, *, n_time: int = 40, n_lat: int = 8, n_lon: int = 16,
                   global_grid: bool = True, descending_lat: bool = True,
                   land: bool = True, seed: int = 0) -> Path:
    """A source-convention NetCDF: latitude descending, longitude -180..180, a land mask.

    ``tas`` (K) = smooth zonal pattern + a trend in year + correlated noise; land pixels
    (a fixed block) are NaN in every field.
    """
    rng = np.random.default_rng(seed)
    if global_grid:
        lat = np.linspace(-78.75, 78.75, n_lat)
        lon = np.arange(n_lon) * 360.0 / n_lon - 180.0
    else:
        lat = np.linspace(20.0, 55.0, n_lat)
        lon = np.linspace(-120.0, -60.0, n_lon)
    years = 1900 + np.arange(n_time)
    base = 288.0 - 30.0 * np.sin(np.deg2rad(lat))[:, None] ** 2 + 2.0 * np.cos(
        np.deg2rad(lon))[None, :]
    noise = rng.normal(size=(n_time, n_lat, n_lon))
    noise = 0.5 * (noise + np.roll(noise, 1, -1))  # some spatial correlation
    tas = base[None] + 0.02 * (years - 1900)[:, None, None] + noise
    if land:
        tas[:, : n_lat // 4, : n_lon // 4] = np.nan
    if descending_lat:
        lat, tas = lat[::-1], tas[:, ::-1]
    import cftime

    time = [cftime.Datetime360Day(int(y), 6, 1) for y in years]
    ds = xr.Dataset(
        {"tas": (("time", "latitude", "longitude"), tas.astype(np.float32),
                 {"units": "K", "standard_name": "air_temperature",
                  "long_name": "near-surface air temperature"})},
        coords={"time": time,
                "latitude": ("latitude", lat, {"units": "degrees_north",
                                               "standard_name": "latitude"}),
                "longitude": ("longitude", lon, {"units": "degrees_east",
                                                 "standard_name": "longitude"})},
        attrs={"title": "geodiff toy data"})
    ds.to_netcdf(path)
    return path


def toy_recipe(tmp_path: Path, *, data: Path | None = None, **sections) -> Recipe:
    """A small EDM recipe on :func:`toy_field_file` (a few seconds per dozen steps)."""
    data = data or toy_field_file(tmp_path / "toy.nc")
    recipe = {
        "name": "toy",
        "data": {"source": str(data), "variables": ["tas"], "sample_dims": ["time"]},
        "split": {"kind": "year_modulo", "modulo": 10, "remainder": 5, "val_fraction": 0.1},
        "scaling": {"method": "standard", "anomaly": "trend", "trend_coord": "year",
                    "trend_degree": 1, "per_pixel_std": True, "n_std": 4.0, "margin": 0.0},
        "conditioning": {"year": True, "coord_channels": True},
        "model": {"channels": [8, 16], "blocks_per_level": 1, "attention_levels": [1],
                  "attention_heads": 2},
        "diffusion": {"parameterization": "edm"},
        "training": {"steps": 8, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                     "checkpoint_every": 4, "val_every": 4, "log_every": 1, "keep_last": 5},
        "sampling": {"sampler": "heun", "steps": 3, "members": 3, "batch_size": 8},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / "toy_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def recipe_path(tmp_path: Path) -> Path:
    return tmp_path / "toy_recipe.yaml"


def toy_level_file(path: Path, *, n_time: int = 40, n_lat: int = 8, n_lon: int = 16,
                   seed: int = 0) -> Path:
    """``ta(time, plev, lat, lon)`` (K) on the pressure levels 850 and 500 hPa (float32, CF
    attributes), latitude descending, longitude 0..360.

    ``ta`` = 280 K at 850 hPa, 250 K at 500 hPa, + a trend in year + noise; at 850 hPa a
    block of pixels (a mountain, below ground) is NaN in every field, valid at 500 hPa.
    """
    import cftime

    rng = np.random.default_rng(seed)
    lat = np.linspace(78.75, -78.75, n_lat)
    lon = np.arange(n_lon) * 360.0 / n_lon
    years = 1900 + np.arange(n_time)
    plev = np.array([850.0, 500.0], np.float32)
    ta = (np.array([280.0, 250.0])[None, :, None, None]
          + 0.02 * (years - 1900)[:, None, None, None]
          + rng.normal(size=(n_time, 2, n_lat, n_lon)))
    ta[:, 0, :2, 4:8] = np.nan
    ds = xr.Dataset(
        {"ta": (("time", "plev", "lat", "lon"), ta.astype(np.float32),
                {"units": "K", "standard_name": "air_temperature"})},
        coords={"time": [cftime.Datetime360Day(int(y), 6, 1) for y in years],
                "plev": ("plev", plev, {"units": "hPa", "standard_name": "air_pressure",
                                        "axis": "Z", "positive": "down"}),
                "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
                "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"})})
    ds.to_netcdf(path)
    return path


def toy_predictor_file(path: Path, *, seed: int = 1) -> Path:
    """:func:`toy_field_file` plus a time-varying predictor ``pr(time, lat, lon)`` (mm/day,
    gamma distributed) and a static ``orog(lat, lon)`` (m)."""
    ds = xr.open_dataset(toy_field_file(path.with_name(path.stem + "_tas.nc"))).load()
    rng = np.random.default_rng(seed)
    ds["pr"] = (ds["tas"].dims, rng.gamma(2.0, 1.0, ds["tas"].shape).astype(np.float32),
                {"units": "mm/day", "long_name": "precipitation"})
    ds["orog"] = (ds["tas"].dims[1:], (3000.0 * rng.random(ds["tas"].shape[1:])
                                       ).astype(np.float32), {"units": "m"})
    ds.to_netcdf(path)
    return path
