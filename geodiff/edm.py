"""EDM preconditioning, loss and noise levels of Karras et al. (2022), "Elucidating the Design
Space of Diffusion-Based Generative Models".

The forward process is variance exploding, ``x = x0 + sigma eps``.  The DDPM forward process
of :mod:`geodiff.diffusion` is the VP case of the same family: with
``sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t`` (``Schedule.sigmas``),
``x_t^VP / sqrt(alpha_bar_t) = x0 + sigma_t eps`` exactly (Karras et al. 2022, Table 1, VP
column with ``s(t) = 1 / sqrt(sigma^2 + 1)``), so a model of either kind is a denoiser
``D(x, sigma)`` on the same ``x`` and every sampler serves both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from geodiff.diffusion import _clean, _net_input, weighted_mse


class EDMPrecond(nn.Module):
    """The preconditioned denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``
    (Karras et al. 2022, eq. 7 and Table 1):

    ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``,
    ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, ``c_noise = ln(sigma) / 4``.

    ``F`` is ``net(x_in, noise_label, cond, cond_drop)``; ``x_in`` is ``c_in x`` followed by the
    extra ``fields`` channels, which are not scaled (they are not noisy).
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data)
                and sigma_data > 0):
            raise ValueError(f"{sigma_data=} must be a finite number > 0 (the data's std)")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``c_skip, c_out, c_in, c_noise`` (Table 1) for noise levels ``sigma`` (B,)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma.square() + sd2)
        c_out = sigma * self.sigma_data / (sigma.square() + sd2).sqrt()
        c_in = 1.0 / (sigma.square() + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4.0

    def forward(self, x: Tensor, sigma: Tensor, fields: Tensor | None = None,
                cond: Tensor | None = None, cond_drop: Tensor | None = None) -> Tensor:
        """``x0_hat`` (B, C, H, W) for ``x`` (B, C, H, W) at noise levels ``sigma`` (B,)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        x = x.float()
        f = self.net(_net_input(c_in * x, fields), c_noise.flatten(), cond, cond_drop)
        return c_skip * x + c_out * f.float()


def edm_loss(precond: EDMPrecond, x0: Tensor, weight: Tensor, *, fields: Tensor | None = None,
             cond: Tensor | None = None, p_mean: float = -1.2, p_std: float = 1.2,
             generator: torch.Generator | None, cond_drop: Tensor | None = None,
             sigma: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """The EDM training loss ``E[lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2]`` (Karras et
    al. 2022, eq. 2 and 8, Table 1) with per-pixel weights.

    ``ln(sigma) ~ N(p_mean, p_std^2)`` and ``n ~ N(0, I)`` are drawn from ``generator`` unless
    given (``sigma`` (B,), ``noise`` like ``x0``).  ``lambda(sigma) = (sigma^2 + sigma_data^2)
    / (sigma sigma_data)^2 = 1 / c_out^2``, so the loss is
    ``weighted_mse(sqrt(lambda) D, sqrt(lambda) x0, weight)``: ``sum(w lambda (D - x0)^2) /
    sum(w)``.  ``x0``, ``weight`` (B, C, H, W); NaN pixels of ``x0`` get weight 0.
    """
    if not p_std > 0:
        raise ValueError(f"{p_std=} must be > 0")
    if (sigma is None or noise is None) and generator is None:
        raise ValueError("generator=None: pass a torch.Generator, or both sigma and noise")
    x0, weight = _clean(x0, weight)
    if sigma is None:
        z = torch.randn(x0.shape[0], generator=generator, device=generator.device)
        sigma = (p_mean + p_std * z).exp()
    sigma = sigma.to(device=x0.device, dtype=torch.float32)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
    noise = noise.to(x0)
    b = sigma.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    denoised = precond(x0 + b * noise, sigma, fields, cond, cond_drop)
    sd2 = precond.sigma_data**2
    sqrt_lambda = (b.square() + sd2).sqrt() / (b * precond.sigma_data)
    return weighted_mse(sqrt_lambda * denoised, sqrt_lambda * x0.float(), weight)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Noise levels ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``, i = 0 .. N-1, followed by ``sigma_N = 0`` (Karras et al. 2022,
    eq. 5): a float64 tensor of shape (steps + 1,), decreasing.  ``steps = 1`` gives
    ``[sigma_max, 0]``.  ``rho = inf`` is the limit of eq. 5, levels evenly spaced in
    ``log sigma`` (uniform in log-SNR, the spacing Lu et al. 2022 use for DPM-Solver on
    low-resolution data)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{steps=} must be an integer >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"{sigma_min=} and {sigma_max=} must satisfy 0 < sigma_min < sigma_max")
    if not rho > 0:
        raise ValueError(f"{rho=} must be > 0 (Karras et al. use 7)")
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if math.isinf(rho):
        sigmas = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min)
                                                         - math.log(sigma_max)))
        return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def estimate_sigma_data(x: Tensor, weight: Tensor | None = None) -> float:
    """Weighted standard deviation of the data ``x`` (any shape), EDM's ``sigma_data``.

    ``sqrt(sum(w (x - m)^2) / sum(w))`` with ``m`` the weighted mean; ``weight`` broadcastable
    to ``x`` (default all ones); NaN values and zero-weight pixels are left out.
    """
    x, w = _clean(x.double(), torch.ones(()) if weight is None else weight.double())
    total = w.sum()
    if not total > 0:
        raise ValueError("estimate_sigma_data: the weights of all finite values sum to 0; "
                         "pass data with at least one valid (finite, weight > 0) pixel")
    mean = (w * x).sum() / total
    sigma = float(((w * (x - mean).square()).sum() / total).sqrt())
    if not sigma > 0:
        raise ValueError(f"estimate_sigma_data: the data is constant ({sigma=}); EDM needs "
                         "sigma_data > 0, set diffusion.sigma_data explicitly")
    return sigma
