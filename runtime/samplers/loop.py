"""The sampling loop: network call, then the plan's update, step after step — on any array type."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dtk.runtime.samplers import host
from dtk.runtime.samplers.plan import SamplerPlan, update


def sample_loop(
    denoise: Callable, x, plan: SamplerPlan, noise: Callable | None, callback: Callable | None = None
):
    """Run `plan` from the initial latents `x` and return the final sample.

    denoise(x, t) → model output for the whole batch at integer timestep t (the caller broadcasts t);
    noise(i) → fresh standard normal noise like x, called only for steps with plan.needs_noise[i], in order
    (on numpy, a source with `take()`, a NoiseSource stepper, is taken a block of draws at a time instead);
    callback(i, t, x) after each step; x is a new array every step (the loop never writes into one it handed
    out), so a callback may keep it. On numpy the update runs in place (samplers/host.py): the generic
    `update` that other array types get (`generic_loop`), bit for bit where x0 is clipped or thresholded, to
    a few float roundings where it is linear and the sums are fused."""
    if noise is None and plan.noisy_steps:
        raise ValueError(f"{plan.name} adds noise on {plan.noisy_steps} steps: pass a noise source")
    if type(x) is np.ndarray:
        return host.host_loop(denoise, x, plan, noise, callback)
    return generic_loop(denoise, x, plan, noise, callback)


def generic_loop(denoise: Callable, x, plan: SamplerPlan, noise: Callable | None, callback=None):
    """`sample_loop` with the generic `update`: every product and sum a new array of x's type."""
    needs_noise = plan.needs_noise.tolist()  # plain Python values: the loop runs per step
    x0_prev = _zeros_like(x)
    x0_prev2 = _zeros_like(x) if plan.history == 2 else None
    for i, (t, row) in enumerate(zip(plan.timesteps.tolist(), plan.coeffs.tolist(), strict=True)):
        out = denoise(x, t)
        step_noise = noise(i) if needs_noise[i] else None
        x, x0 = update(row, x, out, x0_prev, step_noise, plan.clip, x0_prev2, plan.threshold)
        x0_prev, x0_prev2 = x0, x0_prev
        if callback is not None:
            callback(i, t, x)
    return x


def _zeros_like(x):
    if hasattr(x, "new_zeros"):  # torch
        return x.new_zeros(x.shape)
    if hasattr(x, "__array_namespace__"):  # numpy >= 2, cupy
        return x.__array_namespace__().zeros_like(x)
    return x * 0
