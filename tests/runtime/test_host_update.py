"""The in-place numpy update of the host loop: the generic update (bit for bit unless fused), no aliasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtk.runtime.samplers import SAMPLERS, NoiseSource, make_plan, sample_loop, update
from dtk.runtime.samplers.host import HostUpdate, fused_rows
from dtk.runtime.schedule import DiffusionConfig

SHAPE = (1, 3, 3)
CONFIGS = {
    "plain": DiffusionConfig(),
    "clip": DiffusionConfig(clip_sample=True, clip_sample_range=0.8),
    "threshold": DiffusionConfig(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2),
    "v": DiffusionConfig(prediction_type="v_prediction", clip_sample=True),
}


def denoise(x, t):
    """A fixed nonlinear fake network, the same on numpy and torch."""
    tanh = torch.tanh if isinstance(x, torch.Tensor) else np.tanh
    return 1.7 * tanh(2.0 * x + t / 400.0) - 0.3 * x


def trajectories(plan, dtype, generic: bool):
    source = NoiseSource(3)
    x = source.initial(2, SHAPE).astype(dtype)
    kept = []

    def noise(i):
        return source.step(2, SHAPE).astype(dtype)

    if generic:  # the generic update, step by step, as the loop ran before the in-place path
        x0_prev = x0_prev2 = np.zeros_like(x)
        for i, (t, row) in enumerate(zip(plan.timesteps.tolist(), plan.coeffs.tolist(), strict=True)):
            step_noise = noise(i) if plan.needs_noise[i] else None
            x, x0 = update(row, x, denoise(x, t), x0_prev, step_noise, plan.clip, x0_prev2, plan.threshold)
            x0_prev, x0_prev2 = x0, x0_prev
            kept.append(x)
        return kept, x
    final = sample_loop(denoise, x, plan, noise, lambda i, t, x: kept.append(x))  # kept, not copied
    return kept, final


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loop_is_the_generic_update_and_never_overwrites_what_it_handed_out(sampler, config, dtype):
    plan = make_plan(sampler, CONFIGS[config], 12)
    expected, _ = trajectories(plan, dtype, generic=True)
    kept, final = trajectories(plan, dtype, generic=False)
    assert len(kept) == 12 and all(k.dtype == dtype for k in kept)
    fused = [row is not None for row in fused_rows(plan)]
    first_fused = fused.index(True) if any(fused) else len(fused)
    tolerance = 64 * np.finfo(dtype).eps  # 12 steps of a few roundings each, compounded
    for step, (got, want) in enumerate(zip(kept, expected, strict=True)):
        if step < first_fused:  # in place, term by term: bit for bit
            np.testing.assert_array_equal(got, want, err_msg=f"{sampler} {config}: step {step}")
        else:  # fused coefficients: the rounding of the coefficient sums only
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=f"step {step}")
    assert final is kept[-1]
    assert any(fused) == (config == "plain")  # linear x0: at least the last step fuses
    if sampler in ("ddim", "ddpm", "euler", "euler-ancestral") and config == "plain":
        assert all(fused)  # x0 is never read back: every step skips it
    assert len({id(k) for k in kept}) == 12  # a new array every step


def test_other_arrays_take_the_generic_update():
    plan = make_plan("dpmpp-3m", CONFIGS["clip"], 6)
    x = np.linspace(-2, 2, 18, dtype=np.float32).reshape(2, *SHAPE)
    step = HostUpdate(plan, x)
    row = plan.coeffs[3].tolist()
    half = denoise(x, 500).astype(np.float16)  # a float16 network: products in float16, sums in float32
    prev, prev2 = x * 0.5, x * 0.25
    got_x, got_x0 = step(3, row, x, half, prev, None, prev2)
    want_x, want_x0 = update(row, x, half, prev, None, plan.clip, prev2)
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_x0, want_x0)
    # torch tensors run the same loop through the generic update and agree to float32 rounding
    source = NoiseSource(0)
    start = source.initial(2, SHAPE)
    host = sample_loop(denoise, start.copy(), plan, None)
    reference = sample_loop(denoise, torch.from_numpy(start.copy()), plan, None)
    np.testing.assert_allclose(reference.numpy(), host, rtol=0, atol=2e-6)


def test_a_plan_compiles_its_host_steps_once_per_dtype():
    plan = make_plan("dpmpp-2m", CONFIGS["clip"], 6)
    x = np.zeros((2, *SHAPE), dtype=np.float32)
    first, again = HostUpdate(plan, x), HostUpdate(plan, x.copy())
    assert again.programs is first.programs  # kept with the plan: a run pays nothing to compile
    double = HostUpdate(plan, x.astype(np.float64))
    assert double.programs is not first.programs
    assert all(c.dtype == np.float64 for _, terms in double.programs for _, c in terms)
    assert plan.needs_noise is plan.needs_noise and not plan.needs_noise.flags.writeable
