"""Samplers for any denoiser ``D(x, sigma) -> x0_hat`` in the variance-exploding form
``x = x0 + sigma eps`` (DDPM models via :class:`geodiff.diffusion.DDPMDenoiser`, EDM models via
:class:`geodiff.edm.EDMPrecond`; condition, fields and guidance bound in a closure).

Every random number of ensemble member ``b`` (its initial noise and the noise of every
stochastic step) is drawn from ``generators[b]``, in the same order whatever the batch, so a
member is reproduced bit for bit alone or inside any batch (given a denoiser that treats batch
rows independently).

Network evaluations (NFE): one denoiser call on the whole batch counts as one evaluation;
``sample(..., return_nfe=True)`` returns the count next to the samples.  For ``steps = N``
noise levels: ``ddpm``, ``ddim`` and ``dpmpp`` use N, ``heun`` 2N - 1 (no second-order
correction on the last step to sigma = 0), :func:`inpaint` (N - 1) * resample + 1.  A
:func:`guided` denoiser costs two network evaluations per call (one when ``scale`` is 1 or 0).
"""

from __future__ import annotations

import collections
import math
import numbers
import reprlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from geodiff.diffusion import VARIANCES, Schedule
from geodiff.edm import karras_sigmas

SAMPLERS = ("ddpm", "ddim", "dpmpp", "heun")

Denoiser = Callable[[Tensor, Tensor], Tensor]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls in ``calls`` (one call = one batched evaluation)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma)


def guided(denoiser_cond: Denoiser, denoiser_uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, in x0 form):
    ``D(x, sigma) = D_uncond + scale (D_cond - D_uncond)``.

    ``scale = 1`` returns ``denoiser_cond`` itself and ``scale = 0`` ``denoiser_uncond`` (one
    evaluation per call instead of two).
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{scale=} must be a finite number >= 0 (1 = no guidance)")
    if scale == 1:
        return denoiser_cond
    if scale == 0:
        return denoiser_uncond

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        uncond = denoiser_uncond(x, sigma)
        return uncond + scale * (denoiser_cond(x, sigma) - uncond)

    return denoiser


def sigma_grid(sampler: str, steps: int | None, *, sigma_min: float | None = None,
               sigma_max: float | None = None, rho: float | None = None,
               schedule: Schedule | None = None,
               timesteps: Sequence[int] | None = None) -> Tensor:
    """The noise levels a sampler visits: float64 (steps + 1,), decreasing, last one 0.

    Rule: with a DDPM ``schedule``, ``ddpm`` and ``ddim`` use the schedule's own levels at the
    evenly spaced timesteps ``round(linspace(T-1, 0, steps))`` (all T timesteps when
    ``steps = T``: Ho et al.'s sampler exactly; the last step goes from ``sigmas[0]`` to 0,
    Ho et al.'s t = 1 -> 0), or at the given ``timesteps``: any subset of ``0 .. T-1``, in
    any order, visited from the largest down (e.g. the quadratic sequence of Song et al.
    2021, appendix D.2, which spends more steps at low noise); ``steps`` is then
    ``len(timesteps)`` or None.  Otherwise (``heun``, ``dpmpp``, or no schedule) the Karras
    et al. (2022, eq. 5) levels between ``sigma_min`` and ``sigma_max``, which default to the
    schedule's smallest and largest level when a schedule is given.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"{sampler=} is not known; choose one of {SAMPLERS}")
    if timesteps is not None:
        order = torch.tensor(checked_timesteps(sampler, steps, schedule, timesteps))
        return torch.cat([schedule.sigmas[order], torch.zeros(1, dtype=torch.float64)])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{steps=} must be an integer >= 1 (or, for ddpm / ddim on a DDPM "
                         "schedule, give timesteps=)")
    if schedule is not None and sampler in ("ddpm", "ddim"):
        if steps > schedule.timesteps:
            raise ValueError(f"{steps=} exceeds the schedule's {schedule.timesteps} timesteps; "
                             f"use steps <= {schedule.timesteps}")
        ts = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    if schedule is not None:
        sigma_min = float(schedule.sigmas[0]) if sigma_min is None else sigma_min
        sigma_max = float(schedule.sigmas[-1]) if sigma_max is None else sigma_max
    if sigma_min is None or sigma_max is None:
        raise ValueError(f"{sigma_min=}, {sigma_max=}: give both noise-level bounds, or a "
                         "DDPM schedule to take them from")
    rho = default_rho(sampler) if rho is None else rho
    return karras_sigmas(steps, sigma_min, sigma_max, rho)


def checked_timesteps(sampler: str, steps: int | None, schedule: Schedule | None,
                      timesteps: Sequence[int]) -> list[int]:
    """``timesteps`` (a list, tuple, NumPy array or tensor of integers) validated for
    ``sampler`` on ``schedule`` and sorted from the largest down; ``steps``, if not None,
    must equal their number. Raises ValueError naming the value and the fix."""
    if schedule is None or sampler not in ("ddpm", "ddim"):
        raise ValueError(f"timesteps= picks levels of a DDPM schedule: it needs schedule= and "
                         f"sampler 'ddpm' or 'ddim' (got {sampler=}, schedule="
                         f"{'given' if schedule is not None else None}); other samplers take "
                         "steps with sigma_min/sigma_max/rho")
    ts = timesteps.tolist() if hasattr(timesteps, "tolist") else list(timesteps)
    if not ts or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                         for t in ts):
        raise ValueError(f"timesteps={reprlib.repr(ts)} must be a non-empty sequence of "
                         "integers")
    ts = [int(t) for t in ts]
    bad = [t for t in ts if not 0 <= t < schedule.timesteps]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the schedule's 0 .. "
                         f"{schedule.timesteps - 1}")
    repeated = sorted(t for t, k in collections.Counter(ts).items() if k > 1)
    if repeated:
        raise ValueError(f"timesteps repeat {repeated}; give each timestep once")
    if steps is not None and steps != len(ts):
        raise ValueError(f"{steps=} disagrees with the {len(ts)} timesteps given; leave steps "
                         "out (None) or make it len(timesteps)")
    return sorted(ts, reverse=True)


def default_rho(sampler: str) -> float:
    """Noise-level spacing exponent used when none is given: ``inf`` (even in log sigma,
    i.e. log-SNR uniform, as Lu et al. 2022 recommend for low-resolution data) for
    DPM-Solver++, Karras et al.'s ``7`` for every other sampler.

    On the analytic Gaussian of ``benchmarks/bench_model.py`` DPM-Solver++(2M) matches
    1000-step DDPM from 16 evaluations on with log-SNR spacing, 30 with ``rho = 7``; on the
    quickstart model it lowers the spread-skill ratio from 1.17 to 1.11 at 12 steps.
    """
    return math.inf if sampler == "dpmpp" else 7.0


class _MemberNoise:
    """Unit Gaussian noise (B, C, H, W) whose row b comes from ``generators[b]``.

    Each member's generator fills ``chunk`` fields at a time (a rule that depends on the field
    size only, never on the batch), which are handed out one per call: the draws of member b
    are the same whatever the batch it is in, at a fraction of the per-call overhead.
    """

    _MAX_BUFFERED = 2**18  # values buffered per member

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int],
                 device: torch.device, dtype: torch.dtype):
        self.generators = generators
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        self.chunk = max(1, min(64, self._MAX_BUFFERED // max(1, math.prod(self.shape))))
        self.buffer: Tensor | None = None
        self.used = self.chunk

    def __call__(self) -> Tensor:
        if self.used == self.chunk:
            rows = [torch.randn((self.chunk, *self.shape), generator=g, device=g.device,
                                dtype=self.dtype) for g in self.generators]
            self.buffer = torch.stack(rows, 1).to(self.device)  # (chunk, B, C, H, W)
            self.used = 0
        self.used += 1
        return self.buffer[self.used - 1]


def _check_generators(generators: Sequence[torch.Generator], batch: int) -> None:
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generators must hold one torch.Generator per member: got "
                         f"{len(generators)} items for batch size {batch}")


def _resolve_device(denoiser: Denoiser, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(denoiser, nn.Module):
        param = next(denoiser.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _initial(noise: _MemberNoise, sigma_max: float, vp: bool) -> Tensor:
    """x at the first level: N(0, sigma_max^2 I) (Karras et al.), or N(0, (1 + sigma_max^2) I)
    with a DDPM schedule, i.e. x_T^VP ~ N(0, I) as in Ho et al. (2020), Algorithm 2."""
    return math.sqrt(sigma_max**2 + (1.0 if vp else 0.0)) * noise()


def _ancestral_step(x: Tensor, x0: Tensor, s_t: float, s_s: float, noise: _MemberNoise,
                    variance: str) -> Tensor:
    """A draw of p(x_s | x_t) from level ``s_t`` to ``s_s < s_t`` in VE form.

    The mean is the posterior mean ``x0 + (s_s^2 / s_t^2)(x - x0)`` (Ho et al. 2020, eq. 7
    divided by ``sqrt(alpha_bar_s)``); the variance is the exact posterior variance
    ``s_s^2 (1 - s_s^2 / s_t^2)`` (``beta_tilde``) or the larger
    ``(s_t^2 - s_s^2)(1 + s_s^2) / (1 + s_t^2)`` (``beta``: Ho et al.'s sigma_t^2 = beta_t,
    with the respaced ``beta = 1 - alpha_bar_t / alpha_bar_s`` for skipped steps).  Going to
    ``s_s = 0`` returns ``x0`` (no noise on the last step, Algorithm 2).
    """
    if s_s == 0:
        return x0
    ratio = s_s**2 / s_t**2
    if variance == "beta_tilde":
        var = s_s**2 * (1.0 - ratio)
    else:
        var = (s_t**2 - s_s**2) * (1.0 + s_s**2) / (1.0 + s_t**2)
    return x0 + ratio * (x - x0) + math.sqrt(var) * noise()


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)  # (B,)


def sample(denoiser: Denoiser, shape: Sequence[int], generators: Sequence[torch.Generator], *,
           sampler: str, steps: int | None = None, sigma_min: float | None = None,
           sigma_max: float | None = None, rho: float | None = None, eta: float = 0.0,
           schedule: Schedule | None = None, timesteps: Sequence[int] | None = None,
           variance: str = "beta_tilde",
           churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
           s_noise: float = 1.0, device: str | torch.device | None = None,
           return_nfe: bool = False) -> Tensor | tuple[Tensor, int]:
    """Draw ``shape[0]`` fields from the model behind ``denoiser``.

    Parameters
    ----------
    denoiser
        ``D(x (B, C, H, W), sigma (B,)) -> x0_hat (B, C, H, W)``.
    shape
        (B, C, H, W) of the result.
    generators
        B generators; ``generators[b]`` draws every random number of member b.
    sampler
        ``"ddpm"``: ancestral sampling (Ho et al. 2020, Algorithm 2) with posterior variance
        ``variance`` (``"beta_tilde"`` or ``"beta"``, see :func:`_ancestral_step`);
        ``"ddim"``: Song et al. (2021, eq. 12) with stochasticity ``eta`` (0: deterministic,
        the Euler step of the probability-flow ODE; 1: ancestral with ``beta_tilde``);
        ``"dpmpp"``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, data prediction,
        multistep in ``lambda = -log sigma``), deterministic;
        ``"heun"``: Karras et al. (2022), Algorithm 1, or Algorithm 2 with ``churn`` > 0
        (``S_churn``, applied where ``s_tmin <= sigma <= s_tmax``, noise scaled by
        ``s_noise``).
    steps, sigma_min, sigma_max, rho, schedule, timesteps
        The noise levels, see :func:`sigma_grid` (``timesteps``: an explicit subset of a
        DDPM schedule's timesteps for ``ddpm`` / ``ddim``, instead of ``steps`` evenly
        spaced ones).
    device
        Where the sampling runs; default: the denoiser's parameters' device (else CPU).
    return_nfe
        Also return the number of denoiser evaluations (see module docstring).

    Returns
    -------
    (B, C, H, W) float32 samples, or ``(samples, nfe)``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"{sampler=} is not known; choose one of {SAMPLERS}")
    if len(shape) != 4:
        raise ValueError(f"{shape=} must be (B, C, H, W)")
    _check_generators(generators, shape[0])
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{eta=} must be in [0, 1] (0 = deterministic DDIM)")
    if variance not in VARIANCES:
        raise ValueError(f"{variance=} is not known; choose one of {VARIANCES}")
    if not (churn >= 0 and s_noise >= 0):
        raise ValueError(f"{churn=} and {s_noise=} must be >= 0")
    grid = sigma_grid(sampler, steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                      schedule=schedule, timesteps=timesteps).tolist()
    dev = _resolve_device(denoiser, device)
    noise = _MemberNoise(generators, shape[1:], dev, torch.float32)
    counted = CountingDenoiser(denoiser)
    x = _initial(noise, grid[0], vp=schedule is not None)
    pairs = list(zip(grid[:-1], grid[1:]))
    if sampler == "ddpm":
        for s_t, s_s in pairs:
            x = _ancestral_step(x, counted(x, _sigma_batch(s_t, x)), s_t, s_s, noise, variance)
    elif sampler == "ddim":
        for s_t, s_s in pairs:
            x = _ddim_step(x, counted(x, _sigma_batch(s_t, x)), s_t, s_s, eta, noise)
    elif sampler == "dpmpp":
        x = _dpmpp_2m(counted, x, pairs)
    else:
        gamma_max = min(churn / len(pairs), math.sqrt(2.0) - 1.0)
        for s_t, s_s in pairs:
            gamma = gamma_max if s_tmin <= s_t <= s_tmax else 0.0
            x = _heun_step(counted, x, s_t, s_s, gamma, s_noise, noise)
    x = x.float()  # the last step returns the denoiser's output, whatever its dtype
    return (x, counted.calls) if return_nfe else x


def _ddim_step(x: Tensor, x0: Tensor, s_t: float, s_s: float, eta: float,
               noise: _MemberNoise) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in VE form: ``x_s = x0 + sqrt(s_s^2 - v) eps_hat +
    sqrt(v) z`` with ``eps_hat = (x - x0) / s_t`` and ``v = eta^2 s_s^2 (1 - s_s^2 / s_t^2)``
    (eq. 16's sigma divided by ``sqrt(alpha_bar_s)``)."""
    if s_s == 0:
        return x0
    var = eta**2 * s_s**2 * (1.0 - s_s**2 / s_t**2)
    x_s = x0 + math.sqrt(s_s**2 - var) * (x - x0) / s_t
    return x_s + math.sqrt(var) * noise() if var > 0 else x_s


def _dpmpp_2m(denoiser: Denoiser, x: Tensor, pairs: list[tuple[float, float]]) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in VE form with ``lambda = -log sigma``:
    ``x_s = (s_s / s_t) x - expm1(-h) D_hat``, ``h = lambda_s - lambda_t``, where ``D_hat`` is
    the denoised estimate, linearly extrapolated from the previous step
    (``(1 + 1/(2r)) D_t - 1/(2r) D_prev``, ``r = h_prev / h``) after the first step; the last
    step to sigma = 0 returns the denoised estimate."""
    x0_prev, h_prev = None, None
    for s_t, s_s in pairs:
        x0 = denoiser(x, _sigma_batch(s_t, x))
        if s_s == 0:
            return x0
        h = math.log(s_t / s_s)
        if x0_prev is None:
            x0_hat = x0
        else:
            r = h_prev / h
            x0_hat = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
        x = (s_s / s_t) * x - math.expm1(-h) * x0_hat
        x0_prev, h_prev = x0, h
    return x


def _heun_step(denoiser: Denoiser, x: Tensor, s_t: float, s_s: float, gamma: float,
               s_noise: float, noise: _MemberNoise) -> Tensor:
    """One step of Karras et al. (2022), Algorithm 2 (Algorithm 1 when ``gamma = 0``):
    raise the noise to ``s_hat = (1 + gamma) s_t``, Euler step of ``dx/dsigma = (x - D) /
    sigma`` to ``s_s``, then the trapezoidal (Heun) correction unless ``s_s = 0``.  The Euler
    step to ``s_s = 0``, ``x - s_hat (x - D) / s_hat``, is ``D`` exactly and returned as such
    (in float32 the difference would leave a rounding error of order ``ulp(x)``)."""
    s_hat = s_t * (1.0 + gamma)
    if gamma > 0:
        x = x + math.sqrt(s_hat**2 - s_t**2) * s_noise * noise()
    denoised = denoiser(x, _sigma_batch(s_hat, x))
    if s_s == 0:
        return denoised
    d = (x - denoised) / s_hat
    x_next = x + (s_s - s_hat) * d
    d_next = (x_next - denoiser(x_next, _sigma_batch(s_s, x_next))) / s_s
    return x + (s_s - s_hat) * 0.5 * (d + d_next)


def inpaint(denoiser: Denoiser, observed: Tensor, known_mask: Tensor,
            generators: Sequence[torch.Generator], *, steps: int,
            sigma_min: float | None = None, sigma_max: float | None = None,
            rho: float | None = None,
            resample: int = 5, schedule: Schedule | None = None,
            device: str | torch.device | None = None,
            return_nfe: bool = False) -> Tensor | tuple[Tensor, int]:
    """Gap filling: complete partly observed fields, RePaint style (Lugmayr et al. 2022,
    Algorithm 1) in VE form.

    At each step from level ``s_t`` to ``s_s`` the known pixels are the observation noised to
    ``s_s`` (``observed + s_s z``), the unknown ones an ancestral step (``beta_tilde``
    variance) of the current state; the merged state is sent back to ``s_t`` by adding
    ``N(0, (s_t^2 - s_s^2) I)`` and the step repeated, ``resample`` times in all (jump length
    1), so the unknown pixels harmonise with the known ones.  The output holds the observed
    values exactly where ``known_mask`` is True.

    Parameters
    ----------
    observed
        (B, C, H, W); values where ``known_mask`` is False are ignored (may be NaN).
    known_mask
        bool, broadcastable to ``observed``; True = observed.
    generators
        One per member (row of ``observed``), drawing all of its random numbers.
    steps, sigma_min, sigma_max, rho, schedule
        Noise levels as for the ``ddpm`` sampler, see :func:`sigma_grid`.
    resample
        RePaint's U >= 1 (1 = plain replacement-based conditioning).
    """
    if observed.dim() != 4:
        raise ValueError(f"{observed.shape=} must be (B, C, H, W)")
    if known_mask.dtype != torch.bool:
        raise TypeError(f"{known_mask.dtype=} must be torch.bool (True = observed pixel)")
    try:
        mask = torch.broadcast_to(known_mask, observed.shape)
    except RuntimeError:
        raise ValueError(f"{known_mask.shape=} does not broadcast to {observed.shape=}") from None
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"{resample=} must be an integer >= 1")
    _check_generators(generators, observed.shape[0])
    grid = sigma_grid("ddpm", steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                      schedule=schedule).tolist()
    dev = _resolve_device(denoiser, device)
    mask = mask.to(dev)
    obs = torch.where(mask, observed.to(dev, torch.float32), 0.0)
    noise = _MemberNoise(generators, observed.shape[1:], dev, torch.float32)
    counted = CountingDenoiser(denoiser)
    x = _initial(noise, grid[0], vp=schedule is not None)
    for s_t, s_s in zip(grid[:-1], grid[1:]):
        for u in range(resample if s_s > 0 else 1):
            x0 = counted(x, _sigma_batch(s_t, x))
            unknown = _ancestral_step(x, x0, s_t, s_s, noise, "beta_tilde")
            known = obs + s_s * noise() if s_s > 0 else obs
            x_s = torch.where(mask, known, unknown)
            if u < resample - 1 and s_s > 0:
                x = x_s + math.sqrt(s_t**2 - s_s**2) * noise()
        x = x_s
    out = torch.where(mask, obs, x)
    return (out, counted.calls) if return_nfe else out
