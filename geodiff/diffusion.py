"""The discrete-time diffusion process of Ho et al. (2020), "Denoising Diffusion Probabilistic
Models" (DDPM), and its variance-exploding (VE) view.

Index convention: the timestep index ``t`` here runs over ``0 .. T-1`` and stands for Ho et
al.'s ``t = 1 .. T`` (index 0 is their ``x_1``, the last latent before the data).  All schedule
quantities are precomputed in float64.

The VE view used by every sampler: ``x_t^VP = sqrt(alpha_bar_t) (x_0 + sigma_t eps)`` with
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, so ``x = x_t^VP / sqrt(alpha_bar_t)`` is
``x_0 + sigma_t eps`` and ``alpha_bar = 1 / (1 + sigma^2)`` (Karras et al. 2022, Table 1, VP
column with the scaling ``s(t)`` divided out).  :class:`DDPMDenoiser` turns a DDPM network into a
denoiser ``D(x, sigma) -> x0_hat`` on that form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PREDICTIONS = ("eps", "v", "x0")
SCHEDULES = ("linear", "cosine")
VARIANCES = ("beta_tilde", "beta")

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A variance schedule and the quantities derived from it, all float64 tensors of shape (T,).

    ``posterior_mean_coef1`` multiplies ``x_0`` and ``posterior_mean_coef2`` multiplies ``x_t``
    in the posterior mean ``mu_tilde`` (Ho et al. 2020, eq. 7); ``beta_tilde`` is the posterior
    variance (eq. 7), zero at index 0.  ``sigmas`` are the VE noise levels
    ``sqrt((1 - alpha_bar) / alpha_bar)``, strictly increasing.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    beta_tilde: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    sigmas: Tensor

    @property
    def timesteps(self) -> int:
        """Number of diffusion steps T."""
        return int(self.betas.shape[0])


def make_schedule(kind: str, timesteps: int) -> Schedule:
    """Variance schedule ``beta_1 .. beta_T`` and its derived quantities.

    Parameters
    ----------
    kind
        ``"linear"``: Ho et al. (2020) betas from 1e-4 to 0.02 for T = 1000, both ends scaled
        by ``1000 / T`` for other T (Nichol & Dhariwal 2021, ``get_named_beta_schedule``);
        ``"cosine"``: ``alpha_bar(t) = cos^2(pi/2 (t/T + s) / (1 + s))`` with s = 0.008 and
        betas clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17).
    timesteps
        T >= 2.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"{kind=} is not a known schedule; choose one of {SCHEDULES}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"{timesteps=} must be an integer >= 2")
    f64 = torch.float64
    if kind == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=f64)
    else:
        s = 0.008
        u = torch.arange(timesteps + 1, dtype=f64) / timesteps
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # (T + 1,)
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    if not bool((betas < 1).all()):
        raise ValueError(f"{timesteps=} is too small for the {kind} schedule: some beta >= 1")
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=f64), alpha_bar[:-1]])
    # Ho et al. 2020, eq. 7
    beta_tilde = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    coef1 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
    coef2 = (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar)
    sigmas = ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return Schedule(betas, alphas, alpha_bar, alpha_bar_prev, beta_tilde, coef1, coef2, sigmas)


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` as (B, 1, ..., 1) in the dtype and on the device of ``like``."""
    out = values[t.to(values.device).long()].to(like.dtype).to(like.device)
    return out.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)


def _vp_coefficients(s: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` as (B, 1, 1, 1) in ``like``'s dtype.

    Both are formed in float64 before the cast: ``1 - alpha_bar`` taken after rounding
    ``alpha_bar`` to float32 cancels near ``alpha_bar = 1`` (a 2.6e-4 relative error in the
    noise level at t = 0 of the 1000-step cosine schedule).
    """
    return _at(s.alpha_bar.sqrt(), t, like), _at((1.0 - s.alpha_bar).sqrt(), t, like)


def q_mean_variance(s: Schedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``sqrt(alpha_bar_t) x_0`` and variance ``1 - alpha_bar_t`` of q(x_t | x_0) (eq. 4).

    ``x0`` (B, C, H, W), ``t`` (B,) int; the variance is returned as (B, 1, 1, 1).
    """
    return _at(s.alpha_bar.sqrt(), t, x0) * x0, _at(1.0 - s.alpha_bar, t, x0)


def q_sample(s: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """A draw ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` of q(x_t | x_0)
    (Ho et al. 2020, eq. 4); ``x0`` and ``noise`` (B, C, H, W), ``t`` (B,)."""
    sqrt_a, sqrt_1ma = _vp_coefficients(s, t, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def q_posterior(s: Schedule, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``mu_tilde(x_t, x_0)`` and variance ``beta_tilde_t`` of q(x_{t-1} | x_t, x_0)
    (Ho et al. 2020, eq. 6-7); ``x0``, ``xt`` (B, C, H, W), ``t`` (B,) in 1 .. T-1 (index 0
    has the data itself as "previous" step: mean ``x0``, variance 0)."""
    mean = _at(s.posterior_mean_coef1, t, x0) * x0 + _at(s.posterior_mean_coef2, t, xt) * xt
    return mean, _at(s.beta_tilde, t, x0)


# -- parameterisations of the network output (Ho et al. 2020 eq. 11; Salimans & Ho 2022) ---


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"{prediction=} is not known; choose one of {PREDICTIONS}")


def prediction_target(prediction: str, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """What the network learns to output for ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, a = alpha_bar.

    ``"eps"``: eps (Ho et al. 2020, eq. 14); ``"x0"``: x0; ``"v"``:
    ``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022, sec. 4).  ``alpha_bar``
    broadcasts against ``x0`` (e.g. (B, 1, 1, 1)).
    """
    return _target(prediction, x0, eps, alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())


def predict_x0(prediction: str, out: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x0_hat`` from a network output ``out`` at the VP input ``xt`` (inverse of
    :func:`prediction_target`): eps -> ``(xt - sqrt(1-a) eps) / sqrt(a)`` (eq. 15),
    v -> ``sqrt(a) xt - sqrt(1-a) v``."""
    return _x0_from(prediction, out, xt, alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())


def predict_eps(prediction: str, out: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
    """``eps_hat`` from a network output ``out`` at the VP input ``xt``: x0 ->
    ``(xt - sqrt(a) x0) / sqrt(1-a)``, v -> ``sqrt(1-a) xt + sqrt(a) v``."""
    return _eps_from(prediction, out, xt, alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())


# The same three maps on the coefficients ``sqrt_a = sqrt(alpha_bar)`` and ``sqrt_1ma =
# sqrt(1 - alpha_bar)``, which callers form without cancellation (see _vp_coefficients).


def _target(prediction: str, x0: Tensor, eps: Tensor, sqrt_a: Tensor, sqrt_1ma: Tensor
            ) -> Tensor:
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return sqrt_a * eps - sqrt_1ma * x0


def _x0_from(prediction: str, out: Tensor, xt: Tensor, sqrt_a: Tensor, sqrt_1ma: Tensor
             ) -> Tensor:
    _check_prediction(prediction)
    if prediction == "eps":
        return (xt - sqrt_1ma * out) / sqrt_a
    if prediction == "x0":
        return out
    return sqrt_a * xt - sqrt_1ma * out


def _eps_from(prediction: str, out: Tensor, xt: Tensor, sqrt_a: Tensor, sqrt_1ma: Tensor
              ) -> Tensor:
    _check_prediction(prediction)
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (xt - sqrt_a * out) / sqrt_1ma
    return sqrt_1ma * xt + sqrt_a * out


# -- losses -------------------------------------------------------------------------------


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean squared error ``sum(w (pred - target)^2) / sum(w)`` (a 0-d float32 tensor).

    ``weight`` (broadcastable to ``pred``, e.g. cos-lat area weights times the validity mask)
    must be finite and >= 0.  Pixels of weight 0 contribute nothing, not even a NaN: their
    target may be NaN and they receive an exactly zero gradient.  With weights all equal the
    result is the plain mean.  An all-zero weight gives NaN (0 / 0), which the trainer reports.
    """
    if pred.shape != target.shape:
        raise ValueError(f"{pred.shape=} and {target.shape=} must be equal")
    w = torch.broadcast_to(weight, pred.shape).float()
    diff = torch.where(w > 0, pred.float() - target.float(), 0.0)
    return (w * diff.square()).sum() / w.sum()


def _clean(x0: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``x0`` with NaNs set to 0 and ``weight`` set to 0 wherever ``x0`` is not finite."""
    finite = torch.isfinite(x0)
    return torch.where(finite, x0, 0.0), torch.broadcast_to(weight, x0.shape) * finite


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Unit Gaussian noise like ``x``, drawn on the generator's device, moved to ``x``'s."""
    return torch.randn(x.shape, generator=generator, device=generator.device,
                       dtype=x.dtype).to(x.device)


def _net_input(x: Tensor, fields: Tensor | None) -> Tensor:
    """``x`` (B, C, H, W) with the extra fields (B or 1, F, H, W) concatenated as channels."""
    if fields is None or fields.shape[-3] == 0:
        return x
    if fields.dim() == 3:
        fields = fields.unsqueeze(0)  # (1, F, H, W)
    fields = fields.to(dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1, -1)
    return torch.cat([x, fields], 1)  # (B, C + F, H, W)


def ddpm_loss(net: nn.Module, s: Schedule, x0: Tensor, weight: Tensor, *,
              fields: Tensor | None = None, cond: Tensor | None = None,
              prediction: str = "eps", generator: torch.Generator | None,
              cond_drop: Tensor | None = None, t: Tensor | None = None,
              noise: Tensor | None = None) -> Tensor:
    """The simple DDPM training loss (Ho et al. 2020, eq. 14, Algorithm 1) with an eps, v or
    x0 target, weighted by ``weight`` through :func:`weighted_mse`.

    Parameters
    ----------
    net
        ``net(x_in (B, C+F, H, W), noise_label (B,), cond, cond_drop) -> (B, C, H, W)``; the
        noise label is the timestep index as float (the same units :class:`DDPMDenoiser` uses).
    x0, weight
        (B, C, H, W) clean fields and per-pixel weights; NaN pixels of ``x0`` get weight 0.
    t, noise
        Timesteps (B,) int in 0..T-1 and unit Gaussian noise like ``x0``; each one not given is
        drawn from ``generator`` (t uniformly, Algorithm 1 line 3).
    """
    _check_prediction(prediction)
    if (t is None or noise is None) and generator is None:
        raise ValueError("generator=None: pass a torch.Generator, or both t and noise")
    x0, weight = _clean(x0, weight)
    if t is None:
        dev = generator.device
        t = torch.randint(0, s.timesteps, (x0.shape[0],), generator=generator, device=dev)
    t = t.to(x0.device).long()
    noise = _randn_like(x0, generator) if noise is None else noise.to(x0)
    sqrt_a, sqrt_1ma = _vp_coefficients(s, t, x0)
    xt = sqrt_a * x0 + sqrt_1ma * noise
    out = net(_net_input(xt, fields), t.to(x0.dtype), cond, cond_drop)
    return weighted_mse(out, _target(prediction, x0, noise, sqrt_a, sqrt_1ma), weight)


class DDPMDenoiser(nn.Module):
    """A DDPM network seen as a VE denoiser ``D(x, sigma) -> x0_hat``.

    ``x = x0 + sigma eps`` is mapped to the network's VP input ``x / sqrt(1 + sigma^2)`` and
    its continuous timestep label by linear interpolation of ``log sigma`` over the schedule's
    ``log sigmas`` (so ``sigma = schedule.sigmas[t]`` gives label ``t``; levels outside the
    schedule's range are clamped to labels 0 and T-1).  The network output is converted to
    ``x0_hat`` according to ``prediction``.  Classifier-free guidance: ``cond_drop`` (B,) bool
    is passed to the network (True = null condition).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule (make_schedule), got {type(schedule)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.register_buffer("log_sigmas", schedule.sigmas.log().float(), persistent=False)

    def timestep_label(self, sigma: Tensor) -> Tensor:
        """Continuous timestep label (B,) for noise levels ``sigma`` (B,)."""
        log_sigma = sigma.float().clamp_min(1e-20).log()
        ls = self.log_sigmas
        hi = torch.searchsorted(ls, log_sigma).clamp(1, ls.shape[0] - 1)
        frac = ((log_sigma - ls[hi - 1]) / (ls[hi] - ls[hi - 1])).clamp(0.0, 1.0)
        return (hi - 1).float() + frac

    def forward(self, x: Tensor, sigma: Tensor, fields: Tensor | None = None,
                cond: Tensor | None = None, cond_drop: Tensor | None = None) -> Tensor:
        """``x0_hat`` (B, C, H, W) for ``x`` (B, C, H, W) at VE noise levels ``sigma`` (B,)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        # sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2), sqrt(1 - alpha_bar) = sigma sqrt(alpha_bar):
        # no 1 - alpha_bar, which cancels in float32 for small sigma (all of it below 2.4e-4)
        sqrt_a = (1.0 + sigma.square()).rsqrt().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        sqrt_1ma = sigma.reshape(-1, 1, 1, 1) * sqrt_a
        xt = x * sqrt_a
        out = self.net(_net_input(xt, fields), self.timestep_label(sigma), cond, cond_drop)
        return _x0_from(self.prediction, out.to(x.dtype), xt, sqrt_a, sqrt_1ma)

    def eps(self, xt: Tensor, t: Tensor, fields: Tensor | None = None,
            cond: Tensor | None = None, cond_drop: Tensor | None = None) -> Tensor:
        """The discrete eps prediction ``eps_theta(x_t, t)`` (B, C, H, W) at the VP input
        ``xt`` and integer timesteps ``t`` (B,) (Ho et al. 2020, eq. 11)."""
        t = t.to(xt.device).long()
        out = self.net(_net_input(xt, fields), t.to(xt.dtype), cond, cond_drop)
        return _eps_from(self.prediction, out.to(xt.dtype), xt,
                         *_vp_coefficients(self.schedule, t, xt))


# -- the variational bound (Ho et al. 2020, eq. 5 and sec. 3.3) ------------------------------


def _normal_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * ((var2 / var1).log() + (var1 + (mean1 - mean2).square()) / var2 - 1.0)


def _log_normal_interval(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for standard-normal bounds ``lower < upper`` (may be +-inf),
    computed on the side of the distribution where it does not cancel."""
    mirror = lower > 0
    lo = torch.where(mirror, -upper, lower)
    hi = torch.where(mirror, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, var: Tensor, bin_width: float) -> Tensor:
    """-log P(bin of x0) under N(mean, var), per element, in nats (Ho et al. 2020, eq. 13).

    The bin is ``[x0 - bin_width/2, x0 + bin_width/2]``; the bin of the end level -1 (or 1)
    itself is extended to -inf (or +inf), as for the first (last) of the 256 levels over
    [-1, 1].  For data on that grid (``bin_width = 2/255``) this is eq. 13 exactly; for
    continuous data it is the probability of the bin centred on the value (so ``-log P ~
    -log p(x0) - log bin_width``). Only values *at* an end level get the half-infinite bin:
    continuous data beyond +-1 (standardised fields often are) keeps its centred bin, or the
    bound would fall below the likelihood there.
    """
    std = var.sqrt()
    at_end = 1e-3 * bin_width  # data on the grid sits on the end levels to rounding
    lower = torch.where((x0 + 1.0).abs() <= at_end, -math.inf, (x0 - bin_width / 2 - mean) / std)
    upper = torch.where((x0 - 1.0).abs() <= at_end, math.inf, (x0 + bin_width / 2 - mean) / std)
    return -_log_normal_interval(lower, upper)


def _strata(n_terms: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One uniform draw in each of ``k`` contiguous strata of the terms ``1 .. n_terms``, and
    the stratum sizes (the importance weights that make the stratified sum unbiased).

    The strata are geometrically spaced (as even as possible in ``log t``, each at least one
    term wide): the terms near the data (small t) are large and vary fast, so they get narrow
    strata of their own, which keeps the variance of the estimate low.
    """
    targets = torch.logspace(0, math.log10(n_terms + 1), k + 1, dtype=torch.float64)
    edges = [1]
    for j in range(1, k):
        edges.append(min(max(edges[-1] + 1, round(float(targets[j]))), n_terms + 1 - (k - j)))
    edges = torch.tensor(edges + [n_terms + 1])  # (k + 1,)
    sizes = edges[1:] - edges[:-1]
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    picks = edges[:-1] + (u * sizes).long().clamp(max=sizes - 1)
    return picks, sizes


@torch.no_grad()
def vlb_bits_per_dim(denoiser: Denoiser, s: Schedule, x0: Tensor, *,
                     generator: torch.Generator, weight: Tensor | None = None,
                     timesteps: int | None = None, variance: str = "beta_tilde",
                     bin_width: float = 2.0 / 255.0, return_terms: bool = False
                     ) -> Tensor | dict[str, Tensor]:
    """The DDPM variational bound ``L = L_T + sum_{t>1} L_{t-1} + L_0`` in bits per dimension
    for each field of ``x0`` (Ho et al. 2020, eq. 5): the negative log-likelihood bound that
    the theory minimises.

    ``L_T = KL(q(x_T | x_0) || N(0, I))``; ``L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) ||
    p(x_{t-1} | x_t))`` with model mean ``mu_tilde(x_t, x0_hat)``, ``x0_hat`` from
    ``denoiser(x_t / sqrt(alpha_bar_t), sigma_t)`` and fixed variance ``beta_tilde_t`` or
    ``beta_t`` (``variance``); ``L_0 = -log p(x_0 | x_1)`` the discretised Gaussian decoder
    (eq. 13, :func:`discretized_gaussian_nll`) with mean ``x0_hat`` and variance
    ``beta_tilde`` at index 1 (as in Ho et al.'s code, since ``beta_tilde`` at index 0 is 0).
    Each expectation over ``x_t`` uses one draw of noise from ``generator``.

    Parameters
    ----------
    denoiser
        ``D(x (B, C, H, W), sigma (B,)) -> x0_hat``; any parameterisation.
    x0
        (B, C, H, W) data scaled to [-1, 1]; ``bin_width`` 2/255 puts it on 256 levels (the
        image convention).  Continuous geoscience data has no natural grid: the result is then
        the dequantised NLL of a ``bin_width`` bin around each value, i.e. about the continuous
        NLL in bits plus ``-log2(bin_width)`` per dimension (7 bits for 2/255).
    weight
        Optional per-pixel weights (broadcastable to ``x0``); bits/dim is the weighted mean
        over pixels (all ones: the usual mean).  NaN pixels of ``x0`` get weight 0.
    timesteps
        ``None`` sums all T-1 terms ``L_{t-1}``.  An integer K estimates that sum by stratified
        sampling: the terms ``1 .. T-1`` are cut into K contiguous, geometrically growing
        strata, one term is drawn uniformly in each and multiplied by its stratum size, an
        unbiased estimate of the full sum (K network evaluations instead of T-1).
        ``L_T`` and ``L_0`` are always exact.

    Returns
    -------
    (B,) bits/dim, or with ``return_terms`` a dict of (B,) tensors ``prior``, ``diffusion``,
    ``decoder`` and ``total``, each in bits/dim.
    """
    if variance not in VARIANCES:
        raise ValueError(f"{variance=} is not known; choose one of {VARIANCES}")
    if generator is None:
        raise ValueError("generator=None: pass a torch.Generator (randomness is explicit)")
    n_terms = s.timesteps - 1
    if timesteps is not None and not 1 <= timesteps <= n_terms:
        raise ValueError(f"{timesteps=} must be None (all) or in 1..{n_terms}")
    if not bin_width > 0:
        raise ValueError(f"{bin_width=} must be > 0 (2/255 for 256 levels over [-1, 1])")
    x0, w = _clean(x0, torch.ones_like(x0) if weight is None else weight.to(x0))
    xd = x0.double()
    batch = x0.shape[0]

    def per_field_bits(nats: Tensor) -> Tensor:  # (B, C, H, W) -> (B,)
        return (w.double() * nats).flatten(1).sum(1) / w.double().flatten(1).sum(1) / math.log(2)

    def model_x0(t: int, noise: Tensor) -> tuple[Tensor, Tensor]:
        tt = torch.full((batch,), t, dtype=torch.long)
        xt = q_sample(s, xd, tt, noise.double())
        sigma = torch.full((batch,), float(s.sigmas[t]), dtype=x0.dtype, device=x0.device)
        x0_hat = denoiser((xt / s.alpha_bar[t].sqrt()).to(x0.dtype), sigma)
        return xt, x0_hat.double()

    last = torch.full((batch,), s.timesteps - 1, dtype=torch.long)
    mean_t, var_t = q_mean_variance(s, xd, last)
    prior = _normal_kl(mean_t, var_t, torch.zeros_like(xd), torch.ones_like(var_t))

    if timesteps is None:
        picks, counts = torch.arange(1, n_terms + 1), torch.ones(n_terms, dtype=torch.long)
    else:
        picks, counts = _strata(n_terms, timesteps, generator)
    diffusion = torch.zeros_like(xd)
    for t, count in zip(picks.tolist(), counts.tolist()):
        xt, x0_hat = model_x0(t, _randn_like(x0, generator))
        tt = torch.full((batch,), t, dtype=torch.long)
        mean_q, var_q = q_posterior(s, xd, xt, tt)
        mean_p, _ = q_posterior(s, x0_hat, xt, tt)
        var_p = s.beta_tilde[t] if variance == "beta_tilde" else s.betas[t]
        diffusion += count * _normal_kl(mean_q, var_q, mean_p, var_p.to(var_q).expand_as(var_q))

    _, x0_hat = model_x0(0, _randn_like(x0, generator))
    decoder = discretized_gaussian_nll(xd, x0_hat, s.beta_tilde[1].to(xd).expand_as(xd), bin_width)
    terms = {"prior": per_field_bits(prior), "diffusion": per_field_bits(diffusion),
             "decoder": per_field_bits(decoder)}
    terms["total"] = terms["prior"] + terms["diffusion"] + terms["decoder"]
    return terms if return_terms else terms["total"]
