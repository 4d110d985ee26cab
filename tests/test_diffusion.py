"""Tests of geodiff.diffusion (Ho et al. 2020) and geodiff.edm (Karras et al. 2022).

Statistical checks state their tolerance in standard errors (SE); every random number comes
from a seeded generator, so the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geodiff.diffusion import (
    DDPMDenoiser,
    Schedule,
    ddpm_loss,
    discretized_gaussian_nll,
    make_schedule,
    predict_eps,
    predict_x0,
    prediction_target,
    q_mean_variance,
    q_posterior,
    q_sample,
    vlb_bits_per_dim,
    weighted_mse,
)
from geodiff.edm import EDMPrecond, edm_loss, estimate_sigma_data, karras_sigmas


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Gaussian:
    """Data x0 ~ N(mu, sd^2) independently per pixel of a (C, H, W) field, and its optimal
    denoiser E[x0 | x0 + sigma eps = x] = mu + sd^2 / (sd^2 + sigma^2) (x - mu)."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor):
        self.mu, self.sd = mu.double(), sd.double()  # (1, C, H, W)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.double().reshape(-1, 1, 1, 1) ** 2
        return (self.mu + self.sd**2 / (self.sd**2 + s2) * (x.double() - self.mu)).to(x.dtype)

    def data(self, n: int, seed: int) -> torch.Tensor:
        z = torch.randn(n, *self.mu.shape[1:], generator=gen(seed), dtype=torch.float64)
        return (self.mu + self.sd * z).float()


MU = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
SD = torch.linspace(0.3, 0.1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
GAUSS = Gaussian(MU, SD)
gaussian_denoiser = GAUSS.denoiser


# -- schedules ---------------------------------------------------------------------------


def test_linear_schedule_values_and_rescaling():
    s = make_schedule("linear", 1000)
    assert s.timesteps == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # Nichol & Dhariwal: both ends scaled by 1000 / T
    s250 = make_schedule("linear", 250)
    assert s250.betas[0].item() == pytest.approx(4e-4)
    assert s250.betas[-1].item() == pytest.approx(0.08)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_schedule_derived_quantities(kind, timesteps):
    s = make_schedule(kind, timesteps)
    b = s.betas.numpy()
    alpha_bar = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alpha_bar.numpy(), alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bar_prev.numpy(), np.r_[1.0, alpha_bar[:-1]], rtol=1e-12)
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - alpha_bar) / alpha_bar),
                               rtol=1e-12)
    assert s.beta_tilde[0].item() == 0.0
    assert bool((s.sigmas[1:] > s.sigmas[:-1]).all())
    if kind == "cosine":
        u = np.arange(timesteps + 1) / timesteps
        f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        np.testing.assert_allclose(b, np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)


@pytest.mark.parametrize("kind, timesteps, match", [("quadratic", 100, "kind="),
                                                    ("linear", 1, "timesteps="),
                                                    ("linear", 5, "beta >= 1")])
def test_make_schedule_rejects_bad_input(kind, timesteps, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(kind, timesteps)


# -- q(x_t | x_0) and the posterior -------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 137, 999])
def test_q_sample_moments_monte_carlo(kind, t):
    s = make_schedule(kind, 1000)
    n = 100_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    tt = torch.full((n,), t)
    xt = q_sample(s, x0, tt, torch.randn(x0.shape, generator=gen(t), dtype=torch.float64))
    mean, var = q_mean_variance(s, x0, tt)
    assert mean[0].item() == pytest.approx(0.7 * math.sqrt(s.alpha_bar[t]), rel=1e-12)
    assert var[0].item() == pytest.approx(1 - s.alpha_bar[t].item(), rel=1e-12)
    # within 5 SE: SE(mean) = sqrt(var / n), SE(var) = var sqrt(2 / (n - 1))
    v = var[0].item()
    assert abs(xt.mean().item() - mean[0].item()) < 5 * math.sqrt(v / n)
    assert abs(xt.var().item() - v) < 5 * v * math.sqrt(2 / (n - 1))


def test_q_sample_is_the_vp_case_of_the_ve_process():
    """x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps (Karras et al. 2022, Table 1, VP)."""
    s = make_schedule("cosine", 200)
    x0 = torch.randn(200, 1, 2, 2, generator=gen(1), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen(2), dtype=torch.float64)
    t = torch.arange(200)
    ve = q_sample(s, x0, t, noise) / s.alpha_bar[t].sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ve, x0 + s.sigmas[t].reshape(-1, 1, 1, 1) * noise,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind, timesteps", [("linear", 1000), ("cosine", 1000),
                                             ("linear", 50)])
def test_posterior_matches_numerical_bayes(kind, timesteps):
    """q(x_{t-1} | x_t, x_0) against prior q(x_{t-1} | x_0) x likelihood q(x_t | x_{t-1}),
    normalised on a fine 1-D grid (Ho et al. 2020, eq. 6-7)."""
    s = make_schedule(kind, timesteps)
    x0 = 0.4
    for t in sorted({1, 2, 10, timesteps // 2, timesteps - 1}):
        ab, ab_prev, a, b = (float(v[t]) for v in (s.alpha_bar, s.alpha_bar_prev, s.alphas,
                                                   s.betas))
        xt = math.sqrt(ab) * x0 + 0.7 * math.sqrt(1 - ab)
        prior_mean, prior_var = math.sqrt(ab_prev) * x0, 1 - ab_prev
        grid = np.linspace(prior_mean - 12 * math.sqrt(prior_var),
                           prior_mean + 12 * math.sqrt(prior_var), 400_001)
        log_p = (-(grid - prior_mean) ** 2 / (2 * prior_var)
                 - (xt - math.sqrt(a) * grid) ** 2 / (2 * b))
        p = np.exp(log_p - log_p.max())
        p /= p.sum()
        mean_num = (p * grid).sum()
        var_num = (p * (grid - mean_num) ** 2).sum()
        mean, var = q_posterior(s, torch.tensor([[[[x0]]]], dtype=torch.float64),
                                torch.tensor([[[[xt]]]], dtype=torch.float64), torch.tensor([t]))
        assert mean.item() == pytest.approx(mean_num, rel=1e-7, abs=1e-10)
        assert var.item() == pytest.approx(var_num, rel=1e-6)


# -- parameterisations --------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-4, 1 - 1e-4), st.integers(0, 2**31 - 1),
       st.sampled_from(["eps", "v", "x0"]))
def test_prediction_conversions_round_trip(alpha_bar, seed, prediction):
    g = gen(seed)
    x0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    a = torch.tensor(alpha_bar, dtype=torch.float64)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = prediction_target(prediction, x0, eps, a)
    torch.testing.assert_close(predict_x0(prediction, out, xt, a), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(predict_eps(prediction, out, xt, a), eps, rtol=1e-7, atol=1e-7)


def test_v_target_by_hand():
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022) at a = 0.36: 0.6 eps - 0.8 x0."""
    v = prediction_target("v", torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor(0.36))
    assert v.item() == pytest.approx(0.6 * 2.0 - 0.8 * 1.0)


# -- losses -------------------------------------------------------------------------------


def test_weighted_mse_by_hand_and_zero_weight_has_no_gradient():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0, 0.0, float("nan")])
    weight = torch.tensor([1.0, 2.0, 1.0, 0.0])
    loss = weighted_mse(pred, target, weight)
    assert loss.item() == pytest.approx((1 * 1 + 2 * 4 + 1 * 9) / 4)  # = 4.5
    loss.backward()
    # d/dp sum(w (p - t)^2) / sum(w) = 2 w (p - t) / sum(w)
    assert pred.grad.tolist() == pytest.approx([0.5, 2.0, 1.5, 0.0])


def test_weighted_mse_equal_weights_is_the_plain_mean():
    pred, target = torch.randn(2, 3, 1, 4, 5, generator=gen(0))
    loss = weighted_mse(pred, target, torch.full((1, 1, 4, 5), 0.37))  # broadcast weights
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


class ConstantNet(nn.Module):
    """Outputs ``value`` everywhere; records what it was called with."""

    def __init__(self, value: float = 0.0, out_channels: int = 1):
        super().__init__()
        self.value = value
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, noise_label, cond=None, cond_drop=None):
        self.calls.append((x.clone(), noise_label.clone(), cond, cond_drop))
        return torch.full((x.shape[0], self.out_channels, *x.shape[2:]), self.value)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_loss_target_by_hand(prediction):
    s = make_schedule("linear", 100)
    x0 = torch.randn(3, 1, 2, 2, generator=gen(0))
    noise = torch.randn(3, 1, 2, 2, generator=gen(1))
    t = torch.tensor([0, 50, 99])
    weight = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).expand(3, 1, 2, 2)
    net = ConstantNet(0.0)
    loss = ddpm_loss(net, s, x0, weight, prediction=prediction, generator=None, t=t,
                     noise=noise)
    a = s.alpha_bar[t].float().reshape(3, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    assert loss.item() == pytest.approx(((weight * target**2).sum() / weight.sum()).item(),
                                        rel=1e-5)
    x_in, label, _, _ = net.calls[0]
    torch.testing.assert_close(x_in, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert label.tolist() == [0.0, 50.0, 99.0]


def test_ddpm_loss_draws_reproducibly_and_ignores_nan_pixels():
    s = make_schedule("linear", 100)
    x0 = torch.randn(4, 1, 2, 2, generator=gen(0))
    weight = torch.ones_like(x0)
    a = ddpm_loss(ConstantNet(), s, x0, weight, generator=gen(5))
    assert a.item() == ddpm_loss(ConstantNet(), s, x0, weight, generator=gen(5)).item()
    assert a.item() != ddpm_loss(ConstantNet(), s, x0, weight, generator=gen(6)).item()
    x_nan = x0.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    net = ConstantNet()
    loss = ddpm_loss(net, s, x_nan, weight, generator=gen(5))
    assert torch.isfinite(loss) and torch.isfinite(net.calls[0][0]).all()
    with pytest.raises(ValueError, match="generator"):
        ddpm_loss(ConstantNet(), s, x0, weight, generator=None)


class OptimalDDPMNet(nn.Module):
    """The Bayes-optimal eps / v / x0 network for Gaussian data, at any timestep label."""

    def __init__(self, schedule: Schedule, prediction: str, gauss: Gaussian = GAUSS):
        super().__init__()
        self.schedule, self.prediction, self.gauss = schedule, prediction, gauss

    def forward(self, x, noise_label, cond=None, cond_drop=None):
        # continuous label -> log sigma by interpolation over the schedule (as DDPMDenoiser)
        log_sig = torch.from_numpy(np.interp(noise_label.double().numpy(),
                                             np.arange(self.schedule.timesteps),
                                             self.schedule.sigmas.log().numpy()))
        a = (1 / (1 + log_sig.exp() ** 2)).reshape(-1, 1, 1, 1)
        xt, mu, var = x.double(), self.gauss.mu, self.gauss.sd**2
        x0 = mu + a.sqrt() * var / (a * var + 1 - a) * (xt - a.sqrt() * mu)
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}
        return out[self.prediction].float()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_loss_of_the_optimal_network_is_analytic(prediction):
    """E[(out* - target)^2] at alpha_bar a, data variance s^2 (d = a s^2 + 1 - a):
    eps: a s^2 / d, x0: s^2 (1 - a) / d, v: s^2 / d."""
    s = make_schedule("cosine", 100)
    n = 4000
    x0 = GAUSS.data(n, 3)
    t = torch.randint(0, 100, (n,), generator=gen(4))
    net = OptimalDDPMNet(s, prediction)
    loss = ddpm_loss(net, s, x0, torch.ones_like(x0), prediction=prediction, generator=gen(5),
                     t=t)
    a = s.alpha_bar[t].reshape(-1, 1, 1, 1)
    d = a * SD**2 + 1 - a
    err_var = {"eps": a * SD**2 / d, "x0": SD**2 * (1 - a) / d, "v": SD**2 / d}[prediction]
    expected = err_var.expand(n, 1, 4, 4)
    # each squared error is err_var * chi2_1 (variance 2 err_var^2); 5 SE
    se = math.sqrt(float((2 * expected**2).sum())) / expected.numel()
    assert abs(loss.item() - expected.mean().item()) < 5 * se


# -- DDPMDenoiser -------------------------------------------------------------------------


def test_ddpm_denoiser_label_interpolation_and_inputs():
    s = make_schedule("linear", 1000)
    net = ConstantNet(0.0)
    den = DDPMDenoiser(net, s, prediction="x0")
    sig = s.sigmas
    sigma = torch.tensor([sig[0], sig[17], sig[999], (sig[40] * sig[41]).sqrt(), 1e-6, 1e6],
                         dtype=torch.float32)
    x = torch.randn(6, 1, 2, 2, generator=gen(0))
    fields = torch.randn(2, 2, 2, generator=gen(1))  # (F, H, W), shared by the batch
    cond, drop = torch.randn(6, 3), torch.tensor([True, False] * 3)
    out = den(x, sigma, fields, cond, drop)
    assert torch.equal(out, torch.zeros_like(x))  # x0 prediction of 0
    x_in, label, c, d = net.calls[0]
    # sigma_t -> t, geometric midpoint -> t + 0.5, out of range clamped to 0 and T-1
    assert label.tolist() == pytest.approx([0, 17, 999, 40.5, 0, 999], abs=1e-3)
    assert x_in.shape == (6, 3, 2, 2) and c is cond and d is drop
    torch.testing.assert_close(x_in[:, :1], x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(x_in[:, 1:], fields.expand(6, 2, 2, 2))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_denoiser_of_optimal_network_is_the_optimal_denoiser(prediction):
    s = make_schedule("cosine", 1000)
    den = DDPMDenoiser(OptimalDDPMNet(s, prediction), s, prediction)
    x = torch.randn(8, 1, 4, 4, generator=gen(0)) * 3
    sigma = torch.logspace(-1.5, 1.5, 8)
    torch.testing.assert_close(den(x, sigma), gaussian_denoiser(x, sigma), rtol=1e-4,
                               atol=1e-4)
    t = torch.tensor([5, 500])
    xt = torch.randn(2, 1, 4, 4, generator=gen(1))
    a = s.alpha_bar[t].reshape(-1, 1, 1, 1)
    x0_opt = gaussian_denoiser(xt.double() / a.sqrt(), s.sigmas[t])
    torch.testing.assert_close(den.eps(xt, t).double(), (xt - a.sqrt() * x0_opt) / (1 - a).sqrt(),
                               rtol=1e-3, atol=1e-4)


def test_vp_coefficients_keep_float32_precision_near_alpha_bar_one():
    """sqrt(1 - alpha_bar) must be formed before anything is rounded to float32: at t = 0 of
    the 1000-step cosine schedule 1 - alpha_bar = 4.1e-5, and 1 - float32(alpha_bar) is off by
    5e-4 relative (the noise level by 2.6e-4, ~2000 float32 ulps); DDPMDenoiser's
    1 - 1 / (1 + sigma^2) in float32 is off by 15 % of sigma at sigma = 3e-4 and is 0 below
    2.4e-4.  Formed without cancellation, each value below is a product or quotient of
    correctly rounded float32 numbers: a few ulps (relative 2^-23 = 1.2e-7 each)."""
    s = make_schedule("cosine", 1000)
    t = torch.tensor([0, 1, 2])
    sqrt_1ma = (1 - s.alpha_bar[t]).sqrt().reshape(-1, 1, 1, 1)
    zeros, ones = torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1)
    rel = dict(rtol=5e-7, atol=0.0)
    torch.testing.assert_close(q_sample(s, zeros, t, ones).double(), sqrt_1ma, **rel)
    net = ConstantNet(0.0)
    ddpm_loss(net, s, zeros, ones, prediction="v", generator=None, t=t, noise=ones)
    torch.testing.assert_close(net.calls[0][0].double(), sqrt_1ma, **rel)
    # v target for x0 = 1, eps = 0 is -sqrt(1 - alpha_bar); the loss of output 0 its mean square
    loss = ddpm_loss(ConstantNet(0.0), s, ones, ones, prediction="v", generator=None, t=t,
                     noise=zeros)
    assert loss.item() == pytest.approx(sqrt_1ma.square().mean().item(), rel=2e-6)
    # x0 prediction 0 at xt = 1: eps_hat = 1 / sqrt(1 - alpha_bar)
    den = DDPMDenoiser(ConstantNet(0.0), s, "x0")
    torch.testing.assert_close(den.eps(ones, t).double(), 1 / sqrt_1ma, **rel)
    # eps prediction 1 in the VE form: x0_hat = x - sigma exactly; rounding of x sqrt(a) and
    # of the quotient, a few ulp(0.7) = 6e-8
    den = DDPMDenoiser(ConstantNet(1.0), s, "eps")
    sigma = torch.tensor([1e-4, 3e-4, 1e-3, float(s.sigmas[0])])
    x = torch.full((4, 1, 1, 1), 0.7)
    err = den(x, sigma).double().flatten() - (x.double().flatten() - sigma.double())
    assert err.abs().max().item() < 3e-7, err


def test_ddpm_denoiser_rejects_bad_input():
    with pytest.raises(ValueError, match="prediction="):
        DDPMDenoiser(ConstantNet(), make_schedule("cosine", 10), prediction="score")
    with pytest.raises(TypeError, match="Schedule"):
        DDPMDenoiser(ConstantNet(), "linear")


# -- the variational bound ----------------------------------------------------------------


def _closed_form_diffusion_bits(s: Schedule, x0: torch.Tensor, variance: str) -> torch.Tensor:
    """E over x_t of sum_t KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for the optimal Gaussian
    denoiser, per field in bits/dim: x0 - x0_hat = (1 - c)(x0 - mu) - c sigma eps with
    c = s^2 / (s^2 + sigma^2), so E[(mu_q - mu_p)^2] = coef1^2 ((1-c)^2 (x0-mu)^2 + c^2 sigma^2)."""
    t = torch.arange(1, s.timesteps)
    shape = (-1, 1, 1, 1, 1)
    sig2, coef1 = s.sigmas[t].reshape(shape) ** 2, s.posterior_mean_coef1[t].reshape(shape)
    var_q = s.beta_tilde[t].reshape(shape)
    var_p = var_q if variance == "beta_tilde" else s.betas[t].reshape(shape)
    c = SD**2 / (SD**2 + sig2)
    err2 = coef1**2 * ((1 - c) ** 2 * (x0.double() - MU) ** 2 + c**2 * sig2)
    kl = 0.5 * ((var_p / var_q).log() + (var_q + err2) / var_p - 1)  # (T-1, B, 1, 4, 4)
    return kl.sum(0).flatten(1).mean(1) / math.log(2)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_vlb_terms_match_closed_form_for_gaussian_data(variance):
    s = make_schedule("linear", 200)
    x0 = GAUSS.data(300, 0)
    terms = vlb_bits_per_dim(gaussian_denoiser, s, x0, generator=gen(1), variance=variance,
                             return_terms=True)
    # per-field differences are independent with mean 0: 5 SE
    diff = terms["diffusion"] - _closed_form_diffusion_bits(s, x0, variance)
    assert abs(diff.mean().item()) < 5 * diff.std().item() / math.sqrt(len(diff))
    a_T = s.alpha_bar[-1]
    prior = 0.5 * (-(1 - a_T).log() + (1 - a_T) + a_T * x0.double() ** 2 - 1)
    torch.testing.assert_close(terms["prior"], prior.flatten(1).mean(1) / math.log(2))
    torch.testing.assert_close(terms["total"],
                               terms["prior"] + terms["diffusion"] + terms["decoder"])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_vlb_of_optimal_denoiser_approaches_true_nll(kind):
    """Bits/dim of the bound vs the true NLL of N(MU, SD^2) for the same bins (2/255 wide,
    centred on each value).  A bound: gap >= 0 (up to 3 SE).  With the larger reverse
    variance ("beta") the fixed-variance reverse process of T = 1000 steps comes within
    0.25 bits/dim (measured 0.11-0.15 of ~6.6); the exact posterior variance "beta_tilde" is
    too small near the data for continuous data and loses ~0.6 bits/dim more (the sum of
    KL(N(beta) || N(beta_tilde)) ~ sum_t 1 / (4 t^2))."""
    s = make_schedule(kind, 1000)
    x0 = GAUSS.data(300, 2)
    true = discretized_gaussian_nll(x0.double(), MU.expand_as(x0), (SD**2).expand_as(x0),
                                    2 / 255).flatten(1).mean(1) / math.log(2)
    gaps = {}
    for variance in ("beta", "beta_tilde"):
        bits = vlb_bits_per_dim(gaussian_denoiser, s, x0, generator=gen(3), variance=variance)
        d = bits - true
        se = d.std().item() / math.sqrt(len(d))
        gaps[variance] = d.mean().item()
        assert gaps[variance] > -3 * se
    assert gaps["beta"] < 0.25
    assert 0.4 < gaps["beta_tilde"] - gaps["beta"] < 0.8


def test_vlb_timestep_subset_is_unbiased_and_cheaper():
    s = make_schedule("linear", 200)
    x0 = GAUSS.data(100, 4)
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    exact = _closed_form_diffusion_bits(s, x0, "beta_tilde").mean().item()
    estimates = []
    for r in range(30):
        calls.clear()
        terms = vlb_bits_per_dim(counted, s, x0, generator=gen(100 + r), timesteps=20,
                                 return_terms=True)
        assert len(calls) == 21  # 20 KL terms + the decoder
        estimates.append(terms["diffusion"].mean().item())
    est = torch.tensor(estimates)
    # mean of 30 independent unbiased estimates: 5 SE
    assert abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(len(est))


def test_discretized_decoder_sums_to_one_over_the_256_levels():
    """Ho et al. 2020 eq. 13: the bins of the 256 levels over [-1, 1] partition the line."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, var in [(0.3, 0.01), (-0.95, 1e-4), (2.0, 0.5)]:
        nll = discretized_gaussian_nll(levels, torch.full_like(levels, mean),
                                       torch.full_like(levels, var), 2 / 255)
        assert (-nll).exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # first level: P = Phi((-1 + 1/255 - m) / s)
    nll0 = discretized_gaussian_nll(levels[:1], torch.zeros(1, dtype=torch.float64),
                                    torch.full((1,), 0.25, dtype=torch.float64), 2 / 255)
    phi = 0.5 * (1 + math.erf((-1 + 1 / 255) / 0.5 / math.sqrt(2)))
    assert nll0.item() == pytest.approx(-math.log(phi), rel=1e-10)
    # far tail, no cancellation to log(0)
    far = discretized_gaussian_nll(torch.zeros(1, dtype=torch.float64),
                                   torch.full((1,), 0.9, dtype=torch.float64),
                                   torch.full((1,), 1e-4, dtype=torch.float64), 2 / 255)
    assert math.isfinite(far.item()) and far.item() > 3000


def test_vlb_rejects_bad_input():
    s = make_schedule("cosine", 10)
    x0 = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="variance="):
        vlb_bits_per_dim(gaussian_denoiser, s, x0, generator=gen(0), variance="learned")
    with pytest.raises(ValueError, match="timesteps="):
        vlb_bits_per_dim(gaussian_denoiser, s, x0, generator=gen(0), timesteps=10)
    with pytest.raises(ValueError, match="generator"):
        vlb_bits_per_dim(gaussian_denoiser, s, x0, generator=None)


# -- EDM ----------------------------------------------------------------------------------


class OptimalEDMNet(nn.Module):
    """F such that EDMPrecond(F) is the optimal Gaussian denoiser: sigma = exp(4 c_noise),
    x = x_in / c_in, F = (D*(x, sigma) - c_skip x) / c_out."""

    def __init__(self, sigma_data: float, gauss: Gaussian = GAUSS):
        super().__init__()
        self.sd, self.gauss = sigma_data, gauss

    def forward(self, x_in, c_noise, cond=None, cond_drop=None):
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        x = x_in[:, :1].double() * (sigma**2 + self.sd**2).sqrt()
        c_skip = self.sd**2 / (sigma**2 + self.sd**2)
        c_out = sigma * self.sd / (sigma**2 + self.sd**2).sqrt()
        return ((self.gauss.denoiser(x, sigma.flatten()) - c_skip * x) / c_out).float()


def test_edm_precond_table1_coefficients_and_inputs():
    net = ConstantNet(2.0)
    pre = EDMPrecond(net, sigma_data=0.5)
    x = torch.randn(2, 1, 2, 2, generator=gen(0))
    sigma = torch.tensor([0.5, 1.2])
    fields = torch.randn(2, 3, 2, 2, generator=gen(1))
    out = pre(x, sigma, fields, None, None)
    x_in, label, _, _ = net.calls[0]
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(x_in[:, :1], x / (s2 + 0.25).sqrt())  # c_in x
    torch.testing.assert_close(x_in[:, 1:], fields)  # fields are not scaled
    torch.testing.assert_close(label, sigma.log() / 4)  # c_noise
    # sigma = sigma_data: c_skip = 1/2, c_out = sigma_data / sqrt(2)
    torch.testing.assert_close(out[0], 0.5 * x[0] + 0.5 / math.sqrt(2) * 2.0)
    with pytest.raises(ValueError, match="sigma_data="):
        EDMPrecond(net, sigma_data=0.0)


def test_edm_precond_of_optimal_network_is_the_optimal_denoiser():
    pre = EDMPrecond(OptimalEDMNet(0.5), sigma_data=0.5)
    x = torch.randn(8, 1, 4, 4, generator=gen(0)) * 3
    sigma = torch.logspace(-2, 1.5, 8)
    torch.testing.assert_close(pre(x, sigma), gaussian_denoiser(x, sigma), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma_data", [0.2, 0.5])
def test_edm_loss_of_optimal_denoiser_is_analytic(sigma_data):
    """lambda E[(D* - x0)^2] = (sigma^2 + sd^2) / (sigma sd)^2 * s^2 sigma^2 / (s^2 + sigma^2)
    per pixel of data variance s^2 (exactly 1 when sd = s)."""
    n = 3000
    x0 = GAUSS.data(n, 7)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=gen(8)))
    loss = edm_loss(EDMPrecond(OptimalEDMNet(sigma_data), sigma_data), x0, torch.ones_like(x0),
                    generator=gen(9), sigma=sigma)
    s2, sig2 = SD**2, sigma.double().reshape(-1, 1, 1, 1) ** 2
    expected = ((sig2 + sigma_data**2) / (sig2 * sigma_data**2) * s2 * sig2 / (s2 + sig2)
                ).expand(n, 1, 4, 4)
    se = math.sqrt(float((2 * expected**2).sum())) / expected.numel()  # chi2_1 terms; 5 SE
    assert abs(loss.item() - expected.mean().item()) < 5 * se


def test_edm_loss_draws_log_normal_sigma_from_the_generator():
    net = ConstantNet(0.0)
    pre = EDMPrecond(net, sigma_data=0.5)
    x0 = torch.zeros(20_000, 1, 1, 1)
    loss = edm_loss(pre, x0, torch.ones_like(x0), p_mean=0.3, p_std=0.7, generator=gen(0))
    log_sigma = 4 * net.calls[0][1]
    # 5 SE for the mean (0.7 / sqrt(n)) and the std (0.7 / sqrt(2 n))
    assert abs(log_sigma.mean().item() - 0.3) < 5 * 0.7 / math.sqrt(20_000)
    assert abs(log_sigma.std().item() - 0.7) < 5 * 0.7 / math.sqrt(40_000)
    assert loss.item() == edm_loss(pre, x0, torch.ones_like(x0), p_mean=0.3, p_std=0.7,
                                   generator=gen(0)).item()


def test_edm_loss_zero_weight_pixels_get_no_gradient():
    net = nn.Conv2d(1, 1, 1)
    pre = EDMPrecond(lambda x, c, cond, drop: net(x), sigma_data=0.5)
    x0 = torch.randn(2, 1, 2, 2, generator=gen(0))
    x0[0, 0, 1, 1] = float("nan")
    weight = torch.ones_like(x0)
    weight[0, 0, 1, 1] = 0.0
    sigma = torch.tensor([0.5, 2.0])
    noise = torch.randn_like(x0)
    loss = edm_loss(pre, x0, weight, generator=None, sigma=sigma, noise=noise)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    # the loss is unchanged by what sits under a zero weight
    x1 = x0.clone()
    x1[0, 0, 1, 1] = 123.0
    assert edm_loss(pre, x1, weight, generator=None, sigma=sigma, noise=noise).item() == \
        pytest.approx(loss.item(), rel=1e-6)


def test_karras_sigmas_eq5_by_hand():
    torch.testing.assert_close(karras_sigmas(3, 1.0, 8.0, rho=1.0),
                               torch.tensor([8.0, 4.5, 1.0, 0.0], dtype=torch.float64))
    # rho = 3: ((8^(1/3) + 1^(1/3)) / 2)^3 = 1.5^3
    torch.testing.assert_close(karras_sigmas(3, 1.0, 8.0, rho=3.0),
                               torch.tensor([8.0, 3.375, 1.0, 0.0], dtype=torch.float64))
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    s = karras_sigmas(18, 0.002, 80.0)
    assert s.shape == (19,) and bool((s[1:] < s[:-1]).all())
    for bad in [dict(steps=0), dict(sigma_min=0.0), dict(sigma_min=90.0), dict(rho=0.0)]:
        kwargs = dict(steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            karras_sigmas(**kwargs)


def test_estimate_sigma_data_weighted_by_hand():
    x = torch.tensor([1.0, 3.0, float("nan"), 100.0])
    w = torch.tensor([1.0, 3.0, 5.0, 0.0])
    # weighted mean (1 + 9) / 4 = 2.5; variance (1 * 2.25 + 3 * 0.25) / 4 = 0.75
    assert estimate_sigma_data(x, w) == pytest.approx(math.sqrt(0.75))
    assert estimate_sigma_data(torch.tensor([1.0, -1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="constant"):
        estimate_sigma_data(torch.ones(4))
    with pytest.raises(ValueError, match="sum to 0"):
        estimate_sigma_data(x, torch.zeros(4))


def test_decoder_bins_beyond_the_end_levels_stay_centred():
    """Continuous data beyond +-1 keeps a centred bin: the decoder cost is the same function
    of (x0 - mean) / std wherever x0 lies, so the bound cannot drop below the likelihood
    outside [-1, 1] (a half-infinite bin there cost 0.6 instead of 1.7 bits)."""
    var = torch.full((4,), 0.09, dtype=torch.float64)
    x0 = torch.tensor([0.5, 1.5, 3.0, -2.0], dtype=torch.float64)
    nll = discretized_gaussian_nll(x0, x0 - 0.1, var, 2 / 255)
    np.testing.assert_allclose(nll.numpy(), np.full(4, nll[0].item()), rtol=1e-9)
    edge = discretized_gaussian_nll(torch.ones(1, dtype=torch.float64),
                                    torch.full((1,), 0.9, dtype=torch.float64), var[:1], 2 / 255)
    phi = 0.5 * (1 + math.erf((1 - 1 / 255 - 0.9) / 0.3 / math.sqrt(2)))
    assert edge.item() == pytest.approx(-math.log(1 - phi), rel=1e-10)  # the last level
