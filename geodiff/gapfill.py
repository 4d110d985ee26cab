"""Gap filling: complete partly observed fields (e.g. cloudy satellite SST) with an ensemble.

The observed pixels of each field are kept exactly (in physical units); the gaps are
filled by the model's conditional distribution given the observed pixels (RePaint-style
resampling, Lugmayr et al. 2022, see :func:`geodiff.sampling.inpaint`); pixels that were
never valid in training (land) stay NaN.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from geodiff.ensemble import (
    _cell_dicts,
    _provenance,
    condition_fields,
    emit,
    fixed_batch,
    layout_dataset,
    member_seed,
    network_fields,
    on_model_grid,
    resume_request,
    stack_channels,
    to_dataset,
    variable_attrs,
)
from geodiff.io import MEMBER, check_output_path
from geodiff.pipeline import LoadedModel, load_model


def fill_gaps(checkpoint: str | Path | LoadedModel, observed: xr.Dataset,
              members: int | None = None, *,
              steps: int | None = None, resample: int | None = None, seed: int = 0,
              batch_size: int | None = None, compute_batch: int | None = None,
              out: str | Path | None = None,
              overwrite: bool = False, device: str | None = None, progress: bool = True
              ) -> xr.Dataset | Path:
    """An ensemble of completions of ``observed`` (NaN = gap), observed pixels kept exactly.

    ``observed`` holds the model's variables (with the levels it was trained on) on its grid,
    in any latitude order or longitude convention, and, for a model with
    ``conditioning.fields``, those condition fields for the same cells (no gaps needed).
    ``members`` (default the recipe's ``sampling.members``), ``steps``, ``batch_size`` and
    ``compute_batch`` default to the recipe's ``sampling`` section and ``resample`` to
    ``gapfill.resample``; the sampler is always RePaint (no guidance).
    Returns a Dataset with dims (member, *sample dims of observed, [level], lat, lon) in the
    source's conventions, or streams it to ``out`` (``.nc`` / ``.zarr``) like
    :func:`geodiff.generate_ensemble`.
    """
    from geodiff.grid import restore
    from geodiff.sampling import inpaint

    if out is not None:
        check_output_path(out, overwrite)
    for name, value in (("members", members), ("steps", steps), ("resample", resample),
                        ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer (or None for the "
                             "recipe's value)")
    model = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint,
                                                                                device=device)
    members = model.recipe.sampling.members if members is None else members
    steps = model.recipe.sampling.steps if steps is None else steps
    resample = model.recipe.gapfill.resample if resample is None else resample
    batch_size = model.recipe.sampling.batch_size if batch_size is None else batch_size
    if compute_batch is None:
        compute_batch = model.recipe.sampling.compute_batch
    if compute_batch is not None and compute_batch < 1:
        raise ValueError(f"{compute_batch=} must be >= 1 (or None for whole batches)")
    if not isinstance(observed, xr.Dataset):
        raise TypeError(f"observed must be an xarray Dataset, got {type(observed).__name__}")
    obs = on_model_grid(model, observed, model.variables, "observed fields")
    sample_dims = [d for d in model.sample_dims if d in obs.dims]
    cells = xr.Dataset(coords={k: v for k, v in obs.coords.items()
                               if set(v.dims) and set(v.dims) <= set(sample_dims)})
    cell_dicts = _cell_dicts(cells)
    cell_fields = condition_fields(model, observed, cells, "observed fields")
    if model.cond_spec.dim:
        for c in cell_dicts:
            model.cond_spec.check(c)
        cond_vectors = np.stack([model.cond_spec.vector(c) for c in cell_dicts])
    else:
        cond_vectors = np.zeros((len(cell_dicts), 0), np.float32)
    # (n_cells, C, lat, lon): observed values (scaled) and the known-pixel mask
    arr = stack_channels(model, model.scaler.transform(obs), model.variables, list(cells.dims))
    known = np.isfinite(arr) & model.valid[None]
    obs_t = model.padding.apply(torch.from_numpy(np.where(known, arr, 0.0).astype(np.float32)))
    known_t = model.padding.apply(torch.from_numpy(known.astype(np.float32))) > 0.5
    smin, smax = model.sigma_range()
    dev = model.device
    n_cells = len(cell_dicts)

    def run(items: list[tuple[int, int]]) -> np.ndarray:
        idx = [c for c, _ in items]
        gens = [torch.Generator().manual_seed(member_seed(seed, c, m)) for c, m in items]
        fields = network_fields(model, cell_fields, idx)
        cond = torch.as_tensor(cond_vectors[idx], dtype=torch.float32, device=dev)
        net = fixed_batch(model.denoiser, compute_batch)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return net(x, sigma, fields, cond)

        with torch.no_grad():
            x = inpaint(denoise, obs_t[idx].to(dev), known_t[idx].to(dev), gens, steps=steps,
                        sigma_min=smin, sigma_max=smax, rho=model.recipe.sampling.rho,
                        resample=resample, device=dev,
                        schedule=getattr(model.denoiser, "schedule", None))  # DDPM: its levels
        return model.padding.crop(x.float().cpu()).numpy()

    attrs = _provenance(model, sampler="inpaint", steps=steps, guidance=1.0, seed=seed, eta=0.0,
                        kind="fill-gaps")
    attrs["geodiff_resample"] = int(resample)
    if compute_batch is not None:  # part of what makes the bits (and of the resume check)
        attrs["geodiff_compute_batch"] = int(compute_batch)
    per_block = max(1, batch_size // n_cells)
    blocks = [list(range(m0, min(members, m0 + per_block))) for m0 in range(0, members, per_block)]
    restored_obs = restore(obs, model.grid)

    def block_dataset(block: list[int]) -> xr.Dataset:
        items = [(c, m) for m in block for c in range(n_cells)]
        parts = [run(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
        x = np.concatenate(parts).reshape(len(block), n_cells, *parts[0].shape[1:])
        ds = to_dataset(model, x, block, cells)
        member_attrs = dict(ds[MEMBER].attrs)
        for v in model.variables:  # observed pixels exactly as given
            o = restored_obs[v]
            ds[v] = xr.where(o.notnull(), o, ds[v]).transpose(*ds[v].dims).astype(np.float32)
            ds[v].attrs = variable_attrs(model, v)
        ds[MEMBER].attrs = member_attrs  # xr.where drops coordinate attributes
        return ds

    # other observations of the same cells are another ensemble: not resumed from this one
    request = resume_request(members, cell_dicts, cell_fields) | {
        "observed_sha256": hashlib.sha256(
            np.ascontiguousarray(np.where(known, arr, np.nan)).tobytes()).hexdigest()}
    return emit(block_dataset, blocks, members, attrs, out=out, request=request,
                overwrite=overwrite, progress=progress,
                layout=lambda: layout_dataset(model, cells))
