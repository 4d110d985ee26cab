"""Typed, frozen recipe configuration.

A recipe YAML maps one to one onto :class:`Recipe`: every top-level key is a section,
every section is a frozen dataclass below, every key a documented field.  Unknown keys,
wrong types and impossible values raise :class:`ConfigError` naming the key path and
the allowed values, before any data is opened.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe key is unknown, mistyped or out of range (message names the key path)."""


# ---------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class DataConfig:
    """Where the training fields come from."""

    source: str
    """Catalog entry name, or a path to a NetCDF file / Zarr store."""
    variables: tuple[str, ...]
    """Data variables to model (each becomes one channel per level)."""
    catalog: str | None = None
    """Path of a user catalog YAML; ``None`` uses the bundled ``data_catalog.yaml``."""
    sample_dims: tuple[str, ...] = ("time",)
    """Dimensions that index samples (e.g. ``[scenario, time]``); the rest are lat/lon/level."""
    memory_budget_gb: float = 2.0
    """Load the scaled training data into memory when it fits this budget, else stream."""
    reader: Literal["dask", "tensorstore"] = "dask"
    """How streamed training data is read: ``dask`` (any source) or ``tensorstore`` (Zarr
    stores, ``pip install 'geodiff[fast]'``: each batch is one concurrent tensorstore read per
    variable, scaled straight into the batch; ``training.num_workers`` then counts threads)."""

    def validate(self, path: str) -> None:
        _require(len(self.variables) > 0, f"{path}.variables", self.variables, "at least one")
        _require(len(self.sample_dims) > 0, f"{path}.sample_dims", self.sample_dims,
                 "at least one sample dimension, e.g. [time]")
        _require(self.memory_budget_gb >= 0, f"{path}.memory_budget_gb", self.memory_budget_gb,
                 ">= 0")
        _require(self.reader in ("dask", "tensorstore"), f"{path}.reader", self.reader,
                 "one of ['dask', 'tensorstore']")


@dataclass(frozen=True)
class SplitConfig:
    """How samples are divided into train / validation / test (always by time, never shuffled)."""

    kind: Literal["year_modulo", "fraction", "time_ranges"] = "fraction"
    """``year_modulo``: test = years with ``year % modulo == remainder``;
    ``fraction``: the last ``test_fraction`` of times is test, the ``val_fraction`` before it
    validation; ``time_ranges``: explicit inclusive ``[start, end]`` date strings."""
    modulo: int = 10
    """``year_modulo``: period in years of the test years (>= 2; 10: every tenth year).
    Unused (and unchecked) by the other kinds."""
    remainder: int = 5
    """``year_modulo``: the test years are those with ``year % modulo == remainder``
    (``0 <= remainder < modulo``; 5 with modulo 10: 1865, 1875, ...). The year comes from a
    ``year`` coordinate, else from the decoded ``time``."""
    val_fraction: float = 0.1
    """Share of the times held out for validation (``0 <= value < 1`` and ``val_fraction +
    test_fraction < 1``; rounded to whole times, at least one when > 0): ``fraction``: the
    times just before the test block; ``year_modulo``: the last of the non-test times. 0: no
    validation split (no validation loss). Unused by ``time_ranges``."""
    test_fraction: float = 0.1
    """``fraction``: share of the times, the latest ones, held out as the test split
    (``0 <= value < 1``; rounded to whole times, at least one when > 0; 0: no test split).
    Unused by the other kinds."""
    train: tuple[str, str] | None = None
    """``time_ranges`` (required there): inclusive ``[start, end]`` partial-date strings of the
    training times, e.g. ``["1860", "1999-12-31"]`` (each bound compared at its own
    resolution, in any calendar). Ignored by the other kinds."""
    val: tuple[str, str] | None = None
    """``time_ranges``: inclusive ``[start, end]`` of the validation times (disjoint from the
    other ranges); ``null``: no validation split. Ignored by the other kinds."""
    test: tuple[str, str] | None = None
    """``time_ranges``: inclusive ``[start, end]`` of the test times (disjoint from the other
    ranges); ``null``: no test split. Ignored by the other kinds."""

    def validate(self, path: str) -> None:
        # only the settings the kind uses: a recipe switching kind keeps the others unread
        if self.kind == "year_modulo":
            _require(self.modulo >= 2, f"{path}.modulo", self.modulo, ">= 2")
            _require(0 <= self.remainder < self.modulo, f"{path}.remainder", self.remainder,
                     f"0 <= remainder < modulo ({self.modulo})")
        used = {"year_modulo": ("val_fraction",), "fraction": ("val_fraction", "test_fraction")}
        for name in used.get(self.kind, ()):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{path}.{name}", v, "0 <= value < 1")
        if self.kind == "fraction":
            _require(self.val_fraction + self.test_fraction < 1.0, f"{path}.val_fraction",
                     self.val_fraction, "val_fraction + test_fraction < 1")
        if self.kind == "time_ranges":
            _require(self.train is not None, f"{path}.train", self.train,
                     "a [start, end] pair when kind is time_ranges")


@dataclass(frozen=True)
class ScalingConfig:
    """Invertible map of each variable (and level) to about [-1, 1], fitted on the train split."""

    method: Literal["minmax", "quantile", "standard"] = "minmax"
    """``minmax``: data range; ``quantile``: robust range between ``quantiles``;
    ``standard``: mean +- ``n_std`` standard deviations."""
    margin: float = 0.05
    """Fraction of the fitted range added on both sides (0..1), so values a little beyond it
    still map within [-1, 1] (``minmax`` and ``quantile``; ``standard`` adds none)."""
    quantiles: tuple[float, float] = (0.001, 0.999)
    """``quantile``: the (low, high) quantiles of the training values (per variable, or per
    level with ``per_level``) taken as the range before ``margin`` (``0 <= low < high <= 1``;
    estimated from a 65536-bin histogram). Ignored by the other methods."""
    n_std: float = 3.0
    """``standard``: half-range in standard deviations, so mean +- ``n_std`` std maps to
    [-1, 1] (> 0; no ``margin`` is added). Ignored by the other methods."""
    per_level: bool = True
    """Fit separate statistics per vertical level for 3-D variables."""
    transform: Literal["none", "log1p"] = "none"
    """Applied before the range scaling (``log1p`` for positive, skewed fields)."""
    anomaly: Literal["none", "climatology", "trend"] = "none"
    """Subtract a fitted mean field first: ``climatology`` (day-of-year / month mean per
    pixel) or ``trend`` (per-pixel smooth regression on the ``trend_coord`` coordinate,
    separately for each value of ``trend_by``)."""
    trend_coord: str = "year"
    """``anomaly: trend``: coordinate the trend is a polynomial of, normalised to [-1, 1] over
    its training range. ``year``, ``month`` and ``dayofyear`` may come from a decoded
    ``time``; any other name must be a coordinate of the data (and of generation requests).
    ``year`` needs ``conditioning.year: true``."""
    trend_by: str | None = None
    """``anomaly: trend``: categorical coordinate (0-d or 1-d, e.g. ``scenario``) with a
    separate trend fitted for each of its training values (a value not seen in training is
    refused when transforming); ``null``: one trend for all samples."""
    trend_degree: int = 3
    """``anomaly: trend``: degree of the per-pixel Legendre polynomial in ``trend_coord``,
    0..8 (0: a constant per-pixel mean)."""
    trend_smoothing: float | None = None
    """With ``anomaly: trend``: bandwidth (in ``trend_coord`` units, e.g. years) of a Gaussian
    kernel average of the training residuals around the polynomial, added to the trend so
    the mean field follows decadal swings a low-degree polynomial misses. A sample's own
    ``trend_coord`` value is left out of its average, so training anomalies keep their full
    spread. ``null``: polynomial only."""
    climatology_period: Literal["dayofyear", "month"] = "month"
    """``anomaly: climatology``: the mean field is per ``month`` (1..12) or per ``dayofyear``
    of each pixel, from a coordinate of that name or the decoded ``time``; a period absent
    from the training split is refused when transforming."""
    per_pixel_std: bool = False
    """Divide the anomaly by its per-pixel standard deviation before range scaling."""

    def validate(self, path: str) -> None:
        _require(0.0 <= self.margin <= 1.0, f"{path}.margin", self.margin, "0 <= margin <= 1")
        lo, hi = self.quantiles
        _require(0.0 <= lo < hi <= 1.0, f"{path}.quantiles", self.quantiles,
                 "0 <= low < high <= 1")
        _require(self.n_std > 0, f"{path}.n_std", self.n_std, "> 0")
        _require(0 <= self.trend_degree <= 8, f"{path}.trend_degree", self.trend_degree,
                 "0..8")
        if self.trend_smoothing is not None:
            _require(self.trend_smoothing > 0, f"{path}.trend_smoothing", self.trend_smoothing,
                     "> 0 (a kernel bandwidth in trend_coord units) or null")
            _require(self.anomaly == "trend", f"{path}.trend_smoothing", self.trend_smoothing,
                     "null unless anomaly: trend (it smooths the trend's residuals)")


@dataclass(frozen=True)
class ConditioningConfig:
    """What the network is conditioned on."""

    year: bool = False
    """Add the (normalised) calendar year of each sample to the condition vector."""
    day_of_year: bool = False
    """Add sin/cos of the day of year (calendar aware) to the condition vector."""
    labels: tuple[str, ...] = ()
    """Categorical coordinates (e.g. ``scenario``) added one-hot to the condition vector."""
    fields: tuple[str, ...] = ()
    """Other data variables of the source, one field per sample (e.g. a low-resolution
    predictor), given to the network as input channels, scaled like ``data.variables``
    (own statistics); generation reads them for each requested cell from the conditions
    Dataset."""
    static_fields: tuple[str, ...] = ()
    """Time-invariant variables of the source (land-sea mask, orography) given as input
    channels, each standardised (mean 0, std 1 over the grid); stored in the checkpoint."""
    coord_channels: bool = True
    """Add sin/cos latitude and longitude as input channels."""
    mask_channel: bool = True
    """Add the validity mask (1 = valid) as an input channel when the train split has NaNs
    (validation and generation then get it too)."""
    dropout: float = 0.0
    """Probability of dropping the condition vector in training (classifier-free guidance)."""

    def validate(self, path: str) -> None:
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "0 <= p < 1")


@dataclass(frozen=True)
class ModelConfig:
    """The lat-lon UNet."""

    channels: tuple[int, ...] = (64, 128, 256)
    """Width of each resolution level (the grid is halved between levels)."""
    blocks_per_level: int = 2
    """Residual blocks per resolution level in the encoder (>= 1); the decoder has one more
    per level."""
    attention_levels: tuple[int, ...] = (2,)
    """Indices of levels (0 = full resolution) that get self-attention."""
    attention_heads: int = 4
    """Heads of every self-attention layer (>= 1); must divide the width of each level in
    ``attention_levels`` (unchecked when that is empty)."""
    dropout: float = 0.0
    """Dropout probability inside every residual block, in training only (``0 <= p < 1``;
    0: none); its masks are a function of ``training.seed``, the step and the rank."""
    groups: int = 8
    """GroupNorm groups (must divide every width)."""
    periodic_lon: Literal["auto", "yes", "no"] = "auto"
    """Circular padding in longitude; ``auto`` follows the grid's periodicity."""
    pole_padding: Literal["auto", "yes", "no"] = "auto"
    """Pole-aware latitude padding (rows across the pole come from lon + 180 deg)."""

    def validate(self, path: str) -> None:
        _require(len(self.channels) >= 1, f"{path}.channels", self.channels, "at least one level")
        _require(self.groups >= 1, f"{path}.groups", self.groups, ">= 1")
        for c in self.channels:
            _require(c > 0 and c % self.groups == 0, f"{path}.channels", self.channels,
                     f"positive widths divisible by groups={self.groups}")
        _require(self.blocks_per_level >= 1, f"{path}.blocks_per_level", self.blocks_per_level,
                 ">= 1")
        for lvl in self.attention_levels:
            _require(0 <= lvl < len(self.channels), f"{path}.attention_levels",
                     self.attention_levels, f"level indices in 0..{len(self.channels) - 1}")
        if self.attention_levels:
            widths = [self.channels[lvl] for lvl in self.attention_levels]
            _require(self.attention_heads >= 1 and all(w % self.attention_heads == 0
                                                       for w in widths),
                     f"{path}.attention_heads", self.attention_heads,
                     f"a head count >= 1 dividing the widths {widths} of the attention levels")
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "0 <= p < 1")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noising process and the training objective."""

    parameterization: Literal["edm", "ddpm"] = "edm"
    """``edm``: Karras et al. (2022) preconditioned denoiser; ``ddpm``: Ho et al. (2020)."""
    prediction: Literal["eps", "v", "x0"] = "eps"
    """Network target for ``ddpm``."""
    schedule: Literal["linear", "cosine"] = "linear"
    """``ddpm``: variance schedule over the ``timesteps`` steps: ``linear`` (Ho et al. 2020:
    betas 1e-4 to 0.02 at T = 1000, both ends scaled by 1000 / T) or ``cosine`` (Nichol &
    Dhariwal 2021). Ignored by ``edm``."""
    timesteps: int = 1000
    """``ddpm``: number T of diffusion steps (>= 2; the ``linear`` schedule needs T > 20);
    training draws t uniformly from 0 .. T-1, and the ``ddpm`` /
    ``ddim`` samplers visit some of them (``sampling.steps`` or ``sampling.timesteps``).
    Ignored by ``edm``."""
    p_mean: float = -1.2
    """EDM: mean of log(sigma) in training (log-normal noise levels)."""
    p_std: float = 1.2
    """EDM: standard deviation of log(sigma) in training (> 0). Ignored by ``ddpm``."""
    sigma_data: float | None = None
    """EDM: data standard deviation; ``None`` estimates it from the scaled training data."""
    sigma_min: float = 0.002
    """EDM: smallest non-zero noise level of generation and gap filling (the last level before
    0 of the Karras et al. grid; ``0 < sigma_min < sigma_max``); training does not use it.
    Ignored by ``ddpm``, which samples between its schedule's smallest and largest level."""
    sigma_max: float = 80.0
    """EDM: largest noise level: generation and gap filling start from ``N(0, sigma_max^2)``
    noise (80 is pure noise for data scaled to about [-1, 1]); training does not use it.
    Ignored by ``ddpm``."""
    lat_weighted: bool = True
    """Weight the loss by cos(latitude) area weights (normalised to mean 1)."""

    def validate(self, path: str) -> None:
        _require(self.timesteps >= 2, f"{path}.timesteps", self.timesteps, ">= 2")
        if self.parameterization == "ddpm" and self.schedule == "linear":
            _require(self.timesteps > 20, f"{path}.timesteps", self.timesteps,
                     "> 20 with schedule: linear (its betas, 1e-4..0.02 scaled by 1000 / T, "
                     "reach 1 below 21 steps), or schedule: cosine")
        _require(self.p_std > 0, f"{path}.p_std", self.p_std, "> 0")
        _require(0 < self.sigma_min < self.sigma_max, f"{path}.sigma_min", self.sigma_min,
                 f"0 < sigma_min < sigma_max ({self.sigma_max})")
        if self.sigma_data is not None:
            _require(self.sigma_data > 0, f"{path}.sigma_data", self.sigma_data, "> 0 or null")


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation loop."""

    steps: int = 1000
    """Optimizer steps of the whole run (>= 1; skipped non-finite steps count), also the
    length of the learning-rate schedule; a resumed run continues up to this step."""
    batch_size: int = 32
    """Global batch: samples per optimizer step over all torchrun processes (>= 1; must divide
    by their number), also the validation batch. A training split with fewer samples is
    repeated to fill it."""
    lr: float = 2e-4
    """Peak learning rate of AdamW (> 0), reached after ``warmup_steps`` and then shaped by
    ``lr_schedule``."""
    weight_decay: float = 0.0
    """AdamW (decoupled) weight decay (>= 0; 0: none); a resumed run applies the recipe's
    value."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up, from ``lr / warmup_steps`` to ``lr`` (>= 0;
    0: none)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After the warm-up: ``cosine`` decays the learning rate from ``lr`` to 0.1 ``lr`` at
    ``steps``; ``constant`` keeps ``lr``."""
    grad_clip: float = 1.0
    """Largest global L2 norm of the gradients; larger ones are scaled down to it before each
    optimizer step (>= 0; 0: no clipping)."""
    ema_halflife_steps: float = 100.0
    """EMA half-life in optimizer steps (decay = 0.5 ** (1 / half-life))."""
    ema_warmup_steps: int = 0
    """Steps during which the EMA simply copies the weights."""
    val_every: int = 250
    """Every this many steps (>= 1), and at the last one, log ``val_loss``: the EMA model's
    loss on up to 8 batches of ``batch_size`` of the validation split with fixed noise
    (``null`` without a validation split)."""
    checkpoint_every: int = 250
    """Write a checkpoint every this many steps (>= 1), and always at the last step and when
    ``max_time_s`` stops the run."""
    keep_last: int = 3
    """Newest checkpoints kept in ``RUN/checkpoints`` (>= 1); older ones are deleted after
    each save."""
    seed: int = 0
    """Seed of all randomness of training: initial weights, batch order, noise levels and
    noise, condition dropout and dropout masks (each step's from (seed, step): exact resume).
    ``geodiff quickstart`` also generates (and hides its gap-filling clouds) with it."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """``auto``: bf16 autocast on CUDA devices that support it, float32 elsewhere."""
    compile: bool = False
    """Wrap the training objective (network and loss) in ``torch.compile``: the first step
    compiles (slow), later ones may run faster (1.45x measured on an H100, no gain on 2 CPU
    cores). Validation and generation stay eager."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a NaN / inf training loss does: ``stop`` raises ``NonFiniteLossError`` naming the
    step, the batch and the last checkpoint; ``skip`` drops that step's update (the step still
    counts; logged records carry ``skipped_nonfinite``) and stops after 10 in a row."""
    max_time_s: float | None = None
    """Stop (and checkpoint) after this many seconds of training, whatever ``steps`` says."""
    num_workers: int = 0
    """DataLoader worker processes reading (and prefetching) training batches. 0 reads them
    in the training process: fastest when the data is in memory (``data.memory_budget_gb``);
    streamed data wants workers, which decompress in parallel with the training step."""
    log_every: int = 10
    """Append a record (step, loss, lr, elapsed_s) to ``metrics.jsonl`` every this many steps
    (>= 1); steps with a validation loss are always recorded."""

    def validate(self, path: str) -> None:
        _require(self.steps >= 1, f"{path}.steps", self.steps, ">= 1")
        _require(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, ">= 1")
        _require(self.num_workers >= 0, f"{path}.num_workers", self.num_workers, ">= 0")
        _require(self.lr > 0, f"{path}.lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, ">= 0")
        _require(self.max_time_s is None or self.max_time_s > 0, f"{path}.max_time_s",
                 self.max_time_s, "> 0 seconds, or null for no limit")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.ema_warmup_steps >= 0, f"{path}.ema_warmup_steps", self.ema_warmup_steps,
                 ">= 0")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        _require(self.ema_halflife_steps > 0, f"{path}.ema_halflife_steps",
                 self.ema_halflife_steps, "> 0")
        _require(self.keep_last >= 1, f"{path}.keep_last", self.keep_last, ">= 1")
        for name in ("val_every", "checkpoint_every", "log_every"):
            _require(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), ">= 1")


@dataclass(frozen=True)
class SamplingConfig:
    """Default ensemble generation settings (overridable per call)."""

    sampler: Literal["heun", "dpmpp", "ddim", "ddpm"] = "heun"
    """Default sampler of ``generate_ensemble`` / ``geodiff generate``: ``heun`` (Karras et al.
    2022, second order), ``dpmpp`` (DPM-Solver++(2M)), ``ddim`` (see ``eta``) or ``ddpm``
    (ancestral). Gap filling always uses RePaint and ignores it."""
    steps: int = 18
    """Noise levels the sampler visits (>= 1), as many denoiser calls (``heun``:
    ``2 * steps - 1``); ``ddpm`` / ``ddim`` on a DDPM model take that many evenly spaced
    schedule timesteps (at most ``diffusion.timesteps``, checked when generating) unless
    ``timesteps`` is set. Also the default number of levels of gap filling."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic, 1 = ancestral)."""
    guidance: float = 1.0
    """Classifier-free guidance scale (1 = plain conditional model)."""
    members: int = 32
    """Default members per condition cell of ``generate_ensemble`` / ``geodiff generate``, and
    the ensemble size of ``geodiff quickstart`` (gap filling there too); ``fill_gaps`` /
    ``geodiff fill-gaps`` default to 8 instead (>= 1)."""
    batch_size: int = 32
    """Samples (condition cell x member) run through the sampler together when generating or
    filling gaps (>= 1): larger is faster and needs more memory; changing it changes members
    by float32 round-off unless ``compute_batch`` is set."""
    compute_batch: int | None = None
    """Evaluate the network on exactly this many samples at a time (the last chunk of a batch
    padded by repeating a sample), so that member i is bit-identical whatever ``batch_size``:
    kernels choose their summation order by the batch shape. ``null``: the whole batch at
    once (fastest; another ``batch_size`` then changes members by float32 round-off)."""
    rho: float | None = None
    """Exponent of the Karras et al. (2022) noise-level spacing; ``.inf`` spaces the levels
    evenly in log sigma. ``null``: the sampler's default (``inf`` for dpmpp, 7 otherwise;
    :func:`geodiff.sampling.default_rho`)."""
    timesteps: tuple[int, ...] | None = None
    """``ddpm`` / ``ddim`` on a DDPM model (``diffusion.parameterization: ddpm``): visit these
    timesteps of the schedule (any subset of ``0 .. diffusion.timesteps - 1``, e.g. DDIM's
    quadratic sequence) instead of ``steps`` evenly spaced ones. ``null``: evenly spaced.
    Generation with another sampler ignores it."""

    def validate(self, path: str) -> None:
        _require(self.steps >= 1, f"{path}.steps", self.steps, ">= 1")
        if self.timesteps is not None:
            ts = self.timesteps
            _require(len(ts) > 0 and min(ts) >= 0, f"{path}.timesteps", list(ts),
                     "a non-empty list of timesteps >= 0, or null")
            _require(len(set(ts)) == len(ts), f"{path}.timesteps", list(ts),
                     "each timestep once")
            _require(self.sampler in ("ddpm", "ddim"), f"{path}.sampler", self.sampler,
                     "ddpm or ddim when sampling.timesteps is set (other samplers take "
                     "steps and rho)")
        _require(0.0 <= self.eta <= 1.0, f"{path}.eta", self.eta, "0 <= eta <= 1")
        _require(self.guidance >= 0, f"{path}.guidance", self.guidance, ">= 0")
        _require(self.members >= 1, f"{path}.members", self.members, ">= 1")
        _require(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, ">= 1")
        _require(self.compute_batch is None or self.compute_batch >= 1,
                 f"{path}.compute_batch", self.compute_batch, ">= 1 or null")
        _require(self.rho is None or self.rho > 0, f"{path}.rho", self.rho,
                 "> 0 (.inf for log-uniform levels) or null")


@dataclass(frozen=True)
class GapFillConfig:
    """Gap filling (inpainting) evaluation settings."""

    enabled: bool = False
    """Make ``geodiff quickstart`` run the gap-filling experiment with this recipe (train, hide
    ``cloud_fraction`` of each held-out field as clouds, fill them with ``sampling.members``
    members, score against a climatology) instead of the ensemble quickstart; ``fill_gaps``
    does not read it."""
    cloud_fraction: float = 0.3
    """Fraction of valid pixels hidden as artificial clouds in the held-out fields."""
    resample: int = 5
    """RePaint resampling jumps per step (Lugmayr et al. 2022)."""

    def validate(self, path: str) -> None:
        _require(0.0 < self.cloud_fraction < 1.0, f"{path}.cloud_fraction", self.cloud_fraction,
                 "0 < fraction < 1")
        _require(self.resample >= 1, f"{path}.resample", self.resample, ">= 1")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go."""

    dir: str = "geodiff-runs"
    """Default output folder (relative to the working directory): ``geodiff quickstart``
    writes everything there (the run in ``dir/run``); ``geodiff train`` without ``--out`` and
    :func:`geodiff.train.train` without ``run_dir`` train into ``dir/run``."""
    formats: tuple[Literal["netcdf", "zarr"], ...] = ("netcdf",)
    """Files ``geodiff quickstart`` writes its ensemble to (``ensemble.nc``, ``ensemble.zarr``;
    ``geodiff generate`` takes the format from the suffix of ``--out``)."""
    threshold: float | None = None
    """Threshold (physical units) of ``geodiff quickstart``'s exceedance-probability map;
    ``None``: the mean of the held-out observations, rounded to a whole unit."""

    def validate(self, path: str) -> None:
        _require(len(self.formats) >= 1, f"{path}.formats", list(self.formats),
                 "at least one of [netcdf, zarr]")


@dataclass(frozen=True)
class Recipe:
    """A full experiment: data, model, training and sampling."""

    name: str
    """Recipe name (required, non-empty); recorded in ensemble files (``geodiff_recipe``,
    ``title``) and in the gap-filling report."""
    data: DataConfig
    """Where the training fields come from (required section, :class:`DataConfig`)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Train / validation / test division (:class:`SplitConfig`; omitted: its defaults)."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Scaling of each variable to about [-1, 1] (:class:`ScalingConfig`; omitted: defaults)."""
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    """What the network is conditioned on (:class:`ConditioningConfig`; omitted: defaults)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The UNet (:class:`ModelConfig`; omitted: its defaults)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noising process and training objective (:class:`DiffusionConfig`; omitted: defaults)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The optimisation loop (:class:`TrainingConfig`; omitted: its defaults)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default generation settings (:class:`SamplingConfig`; omitted: its defaults)."""
    gapfill: GapFillConfig = field(default_factory=GapFillConfig)
    """Gap-filling settings (:class:`GapFillConfig`; omitted: its defaults)."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go (:class:`OutputConfig`; omitted: its defaults)."""
    description: str = ""
    """Free text for people (default: empty); kept with the recipe (``recipe.yaml``, the
    checkpoint) and not otherwise read."""

    def validate(self) -> Recipe:
        _require(bool(self.name), "name", self.name, "a non-empty string")
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value) and hasattr(value, "validate"):
                value.validate(f.name)
        cond = self.conditioning
        if self.sampling.timesteps is not None:
            _require(self.diffusion.parameterization == "ddpm", "sampling.timesteps",
                     list(self.sampling.timesteps), "null unless diffusion.parameterization is "
                     "ddpm (an EDM model has noise levels, not timesteps: use steps and rho)")
            _require(max(self.sampling.timesteps) < self.diffusion.timesteps,
                     "sampling.timesteps", list(self.sampling.timesteps),
                     f"timesteps below diffusion.timesteps ({self.diffusion.timesteps})")
        if (self.diffusion.parameterization == "ddpm" and self.sampling.timesteps is None
                and self.sampling.sampler in ("ddim", "ddpm")):
            _require(self.sampling.steps <= self.diffusion.timesteps, "sampling.steps",
                     self.sampling.steps, f"<= diffusion.timesteps ({self.diffusion.timesteps}):"
                     f" {self.sampling.sampler} visits that many of the model's timesteps")
        _require(self.sampling.guidance == 1.0 or cond.dropout > 0, "sampling.guidance",
                 self.sampling.guidance, "1 unless conditioning.dropout > 0: classifier-free "
                 "guidance extrapolates from the unconditional model, which only condition "
                 "dropout in training teaches (Ho & Salimans 2022; e.g. dropout: 0.1)")
        for key in ("fields", "static_fields"):
            both = [v for v in getattr(cond, key) if v in self.data.variables]
            _require(not both, f"conditioning.{key}", list(getattr(cond, key)),
                     f"variables other than data.variables: {both} would be given to the "
                     "network as the input it must generate")
        both = [v for v in cond.fields if v in cond.static_fields]
        _require(not both, "conditioning.static_fields", list(cond.static_fields),
                 f"variables other than conditioning.fields (both list {both})")
        if self.scaling.anomaly == "trend":
            _require(cond.year or self.scaling.trend_coord != "year", "scaling.anomaly", "trend",
                     "conditioning.year: true (the trend is a function of the year, so the model"
                     " must know it)")
        return self

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, assignments: list[str] | tuple[str, ...]) -> Recipe:
        """Apply ``section.key=value`` overrides (value parsed as YAML)."""
        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            node = data
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is not a "
                                      f"section; sections are {sorted(data)}")
                node = node[part]
            node[parts[-1]] = yaml.safe_load(raw)
        return recipe_from_dict(data)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from plain YAML data."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    recipe = _build(Recipe, data, "")
    return recipe.validate()


def load_recipe(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (a path, or the name of a bundled recipe such as ``quickstart``)."""
    path = resolve_recipe_path(path_or_name)
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    try:
        recipe = recipe_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return recipe.override(list(overrides)) if overrides else recipe


def bundled_recipes() -> dict[str, Path]:
    """Names and paths of the recipes shipped with geodiff."""
    here = Path(__file__).resolve().parent
    out: dict[str, Path] = {}
    for folder in (here / "recipes", here.parent / "recipes"):
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    known = bundled_recipes()
    if str(path_or_name) in known:
        return known[str(path_or_name)]
    raise ConfigError(f"recipe {str(path_or_name)!r} is neither a file nor a bundled recipe; "
                      f"bundled recipes are {sorted(known)}")


# ---------------------------------------------------------------------------------------
# helpers


_INFINITE_OK = frozenset({"sampling.rho"})
"""Float keys for which ``.inf`` means something (log-uniform noise levels)."""


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {rule}")


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {[_join(path, k) for k in unknown]}; "
                          f"allowed keys in {where}: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(path, name)!r}")
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path} must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path} = {value!r}: "
                          + " / ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in allowed:
            raise ConfigError(f"{path} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:  # a single item is accepted for a list
                value = [value]
            else:
                raise ConfigError(f"{path} = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path} = {value!r} must have {len(args)} items")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string: accept what float() parses
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path} = {value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} must be a number")
        if math.isnan(value) or (math.isinf(value) and path not in _INFINITE_OK):
            raise ConfigError(f"{path} = {value!r} must be a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads an unquoted 1860-01-01 as a date
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} must be a string")
        return str(value)
    if tp is typing.Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # internal: a dataclass bug
