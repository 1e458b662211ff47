"""Samplers against diffusers' schedulers step by step: a deterministic fake network, the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    """diffusers' scheduler for `sampler` on the same config.

    exact: hand it dtk's float64 ᾱ (and, for DPM-Solver, float64 σ's) instead of the float32 schedule it
    builds itself: near t = 0 float32 holds 1 − ᾱ only to ~3e-4 relative, which alone moves x0 by ~1e-4."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kwargs = config.to_diffusers()
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**kwargs, variance_type="fixed_small")
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=set_alpha_to_one)
    else:
        del kwargs["clip_sample"], kwargs["clip_sample_range"]
        scheduler = DPMSolverMultistepScheduler(**kwargs, solver_order=2, algorithm_type="dpmsolver++")
    if exact:
        scheduler.alphas_cumprod = torch.from_numpy(config.alphas_cumprod)
        if sampler == "ddim" and not set_alpha_to_one:
            scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(steps)
    if exact and sampler == "dpmpp-2m":
        abar = config.alphas_cumprod[scheduler.timesteps.numpy()]
        scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - abar) / abar), 0.0))
    return scheduler


def run_diffusers(scheduler, sampler, config, x, noises, eta=0.0, dtype=torch.float64, monkeypatch=None):
    """diffusers' own loop: x after each step, fed the same network and noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    network = fake_network(config)
    sample = torch.from_numpy(x).to(dtype)
    trajectory = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        out = torch.from_numpy(np.asarray(network(sample.double().numpy(), t))).to(dtype)
        noise = torch.from_numpy(noises.get(i, np.zeros_like(x))).to(dtype)
        if sampler == "ddpm":  # DDPMScheduler.step takes no noise argument: hand it ours
            monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, noise=noise, **kwargs: noise)
            sample = scheduler.step(out, t, sample).prev_sample
        elif sampler == "ddim":
            sample = scheduler.step(out, t, sample, eta=eta, variance_noise=noise).prev_sample
        else:
            sample = scheduler.step(out, t, sample).prev_sample
        trajectory.append(sample.double().numpy())
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
