"""Ensembles: tensors from the samplers -> labelled CF xarray in physical units, streamed.

``generate_ensemble`` is the inverse of ``pipeline.prepare_data``: it draws members from a
checkpoint's denoiser, crops the padding, un-stacks channels into variables, applies
``Scaler.inverse``, re-applies the NaN mask, restores the source's coordinate names,
latitude order and longitude convention, and labels the result with a ``member``
dimension (CF ``standard_name = realization``) and provenance attributes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from geodiff._version import __version__
from geodiff.cfcheck import REFERENCE_ATTRS
from geodiff.io import MEMBER, EnsembleWriter, check_output_path, output_format
from geodiff.pipeline import LoadedModel, load_model
from geodiff.samples import parse_times

ENSEMBLE_SAMPLERS = ("heun", "dpmpp", "ddim", "ddpm")


def member_seed(seed: int, cell: int, member: int) -> int:
    """Seed of one member: a function of (seed, condition cell, member) only, so member i
    is identical whatever the ensemble size, the batch size or the number of processes."""
    return int(np.random.SeedSequence([seed, cell, member]).generate_state(1, np.uint64)[0]
               % (2**63 - 1))


# ---------------------------------------------------------------------------------------
# conditions


def condition_cells(model: LoadedModel, conditions: Any) -> xr.Dataset:
    """The condition cells to generate for, as a coordinate-only Dataset over sample dims.

    ``conditions`` is an xarray object whose sample-dimension coordinates are used (e.g. the
    held-out split), or a mapping ``{dim: values}`` (cartesian product), or ``None`` for an
    unconditional model.
    """
    spec = model.cond_spec
    if conditions is None:
        if spec.dim:
            raise ValueError(
                f"this model is conditioned ({spec.dim}-dim condition vector from "
                f"{model.recipe.conditioning}); pass conditions, e.g. a Dataset with the "
                f"sample dims {list(model.sample_dims)} or a dict {{dim: values}}")
        return xr.Dataset()
    if isinstance(conditions, (xr.Dataset, xr.DataArray)):
        dims = [d for d in model.sample_dims if d in conditions.dims]
        if not dims:
            raise ValueError(f"conditions has dims {list(conditions.dims)} but none of the "
                             f"model's sample dims {list(model.sample_dims)}")
        coords = {name: c for name, c in conditions.coords.items()
                  if set(c.dims) and set(c.dims) <= set(dims)}
        cells = xr.Dataset(coords=coords)
    elif isinstance(conditions, Mapping):
        unknown = [k for k in conditions if k not in model.sample_dims and k != "year"]
        if unknown:
            raise ValueError(f"conditions keys {unknown} are neither sample dims of the "
                             f"model ({list(model.sample_dims)}) nor 'year'")
        values = {k: np.atleast_1d(np.asarray(v)) for k, v in conditions.items()}
        if "time" in values and values["time"].dtype.kind in "USO" and all(
                isinstance(t, str) for t in values["time"].ravel()):  # e.g. from JSON
            if spec.calendar is None:
                raise ValueError(
                    f"conditions time={values['time'].tolist()} is text, but the model in "
                    f"{model.path} does not record the calendar of its training times (trained "
                    "without decoded times, or by an older geodiff), so the dates cannot be "
                    "read; pass a Dataset or file with a decoded time coordinate instead")
            values["time"] = parse_times(values["time"], spec.calendar, "conditions time")
        cells = xr.Dataset(coords=values)
    else:
        raise TypeError(f"conditions must be an xarray object, a mapping or None, "
                        f"got {type(conditions).__name__}")
    if "time" in cells.dims and "year" not in cells.coords:
        t = cells["time"]
        if t.dtype.kind == "M" or t.dtype == object:
            cells = cells.assign_coords(year=("time", t.dt.year.values.astype(int)),
                                        dayofyear=("time", t.dt.dayofyear.values.astype(int)))
    for c in _cell_dicts(cells):
        spec.check(c)
    return cells


def condition_fields(model: LoadedModel, conditions: Any, cells: xr.Dataset,
                     what: str = "conditions") -> np.ndarray | None:
    """The time-varying condition fields (``conditioning.fields``) of every cell as the
    network saw them in training: scaled by the model's scaler, NaN -> 0; ``(n_cells, Fc,
    lat, lon)`` float32 in :func:`_cell_dicts` order (padded per batch by
    :func:`network_fields`), or ``None`` for a model without them.

    ``conditions`` must then be a Dataset holding those variables for the requested cells
    in physical units, on the model's grid (any latitude order or longitude convention the
    data layer accepts); a field without one of the cell dims is the same for all its cells.
    ``what`` names ``conditions`` in errors.
    """
    names = model.condition_fields
    if not names:
        return None
    if not isinstance(conditions, xr.Dataset):
        raise ValueError(
            f"the model in {model.path} takes the time-varying condition fields {list(names)} "
            f"(conditioning.fields) as input, but conditions is a {type(conditions).__name__}; "
            f"pass an xarray Dataset holding {list(names)} for the requested cells on the "
            f"model's grid, e.g. conditions=ds[{list(names)}].isel(time=[0, 1]) or geodiff "
            "generate --conditions FILE.nc")
    scaled = model.scaler.transform(on_model_grid(model, conditions, names, what))
    return np.nan_to_num(stack_channels(model, scaled, names, list(cells.dims)), nan=0.0)


def on_model_grid(model: LoadedModel, ds: xr.Dataset, names: Sequence[str],
                  what: str) -> xr.Dataset:
    """``ds[names]`` in the model's canonical form: standardised, taken at the model's
    latitudes, longitudes (modulo 360) and levels, with the model's coordinate values.

    ValueError (naming ``what``) for a missing variable, another grid, missing levels, a
    level dimension where the model has none (or the reverse) and dims that are neither
    sample dims nor lat/lon/level.
    """
    from geodiff.data import on_grid
    from geodiff.grid import LAT, LEVEL, LON, match_values

    missing = [v for v in names if v not in ds.data_vars]
    if missing:
        raise ValueError(f"the variable(s) {missing} the model needs are not in {what}, which "
                         f"has {list(ds.data_vars)}; add them (in physical units, on the "
                         "model's grid) to the Dataset or file")
    lat, lon = np.asarray(model.grid.lat), np.asarray(model.grid.lon)
    out = on_grid(ds[list(names)], xr.Dataset(coords={LAT: lat, LON: lon}), what)
    out = out.assign_coords({LAT: (LAT, lat, out[LAT].attrs), LON: (LON, lon, out[LON].attrs)})
    allowed = {*model.sample_dims, LEVEL, LAT, LON}
    for v in names:
        da, levels = out[v], model.level_values(v)
        extra = [d for d in da.dims if d not in allowed]
        if extra:
            raise ValueError(f"{what}: {v!r} has dims {extra} that are neither sample dims "
                             f"{list(model.sample_dims)} of the model nor lat/lon/level")
        if (levels is None) == (LEVEL in da.dims):
            trained = "without a level dim" if levels is None else f"at levels {levels.tolist()}"
            raise ValueError(f"{what}: {v!r} has dims {da.dims}, but the model was trained on "
                             f"it {trained}")
    per_name = [model.level_values(v) for v in names]
    wanted = list(dict.fromkeys(lv for levels in per_name if levels is not None
                                for lv in levels))  # one level axis: the source's
    if wanted:
        wanted = np.asarray(wanted)
        idx = match_values(wanted.astype(np.float64), out[LEVEL].values.astype(np.float64),
                           None)
        if (idx < 0).any():
            raise ValueError(f"{what}: levels {wanted[idx < 0].tolist()} the model was trained "
                             f"on are missing; it has {out[LEVEL].values.tolist()}")
        out = out.isel({LEVEL: idx}).assign_coords({LEVEL: (LEVEL, wanted, out[LEVEL].attrs)})
    return out


def stack_channels(model: LoadedModel, ds: xr.Dataset, names: Sequence[str],
                   dims: Sequence[str]) -> np.ndarray:
    """Variables ``names`` of a Dataset from :func:`on_model_grid` (scaled or not) as channels
    ``(n_cells, C, lat, lon)`` float32, cells in C order over ``dims`` and each variable's
    levels in the model's channel order (the inverse of :func:`to_dataset`'s un-stacking)."""
    from geodiff.grid import LAT, LEVEL, LON

    n_cells = int(np.prod([ds.sizes[d] for d in dims]))
    blocks = []
    for v in names:
        da, levels = ds[v], model.level_values(v)
        da = da.expand_dims({d: ds.sizes[d] for d in dims if d not in da.dims})
        if levels is not None:
            da = da.sel({LEVEL: levels})
        da = da.transpose(*dims, *[LEVEL] * (levels is not None), LAT, LON)
        values = np.asarray(da.values, dtype=np.float32)
        blocks.append(values.reshape(n_cells, -1, *values.shape[-2:]))  # (cells, c_v, H, W)
    return np.concatenate(blocks, axis=1)


def network_fields(model: LoadedModel, cell_fields: np.ndarray | None,
                   cells: Sequence[int]) -> torch.Tensor:
    """The network's extra input channels for items of ``cells`` ``(n, F, H+, W+)`` on the
    model's device: the shared ones, then the cell's condition fields padded as in
    training."""
    dev, n = model.device, len(cells)
    fields = model.fields.to(dev).expand(n, -1, -1, -1)
    if cell_fields is None:
        return fields
    own = model.padding.apply(torch.from_numpy(cell_fields[list(cells)])).to(dev)
    return torch.cat([fields, own], dim=1)


def _cell_dicts(cells: xr.Dataset) -> list[dict[str, Any]]:
    """One coordinate dict per cell, in C order over ``cells.dims``."""
    dims = list(cells.dims)
    out = []
    for idx in itertools.product(*[range(cells.sizes[d]) for d in dims]):
        sel = cells.isel(dict(zip(dims, idx)))
        out.append({k: v.values.item() if v.ndim == 0 else v.values for k, v in
                    sel.coords.items()})
    return out or [{}]


# ---------------------------------------------------------------------------------------
# tensors <-> xarray


def to_dataset(model: LoadedModel, x: np.ndarray, members: Sequence[int],
               cells: xr.Dataset) -> xr.Dataset:
    """Scaled, cropped samples -> physical-unit Dataset in the source's conventions.

    ``x``: (M, n_cells, C, lat, lon) in canonical order (lat ascending). The channels
    ``name@level`` of a variable are stacked back into its level dimension (the source's
    name, values and attributes), then each variable is inverse-scaled and NaN where that
    channel was never valid in training.
    """
    from geodiff.grid import LAT, LEVEL, LON, restore

    dims = list(cells.dims)
    shape = [cells.sizes[d] for d in dims]
    m = len(members)
    lat, lon = np.asarray(model.grid.lat), np.asarray(model.grid.lon)
    x = x.reshape(m, *shape, x.shape[-3], lat.size, lon.size)  # (M, *cells, C, lat, lon)
    coords = {MEMBER: (MEMBER, np.asarray(members, dtype=np.int32)), LAT: lat, LON: lon,
              **{k: (v.dims, v.values, _drop_references(v.attrs))
                 for k, v in cells.coords.items()}}
    data_vars, masks, start = {}, {}, 0
    for name in model.variables:
        levels, n = model.level_values(name), model.n_channels(name)
        part = slice(start, start + n)
        if levels is None:  # (M, *cells, lat, lon)
            data_vars[name] = ([MEMBER, *dims, LAT, LON], x[..., start, :, :])
            masks[name] = xr.DataArray(model.valid[start], dims=(LAT, LON))
        else:  # (M, *cells, level, lat, lon)
            data_vars[name] = ([MEMBER, *dims, LEVEL, LAT, LON], x[..., part, :, :])
            masks[name] = xr.DataArray(model.valid[part], dims=(LEVEL, LAT, LON))
            coords[LEVEL] = (LEVEL, levels)
        start += n
    ds = model.scaler.inverse(xr.Dataset(
        {k: (d, v.astype(np.float32)) for k, (d, v) in data_vars.items()}, coords=coords))
    for name in model.variables:
        ds[name] = ds[name].where(masks[name]).astype(np.float32)
        ds[name].attrs = variable_attrs(model, name)
    ds[MEMBER].attrs = {"standard_name": "realization", "long_name": "ensemble member",
                        "units": "1"}
    out = restore(ds, model.grid)
    for name, axis in ((model.grid.lat_name, "Y"), (model.grid.lon_name, "X")):
        out[name].attrs.setdefault("axis", axis)  # CF 4: lets every reader find the axes
    return out


OUTPUT_ATTRS = ("standard_name", "long_name", "units", "cell_methods")
"""Attributes of a source variable that still describe the generated one. The rest (the
source model's ``source``, ``grid_mapping``/``bounds`` naming variables the file does not
have, packing, valid ranges, vendor keys) would be false or dangling there."""


def variable_attrs(model: LoadedModel, name: str) -> dict[str, Any]:
    """CF attributes of generated variable ``name``: the source's :data:`OUTPUT_ATTRS`."""
    source = model.meta.get("var_attrs", {}).get(name, {})
    return {k: source[k] for k in OUTPUT_ATTRS if k in source}


def _drop_references(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A condition coordinate's attributes without those naming other variables
    (``bounds: time_bnds``): the generated file carries the coordinate, not its bounds."""
    return {k: v for k, v in attrs.items() if k not in REFERENCE_ATTRS}


def _provenance(model: LoadedModel, *, sampler: str, steps: int, guidance: float, seed: int,
                eta: float, kind: str = "generate") -> dict[str, Any]:
    from geodiff.checkpoint import checkpoint_hash

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "Conventions": "CF-1.10",
        "title": f"geodiff ensemble ({model.recipe.name})",
        "source": f"geodiff {__version__}",
        "history": f"{now}: geodiff {kind} {model.path.name} sampler={sampler} steps={steps} "
                   f"guidance={guidance} seed={seed}",
        "geodiff_checkpoint": str(Path(model.path).resolve()),
        "geodiff_checkpoint_sha256": checkpoint_hash(model.path),
        "geodiff_recipe": model.recipe.name,
        "geodiff_sampler": sampler,
        "geodiff_steps": int(steps),
        "geodiff_guidance": float(guidance),
        "geodiff_eta": float(eta),
        "geodiff_seed": int(seed),
    }


# ---------------------------------------------------------------------------------------
# generation


def fixed_batch(net, size: int | None):
    """``net(x, sigma, *per_sample)`` evaluated on chunks of exactly ``size`` samples.

    Every argument is split along dim 0; the last chunk is padded by repeating its last
    sample and the padding's outputs are dropped. A network's result for one sample depends
    on the batch *shape* (kernels pick their blocking, hence summation order, by it) but not
    on which other samples share the batch, so fixed chunks make each sample's output
    independent of how many are evaluated together. ``size=None`` returns ``net`` unchanged.
    """
    if size is None:
        return net

    def chunked(*args: torch.Tensor | None) -> torch.Tensor:
        n = args[0].shape[0]
        outs = []
        for i in range(0, n, size):
            part = [None if a is None else a[i:i + size] for a in args]
            short = size - part[0].shape[0]
            if short:
                part = [None if a is None else
                        torch.cat([a, a[-1:].expand(short, *a.shape[1:])]) for a in part]
            outs.append(net(*part)[:size - short])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return chunked


def _denoiser_for(model: LoadedModel, fields: torch.Tensor, cond: torch.Tensor,
                  guidance: float, compute_batch: int | None = None):
    from geodiff.sampling import guided

    net = fixed_batch(model.denoiser, compute_batch)

    def d_cond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, fields, cond)

    if guidance == 1.0:
        return d_cond
    drop = torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device)

    def d_uncond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, fields, cond, drop)

    return guided(d_cond, d_uncond, guidance)


def check_guidance(model: LoadedModel, guidance: float) -> None:
    """Refuse classifier-free guidance (``guidance != 1``) a model cannot do: one without a
    condition vector, or one trained without condition dropout, whose unconditional branch
    was never trained (Ho & Salimans 2022)."""
    if not model.cond_spec.dim:
        raise ValueError(f"guidance={guidance}: the model in {model.path} is unconditional (no "
                         "condition vector), so there is nothing to guide; use guidance=1")
    if model.recipe.conditioning.dropout <= 0:
        raise ValueError(f"guidance={guidance}: the model in {model.path} was trained with "
                         "conditioning.dropout=0, so its unconditional branch was never "
                         "trained; use guidance=1, or train with conditioning.dropout > 0 "
                         "(e.g. 0.1)")


def sample_items(model: LoadedModel, items: Sequence[tuple[int, int]], cond_vectors: np.ndarray,
                 *, sampler: str, steps: int, guidance: float, eta: float, seed: int,
                 compute_batch: int | None = None, timesteps: Sequence[int] | None = None,
                 cell_fields: np.ndarray | None = None) -> np.ndarray:
    """Generate (cell, member) items in one batch -> (n, C, lat, lon) scaled, cropped.

    ``cell_fields``: the cells' condition fields from :func:`condition_fields` (a model
    with ``conditioning.fields`` needs them).
    """
    from geodiff.sampling import sample

    dev = model.device
    n = len(items)
    c = len(model.channel_names)
    h, w = model.fields.shape[-2:]
    gens = [torch.Generator(device="cpu").manual_seed(member_seed(seed, cell, m))
            for cell, m in items]
    fields = network_fields(model, cell_fields, [cell for cell, _ in items])
    cond = torch.as_tensor(cond_vectors[[cell for cell, _ in items]], dtype=torch.float32,
                           device=dev).reshape(n, -1)
    smin, smax = model.sigma_range()
    schedule = getattr(model.denoiser, "schedule", None)
    with torch.no_grad():
        x = sample(_denoiser_for(model, fields, cond, guidance, compute_batch), (n, c, h, w), gens,
                   sampler=sampler, steps=steps, sigma_min=smin, sigma_max=smax,
                   rho=model.recipe.sampling.rho, eta=eta, schedule=schedule,
                   timesteps=timesteps, device=dev)
    return model.padding.crop(x.float().cpu()).numpy()


def generate_ensemble(checkpoint: str | Path | LoadedModel, members: int | None = None,
                      conditions: Any = None, *, sampler: str | None = None,
                      steps: int | None = None, timesteps: Sequence[int] | None = None,
                      guidance: float | None = None,
                      eta: float | None = None, seed: int = 0, batch_size: int | None = None,
                      compute_batch: int | None = None, out: str | Path | None = None,
                      overwrite: bool = False,
                      device: str | None = None, progress: bool = True
                      ) -> xr.Dataset | Path:
    """Draw an ensemble from a checkpoint; return it (``out=None``) or stream it to ``out``.

    Parameters
    ----------
    checkpoint : run directory, checkpoint directory, or a :class:`LoadedModel`.
    members : number of members per condition cell (default: recipe ``sampling.members``).
    conditions : xarray object (its sample-dim coordinates are used) or ``{dim: values}``.
        A model with ``conditioning.fields`` needs a Dataset that also holds those variables
        for the requested cells (physical units, the model's grid): see
        :func:`condition_fields`.
    sampler, steps, guidance, eta : sampler settings (default: the recipe's ``sampling``).
    timesteps : ``ddpm`` / ``ddim`` on a DDPM model: these schedule timesteps instead of
        ``steps`` evenly spaced ones (:func:`geodiff.sampling.sigma_grid`); default: the
        recipe's ``sampling.timesteps`` when neither ``steps`` nor ``timesteps`` is given and
        the sampler is ``ddpm`` or ``ddim``. Recorded as ``geodiff_timesteps``.
    seed : base seed; member i of cell c uses :func:`member_seed` (seed, c, i).
    batch_size : samples generated together.
    compute_batch : evaluate the network on chunks of exactly this many samples, so member i
        is bit-identical whatever ``batch_size`` (default: recipe ``sampling.compute_batch``;
        ``None`` there = whole batches, fastest).
    out : ``*.nc`` or ``*.zarr``; written atomically and resumably. Under torchrun each rank
        writes its own members into one Zarr store.
    """
    from geodiff.runtime import init_distributed, resolve_device

    if out is not None:
        check_output_path(out, overwrite)
    model = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint,
                                                                                device=device)
    sc = model.recipe.sampling
    members = sc.members if members is None else members
    sampler = sc.sampler if sampler is None else sampler
    if timesteps is None and steps is None and sampler in ("ddpm", "ddim"):
        timesteps = sc.timesteps
    given_steps = steps
    steps = sc.steps if steps is None else steps
    guidance = sc.guidance if guidance is None else guidance
    eta = sc.eta if eta is None else eta
    batch_size = sc.batch_size if batch_size is None else batch_size
    compute_batch = sc.compute_batch if compute_batch is None else compute_batch
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"{members=} must be a positive integer")
    if sampler not in ENSEMBLE_SAMPLERS:
        raise ValueError(f"{sampler=} is unknown; choose one of {list(ENSEMBLE_SAMPLERS)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"{steps=} and {batch_size=} must be >= 1")
    if compute_batch is not None and compute_batch < 1:
        raise ValueError(f"{compute_batch=} must be >= 1 (or None for whole batches)")
    if guidance != 1.0:
        check_guidance(model, guidance)
    if timesteps is not None:
        from geodiff.sampling import checked_timesteps

        # validated against the model's schedule (and steps, if given) before any work
        schedule = getattr(model.denoiser, "schedule", None)
        if schedule is None:
            raise ValueError(f"timesteps={list(timesteps)!r}: the model in {model.path} is "
                             "EDM-parameterised and has noise levels, not timesteps; use "
                             "steps (and sampling.rho), or train with "
                             "diffusion.parameterization: ddpm")
        timesteps = checked_timesteps(sampler, given_steps, schedule, timesteps)
        steps = len(timesteps)
    cells = condition_cells(model, conditions)
    cell_dicts = _cell_dicts(cells)
    cell_fields = condition_fields(model, conditions, cells)
    cond_vectors = np.stack([model.cond_spec.vector(c) for c in cell_dicts]) \
        if model.cond_spec.dim else np.zeros((len(cell_dicts), 0), np.float32)
    dist = init_distributed(resolve_device(device)) if out is not None else None
    if dist is not None and dist.world > 1 and output_format(out) != "zarr":
        raise ValueError(f"out={str(out)!r}: under torchrun write a .zarr store (each rank "
                         "writes its own region); NetCDF cannot be written in parallel")
    attrs = _provenance(model, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                        eta=eta)
    if compute_batch is not None:  # part of what makes the bits (and of the resume check)
        attrs["geodiff_compute_batch"] = int(compute_batch)
    if timesteps is not None:
        attrs["geodiff_timesteps"] = timesteps
    n_cells = len(cell_dicts)
    per_block = max(1, batch_size // n_cells)
    blocks = [list(range(m0, min(members, m0 + per_block))) for m0 in range(0, members, per_block)]

    def block_dataset(block: list[int]) -> xr.Dataset:
        items = [(c, m) for m in block for c in range(n_cells)]
        parts = [sample_items(model, items[i:i + batch_size], cond_vectors, sampler=sampler,
                              steps=steps, guidance=guidance, eta=eta, seed=seed,
                              compute_batch=compute_batch, timesteps=timesteps,
                              cell_fields=cell_fields)
                 for i in range(0, len(items), batch_size)]
        x = np.concatenate(parts).reshape(len(block), n_cells, *parts[0].shape[1:])
        return to_dataset(model, x, block, cells)

    return emit(block_dataset, blocks, members, attrs, out=out,
                request=resume_request(members, cell_dicts, cell_fields),
                overwrite=overwrite, dist=dist, progress=progress,
                layout=lambda: layout_dataset(model, cells))


def resume_request(members: int, cell_dicts: list[dict[str, Any]],
                   cell_fields: np.ndarray | None) -> dict[str, Any]:
    """The part of a resume key that names what is generated: the member count, the cells
    and (for ``conditioning.fields``) a hash of their predictors, since other predictor
    values for the same cells make other members."""
    request: dict[str, Any] = {"members": members,
                               "cells": [{k: str(v) for k, v in c.items()} for c in cell_dicts]}
    if cell_fields is not None:
        request["condition_fields_sha256"] = hashlib.sha256(cell_fields.tobytes()).hexdigest()
    return request


def layout_dataset(model: LoadedModel, cells: xr.Dataset) -> xr.Dataset:
    """A one-member Dataset with the dims, coordinates and attributes every generated slab
    has (values meaningless): :func:`to_dataset` of zeros, so the output file's template
    costs no sampling."""
    n_cells = int(np.prod([cells.sizes[d] for d in cells.dims]))
    h, w = len(model.grid.lat), len(model.grid.lon)
    zeros = np.zeros((1, n_cells, len(model.channel_names), h, w), np.float32)
    return to_dataset(model, zeros, [0], cells)


def emit(block_dataset, blocks: list[list[int]], members: int, attrs: dict[str, Any], *,
         out: str | Path | None, request: dict[str, Any], overwrite: bool, dist=None,
         progress: bool = True, layout=None) -> xr.Dataset | Path:
    """Run ``block_dataset`` over member blocks; concatenate in memory or stream to ``out``.

    ``layout()`` returns a one-member Dataset shaped like the slabs (default: the first
    member block itself, generated once more) for the output file's template. Under
    torchrun (``dist.world > 1``) block b is generated by rank ``b % world``; rank 0 writes
    the template and renames the finished store. The resume key is ``request`` plus the
    ``geodiff_*`` attributes, except the checkpoint's path (its SHA-256 identifies it, so
    the same run given by another path resumes).
    """
    from geodiff.runtime import barrier

    world, rank = (dist.world, dist.rank) if dist else (1, 0)
    bar = _progress(members, progress and rank == 0)
    if out is None:
        slabs = []
        for block in blocks:
            slabs.append(block_dataset(block))
            bar.update(len(block))
        bar.close()
        ds = xr.concat(slabs, MEMBER) if len(slabs) > 1 else slabs[0]
        ds.attrs.update(attrs)
        return ds
    out = Path(out)
    request = {k: v for k, v in attrs.items()
               if k.startswith("geodiff_") and k != "geodiff_checkpoint"} | request
    writer = EnsembleWriter(out, request, rank=rank)
    done = writer.members_done(world)
    if rank == 0 and not done:
        template = _template(layout() if layout is not None else block_dataset([0]), members)
        template.attrs.update(attrs)
        writer.create(template, _encoding(template, out))
    barrier(dist)
    bar.update(len(done))
    for b, block in enumerate(blocks):
        if b % world != rank:
            continue
        todo = [m for m in block if m not in done]
        if todo:
            writer.write(block_dataset(todo), todo)
        bar.update(len(todo))
    bar.close()
    barrier(dist)
    if rank == 0:
        writer.finalize(overwrite)
    barrier(dist)
    return out


def _template(first: xr.Dataset, members: int) -> xr.Dataset:
    """All-NaN Dataset with ``members`` members, coordinates and attrs of ``first``.

    The data are lazy (dask, one chunk per member), and only the coordinates are reindexed,
    so building it allocates nothing of the ensemble's size.
    """
    import dask.array as da

    coords = first.drop_vars(list(first.data_vars)).isel({MEMBER: [0]})
    out = coords.reindex({MEMBER: np.arange(members, dtype=np.int32)})
    for name, v in first.data_vars.items():
        shape = tuple(members if d == MEMBER else first.sizes[d] for d in v.dims)
        out[name] = (v.dims, da.full(shape, np.nan, dtype=np.float32,
                                     chunks=tuple(1 if d == MEMBER else s
                                                  for d, s in zip(v.dims, shape))), v.attrs)
    out[MEMBER].attrs = dict(first[MEMBER].attrs)
    return out


def _encoding(ds: xr.Dataset, out: Path) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {}
    for name in ds.data_vars:
        v = ds[name]
        chunks = tuple(1 if d == MEMBER else s for d, s in zip(v.dims, v.shape))
        if output_format(out) == "zarr":
            enc[name] = {"chunks": chunks, "_FillValue": np.float32(np.nan)}
        else:
            enc[name] = {"zlib": True, "complevel": 4, "chunksizes": chunks,
                         "_FillValue": np.float32(np.nan), "dtype": "float32"}
    return enc


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="generate", unit="member",
                dynamic_ncols=True)
