"""Tests of geodiff.sampling with analytic (Bayes-optimal) denoisers of Gaussian data.

For x0 ~ N(mu, sd^2) the optimal denoiser is known in closed form, so a correct sampler must
return samples with mean mu and standard deviation sd, up to (a) Monte Carlo error, stated in
standard errors (SE), and (b) the sampler's own discretisation error for the given number of
steps, stated per configuration and checked separately by its order of convergence.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import Gaussian, OptimalDDPMNet, OptimalEDMNet, gen

from geodiff.diffusion import DDPMDenoiser, make_schedule
from geodiff.edm import EDMPrecond, karras_sigmas
from geodiff.sampling import SAMPLERS, guided, inpaint, sample, sigma_grid


def gens(n: int, start: int = 0) -> list[torch.Generator]:
    return [gen(start + i) for i in range(n)]


# scaled geoscience-like data: one (1, 4, 4) field, per-pixel mean and std
DATA = Gaussian(torch.linspace(-0.3, 0.3, 16).reshape(1, 1, 4, 4),
                torch.linspace(1.0, 0.5, 16).reshape(1, 1, 4, 4))
LINEAR = make_schedule("linear", 1000)
EDM_RANGE = dict(sigma_min=0.002, sigma_max=80.0)


def denoiser_for(kind: str):
    """The optimal denoiser, raw or through one of the two parameterisations."""
    if kind == "raw":
        return DATA.denoiser
    if kind == "edm":
        return EDMPrecond(OptimalEDMNet(0.5, DATA), sigma_data=0.5)
    prediction = kind.split("-")[1]
    return DDPMDenoiser(OptimalDDPMNet(LINEAR, prediction, DATA), LINEAR, prediction)


# (denoiser, sampler arguments, members n, allowed |std / sd - 1| from discretisation).
# The allowances bound the deterministic bias of each configuration on this distribution,
# measured with 1e5 members (e.g. heun 18 steps: +4.4..+5.5 %, dpmpp 25: +2.2..+3.0 %,
# ddim 50 on the DDPM grid: -3.7..-6.2 %, ddpm 1000 beta_tilde: -0.0..-0.9 %, beta: +-0.5 %).
CASES = {
    "ddpm-1000-eps": ("ddpm-eps", dict(sampler="ddpm", steps=1000, schedule=LINEAR), 4000, 0.01),
    "ddpm-1000-beta-v": ("ddpm-v", dict(sampler="ddpm", steps=1000, schedule=LINEAR,
                                        variance="beta"), 4000, 0.006),
    "ddim-50-x0": ("ddpm-x0", dict(sampler="ddim", steps=50, schedule=LINEAR), 20000, 0.065),
    "ddim-100-eta0.5": ("raw", dict(sampler="ddim", steps=100, eta=0.5, **EDM_RANGE), 20000,
                        0.045),
    "dpmpp-25-edm": ("edm", dict(sampler="dpmpp", steps=25, **EDM_RANGE), 20000, 0.035),
    "heun-18-edm": ("edm", dict(sampler="heun", steps=18, **EDM_RANGE), 20000, 0.06),
    "heun-40-churn": ("raw", dict(sampler="heun", steps=40, churn=10.0, **EDM_RANGE), 20000,
                      0.035),
}


@pytest.mark.parametrize("case", list(CASES))
def test_samplers_recover_gaussian_mean_and_std(case):
    kind, kwargs, n, allow = CASES[case]
    x = sample(denoiser_for(kind), (n, 1, 4, 4), gens(n), **kwargs)
    mu, sd = DATA.mu.float()[0], DATA.sd.float()[0]
    # per pixel: mean within 5 SE (sd / sqrt(n)); std within the discretisation allowance
    # plus 5 SE (sd / sqrt(2 (n - 1)))
    z_mean = (x.mean(0) - mu) / (sd / math.sqrt(n))
    assert z_mean.abs().max().item() < 5
    rel_std = x.std(0) / sd - 1
    assert rel_std.abs().max().item() < allow + 5 / math.sqrt(2 * (n - 1))


@pytest.mark.parametrize("sampler, order", [("heun", 2), ("dpmpp", 2), ("ddim", 1)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    """Zero-mean Gaussian data: the probability-flow ODE maps x(sigma_max) to
    x(sigma_max) sd / sqrt(sd^2 + sigma_max^2); the error of the discrete map must shrink by
    2^order when the number of steps doubles."""
    sd = torch.tensor([0.5, 1.0]).reshape(1, 1, 1, 2)
    data = Gaussian(torch.zeros_like(sd), sd)
    first = []

    def recording(x, sigma):
        if not first:
            first.append(x.clone())
        return data.denoiser(x, sigma)

    errors = []
    for steps in (16, 32, 64):
        first.clear()
        x = sample(recording, (1, 1, 1, 2), gens(1), sampler=sampler, steps=steps, **EDM_RANGE)
        exact = first[0].double() * sd / (sd**2 + 80.0**2).sqrt()
        errors.append((x.double() / exact - 1).abs().max().item())
    ratios = [errors[1] / errors[0], errors[2] / errors[1]]
    expected = 0.5**order
    assert all(0.6 * expected < r < 1.3 * expected for r in ratios), (errors, ratios)


def test_ddim_with_eta_1_is_the_ancestral_sampler():
    kwargs = dict(steps=30, **EDM_RANGE)
    a = sample(DATA.denoiser, (6, 1, 4, 4), gens(6), sampler="ddim", eta=1.0, **kwargs)
    b = sample(DATA.denoiser, (6, 1, 4, 4), gens(6), sampler="ddpm", **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


STOCHASTIC = [dict(sampler="ddpm", steps=20, schedule=make_schedule("cosine", 100)),
              dict(sampler="ddpm", steps=12, variance="beta", **EDM_RANGE),
              dict(sampler="ddim", steps=12, eta=0.5, **EDM_RANGE),
              dict(sampler="dpmpp", steps=12, **EDM_RANGE),
              dict(sampler="heun", steps=12, churn=5.0, **EDM_RANGE)]


@pytest.mark.parametrize("kwargs", STOCHASTIC, ids=lambda k: k["sampler"])
def test_member_is_bit_identical_alone_or_in_a_batch(kwargs):
    batch = sample(DATA.denoiser, (4, 1, 4, 4), gens(4, start=10), **kwargs)
    alone = sample(DATA.denoiser, (1, 1, 4, 4), [gen(12)], **kwargs)
    assert torch.equal(batch[2], alone[0])
    again = sample(DATA.denoiser, (4, 1, 4, 4), gens(4, start=10), **kwargs)
    assert torch.equal(batch, again)
    other = sample(DATA.denoiser, (4, 1, 4, 4), gens(4, start=20), **kwargs)
    assert not torch.equal(batch, other)
    assert len({tuple(m.flatten().tolist()) for m in batch}) == 4  # members differ


@pytest.mark.parametrize("sampler, steps, nfe", [("ddpm", 7, 7), ("ddim", 7, 7), ("dpmpp", 7, 7),
                                                 ("heun", 7, 13), ("heun", 1, 1)])
def test_network_evaluations_are_counted(sampler, steps, nfe):
    calls = []

    def counting(x, sigma):
        calls.append(sigma[0].item())
        return DATA.denoiser(x, sigma)

    _, reported = sample(counting, (2, 1, 4, 4), gens(2), sampler=sampler, steps=steps,
                         return_nfe=True, **EDM_RANGE)
    assert reported == len(calls) == nfe
    assert calls[0] == pytest.approx(80.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_last_step_returns_the_last_denoised_estimate_exactly(sampler, steps):
    """The step to sigma = 0 ends every sampler on D(x, sigma_last) itself: Ho et al.'s
    Algorithm 2 with z = 0, DDIM, DPM-Solver++ (x_s = 0 x + D) and Karras et al.'s Euler
    step x + (0 - s)(x - D) / s = D, which computed as written in float32 leaves a rounding
    error of order ulp(x) (2e-5 for one step from sigma_max = 80)."""
    outputs = []

    def recording(x, sigma):
        outputs.append(DATA.denoiser(x, sigma))
        return outputs[-1]

    x = sample(recording, (16, 1, 4, 4), gens(16), sampler=sampler, steps=steps,
               churn=1.0 if sampler == "heun" else 0.0, **EDM_RANGE)
    assert torch.equal(x, outputs[-1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_are_float32_whatever_the_denoiser_returns(sampler):
    """The last step returns the denoiser's output itself; a denoiser whose network ran in
    bf16 (autocast) without casting back must still give float32 samples."""
    def bf16(x, sigma):
        return DATA.denoiser(x, sigma).bfloat16()

    x = sample(bf16, (2, 1, 4, 4), gens(2), sampler=sampler, steps=3, **EDM_RANGE)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_guided_combines_and_costs_two_evaluations():
    calls = []

    def const(value):
        def denoiser(x, sigma):
            calls.append(value)
            return torch.full_like(x, value)
        return denoiser

    cond, uncond = const(1.0), const(0.25)
    x = torch.zeros(2, 1, 2, 2)
    out = guided(cond, uncond, 3.0)(x, torch.ones(2))
    assert torch.allclose(out, torch.full_like(x, 0.25 + 3.0 * (1.0 - 0.25)))
    assert sorted(calls) == [0.25, 1.0]
    assert guided(cond, uncond, 1.0) is cond and guided(cond, uncond, 0.0) is uncond
    with pytest.raises(ValueError, match="scale="):
        guided(cond, uncond, -1.0)


def test_sigma_grid_rule():
    full = sigma_grid("ddpm", 1000, schedule=LINEAR)
    torch.testing.assert_close(full, torch.cat([LINEAR.sigmas.flip(0), torch.zeros(1,
                                                                                  dtype=torch.float64)]))
    sub = sigma_grid("ddim", 50, schedule=LINEAR)
    # timesteps round(linspace(999, 0, 50)): 999, 979 (978.6), ..., 0
    assert sub[0] == LINEAR.sigmas[999] and sub[1] == LINEAR.sigmas[979]
    assert sub[-2] == LINEAR.sigmas[0] and sub[-1] == 0 and sub.shape == (51,)
    torch.testing.assert_close(sigma_grid("heun", 10, schedule=LINEAR),
                               karras_sigmas(10, float(LINEAR.sigmas[0]),
                                             float(LINEAR.sigmas[-1])))
    torch.testing.assert_close(sigma_grid("ddpm", 5, sigma_min=0.1, sigma_max=10.0, rho=3.0),
                               karras_sigmas(5, 0.1, 10.0, 3.0))
    with pytest.raises(ValueError, match="exceeds"):
        sigma_grid("ddpm", 1001, schedule=LINEAR)
    with pytest.raises(ValueError, match="sigma_min="):
        sigma_grid("heun", 10)


def test_explicit_timesteps_are_any_subset_of_the_schedule():
    even = torch.linspace(999, 0, 50, dtype=torch.float64).round().long()
    # the evenly spaced subset given explicitly, in any order and container, is steps=50
    for given in (even.flip(0), even.numpy(), even.tolist()[1::2] + even.tolist()[::2]):
        assert torch.equal(sigma_grid("ddim", None, schedule=LINEAR, timesteps=given),
                           sigma_grid("ddim", 50, schedule=LINEAR))
    a = sample(DATA.denoiser, (3, 1, 4, 4), gens(3), sampler="ddim", steps=50, schedule=LINEAR)
    b = sample(DATA.denoiser, (3, 1, 4, 4), gens(3), sampler="ddim", schedule=LINEAR,
               timesteps=even.numpy(), steps=50)
    assert torch.equal(a, b)
    grid = sigma_grid("ddpm", None, schedule=LINEAR, timesteps=[10, 500, 3])
    assert grid.tolist() == [LINEAR.sigmas[500].item(), LINEAR.sigmas[10].item(),
                             LINEAR.sigmas[3].item(), 0.0]
    # the quadratic sequence of Song et al. (2021, app. D.2) spends more steps at low noise,
    # where first-order DDIM loses spread: with the same members (so Monte Carlo noise
    # cancels) the mean std deficit at 49 steps shrinks from -4.5 % to -3.2 % (difference
    # +0.0129 in three independent 20,000-member draws, stable to 1e-4)
    quad = sorted({round((i / 49) ** 2 * 999) for i in range(50)})
    n = 20000
    sd = DATA.sd.float()[0]
    bias = {}
    for name, kw in (("even", dict(steps=len(quad))), ("quad", dict(timesteps=quad))):
        x = sample(DATA.denoiser, (n, 1, 4, 4), gens(n), sampler="ddim", schedule=LINEAR, **kw)
        bias[name] = (x.std(0) / sd - 1).mean().item()
    assert bias["quad"] - bias["even"] > 0.01, bias


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="dpmpp", schedule=LINEAR, timesteps=[5, 1]), "needs schedule= and sampler"),
    (dict(sampler="ddim", timesteps=[5, 1]), "needs schedule= and sampler"),
    (dict(sampler="ddim", schedule=LINEAR, timesteps=[]), "non-empty sequence of integers"),
    (dict(sampler="ddim", schedule=LINEAR, timesteps=[5.0, 1.0]), "sequence of integers"),
    (dict(sampler="ddim", schedule=LINEAR, timesteps=[1000, 3, -1]),
     r"timesteps \[1000, -1\] are outside the schedule's 0 .. 999"),
    (dict(sampler="ddim", schedule=LINEAR, timesteps=[7, 3, 7, 3, 9]), r"repeat \[3, 7\]"),
    (dict(sampler="ddim", schedule=LINEAR), "steps=None must be an integer"),
    (dict(sampler="ddim", schedule=LINEAR, timesteps=[7, 3], steps=5), "steps=5 disagrees"),
])
def test_explicit_timesteps_rejected_before_any_work(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        sample(lambda x, s: calls.append(1) or x, (2, 1, 4, 4), gens(2), **kwargs)
    assert not calls


@pytest.mark.parametrize("bad, match", [
    (dict(sampler="euler"), "'ddpm', 'ddim', 'dpmpp', 'heun'"),
    (dict(shape=(2, 4, 4)), "shape="),
    (dict(generators=gens(3)), "one torch.Generator per member"),
    (dict(eta=1.5), "eta="),
    (dict(variance="learned"), "variance="),
    (dict(steps=0), "steps="),
])
def test_sample_rejects_bad_input_before_any_work(bad, match):
    calls = []
    kwargs = dict(shape=(2, 1, 4, 4), generators=gens(2), sampler="ddpm", steps=5,
                  **EDM_RANGE) | bad
    shape, generators = kwargs.pop("shape"), kwargs.pop("generators")
    with pytest.raises(ValueError, match=match):
        sample(lambda x, s: calls.append(1) or x, shape, generators, **kwargs)
    assert not calls
    assert SAMPLERS == ("ddpm", "ddim", "dpmpp", "heun")


# -- gap filling --------------------------------------------------------------------------


RHO = 0.8
PAIR = Gaussian(torch.tensor([0.1, -0.2]).reshape(1, 1, 1, 2),
                torch.tensor([0.5, 0.7]).reshape(1, 1, 1, 2))
COV = torch.tensor([[0.25, RHO * 0.35], [RHO * 0.35, 0.49]], dtype=torch.float64)


def pair_denoiser(x, sigma):
    """Optimal denoiser of 2 correlated pixels: mu + S (S + sigma^2 I)^-1 (x - mu)."""
    gain = COV @ torch.linalg.inv(COV + sigma.double().reshape(-1, 1, 1) ** 2 * torch.eye(2))
    mu = PAIR.mu.reshape(1, 2, 1)
    out = mu + gain @ (x.double().reshape(-1, 2, 1) - mu)  # (B, 2, 1)
    return out.reshape(x.shape).to(x.dtype)


def test_inpaint_keeps_observations_and_fills_with_the_conditional_law():
    """Observe pixel 0 = 0.6; pixel 1 | pixel 0 ~ N(mu1 + rho s1/s0 (0.6 - mu0),
    s1^2 (1 - rho^2)) = N(0.36, 0.42^2).  RePaint is approximate: with 200 steps and 20
    resampling jumps its bias here is ~2 % of the conditional shift and ~1 % of the std
    (measured), below the 5 SE tolerance."""
    n = 3000
    observed = torch.tensor([0.6, float("nan")]).reshape(1, 1, 1, 2).repeat(n, 1, 1, 1)
    mask = torch.tensor([True, False]).reshape(1, 1, 1, 2)
    x, nfe = inpaint(pair_denoiser, observed, mask, gens(n), steps=200, resample=20,
                     return_nfe=True, **EDM_RANGE)
    assert nfe == 199 * 20 + 1
    assert torch.equal(x[:, 0, 0, 0], observed[:, 0, 0, 0])
    filled = x[:, 0, 0, 1].double()
    cond_mean = -0.2 + RHO * 0.7 / 0.5 * (0.6 - 0.1)
    cond_std = 0.7 * math.sqrt(1 - RHO**2)
    assert abs(filled.mean().item() - cond_mean) < 5 * cond_std / math.sqrt(n)
    assert abs(filled.std().item() / cond_std - 1) < 5 / math.sqrt(2 * (n - 1))


def test_inpaint_is_reproducible_per_member_and_exact_on_observed_pixels():
    observed = torch.randn(4, 1, 4, 4, generator=gen(0))
    mask = torch.rand(1, 1, 4, 4, generator=gen(1)) < 0.5
    kwargs = dict(steps=8, resample=3, schedule=make_schedule("cosine", 100))
    batch = inpaint(DATA.denoiser, observed, mask, gens(4, start=5), **kwargs)
    alone = inpaint(DATA.denoiser, observed[1:2], mask, [gen(6)], **kwargs)
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(batch[mask.expand_as(batch)], observed[mask.expand_as(observed)])
    assert not torch.equal(batch[~mask.expand_as(batch)], observed[~mask.expand_as(observed)])


@pytest.mark.parametrize("mask, resample, error", [
    (torch.ones(1, 1, 4, 4), 2, TypeError),
    (torch.ones(1, 1, 3, 4, dtype=torch.bool), 2, ValueError),
    (torch.ones(1, 1, 4, 4, dtype=torch.bool), 0, ValueError),
])
def test_inpaint_rejects_bad_input(mask, resample, error):
    with pytest.raises(error, match="known_mask|resample="):
        inpaint(DATA.denoiser, torch.zeros(2, 1, 4, 4), mask, gens(2), steps=4,
                resample=resample, **EDM_RANGE)
