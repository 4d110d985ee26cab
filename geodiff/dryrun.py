"""``geodiff train RECIPE --dry-run``: what a run would do, without doing it.

Prints the resolved recipe, the data shapes, the parameter count and an estimated time per
training step (a step on random tensors of the real shape with a batch of at most 4, after
one warm-up step, scaled linearly to the recipe's batch size).  When the data cannot
be opened here (a remote store without network) the grid size can be given instead.
"""

from __future__ import annotations

import time

import torch

from geodiff.config import Recipe


def _shapes_from_data(recipe: Recipe) -> dict:
    from geodiff.pipeline import prepare_data

    data = prepare_data(recipe)
    x = data.train[0]
    return {"spec": data.spec, "n_train": len(data.train),
            "n_val": len(data.val) if data.val is not None else 0,
            "padded": tuple(x["x"].shape[-2:]), "grid": (len(data.grid.lat), len(data.grid.lon)),
            "channels": list(data.train.channel_names)}


def _shapes_from_grid(recipe: Recipe, grid: tuple[int, int]) -> dict:
    n_lat, n_lon = grid
    mult = 2 ** (len(recipe.model.channels) - 1)
    padded = (-(-n_lat // mult) * mult, -(-n_lon // mult) * mult)
    c = len(recipe.data.variables)
    cc = recipe.conditioning
    n_fields = 4 * cc.coord_channels + len(cc.fields) + len(cc.static_fields)
    cond_dim = int(cc.year) + 2 * int(cc.day_of_year) + 4 * len(cc.labels)
    # as prepare_data decides (pipeline.pole_padding_fits) for a global grid of cell-centred
    # rows: pole padding only without data-layer padding and with an even coarsest width;
    # otherwise the network zero-pads latitude (a grid needing padding, or an odd width,
    # trains fine, and must not fail here)
    global_lat = padded == (n_lat, n_lon) and (n_lon // mult) % 2 == 0
    return {"spec": {"in_channels": c + n_fields, "out_channels": c, "cond_dim": cond_dim,
                     "periodic": True, "global_lat": global_lat, "sigma_data": 0.5},
            "n_train": None, "n_val": None, "padded": padded, "grid": grid,
            "channels": list(recipe.data.variables)}


def dry_run(recipe: Recipe, *, device: str | None = None,
            grid: tuple[int, int] | None = None) -> str:
    """A text report: resolved recipe, shapes, parameters, seconds per training step."""
    from geodiff.pipeline import Objective, build_denoiser, draw_noise
    from geodiff.runtime import autocast, resolve_device

    dev = resolve_device(device)
    note = ""
    if grid is None:
        try:
            info = _shapes_from_data(recipe)
        except (OSError, ImportError) as err:
            raise ValueError(f"the data of {recipe.data.source!r} cannot be opened here ({err}); "
                             "give the grid size to estimate without it: "
                             "--grid 32x64 (CLI) or dry_run(recipe, grid=(32, 64))") from err
    else:
        info = _shapes_from_grid(recipe, grid)
        note = (" (from the given grid size, assumed global with cell-centred rows; one "
                "level per variable, no NaN mask channel, 4 values per label)")
    denoiser = build_denoiser(recipe, info["spec"]).to(dev)
    n_params = sum(p.numel() for p in denoiser.parameters())
    spec = info["spec"]
    b_full = recipe.training.batch_size
    b = min(b_full, 4)  # timed on a small batch, scaled linearly to the full batch
    h, w = info["padded"]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, spec["out_channels"], h, w, generator=gen)
    batch = (x0, torch.ones_like(x0), torch.zeros(b, spec["in_channels"] - spec["out_channels"],
                                                   h, w), torch.zeros(b, spec["cond_dim"]))
    objective = Objective(denoiser, recipe)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=recipe.training.lr)
    times = []
    for _ in range(2):
        level, noise = draw_noise(recipe, x0.shape, gen)
        t0 = time.perf_counter()
        with autocast(dev, recipe.training.amp):
            loss = objective(*[t.to(dev) for t in batch], level.to(dev), noise.to(dev),
                             torch.zeros(b, dtype=torch.bool, device=dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    per_step = times[-1] * b_full / b
    lines = [recipe.to_yaml().rstrip(), "", f"# dry run on {dev}{note}",
             f"grid (lat x lon): {info['grid'][0]} x {info['grid'][1]}, padded to {h} x {w}",
             f"channels: {info['channels']}  extra input fields: "
             f"{spec['in_channels'] - spec['out_channels']}  condition vector: {spec['cond_dim']}",
             f"periodic longitude: {spec['periodic']}",
             f"training samples: {info['n_train']}  validation samples: {info['n_val']}",
             f"parameters: {n_params:,}",
             f"time per step (batch {b_full}, timed at {b} and scaled): {per_step:.3f} s -> "
             f"{recipe.training.steps} steps "
             f"~ {per_step * recipe.training.steps / 60:.1f} min"]
    return "\n".join(lines)
