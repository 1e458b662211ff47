"""Sampler plans: pinned coefficients, identities between samplers, the update and loop on numpy and torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import SAMPLERS, NoiseSource, SamplerPlan, Threshold, make_plan, sample_loop, update
from dtk.runtime.samplers.plan import dynamic_threshold
from dtk.runtime.schedule import DiffusionConfig

LINEAR = DiffusionConfig()
SHAPE = (1, 2, 2)


def network(config: DiffusionConfig):
    """A fake ε-network that believes x0 = 0.9·tanh(2x); float32 in, float32 out."""
    abar = config.alphas_cumprod

    def denoise(x, t):
        alpha, sigma = math.sqrt(abar[t]), math.sqrt(1.0 - abar[t])
        return (x - alpha * 0.9 * np.tanh(2 * x)) / sigma

    return denoise


def run(plan: SamplerPlan, config=LINEAR, num=2, seed=0, dtype=np.float32):
    source = NoiseSource(seed)
    x = source.initial(num, SHAPE).astype(dtype)
    return sample_loop(network(config), x, plan, lambda i: source.step(num, SHAPE).astype(dtype))


def test_registry():
    assert SAMPLERS == (
        "ddpm",
        "ddim",
        "dpmpp-2m",
        "dpmpp-2m-sde",
        "dpmpp-3m",
        "unipc",
        "euler",
        "euler-ancestral",
    )
    for name in SAMPLERS:
        plan = make_plan(name, LINEAR, 10)
        assert plan.name == name and plan.timesteps.dtype == np.int64 and plan.coeffs.dtype == np.float64
        assert plan.coeffs.shape == (10, 8) and plan.steps == 10
        assert plan.history == (2 if name in ("dpmpp-3m", "unipc") else 1)


def test_ddpm_plan_pinned():
    plan = make_plan("ddpm", LINEAR, 10)
    np.testing.assert_array_equal(plan.timesteps, np.arange(900, -1, -100))
    np.testing.assert_allclose(
        plan.coeffs[0],
        [
            60.830523266190347,
            -60.822303153025409,
            0.42287200340654674,
            0,
            0.031875166798809716,
            0,
            0.90538393679022144,
            0,
        ],
        rtol=1e-12,
    )
    assert plan.needs_noise.tolist() == [True] * 9 + [False]
    assert plan.clip is None


def test_ddim_plan_pinned():
    plan = make_plan("ddim", LINEAR, 10)
    np.testing.assert_allclose(
        plan.coeffs[5],
        [2.2728915839172408, -2.041087002614495, 0, 0.7784528742811719, 0.6277030528230543, 0, 0, 0],
    )
    assert not plan.needs_noise.any()
    assert make_plan("ddim", LINEAR, 10, eta=0.5).needs_noise.tolist() == [True] * 9 + [False]


def test_dpmpp_2m_plan_pinned():
    plan = make_plan("dpmpp-2m", LINEAR, 10)
    np.testing.assert_array_equal(plan.timesteps, np.arange(900, 0, -90))  # leading: T // (S + 1) apart
    row = [
        2.818984367868274,
        -2.63565416287602,
        0.9178958625286687,
        0,
        0.2745351756600548,
        -0.08683414873543235,
        0,
        0,
    ]
    np.testing.assert_allclose(plan.coeffs[5], row, rtol=1e-12)
    assert plan.coeffs[0, 5] == 0 and plan.coeffs[-1, 5] == 0  # first order on the first and last steps
    assert np.all(plan.coeffs[1:-1, 5] != 0)
    assert not plan.needs_noise.any()


def test_dpmpp_first_step_is_ddim():
    """DPM-Solver++(1) from t to s: x_s = (σ_s/σ_t)·x_t + (α_s − α_t·σ_s/σ_t)·x0."""
    plan = make_plan("dpmpp-2m", LINEAR, 10)
    abar = LINEAR.alphas_cumprod[plan.timesteps[:2]]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    p, q, a, b, c, d, e, d2 = plan.coeffs[0]
    assert a == pytest.approx(sigma[1] / sigma[0], rel=1e-12)
    assert c == pytest.approx(alpha[1] - alpha[0] * sigma[1] / sigma[0], rel=1e-12)
    assert (p, q) == pytest.approx((1 / alpha[0], -sigma[0] / alpha[0]), rel=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_last_step_returns_x0(sampler, prediction):
    """Every sampler ends on ᾱ = 1 (σ = 0): the final sample is the last x0 prediction."""
    plan = make_plan(sampler, DiffusionConfig(prediction_type=prediction), 10)
    assert tuple(plan.coeffs[-1, 2:]) == pytest.approx((0, 0, 1, 0, 0, 0), abs=1e-12)


def test_ddim_with_eta_one_over_all_timesteps_is_ddpm():
    """DDIM's σ_t(η = 1) is DDPM's posterior variance: the two chains agree for the same noise."""
    ddpm = run(make_plan("ddpm", LINEAR, 1000), num=1, dtype=np.float64)
    ddim = run(make_plan("ddim", LINEAR, 1000, eta=1.0), num=1, dtype=np.float64)
    np.testing.assert_allclose(ddim, ddpm, atol=1e-9)


def test_sampled_values_pinned():
    pins = {
        "ddpm": [-0.8474806968044251, -0.8382751350275643, -0.8246449560147899, -0.8118451875177263],
        "ddim": [0.8514771076454912, -0.8528101592138783, 0.8439185870299566, -0.855331480989467],
        "dpmpp-2m": [0.8838798655515379, -0.8884229205406139, 0.8579926246902763, -0.8953856082550798],
    }
    for name, expected in pins.items():
        out = run(make_plan(name, LINEAR, 10))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out[:, 0, 0, :].ravel(), expected, atol=2e-6, err_msg=name)


def test_clip_plan_follows_config():
    config = DiffusionConfig(clip_sample=True, clip_sample_range=1.5)
    assert make_plan("ddpm", config, 5).clip == 1.5 and make_plan("ddim", config, 5).clip == 1.5
    # dtk clips x0 on every sampler (diffusers' DPM-Solver: its thresholding with sample_max_value 1)
    assert all(make_plan(name, config, 5).clip == 1.5 for name in SAMPLERS)
    thresholded = make_plan("unipc", DiffusionConfig(clip_sample=True, thresholding=True), 5)
    assert thresholded.clip is None and thresholded.threshold.ratio == 0.995


def test_update_formula():
    row = np.array([2.0, -1.0, 0.5, 0.25, 3.0, -2.0, 0.1])
    x, out, x0_prev, noise = (np.array([v], dtype=np.float32) for v in (1.0, 4.0, 0.5, -1.0))
    x_next, x0 = update(row, x, out, x0_prev, noise, None)
    assert x0.tolist() == [-2.0]  # 2·1 − 4
    assert x_next == pytest.approx([0.5 + 1.0 - 6.0 - 1.0 - 0.1])
    x_next, x0 = update(row, x, out, x0_prev, noise, 1.0)
    assert x0.tolist() == [-1.0] and x_next == pytest.approx([0.5 + 1.0 - 3.0 - 1.0 - 0.1])


def test_update_skips_noise_when_e_is_zero():
    x = np.ones(3, dtype=np.float32)
    x_next, _ = update(np.array([1.0, 0, 0.5, 0, 0, 0, 0]), x, x, x, None, None)
    assert x_next.dtype == np.float32 and x_next.tolist() == [0.5] * 3


@pytest.mark.parametrize("threshold", [None, Threshold(0.8, 1.3)])
def test_update_on_torch_matches_numpy(threshold):
    import torch

    rng = np.random.default_rng(0)
    x, out, x0_prev, x0_prev2, noise = (
        rng.standard_normal((2, 1, 3, 3)).astype(np.float32) for _ in range(5)
    )
    row = make_plan("unipc", LINEAR, 10).coeffs[4] + np.array([0, 0, 0, 0, 0, 0, 0.3, 0])
    assert row[7] != 0  # UniPC uses x0 two steps back
    clip = None if threshold else 1.0
    ours = update(row, x, out, x0_prev, noise, clip, x0_prev2, threshold)
    tensors = [torch.from_numpy(a) for a in (x, out, x0_prev, noise)]
    theirs = update(row, *tensors, clip, torch.from_numpy(x0_prev2), threshold)
    for a, b in zip(ours, theirs, strict=True):
        assert b.dtype == torch.float32
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-6, atol=1e-6)


def test_dynamic_threshold_pinned():
    """Per image: s = the ratio-quantile of |x0| (linear interpolation), clamped to [1, max]; x0 → clip/s."""
    x0 = np.array([[0.5, -3.0, 2.0, 1.0], [0.2, 0.4, -0.6, 0.8]]).reshape(2, 1, 2, 2)
    out = dynamic_threshold(x0, Threshold(0.5, 1.6))
    # image 0: |x0| sorted 0.5 1 2 3, median 1.5 → s = 1.5; image 1: median 0.5 → s = 1 (plain clipping)
    np.testing.assert_allclose(out[0].ravel(), [0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5])
    np.testing.assert_allclose(out[1].ravel(), [0.2, 0.4, -0.6, 0.8])
    np.testing.assert_allclose(dynamic_threshold(x0, Threshold(1.0, 2.0))[0].ravel(), [0.25, -1, 1, 0.5])


def test_sample_loop_on_torch_matches_numpy():
    import torch

    plan = make_plan("ddpm", LINEAR, 20)
    expected = run(plan)
    source = NoiseSource(0)
    x = torch.from_numpy(source.initial(2, SHAPE))
    denoise = network(LINEAR)
    out = sample_loop(
        lambda x, t: torch.from_numpy(denoise(x.numpy(), t)),
        x,
        plan,
        lambda i: torch.from_numpy(source.step(2, SHAPE)),
    )
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_sample_loop_calls():
    plan = make_plan("ddim", LINEAR, 5, eta=0.5)
    calls, noise_steps, seen = [], [], []

    def denoise(x, t):
        calls.append(t)
        assert isinstance(t, int)
        return np.zeros_like(x)

    def noise(i):
        noise_steps.append(i)
        return np.zeros((1, *SHAPE), dtype=np.float32)

    sample_loop(
        denoise, np.ones((1, *SHAPE), dtype=np.float32), plan, noise, lambda i, t, x: seen.append((i, t))
    )
    assert calls == [800, 600, 400, 200, 0]
    assert noise_steps == [0, 1, 2, 3]  # the last DDIM step lands on ᾱ = 1: no noise
    assert seen == list(enumerate(calls))


def test_sample_loop_needs_noise_for_noisy_plans():
    x = np.zeros((1, *SHAPE), dtype=np.float32)
    with pytest.raises(ValueError, match="noise"):
        sample_loop(lambda x, t: x, x, make_plan("ddpm", LINEAR, 3), None)
    assert sample_loop(lambda x, t: x, x, make_plan("ddim", LINEAR, 3), None).shape == x.shape


def test_trailing_spacing_gives_the_requested_steps():
    """diffusers' trailing spacing returns 62 timesteps (the last -1) for 61 steps; plans keep 61."""
    config = DiffusionConfig(timestep_spacing="trailing")
    for sampler in SAMPLERS:
        ts = make_plan(sampler, config, 61).timesteps
        assert len(ts) == 61 and ts.min() >= 0 and ts[0] == 999


@pytest.mark.parametrize(
    "sampler, steps, kwargs, message",
    [
        ("euler-a", 10, {}, "unknown sampler 'euler-a'; choose one of ddpm, ddim, dpmpp-2m, dpmpp-2m-sde"),
        ("ddim", 0, {}, "steps must be between 1 and num_train_timesteps \\(1000\\), got 0"),
        ("ddpm", 1001, {}, "got 1001"),
        ("dpmpp-2m", 5000, {}, "got 5000"),
        ("ddim", 2.5, {}, "steps must be an integer"),
        ("ddpm", 10, {"eta": 0.5}, "eta applies to the ddim sampler only"),
        ("ddim", 10, {"eta": 1.5}, "eta must be between 0 and 1"),
        ("ddim", 10, {"eta": -0.1}, "eta must be between 0 and 1"),
        ("dpmpp-2m", 1000, {}, "repeated"),  # linspace over S + 1 points repeats timesteps at S = T
    ],
)
def test_bad_requests_are_refused(sampler, steps, kwargs, message):
    config = DiffusionConfig(timestep_spacing="linspace") if sampler == "dpmpp-2m" else LINEAR
    with pytest.raises(DtkError, match=message):
        make_plan(sampler, config, steps, **kwargs)


def test_offset_past_the_last_timestep_is_refused():
    config = DiffusionConfig(steps_offset=1)
    assert make_plan("ddpm", config, 999).timesteps[0] == 999
    with pytest.raises(DtkError, match="past the last trained one"):
        make_plan("ddpm", config, 1000)


def test_plan_checks_its_arrays():
    with pytest.raises(ValueError, match="coeffs"):
        SamplerPlan("x", np.arange(3), np.zeros((3, 6)), None)
    with pytest.raises(ValueError, match="non-finite"):
        SamplerPlan("x", np.arange(1), np.full((1, 7), np.nan), None)


def ideal_network(config: DiffusionConfig, data: np.ndarray):
    """The exact minimiser of the training loss for a dataset of K images: x0̂ = E[x0 | x_t], a softmax over
    the images weighted by how likely each makes x_t — the denoiser a perfect network would learn."""
    abar = config.alphas_cumprod
    flat = data.reshape(len(data), -1).astype(np.float64)

    def denoise(x, t):
        alpha, sigma = math.sqrt(abar[t]), math.sqrt(1.0 - abar[t])
        xt = x.reshape(len(x), -1).astype(np.float64)
        logits = -((xt[:, None, :] - alpha * flat[None]) ** 2).sum(-1) / (2 * sigma**2)
        weights = np.exp(logits - logits.max(1, keepdims=True))
        x0 = (weights / weights.sum(1, keepdims=True)) @ flat
        eps = (xt - alpha * x0) / sigma
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[config.prediction_type]
        return out.reshape(x.shape).astype(np.float32)

    return denoise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 25), ("dpmpp-2m", 15)])
def test_an_ideal_network_reproduces_its_training_images(sampler, steps, prediction):
    """End to end, beyond step-by-step parity: every sampler lands on an image the ideal network knows."""
    data = np.sign(np.random.default_rng(1).standard_normal((6, 1, 4, 4))).astype(np.float32)
    config = DiffusionConfig(beta_schedule="cosine", prediction_type=prediction)
    source = NoiseSource(0)
    plan = make_plan(sampler, config, steps)
    x = source.initial(8, (1, 4, 4))
    out = sample_loop(ideal_network(config, data), x, plan, lambda i: source.step(8, (1, 4, 4)))
    distance = np.abs(out[:, None] - data[None]).reshape(8, 6, -1).max(-1)  # [sample, image]
    assert distance.min(1).max() < 1e-2
    assert len(set(distance.argmin(1).tolist())) >= 3  # not one image every time
