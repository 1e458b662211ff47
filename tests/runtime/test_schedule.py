"""The noise schedule: pinned values, Nichol & Dhariwal's closed form, and diffusers' timestep spacings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig, alphas_cumprod, cosine_betas, make_betas, timesteps


def _cosine_f(t: float, s: float = 0.008) -> float:
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def test_linear_schedule_pinned():
    config = DiffusionConfig()
    betas, abar = config.betas, config.alphas_cumprod
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert betas[499] == pytest.approx(0.010040040040040039, rel=1e-12)
    assert abar[0] == pytest.approx(0.9999, rel=1e-12)
    assert abar[499] == pytest.approx(0.07858724288177824, rel=1e-10)
    assert abar[999] == pytest.approx(4.035829765375676e-05, rel=1e-10)
    assert np.all(np.diff(abar) < 0)


def test_alphas_cumprod_is_the_product_of_one_minus_beta():
    betas = np.array([0.1, 0.2, 0.5])
    np.testing.assert_allclose(alphas_cumprod(betas), [0.9, 0.72, 0.36], rtol=1e-15)


def test_cosine_schedule_follows_nichol_dhariwal():
    abar = DiffusionConfig(beta_schedule="cosine").alphas_cumprod
    betas = cosine_betas(1000)
    # ᾱ_t = f(t) / f(0) (eq. 17): the product of 1 − β telescopes, until the cap
    expected = np.array([_cosine_f((t + 1) / 1000) / _cosine_f(0.0) for t in range(999)])
    np.testing.assert_allclose(abar[:999], expected, rtol=1e-12)
    assert abar[0] == pytest.approx(0.999958715775178, rel=1e-12)
    assert abar[499] == pytest.approx(0.4938435904406382, rel=1e-10)
    # the last β would be 1 (f(1) = 0): capped at 0.999, the only one that is
    assert betas[-1] == 0.999 and np.count_nonzero(betas >= 0.999) == 1
    assert abar[999] == pytest.approx(abar[998] * 0.001, rel=1e-12)
    assert abar[999] == pytest.approx(2.4287669070348567e-09, rel=1e-9)
    assert betas[0] == pytest.approx(4.128422482196914e-05, rel=1e-10)


def test_cosine_cap_is_configurable():
    betas = cosine_betas(1000, max_beta=0.5)
    assert betas.max() == 0.5 and np.count_nonzero(betas == 0.5) > 1


def test_squaredcos_cap_v2_is_cosine():
    assert DiffusionConfig(beta_schedule="squaredcos_cap_v2").beta_schedule == "cosine"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"beta_schedule": "cosine"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"num_train_timesteps": 100, "beta_end": 0.05},
    ],
)
def test_betas_match_diffusers(kwargs):
    from diffusers import DDPMScheduler

    config = DiffusionConfig(**kwargs)
    theirs = DDPMScheduler(**config.to_diffusers())
    # diffusers builds its schedule in float32; dtk keeps float64
    np.testing.assert_allclose(make_betas(config), theirs.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        config.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-6
    )


def test_config_round_trips_and_maps_to_diffusers():
    config = DiffusionConfig(
        beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="trailing"
    )
    assert DiffusionConfig.from_dict(config.to_dict()) == config
    assert config.to_diffusers()["beta_schedule"] == "squaredcos_cap_v2"
    as_ddpm = dataclasses.replace(config, sampler="ddpm")  # the class name sets the default sampler
    assert DiffusionConfig.from_dict({**config.to_diffusers(), "variance_type": "fixed_small"}) == as_ddpm


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(DtkError, match=message):
        DiffusionConfig(**kwargs)


def test_spacings_pinned():
    np.testing.assert_array_equal(timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
    np.testing.assert_array_equal(timesteps(1000, 10, "leading", steps_offset=1), np.arange(901, 0, -100))
    np.testing.assert_array_equal(timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(timesteps(1000, 10, "linspace"), np.arange(999, -1, -111))
    np.testing.assert_array_equal(timesteps(1000, 1000, "leading"), np.arange(999, -1, -1))
    assert timesteps(1000, 3, "leading").dtype == np.int64


# leading spacing with steps_offset 1 and 1000 steps reaches t = 1000 (in diffusers too): samplers refuse it
SPACING_CASES = [
    (spacing, offset, steps)
    for spacing in ("leading", "trailing", "linspace")
    for offset in (0, 1)
    for steps in (1, 2, 3, 7, 10, 50, 100, 250, 999, 1000)
    if not (spacing == "leading" and offset and steps == 1000)
]


@pytest.mark.parametrize("spacing, steps_offset, steps", SPACING_CASES)
def test_spacings_match_diffusers(spacing, steps_offset, steps):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler.set_timesteps(steps)
    ours = timesteps(1000, steps, spacing, steps_offset)
    np.testing.assert_array_equal(ours, scheduler.timesteps.numpy())


@pytest.mark.parametrize("steps", [61, 103, 998])
def test_trailing_spacing_gives_exactly_steps_timesteps(steps):
    # diffusers returns steps + 1 values ending in -1 here (float arange); dtk keeps exactly `steps`
    ts = timesteps(1000, steps, "trailing")
    assert len(ts) == steps and ts.min() >= 0


def test_steps_offset_past_the_last_timestep_is_refused():
    with pytest.raises(DtkError, match="past the last trained one"):
        timesteps(1000, 1000, "leading", steps_offset=1)


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_step_count_out_of_range_is_refused(steps):
    with pytest.raises(DtkError, match="between 1 and num_train_timesteps"):
        timesteps(1000, steps)


def test_unknown_spacing_is_refused():
    with pytest.raises(DtkError, match="timestep_spacing"):
        timesteps(1000, 10, "uniform")


# every diffusers field the issue named as silently dropped: now honoured (a field) or refused (one line)
HONOURED = {
    "set_alpha_to_one": False,
    "variance_type": "fixed_large",
    "use_karras_sigmas": True,
    "solver_type": "heun",
    "final_sigmas_type": "sigma_min",
    "lambda_min_clipped": -5.1,
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.9,
    "sample_max_value": 2.0,
    "disable_corrector": [0, 2],
}
REFUSED = [
    ({"trained_betas": [0.001] * 1000}, "trained_betas \\(a list of 1000\\) is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr \\(True\\) is not supported"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas \\(True\\) is not supported"),
    ({"timestep_type": "continuous"}, "timestep_type \\('continuous'\\) is not supported"),
    ({"predict_x0": False}, "predict_x0 \\(False\\) is not supported"),
    ({"variance_type": "learned_range"}, "unknown variance_type 'learned_range'"),
    ({"solver_type": "logrho-x"}, "unknown solver_type"),
    ({"final_sigmas_type": "max"}, "unknown final_sigmas_type"),
    ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type='sde-dpmsolver', solver_order=2 is not supported"),
    ({"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, "solver_order=3 is not supported"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_order": 3}, "solver_order=3 is not supported"),
    ({"_class_name": "LMSDiscreteScheduler"}, "'LMSDiscreteScheduler' has no dtk sampler"),
    ({"skip_prk_steps": True}, "unknown scheduler field 'skip_prk_steps'"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an integer, got 1000.0"),
    ({"clip_sample_range": -1.0}, "clip_sample_range must be positive"),
    ({"clip_sample": "yes"}, "clip_sample must be true or false"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio must lie in \\(0, 1\\]"),
    ({"sample_max_value": 0.5}, "sample_max_value must be at least 1"),
    ({"lambda_min_clipped": float("nan")}, "lambda_min_clipped must be a number or null"),
    ({"disable_corrector": [-1]}, "disable_corrector must be a list of step indices"),
    ({"steps_offset": -1}, "steps_offset must not be negative"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
]


def test_diffusers_fields_are_honoured():
    config = DiffusionConfig.from_dict(HONOURED)
    for key, value in HONOURED.items():
        assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value), key
    assert DiffusionConfig.from_dict(config.to_dict()) == config
    # inert values of refused fields, and diffusers' metadata, are accepted
    inert = {"trained_betas": None, "rescale_betas_zero_snr": False, "_diffusers_version": "0.42.1"}
    assert DiffusionConfig.from_dict(inert) == DiffusionConfig()


@pytest.mark.parametrize("data, message", REFUSED)
def test_diffusers_fields_are_refused_with_one_line(data, message):
    with pytest.raises(DtkError, match=message) as error:
        DiffusionConfig.from_dict(data)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "class_name, extra, sampler",
    [
        ("DDPMScheduler", {}, "ddpm"),
        ("DDIMScheduler", {}, "ddim"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp-2m"),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp-3m"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp-2m-sde"),
        ("UniPCMultistepScheduler", {"solver_order": 2}, "unipc"),
        ("EulerDiscreteScheduler", {}, "euler"),
        ("EulerAncestralDiscreteScheduler", {}, "euler-ancestral"),
    ],
)
def test_the_scheduler_class_sets_the_default_sampler(class_name, extra, sampler):
    import diffusers

    stock = dict(getattr(diffusers, class_name)().config)  # every field diffusers writes, at its default
    stock = {k: v for k, v in stock.items() if not k.startswith("_")}
    config = DiffusionConfig.from_dict({"_class_name": class_name, **stock, **extra})
    assert config.sampler == sampler
    assert config.to_diffusers()["_class_name"] == class_name


def test_a_manifest_with_an_unsupported_field_is_refused(tiny_bundle, tmp_path):
    import json

    from dtk.runtime.manifest import load_manifest

    data = json.loads((tiny_bundle / "dtk.json").read_text())
    data["diffusion"]["rescale_betas_zero_snr"] = True
    (tmp_path / "dtk.json").write_text(json.dumps(data))
    with pytest.raises(DtkError, match="dtk.json: rescale_betas_zero_snr \\(True\\) is not supported"):
        load_manifest(tmp_path)


def test_lambda_min_clipped_minus_infinity_is_no_clipping():
    assert DiffusionConfig.from_dict({"lambda_min_clipped": -float("inf")}).lambda_min_clipped is None
    assert "lambda_min_clipped" not in DiffusionConfig(sampler="dpmpp-2m").to_diffusers()
    assert DiffusionConfig(lambda_min_clipped=-5.1).to_diffusers("dpmpp-2m")["lambda_min_clipped"] == -5.1
