"""Samplers against diffusers' schedulers step by step: a deterministic fake network, the same noise."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from dtk.runtime.diffusers_config import reproduction_gaps
from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import SAMPLERS, NoiseSource, SamplerPlan, make_plan, sample_loop
from dtk.runtime.samplers.ddim import ddim_plan
from dtk.runtime.schedule import DiffusionConfig

# diffusers' DPMSolverMultistepScheduler calls np.array() on a tensor, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (1, 4, 4)  # C, H, W
NUM = 2


def fake_network(config: DiffusionConfig):
    """A fixed nonlinear function of (x, t): the output a network would give if it believed
    x0 = 1.3·tanh(1.5x + 0.3·sin(t/50)) — so trajectories stay bounded and x0 often leaves [-1, 1]."""
    abar = config.alphas_cumprod

    def network(x, t):
        tanh = torch.tanh if isinstance(x, torch.Tensor) else np.tanh
        alpha, sigma = float(np.sqrt(abar[t])), float(np.sqrt(1.0 - abar[t]))
        x0 = 1.3 * tanh(1.5 * x + 0.3 * np.sin(t / 50.0))
        eps = (x - alpha * x0) / sigma
        if config.prediction_type == "epsilon":
            return eps
        if config.prediction_type == "v_prediction":
            return alpha * eps - sigma * x0
        return x0

    return network


def run_dtk(plan: SamplerPlan, config: DiffusionConfig, seed: int = 0, dtype=np.float64):
    """→ (initial x, {step: noise}, [x after each step]) with the sampler loop on numpy arrays."""
    source = NoiseSource(seed)
    x = source.initial(NUM, SHAPE).astype(dtype)
    noises, trajectory = {}, []

    def noise(i):
        noises[i] = source.step(NUM, SHAPE).astype(dtype)
        return noises[i]

    sample_loop(fake_network(config), x.copy(), plan, noise, lambda i, t, x: trajectory.append(x.copy()))
    return x, noises, trajectory


def make_scheduler(
    sampler: str, config: DiffusionConfig, steps: int, set_alpha_to_one: bool = True, exact=True
):
    """diffusers' scheduler for `sampler` on the same config (its class and fields from `to_diffusers`).

    exact: hand it dtk's float64 ᾱ (and, for the σ-stepping samplers, float64 σ's) instead of the float32
    schedule it builds itself: near t = 0 float32 holds 1 − ᾱ only to ~3e-4 relative, which alone moves x0 by
    ~1e-4."""
    import diffusers

    config = dataclasses.replace(config, set_alpha_to_one=set_alpha_to_one)
    kwargs = config.to_diffusers(sampler)
    scheduler = getattr(diffusers, kwargs.pop("_class_name"))(**kwargs)
    if exact:
        scheduler.alphas_cumprod = torch.from_numpy(config.alphas_cumprod)
        if sampler == "ddim" and not set_alpha_to_one:
            scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(steps)
    if exact and sampler in SIGMA_SAMPLERS:
        plan_sigmas = _plan_sigmas(sampler, config, steps)
        scheduler.sigmas = torch.from_numpy(plan_sigmas)
    return scheduler


SIGMA_SAMPLERS = ("dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m", "unipc", "euler", "euler-ancestral")


def _plan_sigmas(sampler, config, steps):
    from dtk.runtime.samplers.sigmas import solver_schedule

    if sampler.startswith("euler"):
        from dtk.runtime.samplers.euler import euler_timesteps

        last = config.sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
        return np.append(config.sigmas[euler_timesteps(sampler, config, steps)], last)
    return solver_schedule(sampler, config, steps)[1]


def run_diffusers(scheduler, sampler, config, x, noises, eta=0.0, dtype=torch.float64, monkeypatch=None):
    """diffusers' own loop: x after each step, fed the same network and noise.

    The Euler schedulers step x_ve = x/α: they start from x·√(1 + σ_0²) and feed the network
    scale_model_input(x_ve); their x after each step is compared as α·x_ve."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    network = fake_network(config)
    euler = sampler.startswith("euler")
    sigmas = scheduler.sigmas.double().numpy() if euler else None
    sample = torch.from_numpy(x).to(dtype)
    if euler:
        sample = sample * float(np.sqrt(1.0 + sigmas[0] ** 2))
    trajectory = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        model_input = scheduler.scale_model_input(sample, t) if euler else sample
        out = torch.from_numpy(np.asarray(network(model_input.double().numpy(), int(round(t))))).to(dtype)
        noise = torch.from_numpy(noises.get(i, np.zeros_like(x))).to(dtype)
        if sampler == "ddpm":  # DDPMScheduler.step takes no noise argument: hand it ours
            monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, noise=noise, **kwargs: noise)
            sample = scheduler.step(out, t, sample).prev_sample
        elif sampler == "ddim":
            sample = scheduler.step(out, t, sample, eta=eta, variance_noise=noise).prev_sample
        elif sampler == "dpmpp-2m-sde":
            sample = scheduler.step(out, t, sample, variance_noise=noise).prev_sample
        elif sampler == "euler-ancestral":
            module = sys.modules[type(scheduler).__module__]
            monkeypatch.setattr(module, "randn_tensor", lambda *args, noise=noise, **kwargs: noise)
            sample = scheduler.step(out, t, sample).prev_sample
        else:
            sample = scheduler.step(out, t, sample).prev_sample
        scale = 1.0 / np.sqrt(1.0 + sigmas[i + 1] ** 2) if euler else 1.0
        trajectory.append(sample.double().numpy() * scale)
    return trajectory


def assert_same_trajectory(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"x after step {i}")


def _config(schedule, prediction, clip=False, spacing="leading", offset=0):
    return DiffusionConfig(
        beta_schedule=schedule,
        prediction_type=prediction,
        clip_sample=clip,
        timestep_spacing=spacing,
        steps_offset=offset,
    )


GRID = [(s, p) for s in ("linear", "cosine") for p in ("epsilon", "v_prediction", "sample")]


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("schedule, prediction", GRID)
def test_ddpm_matches_diffusers(schedule, prediction, clip, monkeypatch):
    config = _config(schedule, prediction, clip)
    plan = make_plan("ddpm", config, 50)
    x, noises, ours = run_dtk(plan, config)
    theirs = run_diffusers(
        make_scheduler("ddpm", config, 50), "ddpm", config, x, noises, monkeypatch=monkeypatch
    )
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize(
    "schedule, prediction, clip, spacing, offset, steps",
    [
        ("linear", "epsilon", False, "leading", 0, 1000),  # the full Markov chain
        ("cosine", "v_prediction", True, "trailing", 0, 1000),
        ("linear", "sample", True, "linspace", 0, 7),
        ("cosine", "epsilon", False, "trailing", 0, 3),
        ("linear", "v_prediction", False, "leading", 1, 10),
        ("cosine", "epsilon", True, "linspace", 0, 1),
    ],
)
def test_ddpm_matches_diffusers_at_other_step_counts(
    schedule, prediction, clip, spacing, offset, steps, monkeypatch
):
    config = _config(schedule, prediction, clip, spacing, offset)
    plan = make_plan("ddpm", config, steps)
    x, noises, ours = run_dtk(plan, config)
    scheduler = make_scheduler("ddpm", config, steps)
    assert_same_trajectory(ours, run_diffusers(scheduler, "ddpm", config, x, noises, monkeypatch=monkeypatch))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("schedule, prediction", GRID)
def test_ddim_matches_diffusers(schedule, prediction, clip, eta):
    config = _config(schedule, prediction, clip)
    plan = make_plan("ddim", config, 20, eta=eta)
    x, noises, ours = run_dtk(plan, config)
    assert_same_trajectory(
        ours, run_diffusers(make_scheduler("ddim", config, 20), "ddim", config, x, noises, eta)
    )


@pytest.mark.parametrize(
    "schedule, prediction, clip, spacing, offset, steps, eta, alpha_to_one",
    [
        ("linear", "epsilon", True, "trailing", 0, 7, 0.5, True),
        ("cosine", "v_prediction", False, "linspace", 0, 9, 0.3, True),
        ("linear", "epsilon", False, "leading", 1, 50, 0.0, True),
        ("cosine", "sample", True, "leading", 0, 1, 1.0, True),
        ("linear", "epsilon", False, "leading", 0, 10, 0.0, False),
        ("cosine", "epsilon", True, "trailing", 0, 250, 1.0, False),
    ],
)
def test_ddim_matches_diffusers_at_other_settings(
    schedule, prediction, clip, spacing, offset, steps, eta, alpha_to_one
):
    config = _config(schedule, prediction, clip, spacing, offset)
    plan = ddim_plan(config, steps, eta=eta, set_alpha_to_one=alpha_to_one)
    x, noises, ours = run_dtk(plan, config)
    scheduler = make_scheduler("ddim", config, steps, set_alpha_to_one=alpha_to_one)
    assert_same_trajectory(ours, run_diffusers(scheduler, "ddim", config, x, noises, eta))


# DPMSolverMultistepScheduler.step casts the sample to float32, so its trajectories carry float32 rounding
@pytest.mark.parametrize(
    "spacing, steps", [("linspace", 20), ("leading", 50), ("trailing", 7), ("linspace", 2)]
)
@pytest.mark.parametrize("schedule, prediction", GRID)
def test_dpmpp_2m_matches_diffusers(schedule, prediction, spacing, steps):
    config = _config(schedule, prediction, spacing=spacing)
    plan = make_plan("dpmpp-2m", config, steps)
    x, noises, ours = run_dtk(plan, config)
    assert noises == {}
    assert_same_trajectory(
        ours, run_diffusers(make_scheduler("dpmpp-2m", config, steps), "dpmpp-2m", config, x, {})
    )


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 10, 998])
def test_dpmpp_2m_timesteps_are_diffusers(spacing, steps):
    config = _config("linear", "epsilon", spacing=spacing, offset=1 if spacing == "leading" else 0)
    ours = make_plan("dpmpp-2m", config, steps).timesteps
    theirs = make_scheduler("dpmpp-2m", config, steps, exact=False).timesteps.numpy()
    if len(theirs) == steps + 1:  # diffusers' trailing spacing can add a t = -1 step (998 steps: it does)
        assert spacing == "trailing" and theirs[-1] == -1
        theirs = theirs[:steps]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_stock_diffusers_in_float32(sampler, monkeypatch):
    """Unmodified diffusers (its float32 schedule, float32 samples): equal to float32 precision."""
    config = _config("linear", "epsilon", clip=True, spacing="trailing")
    if reproduction_gaps(config, sampler):  # diffusers' Euler schedulers cannot clip x0
        assert sampler.startswith("euler")
        config = _config("linear", "epsilon", clip=False, spacing="trailing")
    plan = make_plan(sampler, config, 25, eta=1.0 if sampler == "ddim" else 0.0)
    x, noises, ours = run_dtk(plan, config, dtype=np.float32)
    scheduler = make_scheduler(sampler, config, 25, exact=False)
    theirs = run_diffusers(scheduler, sampler, config, x, noises, 1.0, torch.float32, monkeypatch)
    assert_same_trajectory(ours, theirs, atol=2e-4)


def test_clipping_changes_the_trajectory():
    """The fake's x0 leaves [-1, 1], so the clip_sample cases above test clipping."""
    runs = [
        run_dtk(make_plan("ddim", _config("linear", "epsilon", clip), 20), _config("linear", "epsilon"))[2][
            -1
        ]
        for clip in (False, True)
    ]
    assert np.abs(runs[0]).max() > 1.1 and np.abs(runs[1]).max() <= 1.0


def _options(config: DiffusionConfig, **options) -> DiffusionConfig:
    return dataclasses.replace(config, **options)


THRESHOLD = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.2}
# (sampler, schedule, prediction, spacing, steps, options): each new sampler and option against diffusers
NEW_CASES = [
    ("dpmpp-2m-sde", "linear", "epsilon", "linspace", 20, {}),
    ("dpmpp-2m-sde", "cosine", "v_prediction", "trailing", 7, {"solver_type": "heun"}),
    ("dpmpp-2m-sde", "linear", "sample", "leading", 12, {"use_karras_sigmas": True}),
    ("dpmpp-3m", "linear", "epsilon", "linspace", 20, {}),
    ("dpmpp-3m", "cosine", "v_prediction", "leading", 10, {}),
    ("dpmpp-3m", "linear", "sample", "trailing", 16, {"use_karras_sigmas": True}),
    ("dpmpp-3m", "linear", "epsilon", "linspace", 18, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp-2m", "linear", "epsilon", "linspace", 20, {"solver_type": "heun"}),
    ("dpmpp-2m", "linear", "epsilon", "trailing", 10, {"use_karras_sigmas": True}),
    ("dpmpp-2m", "linear", "v_prediction", "leading", 16, {"final_sigmas_type": "sigma_min"}),
    (
        "dpmpp-2m",
        "linear",
        "epsilon",
        "linspace",
        8,
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    ),
    (
        "dpmpp-2m",
        "linear",
        "epsilon",
        "trailing",
        9,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    ),
    ("dpmpp-2m", "linear", "epsilon", "linspace", 10, THRESHOLD),
    ("dpmpp-3m", "cosine", "epsilon", "trailing", 10, THRESHOLD),
    ("unipc", "linear", "epsilon", "linspace", 20, {}),
    ("unipc", "cosine", "v_prediction", "trailing", 7, {}),
    ("unipc", "linear", "sample", "leading", 10, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", "linear", "epsilon", "trailing", 12, {"use_karras_sigmas": True}),
    ("unipc", "cosine", "epsilon", "linspace", 9, {"final_sigmas_type": "sigma_min"}),
    ("unipc", "linear", "epsilon", "leading", 10, {"disable_corrector": (0, 3)}),
    (
        "unipc",
        "linear",
        "epsilon",
        "linspace",
        16,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    ),
    ("unipc", "linear", "v_prediction", "linspace", 10, THRESHOLD),
    ("euler", "linear", "epsilon", "leading", 20, {}),
    ("euler", "cosine", "v_prediction", "trailing", 7, {"final_sigmas_type": "sigma_min"}),
    ("euler", "linear", "epsilon", "linspace", 10, {}),
    ("euler-ancestral", "linear", "epsilon", "leading", 20, {}),
    ("euler-ancestral", "cosine", "v_prediction", "trailing", 9, {}),
    ("euler-ancestral", "linear", "epsilon", "linspace", 28, {}),
    ("ddpm", "linear", "epsilon", "leading", 50, {"variance_type": "fixed_large"}),
    ("ddpm", "cosine", "v_prediction", "trailing", 10, {"variance_type": "fixed_large"}),
    ("ddpm", "linear", "epsilon", "leading", 20, THRESHOLD),
    ("ddim", "linear", "epsilon", "leading", 10, {"set_alpha_to_one": False}),
    ("ddim", "cosine", "sample", "trailing", 15, {**THRESHOLD, "clip_sample": True}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("sampler, schedule, prediction, spacing, steps, options", NEW_CASES)
def test_new_samplers_and_options_match_diffusers(
    sampler, schedule, prediction, spacing, steps, options, dtype, monkeypatch
):
    """float64: dtk's float64 schedule handed to diffusers; float32: diffusers as it comes (float32)."""
    config = _options(_config(schedule, prediction, spacing=spacing), **options)
    assert not reproduction_gaps(config, sampler)
    plan = make_plan(sampler, config, steps)
    exact = dtype == torch.float64
    x, noises, ours = run_dtk(plan, config, dtype=np.float64 if exact else np.float32)
    assert bool(noises) == (sampler in ("ddpm", "dpmpp-2m-sde", "euler-ancestral"))
    scheduler = make_scheduler(sampler, config, steps, config.set_alpha_to_one, exact=exact)
    np.testing.assert_array_equal(plan.timesteps, np.asarray(scheduler.timesteps.tolist()).round()[:steps])
    theirs = run_diffusers(scheduler, sampler, config, x, noises, dtype=dtype, monkeypatch=monkeypatch)
    # float32: diffusers' float32 schedule alone moves x by ~1e-4 (linear) and ~1e-3 (cosine: σ_max ≈ 2e4)
    assert_same_trajectory(ours, theirs, atol=1e-5 if exact else 5e-4 if schedule == "linear" else 1.5e-3)


def test_unipc_bh1_lands_on_sigma_zero_where_diffusers_gives_nan():
    """diffusers multiplies B(h) = −h = −∞ by a zero on the last bh1 step; dtk leaves the term out."""
    config = _options(_config("linear", "epsilon"), solver_type="bh1")
    x, noises, ours = run_dtk(make_plan("unipc", config, 10), config)
    theirs = run_diffusers(make_scheduler("unipc", config, 10), "unipc", config, x, noises)
    assert_same_trajectory(ours[:-1], theirs[:-1])
    assert np.isnan(theirs[-1]).all() and np.isfinite(ours[-1]).all()


def test_thresholding_changes_the_trajectory_on_every_sampler():
    config = _config("linear", "epsilon")
    for sampler in SAMPLERS:
        runs = [
            run_dtk(make_plan(sampler, _options(config, **opts), 10), config)[2][-1]
            for opts in ({}, {**THRESHOLD, "sample_max_value": 1.0})
        ]
        assert np.abs(runs[0]).max() > 1.05, sampler
        assert np.abs(runs[1]).max() <= 1.0 + 1e-9, sampler  # max 1: thresholding is clipping to ±1


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_lambda_min_clipped_timesteps_are_diffusers(spacing):
    config = _options(_config("cosine", "epsilon", spacing=spacing), lambda_min_clipped=-5.1)
    plan = make_plan("dpmpp-2m", config, 10)
    unclipped = make_plan("dpmpp-2m", _config("cosine", "epsilon", spacing=spacing), 10)
    assert (plan.timesteps != unclipped.timesteps).any() == (spacing != "leading")  # T // 11 either way
    theirs = make_scheduler("dpmpp-2m", config, 10, exact=False).timesteps.numpy()
    np.testing.assert_array_equal(plan.timesteps, theirs)


def test_ddim_set_alpha_to_one_comes_from_the_config():
    config = _config("linear", "epsilon")
    plan_default = make_plan("ddim", config, 10)
    plan_sd = make_plan("ddim", _options(config, set_alpha_to_one=False), 10)
    # the last step lands on ᾱ_0 instead of 1: x_prev = √ᾱ_0·x0 + √(1 − ᾱ_0)·ε
    assert plan_default.coeffs[-1, 4] == 1.0 and plan_sd.coeffs[-1, 4] == pytest.approx(np.sqrt(0.9999))
    np.testing.assert_array_equal(plan_default.coeffs[:-1], plan_sd.coeffs[:-1])


@pytest.mark.parametrize("sampler", ["euler", "euler-ancestral"])
def test_euler_refuses_what_it_cannot_feed_the_network(sampler):
    with pytest.raises(DtkError, match="fractional timesteps"):
        make_plan(sampler, _config("linear", "epsilon", spacing="linspace"), 20)
    with pytest.raises(DtkError, match="use_karras_sigmas"):
        make_plan(sampler, _options(_config("linear", "epsilon"), use_karras_sigmas=True), 10)


def test_dpm_solver_refuses_karras_sigmas_on_the_cosine_schedule():
    config = _options(_config("cosine", "epsilon"), use_karras_sigmas=True)
    with pytest.raises(DtkError, match="fractional timesteps"):
        make_plan("dpmpp-2m", config, 10)
