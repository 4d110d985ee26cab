"""Throughput and memory of LatLonUNet vs diffusers' UNet2DModel, and sampler efficiency.

Not a test. For each grid (lat x lon) and channel count the script times

* a **training step** (forward, MSE loss, backward, Adam step) and
* a **sampling step** (one network evaluation without gradients, eval mode)

for four networks of matched size: geodiff's :class:`~geodiff.unet.LatLonUNet` on a global
grid (circular longitude + pole padding, the configuration it exists for), the same network
on a regional grid (zero padding, exactly what diffusers does), ``diffusers.UNet2DModel`` made
seam-free the obvious way (``padding_mode="circular"`` in every padded ``Conv2d``: the fair
peer on a global grid, ratios ``*_vs_diffusers_circular``) and plain ``diffusers.UNet2DModel``
with the same widths, blocks, attention levels, group norm and scale-shift embedding
(parameter counts are printed and must agree within 10 %). Timings interleave the models
step by step, so the load of a shared machine hits all of them alike, and report medians.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak RSS increase
(psutil, sampled every millisecond, after returning freed heap to the OS) on CPU.

Finally, with the analytic Gaussian denoiser of ``x0 ~ N(mu, diag s^2)``,
``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)``, it finds the fewest network
evaluations for which each sampler (DPM-Solver++, Heun, DDIM, DDPM on fewer timesteps)
matches the sample quality of 1000-step DDPM (:func:`evals_to_match_ddpm`): 16, 57, 400 and
all 1000 with 1000 members.

Speed ratios are medians over rounds of the per-round ratio diffusers time / geodiff
time (each round times every network once, so a slow spell of a shared machine hits both
sides of a ratio), with distribution-free 90 % intervals (:func:`paired_speed_ratio`).
The multiply-adds each network needs per sample (``macs_per_sample``, ratio ``macs_ratio``)
are counted with ``torch.utils.flop_counter``, convolution taps over zero padding left out
(:func:`conv_flops_formula`): plain diffusers' convolutions skip them; a global grid's halo
holds data, so every tap of geodiff's global network is real work (1.03-1.11x plain
diffusers' multiply-adds at these sizes, as many as diffusers made seam-free). ``*_per_mac``
ratios scale the speed ratio by the multiply-add ratio: the speed of the arithmetic.

Writes ``benchmarks/results/bench_model.json``. ``--quick`` (grids 16x32 and 32x64, widths
32-64-64, batch 4, 40 timed steps, 1000 sampler members) takes about seven minutes on two CPU
cores; the full run (grids 32x64 and 64x128, widths 64-128-256, two blocks per level, batch
16, 30 timed steps, 4000 members) is meant for a GPU: allow one to two hours on a CPU, or
pick one configuration (``--grids 32x64 --channels 1 --iters 10 --skip-sampler``: 7 min).

What the numbers show (2 CPU cores; the H100 figures in README predate the CPU work below):
on zero padding geodiff beats diffusers step for step (CPU quick 1.05-1.15x train /
1.10-1.22x sample, full-size network 1.04-1.07x / 1.01-1.02x). The global configuration is
1.17-1.28x train / 1.11-1.21x sample as fast as diffusers made seam-free with circular
padding, the like-for-like peer, and 0.96-1.01x train / 0.96-1.05x sample plain diffusers
at the quick sizes (90 % intervals within 0.93-1.07; full size at 32x64 1.01x [0.89, 1.29]
/ 0.94x [0.88, 1.00], at 64x128 0.95x [0.83, 1.36] / 0.99x [0.63, 1.12]), which has a seam
and zero poles and needs 7-11 % (full size 8 % / 3 %) fewer multiply-adds: per multiply-add
geodiff's global network is 1.02-1.16x as fast as plain diffusers (0.98x / 1.03x at
64x128). The price of the halo is that arithmetic plus the copy: every 3x3 convolution
reads a (H + 2) x (W + 2) copy and its backward returns a gradient of that size (oneDNN's
NCHW convolution took +19 % at 4x8, +5 % at 8x16, +6 % at 16x32, +2 % at 32x64 over its own
zero padding), plus the copy itself. Tried and measured: concatenation (10x slower than
slice copies), autograd through slice assignments (clones the gradient once per
assignment), a copy-free "zero-padded conv + edge corrections" (grouped 1-D convolutions
of the edge rows and columns, added onto the output; its thin convolutions and strided
adds cost more than the copy up to 32x64: forward + backward of a 16 x 64-256 channel
convolution 1.13-1.32x the zero-padded one's time against the halo's 1.06-1.10x; it wins
only from 64x128 on, 1.04x against 1.12x at 16 x 64 channels, where the halo is 4 % of the
full-size training step, so at most ~3 % to gain), channels-last memory format (whole
net 0.64-0.86x diffusers; only the padded convolution input: slower except at 8x16 with
>= 256 channels), convolutions as
shifted or im2col matrix products on the padded grid (1.4-3x oneDNN), Winograd F(2x2, 3x3)
as batched matrix products (fewer multiplies, but the transforms and a memory-bound product
at 64-128 channels: forward 1.4-2.8x oneDNN's time, 0.94x only at 256 channels on 8x16),
``torch.compile`` of both networks (geodiff global 0.84x compiled diffusers: worse than
eager). Kept, on CPU: below 64 K values per sample the padded tensor is one gather of a
cached index along dim 1 of a ``(B * C, H * W)`` view (3-5x faster than along the last dim
of ``(B, C, H * W)``), whose backward autograd derives in C++; above, one preallocated
tensor with SiLU computed straight into it and four strided strip copies (strip views
cached per shape), with a backward that folds the halo gradient in place into the incoming
gradient and crops it through ``silu_backward``; on periodic grids the nearest-neighbour
upsampling and the halo are one gather (``F.interpolate`` round-trips through channels-last
on CPU). On CUDA the halo is one gather/scatter of precomputed indices (strips were 15 %
slower per H100 training step). Also kept, and what lifted geodiff on both grids: 1x1
convolutions (skip connections, attention projections) as one matrix product per sample
(oneDNN's 1x1 convolution took 1.2-2.8x its time at the quick sizes, 0.93-1.25x at the full
sizes), the second group norm's affine folded into the scale-shift (one pass less), every
block's embedding injection from one concatenated product (``embedding_terms``), and CPU
attention over <= 128 points as explicit channels-first products.

Usage::

    python benchmarks/bench_model.py --quick --device cpu
    python benchmarks/bench_model.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from geodiff.unet import LatLonUNet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_model.json"


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark run."""

    grids: tuple[tuple[int, int], ...]
    channel_counts: tuple[int, ...]
    widths: tuple[int, ...]
    blocks: int
    batch: int
    warmup: int
    iters: int
    members: int


QUICK = Setting(grids=((16, 32), (32, 64)), channel_counts=(1, 4), widths=(32, 64, 64),
                blocks=1, batch=4, warmup=3, iters=40, members=1000)
FULL = Setting(grids=((32, 64), (64, 128)), channel_counts=(1, 4), widths=(64, 128, 256),
               blocks=2, batch=16, warmup=5, iters=30, members=4000)


# ---------------------------------------------------------------------------------------
# models


def build_models(setting: Setting, channels: int, grid: tuple[int, int]) -> dict[str, nn.Module]:
    """geodiff (global and regional padding) and diffusers UNets of matched architecture."""
    from diffusers import UNet2DModel

    widths, levels = setting.widths, len(setting.widths)
    heads = 4
    common = {"channels": widths, "blocks_per_level": setting.blocks,
              "attention_levels": (levels - 1,), "attention_heads": heads, "groups": 8}
    down = tuple("AttnDownBlock2D" if i == levels - 1 else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i == levels - 1 else "UpBlock2D"
               for i in reversed(range(levels)))
    torch.manual_seed(0)

    def diffusers_unet() -> nn.Module:
        return UNet2DModel(sample_size=grid, in_channels=channels, out_channels=channels,
                           block_out_channels=widths, layers_per_block=setting.blocks,
                           down_block_types=down, up_block_types=up, norm_num_groups=8,
                           attention_head_dim=widths[-1] // heads,
                           resnet_time_scale_shift="scale_shift")

    circular = diffusers_unet()
    for module in circular.modules():  # the obvious way to make diffusers seam-free
        if isinstance(module, nn.Conv2d) and module.padding != (0, 0):
            module.padding_mode = "circular"
            module._reversed_padding_repeated_twice = [
                p for p in reversed(module.padding) for _ in range(2)]
    return {
        "geodiff_global": LatLonUNet(channels, channels, periodic_lon=True, pole_padding=True,
                                     **common),
        "geodiff_regional": LatLonUNet(channels, channels, **common),
        "diffusers": diffusers_unet(),
        "diffusers_circular": circular,
    }


def forward(name: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One network evaluation of either library's UNet."""
    if name.startswith("diffusers"):
        return model(x, t, return_dict=False)[0]
    return model(x, t)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# timing and memory


def make_steps(models: dict[str, nn.Module], x: torch.Tensor, t: torch.Tensor, device: str
               ) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """Training-step and sampling-step closures for every model."""
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
           else nullcontext())
    target = torch.randn_like(x)
    train, sample = {}, {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def train_step(name=name, model=model, opt=opt) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = F.mse_loss(forward(name, model, x, t).float(), target)
            loss.backward()
            opt.step()

        def sample_step(name=name, model=model) -> None:
            model.eval()
            with torch.no_grad(), amp:
                forward(name, model, x, t)

        train[name], sample[name] = train_step, sample_step
    return train, sample


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one closure: medians and every timed wall-clock call in order."""

    wall: float
    cpu: float
    walls: tuple[float, ...]


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, iters: int,
                     device: str) -> dict[str, Timing]:
    """Median (wall, process CPU) seconds per call of each closure, called in turn.

    On a shared CPU the CPU time is the steadier measure of the work a step needs; the wall
    time is what a user waits. Call ``k`` of every closure falls in round ``k``, so the
    per-call wall times of two closures can be paired (:func:`paired_speed_ratio`).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]),
                         tuple(wall[name]))
            for name in steps}


def paired_speed_ratio(ref: Timing, other: Timing, level: float = 0.90
                       ) -> tuple[float, float, float]:
    """Speed of ``other`` relative to ``ref`` (> 1: ``other`` is faster) with a confidence
    interval: ``(median, low, high)`` of the per-round ratios ``ref_k / other_k``.

    Pairing the calls of one round cancels the slow drifts of a shared machine, which a
    ratio of two medians keeps. The interval is the distribution-free one for a median
    (order statistics ``j`` and ``n + 1 - j`` of the ``n`` ratios, ``j`` the largest rank
    with ``P(Binomial(n, 1/2) < j) <= (1 - level) / 2``; e.g. Hollander, Wolfe & Chicken,
    "Nonparametric Statistical Methods", 3rd ed., sec. 3.6), so it assumes only that the
    rounds are independent; it is ``(min, max)`` when ``n`` is too small for ``level``.
    """
    ratios = sorted(r / o for r, o in zip(ref.walls, other.walls, strict=True))
    n = len(ratios)
    tail, j, cdf = (1 - level) / 2, 0, 0.0
    while j < n and cdf + math.comb(n, j) / 2**n <= tail:
        cdf += math.comb(n, j) / 2**n
        j += 1
    low, high = (ratios[j - 1], ratios[n - j]) if j else (ratios[0], ratios[-1])
    return statistics.median(ratios), low, high


def conv_flops_formula(x_shape, w_shape, _bias, stride, padding, dilation, transposed, *args,
                       out_shape=None, **kwargs) -> int:
    """Floating-point operations (2 per multiply-add) of one convolution, counting only the
    kernel taps that land on input cells (a formula for
    ``torch.utils.flop_counter.FlopCounterMode``, whose own counts full windows).

    A direct convolution need not multiply by its implicit zero padding: a 3x3 convolution
    of an 8 x 16 grid with ``padding=1`` needs 0.88x the multiply-adds of the same
    convolution of the explicitly padded 10 x 18 grid whose halo holds data (0.94x at
    16 x 32, 0.97x at 32 x 64). oneDNN saves part of that in time: on 2 cores, batch 16,
    256-64 channels, the padded input took 1.19 / 1.05 / 1.06 / 1.02x the time at 4 x 8 /
    8 x 16 / 16 x 32 / 32 x 64 (multiply-add ratios 1.31 / 1.14 / 1.07 / 1.03).
    """
    if transposed:
        raise NotImplementedError("transposed convolutions are not counted")
    taps = 1
    for d, k in enumerate(w_shape[2:]):
        pos = (torch.arange(out_shape[2 + d])[:, None] * stride[d] - padding[d]
               + torch.arange(k)[None, :] * dilation[d])
        taps *= int(((pos >= 0) & (pos < x_shape[2 + d])).sum())
    return 2 * x_shape[0] * w_shape[0] * w_shape[1] * taps


def effective_macs(name: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """Multiply-adds per sample of one network evaluation: every operation that
    ``FlopCounterMode`` counts (matrix products, attention, convolutions), the convolutions
    without the taps over zero padding (:func:`conv_flops_formula`)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution: conv_flops_formula})
    with mode, torch.no_grad():
        forward(name, model, x, t)
    return round(mode.get_total_flops() / 2 / x.shape[0])


def _trim_heap() -> None:
    gc.collect()
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mib(step: Callable[[], None], device: str) -> float:
    """Peak memory increase (MiB) over two calls of ``step``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import psutil

    proc = psutil.Process()
    _trim_heap()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for _ in range(2):
        step()
    done.set()
    thread.join()
    return (max(peak, proc.memory_info().rss) - base) / 2**20


def bench_config(setting: Setting, channels: int, grid: tuple[int, int], device: str) -> dict:
    """Timings, memory and parameter counts of the three networks on one configuration."""
    models = {k: m.to(device) for k, m in build_models(setting, channels, grid).items()}
    counts = {k: n_params(m) for k, m in models.items()}
    ratio = counts["geodiff_global"] / counts["diffusers"]
    assert abs(ratio - 1) < 0.1, f"parameter counts not matched: {counts}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setting.batch, channels, *grid, generator=gen).to(device)
    t = (torch.rand(setting.batch, generator=gen) * 999).to(device)
    train, sample = make_steps(models, x, t, device)
    macs = {k: effective_macs(k, m, x[:1], t[:1]) for k, m in models.items()}
    train_s = time_interleaved(train, setting.warmup, setting.iters, device)
    sample_s = time_interleaved(sample, setting.warmup, setting.iters, device)
    out = {"grid": list(grid), "channels": channels, "batch": setting.batch, "params": counts,
           "models": {}}
    for name in models:
        out["models"][name] = {
            "macs_per_sample": macs[name],
            "train_samples_per_s": setting.batch / train_s[name].wall,
            "sample_samples_per_s": setting.batch / sample_s[name].wall,
            "train_cpu_s_per_step": train_s[name].cpu,
            "sample_cpu_s_per_step": sample_s[name].cpu,
            "train_peak_mib": peak_memory_mib(train[name], device),
            "sample_peak_mib": peak_memory_mib(sample[name], device),
        }
    timings = {"train": train_s, "sample": sample_s}
    for name in ("geodiff_global", "geodiff_regional", "diffusers_circular"):
        m = out["models"][name]
        m["macs_ratio"] = macs[name] / macs["diffusers"]
        for kind, s in timings.items():
            ratio, low, high = paired_speed_ratio(s["diffusers"], s[name])
            m[f"{kind}_speed_ratio"] = ratio
            m[f"{kind}_speed_ratio_ci90"] = [low, high]
            m[f"{kind}_cpu_time_ratio"] = s["diffusers"].cpu / s[name].cpu
            # multiply-adds per second relative to diffusers: the speed of the arithmetic,
            # apart from how much of it each network's padding needs
            m[f"{kind}_speed_per_mac_ratio"] = ratio * m["macs_ratio"]
        if name == "geodiff_global":
            for kind, s in timings.items():
                ratio, low, high = paired_speed_ratio(s["diffusers_circular"], s[name])
                m[f"{kind}_speed_ratio_vs_circular"] = ratio
                m[f"{kind}_speed_ratio_vs_circular_ci90"] = [low, high]
    return out


# ---------------------------------------------------------------------------------------
# DPM-Solver++ vs DDPM-1000 on an analytic Gaussian denoiser


class GaussianDenoiser:
    """Exact denoiser of ``x0 ~ N(mu, diag s^2)`` under ``x = x0 + sigma eps``.

    ``D(x, sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)``; counts its calls.
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor) -> None:
        self.mu, self.s, self.calls = mu, s, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)                   # (B, 1, 1, 1)
        s2 = self.s**2
        return self.mu + s2 / (s2 + sigma**2) * (x - self.mu)


def sample_error(samples: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> dict[str, float]:
    """RMS over pixels of the standardised errors of the ensemble mean and std.

    ``samples`` is ``(N, C, H, W)``; the mean error is ``(mean - mu) / s`` (Monte-Carlo
    standard error ``1 / sqrt(N)``), the std error ``std / s - 1`` (standard error about
    ``1 / sqrt(2 N)``).
    """
    mean_err = (samples.mean(0) - mu) / s
    std_err = samples.std(0) / s - 1
    return {"mean_rms": mean_err.square().mean().sqrt().item(),
            "std_rms": std_err.square().mean().sqrt().item()}


SAMPLER_STEPS = {
    "dpmpp": tuple(range(2, 61)),
    "ddim": tuple(range(2, 61)) + (70, 80, 100, 125, 150, 200, 250, 300, 400, 500, 700, 1000),
    "heun": tuple(range(2, 61)),
    "ddpm": tuple(range(2, 61)) + (70, 80, 100, 125, 150, 200, 250, 300, 400, 500, 700, 1000),
}
"""Step counts tried per sampler by :func:`evals_to_match_ddpm`: the second-order solvers
converge within tens of steps; first-order DDIM and ancestral DDPM on evenly spaced
timesteps of the schedule are tried up to all 1000 (DDPM-1000 with the same seeds is the
reference itself)."""


def evals_to_match_ddpm(members: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        samplers: tuple[str, ...] = ("dpmpp", "heun", "ddim", "ddpm")) -> dict:
    """Fewest network evaluations with which each sampler matches DDPM-1000's samples.

    The truth is ``N(mu, s^2)`` on a 16 x 32 one-channel grid (P = 512 pixels) with ``mu`` in
    [-1, 1] and ``s`` in [0.05, 0.5] (scaled-data ranges), sampled through its exact denoiser
    (:class:`GaussianDenoiser`), so only the sampler's discretisation and Monte-Carlo noise
    are measured. The reference runs 1000 ancestral steps of the linear schedule (Ho et al.
    2020). Each sampler runs in its standard setting for every step count of
    :data:`SAMPLER_STEPS`: DPM-Solver++(2M) (Lu et al. 2022) at its default noise levels
    (:func:`geodiff.sampling.default_rho`: even in log sigma from ``sigma_max`` to
    ``sigma_min``), Heun (Karras et al. 2022, algorithm 1, ``rho = 7``, same bounds), and
    deterministic DDIM (Song et al. 2021, ``eta = 0``) and ancestral DDPM, both on evenly
    spaced timesteps of the linear schedule. A step count matches when its RMS mean error and
    RMS std error (:func:`sample_error`) are each at most DDPM-1000's plus two standard
    errors of the difference of two independent Monte-Carlo RMS estimates,
    ``2 sqrt(2) se / sqrt(2 P)`` with ``se = 1 / sqrt(N)`` (mean) or ``1 / sqrt(2 N)``
    (std). The answer per sampler is the fewest evaluations from which every larger step
    count tried matches (``first_match`` records the first isolated one); ``None`` when the
    largest step count tried does not match.
    """
    from geodiff import sampling
    from geodiff.diffusion import make_schedule

    gen = torch.Generator().manual_seed(1)
    shape = (members, 1, 16, 32)
    mu = torch.rand(1, *shape[1:], generator=gen, dtype=torch.float64) * 2 - 1
    s = 0.05 + 0.45 * torch.rand(1, *shape[1:], generator=gen, dtype=torch.float64)
    linear = make_schedule("linear", 1000)
    settings = {"dpmpp": {"sigma_min": sigma_min, "sigma_max": sigma_max},
                "heun": {"sigma_min": sigma_min, "sigma_max": sigma_max},
                "ddim": {"schedule": linear, "eta": 0.0},
                "ddpm": {"schedule": linear}}

    def run(sampler: str, steps: int, **kw) -> tuple[dict[str, float], int]:
        den = GaussianDenoiser(mu, s)
        gens = [torch.Generator().manual_seed(10_000 + b) for b in range(members)]
        out = sampling.sample(den, shape, gens, sampler=sampler, steps=steps, **kw)
        return sample_error(out.double(), mu, s), den.calls

    t0 = time.perf_counter()
    ddpm, ddpm_calls = run("ddpm", 1000, schedule=linear)
    pixels = mu.numel()
    tol_mean = 2 * math.sqrt(2) * (1 / math.sqrt(members)) / math.sqrt(2 * pixels)
    tol_std = 2 * math.sqrt(2) * (1 / math.sqrt(2 * members)) / math.sqrt(2 * pixels)
    result = {"members": members, "pixels": pixels, "ddpm1000": {**ddpm, "evals": ddpm_calls},
              "tolerance": {"mean_rms": tol_mean, "std_rms": tol_std}, "samplers": {}}
    for sampler in samplers:
        trials = []
        for steps in SAMPLER_STEPS[sampler]:
            err, calls = run(sampler, steps, **settings[sampler])
            ok = (err["mean_rms"] <= ddpm["mean_rms"] + tol_mean
                  and err["std_rms"] <= ddpm["std_rms"] + tol_std)
            trials.append({"steps": steps, "evals": calls, **err, "matches": ok})
        # the error is not monotone in the step count (an isolated lucky step count can
        # match): report the fewest evaluations from which every larger count matches too
        found = None
        for trial in reversed(trials):
            if not trial["matches"]:
                break
            found = trial["evals"]
        first = next((t["evals"] for t in trials if t["matches"]), None)
        result["samplers"][sampler] = {"evals_to_match": found, "first_match": first,
                                       "trials": trials}
    result["seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------
# report


def print_table(configs: list[dict]) -> None:
    """Throughput (wall clock), speed ratios vs diffusers (paired median [90 % interval] /
    CPU time), multiply-adds relative to diffusers and memory."""
    head = (f"{'grid':>7} {'C':>1} {'model':<19}{'params':>8} {'MACs':>5} {'train/s':>8} "
            f"{'ratio [90% CI]':>17} {'cpu':>5} {'sample/s':>8} {'ratio [90% CI]':>17} "
            f"{'cpu':>5} {'trainMiB':>8} {'sampMiB':>7}")
    print(head)
    print("-" * len(head))
    for cfg in configs:
        grid = f"{cfg['grid'][0]}x{cfg['grid'][1]}"
        for name, m in cfg["models"].items():
            cols = []
            for kind in ("train", "sample"):
                low, high = m.get(f"{kind}_speed_ratio_ci90", (1.0, 1.0))
                cols.append(f"{m[f'{kind}_samples_per_s']:>8.1f} "
                            f"{m.get(f'{kind}_speed_ratio', 1.0):>5.2f} "
                            f"[{low:.2f},{high:.2f}] {m.get(f'{kind}_cpu_time_ratio', 1.0):>5.2f}")
            print(f"{grid:>7} {cfg['channels']:>1} {name:<19}{cfg['params'][name]:>8} "
                  f"{m.get('macs_ratio', 1.0):>5.3f} {cols[0]} {cols[1]} "
                  f"{m['train_peak_mib']:>8.1f} {m['sample_peak_mib']:>7.1f}")


def _grid_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"32x64,64x128"`` -> ``((32, 64), (64, 128))``."""
    try:
        return tuple((int(h), int(w)) for h, w in (g.split("x") for g in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grids {text!r}: expected HxW[,HxW...], "
                                         "e.g. 32x64,64x128") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="small grids and few iterations")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-sampler", action="store_true",
                        help="skip the DPM-Solver++ vs DDPM comparison")
    parser.add_argument("--grids", type=_grid_list, default=None,
                        help="override the setting's grids, e.g. 32x64,64x128")
    parser.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")),
                        default=None, help="override the channel counts, e.g. 1,4")
    parser.add_argument("--iters", type=int, default=None,
                        help="override the number of timed steps per model")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    overrides = {"grids": args.grids, "channel_counts": args.channels, "iters": args.iters}
    setting = replace(setting, **{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    configs = [bench_config(setting, c, grid, device)
               for grid in setting.grids for c in setting.channel_counts]
    print_table(configs)

    def worst(model: str, key: str) -> float:
        return min(c["models"][model][key] for c in configs)

    def worst_ci(model: str, key: str) -> list[float]:
        """The 90 % interval of the configuration with the worst ``key``."""
        cfg = min(configs, key=lambda c: c["models"][model][key])
        return cfg["models"][model][f"{key}_ci90"]

    global_macs = [c["models"]["geodiff_global"]["macs_ratio"] for c in configs]
    summary = {
        "train_speed_ratio_vs_diffusers": worst("geodiff_global", "train_speed_ratio"),
        "sample_speed_ratio_vs_diffusers": worst("geodiff_global", "sample_speed_ratio"),
        "train_speed_ratio_vs_diffusers_ci90": worst_ci("geodiff_global", "train_speed_ratio"),
        "sample_speed_ratio_vs_diffusers_ci90": worst_ci("geodiff_global",
                                                         "sample_speed_ratio"),
        "global_macs_ratio_vs_diffusers": [min(global_macs), max(global_macs)],
        "train_speed_per_mac_ratio_vs_diffusers": worst("geodiff_global",
                                                        "train_speed_per_mac_ratio"),
        "sample_speed_per_mac_ratio_vs_diffusers": worst("geodiff_global",
                                                         "sample_speed_per_mac_ratio"),
        "regional_train_speed_ratio_vs_diffusers": worst("geodiff_regional",
                                                         "train_speed_ratio"),
        "regional_sample_speed_ratio_vs_diffusers": worst("geodiff_regional",
                                                          "sample_speed_ratio"),
        "train_cpu_time_ratio_vs_diffusers": worst("geodiff_global", "train_cpu_time_ratio"),
        "sample_cpu_time_ratio_vs_diffusers": worst("geodiff_global", "sample_cpu_time_ratio"),
        "train_speed_ratio_vs_diffusers_circular": worst("geodiff_global",
                                                         "train_speed_ratio_vs_circular"),
        "sample_speed_ratio_vs_diffusers_circular": worst("geodiff_global",
                                                          "sample_speed_ratio_vs_circular"),
        "dpmpp_evals_to_match_ddpm1000": None,
        "evals_to_match_ddpm1000": None,
    }
    result = {"summary": summary, "device": device, "quick": args.quick,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "setting": setting.__dict__, "configs": configs}
    if not args.skip_sampler:
        sampler = evals_to_match_ddpm(setting.members)
        found = {k: v["evals_to_match"] for k, v in sampler["samplers"].items()}
        summary["dpmpp_evals_to_match_ddpm1000"] = found["dpmpp"]
        summary["evals_to_match_ddpm1000"] = found
        result["sampler"] = sampler
        print(f"DDPM-1000 errors {sampler['ddpm1000']}; tolerance {sampler['tolerance']}")
        for name, res in sampler["samplers"].items():
            tried = res["trials"][-1]["evals"]
            print(f"  {name:<6} matches from {res['evals_to_match']} evaluations on "
                  f"(first isolated match {res['first_match']}; tried up to {tried})")
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
