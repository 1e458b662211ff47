"""The in-place numpy update of the host loop: the generic update (bit for bit unless fused), no aliasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtk.runtime.samplers import SAMPLERS, NoiseSource, make_plan, sample_loop, update
from dtk.runtime.samplers.host import compiled, fused_rows
from dtk.runtime.samplers.loop import generic_loop
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
    for step, (got, want) in enumerate(zip(kept, expected, strict=True)):
        if step < first_fused:  # in place, term by term: bit for bit
            np.testing.assert_array_equal(got, want, err_msg=f"{sampler} {config}: step {step}")
        else:  # fused coefficients, and d·x0 carried whole: a few roundings of the largest term, compounded
            scale = 64 * np.finfo(dtype).eps * np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=scale, err_msg=f"{sampler} step {step}")
    assert final is kept[-1]
    assert any(fused) == (config == "plain")  # linear x0: at least the last step fuses
    if sampler in ("ddim", "ddpm", "euler", "euler-ancestral") and config == "plain":
        assert all(fused)  # x0 is never read back: every step skips it
    assert len({id(k) for k in kept}) == 12  # a new array every step


def test_other_arrays_take_the_generic_update():
    """A float16 network: its steps take the generic update (products in float16, sums in float32); from
    the first such output on, every step does, as the generic loop."""
    plan = make_plan("dpmpp-3m", CONFIGS["clip"], 6)
    start = np.linspace(-2, 2, 18, dtype=np.float32).reshape(2, *SHAPE)

    def half(x, t):
        return denoise(x, t).astype(np.float16)

    def mixed(x, t):  # float16 on step 2 only
        return half(x, t) if t == plan.timesteps[2] else denoise(x, t)

    for network in (half, mixed):
        got = sample_loop(network, start.copy(), plan, None)
        want = generic_loop(network, start.copy(), plan, None)
        np.testing.assert_array_equal(got, want)
    # torch tensors run the same loop through the generic update and agree to float32 rounding
    host_result = sample_loop(denoise, start.copy(), plan, None)
    reference = sample_loop(denoise, torch.from_numpy(start.copy()), plan, None)
    np.testing.assert_allclose(reference.numpy(), host_result, rtol=0, atol=2e-6)


def test_a_plan_compiles_its_host_steps_once_per_dtype():
    plan = make_plan("dpmpp-2m-sde", CONFIGS["clip"], 6)
    first, again = compiled(plan, np.float32), compiled(plan, np.dtype("float32"))
    assert again is first  # kept with the plan: a run pays nothing to compile
    double = compiled(plan, np.float64)
    assert double is not first
    coefficients = []
    for _, e, ahead, _, p, q, behind in double:
        pairs = ((ahead[0], *ahead[1]) if ahead else ()) + behind
        coefficients += [c for _, c in pairs] + [c for c in (e, p, q) if c is not None]
    assert coefficients and all(c.dtype == np.float64 and c.ndim == 0 for c in coefficients)
    assert [t for t, *_ in first] == plan.timesteps.tolist()
    assert [e is not None for _, e, *_ in first] == plan.needs_noise.tolist()
    assert [float(e) for _, e, *_ in double if e is not None] == plan.coeffs[plan.needs_noise, 6].tolist()
    assert plan.needs_noise is plan.needs_noise and not plan.needs_noise.flags.writeable


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m-sde", "euler-ancestral"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_taken_a_block_at_a_time_is_the_same_as_drawn_step_by_step(monkeypatch, sampler, dtype):
    """A NoiseSource stepper offers take(): the loop scales a block of draws at once (two steps here). Bit
    for bit the images of one draw per step; float64 samples with float32 noise take the raw draws through
    the generic update, as they did step by step."""
    from dtk.runtime.samplers import noise as noise_module

    monkeypatch.setattr(noise_module, "BLOCK_BYTES", 2 * 2 * 4 * int(np.prod(SHAPE)))  # two steps of 2 images
    plan = make_plan(sampler, CONFIGS["clip"], 9)

    def run(blocks: bool):
        source = NoiseSource(5)
        x = source.initial(2, SHAPE).astype(dtype)
        stepper = source.stepper(2, SHAPE, int(plan.needs_noise.sum()))
        if not blocks:
            return sample_loop(denoise, x, plan, lambda i: stepper(i)), []  # a plain callable: no take()
        taken = []
        take = stepper.take
        stepper.take = lambda: taken.append(len(block := take())) or block
        return sample_loop(denoise, x, plan, stepper), taken

    by_block, taken = run(True)
    by_step, _ = run(False)
    np.testing.assert_array_equal(by_block, by_step)
    noisy = int(plan.needs_noise.sum())
    assert sum(taken) == noisy and set(taken[:-1]) == {2}


def test_take_gives_the_draws_noise_would_give_across_blocks(monkeypatch):
    from dtk.runtime.samplers import noise as noise_module

    shape = (1, 2, 2)
    a, b = NoiseSource(8), NoiseSource(8)
    a.initial(3, shape), b.initial(3, shape)
    want = np.stack([b.step(3, shape).copy() for _ in range(8)])  # one draw per step, nothing ahead
    monkeypatch.setattr(noise_module, "BLOCK_BYTES", 2 * 3 * 4 * 4)  # two steps of three images
    mixed = a.stepper(3, shape, 8)
    got = [mixed(0)[None], mixed.take(), mixed.take(), mixed(5)[None], mixed.take(), mixed.take()]
    assert [len(g) for g in got] == [1, 1, 2, 1, 1, 2]  # what the block held, or the next block of two
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert mixed.remaining == 0


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
def test_a_linear_plan_with_one_x0_of_history_carries_the_term_whole(sampler):
    """Linear x0, one x0 of history: a step hands the next d'·x0 (d' the next step's d), which that step adds
    without a product. A float16 output mid-run turns the run generic, from the true x0 of the step before."""
    plan = make_plan(sampler, CONFIGS["plain"], 8)
    program = compiled(plan, np.float64)
    p, q, d = plan.coeffs[:, 0], plan.coeffs[:, 1], plan.coeffs[:, 5]
    assert [adds for _, _, _, adds, *_ in program] == (d != 0).tolist()
    for i, (_, _, _, _, carry_x, carry_out, _) in enumerate(program[:-1]):
        if d[i + 1] == 0:  # the next step reads no x0: nothing carried
            assert carry_x is None and carry_out is None
        else:
            assert float(carry_x) == pytest.approx(d[i + 1] * p[i])
            assert float(carry_out) == pytest.approx(d[i + 1] * q[i])
    assert program[-1][4] is None and program[-1][5] is None  # nothing after the last step

    def mixed(x, t):  # float16 on step 4 only
        out = denoise(x, t)
        return out.astype(np.float16) if t == plan.timesteps[4] else out

    start = np.linspace(-2, 2, 18, dtype=np.float32).reshape(2, *SHAPE)
    noise_table = {i: NoiseSource(i).initial(2, SHAPE) for i in range(plan.steps)}
    got = sample_loop(mixed, start.copy(), plan, noise_table.get)
    want = generic_loop(mixed, start.copy(), plan, noise_table.get)
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * np.finfo(np.float32).eps * np.abs(want).max())
