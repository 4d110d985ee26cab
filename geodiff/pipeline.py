"""The bridge between the xarray world and the tensor world for one recipe.

``prepare_data`` turns a recipe into scaled torch datasets (catalog -> grid -> split ->
Scaler fitted on the train split -> FieldDataset); ``build_denoiser`` builds the
preconditioned UNet it trains; ``Objective`` is the training loss as a module (so DDP
sees one forward); ``load_model`` rebuilds everything needed to generate from a
checkpoint alone, without the training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from geodiff import checkpoint as ckpt
from geodiff.config import Recipe, recipe_from_dict


@dataclass
class DataBundle:
    """Scaled training data of a recipe and everything derived from it."""

    source: xr.Dataset
    """The standardised (canonical lat/lon) source Dataset, lazy."""
    splits: dict[str, xr.Dataset]
    scaler: Any
    cond_spec: Any
    padding: Any
    train: Any
    val: Any | None
    grid: Any
    valid: np.ndarray
    """(C, lat, lon) bool: pixels of each channel valid in at least one training sample."""
    fields: torch.Tensor
    """(F0, H+, W+) the network's extra input channels that are the same for every sample
    (coordinates, generation mask, static fields); the time-varying condition fields follow
    them, one set per sample (:attr:`FieldDataset.condition_channels`)."""
    sample_dims: tuple[str, ...]
    variables: tuple[str, ...]
    var_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pole_padding_fits: bool = False
    noise_max_freq: float = 1e2
    """The network's fastest noise-label frequency (``LatLonUNet(noise_max_freq=)``): 1 rad
    per timestep for DDPM models, 1e2 for EDM; stored in the spec (checkpoints without it
    were built with 1e2)."""
    """Whether the network may pad across the poles (:func:`pole_padding_fits`); stored as
    the spec's ``global_lat``, which ``model.pole_padding: auto`` follows."""
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``{name: {"values": [...], "dtype": str}}``: the vertical levels of each variable or
    condition field with a level dim, in channel order (``name@level``)."""

    @property
    def channels(self) -> int:
        return len(self.train.channel_names)

    @property
    def spec(self) -> dict[str, Any]:
        """What the network shape depends on (stored in the checkpoint)."""
        return {"in_channels": self.channels + self.train.n_fields,
                "out_channels": self.channels, "cond_dim": int(self.cond_spec.dim),
                "periodic": bool(self.grid.periodic), "global_lat": bool(self.pole_padding_fits),
                "sigma_data": self.sigma_data, "noise_max_freq": self.noise_max_freq}

    @property
    def sigma_data(self) -> float:
        """Weighted standard deviation of the scaled training fields (EDM's sigma_data)."""
        if not hasattr(self, "_sigma_data"):
            from geodiff.edm import estimate_sigma_data

            n = min(len(self.train), 512)
            items = [self.train[i] for i in np.linspace(0, len(self.train) - 1, n).astype(int)]
            x = torch.stack([it["x"] for it in items])  # (n, C, H+, W+)
            w = torch.stack([it["weight"] for it in items])
            self._sigma_data = float(estimate_sigma_data(x, w))
        return self._sigma_data

    def meta(self, recipe: Recipe) -> dict[str, Any]:
        """JSON metadata of a checkpoint: enough to generate without the data."""
        return {
            "format": "geodiff-checkpoint/1",
            "recipe": recipe.to_dict(),
            "spec": self.spec,
            "scaler": self.scaler.to_dict(),
            "cond_spec": self.cond_spec.to_dict(),
            "padding": _padding_to_dict(self.padding),
            "grid": self.grid.to_dict(),
            "channel_names": list(self.train.channel_names),
            "variables": list(self.variables),
            "var_attrs": self.var_attrs,
            "sample_dims": list(self.sample_dims),
            "valid": self.valid.astype(np.uint8).tolist(),
            "levels": self.levels,
            "field_names": list(self.train.field_names),
            "condition_channels": list(self.train.condition_channels),
            "fields": self.fields.tolist(),
            "versions": ckpt.versions(),
        }

    def check_compatible(self, meta: dict[str, Any]) -> None:
        """Raise if a checkpoint was trained on another grid or other variables."""
        problems = []
        if list(meta["variables"]) != list(self.variables):
            problems.append(f"variables {meta['variables']} vs data {list(self.variables)}")
        if list(meta["channel_names"]) != list(self.train.channel_names):
            problems.append(f"channels {meta['channel_names']} vs data "
                            f"{list(self.train.channel_names)}")
        theirs = meta["grid"]
        mine = self.grid.to_dict()
        for key in ("lat", "lon"):
            a, b = np.asarray(theirs[key]), np.asarray(mine[key])
            if a.shape != b.shape or not np.allclose(a, b):
                problems.append(f"{key}: checkpoint has {a.size} points "
                                f"[{a.min():g}..{a.max():g}], data has {b.size} "
                                f"[{b.min():g}..{b.max():g}]")
        if problems:
            raise ValueError("checkpoint does not match this data: " + "; ".join(problems)
                             + ". Use the recipe and data the checkpoint was trained with, or "
                             "start a new run directory.")


def prepare_data(recipe: Recipe) -> DataBundle:
    """Open, split, fit the scaler on the train split and build the torch datasets.

    The data variables and the condition fields (``conditioning.fields``) are scaled by one
    :class:`~geodiff.scaling.Scaler` fitted on the train split (each with its own statistics),
    so that generation scales a requested cell's condition fields exactly as training did;
    static fields are standardised per channel (:class:`~geodiff.data.FieldDataset`).
    """
    from geodiff import catalog, data, grid
    from geodiff.scaling import Scaler

    dc, cc = recipe.data, recipe.conditioning
    opened = list(dict.fromkeys([*dc.variables, *cc.fields, *cc.static_fields]))
    ds = catalog.open_dataset(dc.source, catalog=dc.catalog, variables=opened)
    info = grid.grid_info(ds)
    missing = [d for d in dc.sample_dims if d not in ds.dims]
    if missing:
        raise ValueError(f"data.sample_dims={list(dc.sample_dims)}: {missing} not among the "
                         f"dimensions {sorted(map(str, ds.dims))} of {dc.source!r}")
    for f in cc.fields:
        if set(dc.sample_dims) - set(ds[f].dims):
            raise ValueError(f"conditioning.fields: {f!r} has dims {ds[f].dims}, without the "
                             f"sample dims {list(dc.sample_dims)}; list time-invariant inputs "
                             "under conditioning.static_fields")
    splits = data.split_dataset(ds, recipe.split, dc.sample_dims)
    scaler = Scaler.fit(splits["train"], recipe.scaling, [*dc.variables, *cc.fields],
                        dc.sample_dims)
    cond_spec = data.ConditionSpec.from_config(recipe.conditioning, splits["train"])
    multiple = 2 ** (len(recipe.model.channels) - 1)
    padding = data.compute_padding(ds.sizes[grid.LAT], ds.sizes[grid.LON], multiple,
                                   info.periodic)
    fits, why = pole_padding_fits(np.asarray(info.lat), np.asarray(info.lon), info.periodic,
                                  padding, multiple)
    if recipe.model.pole_padding == "yes" and not fits:
        raise ValueError(f"model.pole_padding='yes' cannot be done exactly on this grid: {why}; "
                         "set model.pole_padding: auto (zero padding across the poles) or "
                         "change the grid or the number of levels")

    def dataset(split: xr.Dataset, name: str, with_mask: bool | None):
        if dc.reader == "tensorstore":  # the same split, read without dask, scaled per batch
            return data.FieldDataset(ts_splits[name], dc.variables, dc.sample_dims, cond_spec,
                                     recipe.conditioning, padding,
                                     memory_budget_gb=dc.memory_budget_gb, scaler=scaler,
                                     with_mask=with_mask)
        return data.FieldDataset(scaler.transform(split), dc.variables, dc.sample_dims,
                                 cond_spec, recipe.conditioning, padding,
                                 memory_budget_gb=dc.memory_budget_gb, with_mask=with_mask)

    if dc.reader == "tensorstore":
        ts_splits = data.split_dataset(
            catalog.open_dataset(dc.source, catalog=dc.catalog, variables=opened,
                                 reader="tensorstore"), recipe.split, dc.sample_dims)
    # the train split decides whether the network sees a validity-mask channel (it has
    # NaNs); validation and generation (the checkpoint's fields) get the same inputs
    train = dataset(splits["train"], "train", None)
    val = (dataset(splits["val"], "val", train.with_mask)
           if _n_samples(splits.get("val"), dc.sample_dims) else None)
    valid = _valid_channels(splits["train"], dc.variables)
    noise_max_freq = 1.0 if recipe.diffusion.parameterization == "ddpm" else 1e2
    return DataBundle(pole_padding_fits=fits, noise_max_freq=noise_max_freq, source=ds,
                      splits=splits, scaler=scaler, cond_spec=cond_spec,
                      padding=padding, train=train, val=val, grid=info, valid=valid,
                      fields=_generation_fields(train, valid), sample_dims=tuple(dc.sample_dims),
                      variables=tuple(dc.variables),
                      var_attrs={v: _jsonable_attrs(ds[v].attrs) for v in dc.variables},
                      levels={v: _levels(ds[v]) for v in [*dc.variables, *cc.fields]
                              if grid.LEVEL in ds[v].dims})


def _valid_channels(train: xr.Dataset, variables: tuple[str, ...]) -> np.ndarray:
    """``(C, lat, lon)`` bool: whether each pixel of each channel (variables x levels, in
    :class:`~geodiff.data.FieldDataset` order) is valid in at least one training sample."""
    from geodiff.grid import LAT, LEVEL, LON

    blocks = []
    for v in variables:
        da = train[v]
        seen = da.notnull().any([d for d in da.dims if d not in (LEVEL, LAT, LON)])
        seen = seen.transpose(*[d for d in (LEVEL, LAT, LON) if d in seen.dims]).values
        blocks.append(seen.reshape(-1, *seen.shape[-2:]))  # (levels or 1, lat, lon)
    return np.concatenate(blocks)


def _levels(da: xr.DataArray) -> dict[str, Any]:
    """The level values of ``da`` (in its channel order) and their dtype, JSON-able."""
    from geodiff.grid import LEVEL
    from geodiff.samples import _plain

    values = np.asarray(da[LEVEL].values)
    return {"values": [_plain(v) for v in values], "dtype": values.dtype.str}


def pole_padding_fits(lat: np.ndarray, lon: np.ndarray, periodic: bool, padding: Any,
                      multiple: int) -> tuple[bool, str]:
    """Whether the network's cross-pole padding (:class:`geodiff.nn.LatLonPad`: the row
    beyond a pole is the first row seen from ``lon + 180``) is exact on this grid, and why
    not.

    It needs a periodic grid whose rows are cell-centred from pole to pole (the first and
    last rows half a spacing from the poles: a row *at* +-90 has no row across the pole), no
    data-layer padding (padded rows or columns would be taken for real ones, and
    ``lon + 180`` would be counted on the padded width) and an even number of longitudes at
    the coarsest level (``W / multiple``). Otherwise ``model.pole_padding: auto`` zero-pads
    latitude, as on a regional grid.
    """
    lat = np.asarray(lat, dtype=np.float64)
    if not periodic:
        return False, "the longitudes do not cover the globe"
    if lat.size < 2:
        return False, "fewer than 2 latitudes"
    step = abs(float(lat[1] - lat[0]))
    tol = 1e-3 * step
    if abs(lat.min() + 90.0 - step / 2) > tol or abs(90.0 - lat.max() - step / 2) > tol:
        return False, (f"the rows are not cell-centred from pole to pole (first/last "
                       f"{lat.min():g}/{lat.max():g} with spacing {step:g}; rows at +-90 have "
                       "no row across the pole)")
    pads = (padding.lat_before, padding.lat_after, padding.lon_before, padding.lon_after)
    if any(pads):
        return False, (f"the grid {lat.size} x {len(lon)} is padded to multiples of "
                       f"{multiple} (lat/lon padding {pads})")
    if (len(lon) // multiple) % 2:
        return False, (f"{len(lon)} longitudes give an odd width {len(lon) // multiple} at "
                       "the coarsest level")
    return True, ""


def build_denoiser(recipe: Recipe, spec: dict[str, Any] | DataBundle) -> nn.Module:
    """The UNet wrapped in its parameterisation (EDM preconditioning or DDPM)."""
    from geodiff.unet import LatLonUNet

    spec = spec.spec if isinstance(spec, DataBundle) else spec
    net = LatLonUNet.from_config(recipe.model, spec["in_channels"], spec["out_channels"],
                                 spec["cond_dim"], periodic=spec["periodic"],
                                 global_lat=spec["global_lat"],
                                 noise_max_freq=float(spec.get("noise_max_freq", 1e2)))
    dc = recipe.diffusion
    if dc.parameterization == "edm":
        from geodiff.edm import EDMPrecond

        sigma_data = dc.sigma_data if dc.sigma_data is not None else spec["sigma_data"]
        return EDMPrecond(net, sigma_data=float(sigma_data))
    from geodiff.diffusion import DDPMDenoiser, make_schedule

    return DDPMDenoiser(net, make_schedule(dc.schedule, dc.timesteps), prediction=dc.prediction)


def draw_noise(recipe: Recipe, shape: torch.Size, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise level (EDM sigma, or DDPM timestep) and unit Gaussian noise for a batch.

    EDM: ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, sec. 5); DDPM: t ~ U{0..T-1}
    (Ho et al. 2020, Algorithm 1).
    """
    dc = recipe.diffusion
    b = shape[0]
    if dc.parameterization == "edm":
        level = torch.exp(dc.p_mean + dc.p_std * torch.randn(b, generator=gen))
    else:
        level = torch.randint(0, dc.timesteps, (b,), generator=gen).float()
    return level, torch.randn(shape, generator=gen)


class Objective(nn.Module):
    """The training loss of a denoiser as one module (so DDP wraps a single forward)."""

    def __init__(self, denoiser: nn.Module, recipe: Recipe):
        super().__init__()
        self.denoiser = denoiser
        self.recipe = recipe

    def forward(self, x0: torch.Tensor, weight: torch.Tensor, fields: torch.Tensor,
                cond: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor,
                cond_drop: torch.Tensor) -> torch.Tensor:
        dc = self.recipe.diffusion
        if not dc.lat_weighted:
            weight = (weight > 0).to(weight.dtype)
        if dc.parameterization == "edm":
            from geodiff.edm import edm_loss

            return edm_loss(self.denoiser, x0, weight, fields=fields, cond=cond,
                            p_mean=dc.p_mean, p_std=dc.p_std, generator=None,
                            cond_drop=cond_drop, sigma=noise_level, noise=noise)
        from geodiff.diffusion import ddpm_loss

        return ddpm_loss(self.denoiser.net, self.denoiser.schedule, x0, weight, fields=fields,
                         cond=cond, prediction=dc.prediction, generator=None,
                         cond_drop=cond_drop, t=noise_level.long(), noise=noise)


@dataclass
class LoadedModel:
    """A trained model and its data conventions, rebuilt from a checkpoint alone."""

    path: Path
    recipe: Recipe
    denoiser: nn.Module
    scaler: Any
    cond_spec: Any
    padding: Any
    grid: Any
    meta: dict[str, Any]
    fields: torch.Tensor
    """(F0, H+, W+) the input channels shared by every sample (coordinates, mask, static
    fields); the :attr:`condition_fields` of each cell follow them."""
    valid: np.ndarray
    """(C, lat, lon) bool: pixels of each channel valid in some training sample."""
    device: torch.device

    @property
    def channel_names(self) -> list[str]:
        return list(self.meta["channel_names"])

    @property
    def sample_dims(self) -> tuple[str, ...]:
        return tuple(self.meta["sample_dims"])

    @property
    def variables(self) -> tuple[str, ...]:
        """The generated variables, in channel order."""
        return tuple(self.meta["variables"])

    @property
    def condition_fields(self) -> tuple[str, ...]:
        """Time-varying input variables (``conditioning.fields``), given per cell."""
        return tuple(self.recipe.conditioning.fields)

    def level_values(self, name: str) -> np.ndarray | None:
        """Level values of variable or condition field ``name`` in channel order (its
        channels ``name@level``), ``None`` when it has no level dimension."""
        entry = self.meta.get("levels", {}).get(name)
        return None if entry is None else np.asarray(entry["values"], dtype=entry["dtype"])

    def n_channels(self, name: str) -> int:
        """Number of channels of variable or condition field ``name``."""
        levels = self.level_values(name)
        return 1 if levels is None else levels.size

    def sigma_range(self) -> tuple[float, float]:
        dc = self.recipe.diffusion
        if dc.parameterization == "edm":
            return dc.sigma_min, dc.sigma_max
        sig = self.denoiser.schedule.sigmas
        return float(sig[0]), float(sig[-1])


def load_model(checkpoint: str | Path, *, device: str | torch.device | None = None,
               which: str = "ema") -> LoadedModel:
    """Rebuild the denoiser (EMA weights by default), scaler and grid from a checkpoint."""
    from geodiff.data import ConditionSpec
    from geodiff.grid import GridInfo
    from geodiff.runtime import resolve_device
    from geodiff.scaling import Scaler

    path = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.load_meta(path)
    recipe = recipe_from_dict(meta["recipe"])
    padding = _padding_from_dict(meta["padding"])
    info = GridInfo.from_dict(meta["grid"])
    fields = torch.tensor(meta["fields"], dtype=torch.float32).reshape(
        -1, *padding.padded_shape(len(info.lat), len(info.lon)))  # (F0, H+, W+), F0 may be 0
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    denoiser = build_denoiser(recipe, meta["spec"])
    denoiser.load_state_dict(ckpt.load_weights(path, which))
    denoiser.to(dev).eval().requires_grad_(False)
    model = LoadedModel(path=path, recipe=recipe, denoiser=denoiser,
                        scaler=Scaler.from_dict(meta["scaler"]),
                        cond_spec=ConditionSpec.from_dict(meta["cond_spec"]), padding=padding,
                        grid=info, meta=meta, fields=fields,
                        valid=np.asarray(meta["valid"], dtype=bool), device=dev)
    _check_channels(model)
    return model


def _check_channels(model: LoadedModel) -> None:
    """Refuse a checkpoint whose metadata does not account for its network's channels: one
    written before levels and condition fields were recorded (``meta["levels"]``, fields
    without the first training sample's condition fields)."""
    names, meta = model.channel_names, model.meta
    n_out = sum(model.n_channels(v) for v in model.variables)
    n_cond = sum(model.n_channels(f) for f in model.condition_fields)
    if n_out != len(names) or len(model.valid) != len(names):
        raise ValueError(f"checkpoint {model.path}: its channels {names} are not one per "
                         f"variable {list(model.variables)} and its metadata does not record "
                         "their vertical levels (written by an older geodiff); train it again "
                         "with this version to generate from it")
    if meta["spec"]["in_channels"] != len(names) + model.fields.shape[0] + n_cond:
        raise ValueError(f"checkpoint {model.path}: its network takes "
                         f"{meta['spec']['in_channels']} input channels, but {len(names)} "
                         f"generated + {model.fields.shape[0]} stored + {n_cond} condition "
                         f"channels of {list(model.condition_fields)} are recorded (written "
                         "by an older geodiff, which stored one training sample's condition "
                         "fields); train it again with this version to generate from it")


def _padding_to_dict(p: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(p)


def _padding_from_dict(d: dict[str, Any]) -> Any:
    from geodiff.data import Padding

    return Padding(**d)


def _generation_fields(train: Any, valid: np.ndarray) -> torch.Tensor:
    """The extra input channels shared by every generated sample ``(F0, H+, W+)``: those of
    the first training sample without its condition fields (given per cell at generation),
    with the mask channel (if any) set to the pixels valid in some training sample for every
    channel (``valid.all(0)``; 0 on the padding), as in training a sample without gaps, not
    the first sample's own gaps."""
    n_shared = train.n_fields - len(train.condition_channels)
    fields = train[0]["fields"][:n_shared].clone()
    if train.with_mask:
        p, (n_lat, n_lon) = train.padding, valid.shape[-2:]
        mask = fields[train.field_names.index("mask")]  # (H+, W+), a view
        mask.zero_()
        mask[p.lat_before:p.lat_before + n_lat, p.lon_before:p.lon_before + n_lon] = (
            torch.from_numpy(valid.all(axis=0).astype(np.float32)))
    return fields


def _n_samples(ds: xr.Dataset | None, sample_dims: tuple[str, ...]) -> int:
    if ds is None:
        return 0
    return int(np.prod([ds.sizes[d] for d in sample_dims]))


def _jsonable_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, (str, int, float, bool)):
            out[k] = v
        elif isinstance(v, np.generic):
            out[k] = v.item()
    return out
