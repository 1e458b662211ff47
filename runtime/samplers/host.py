"""The sampling loop on numpy arrays, its update in place and split around the network call: the host's hot
path.

Each product goes into one scratch buffer reused across steps and is added into its sum in place, so a step
allocates only its new arrays (x_next, and what it hands the next steps); they are new every step, so a
caller (a step callback) may keep them, and no later step writes into them. The steps are compiled once per
plan into (slot, coefficient) pairs without the zero coefficients, and only what can change (the network
output, the step noise) is checked per step. Each step is cut in two around the network call: ahead of it,
the terms that do not read the network's output; behind it, those that do.

- x0 clipped or thresholded (not linear): the terms of `plan.update`, in its order and precision, so the
  results are bit for bit those of the generic update.
- x0 linear: x_next on x and out directly (fused coefficients, `fused_rows`), and x0 only where a later
  step reads it. With one x0 of history (DPM-Solver++(2M) and its SDE), a step hands the next its whole term
  d·x0, which that step adds without a product. Both round differently from the generic update, by a few
  float roundings of the largest term.

The noise of a NoiseSource stepper is taken a block at a time and multiplied by the steps' e in one
operation (bit for bit e·noise step by step). Per step of the 50-step `tiny` benchmark this leaves 3 array
operations for DDIM and 8 for DPM-Solver++(2M) SDE, against 5 and 10 term by term.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dtk.runtime.samplers.plan import NOISE as NOISE_COEFF
from dtk.runtime.samplers.plan import SamplerPlan, dynamic_threshold, update

try:  # the clip ufunc itself: one call, where np.clip's wrappers cost more than clipping a small image
    from numpy._core.umath import clip as _clip
except ImportError:  # numpy 1.x
    from numpy.core.umath import clip as _clip

X, OUT, X0, X0_PREV, X0_PREV2 = range(5)  # the arrays a step's terms read, by slot (the noise apart)


def host_loop(denoise: Callable, x: np.ndarray, plan: SamplerPlan, noise, callback=None) -> np.ndarray:
    """`sample_loop` on numpy arrays (its arguments), with the update in place.

    Where `noise` offers `take()` (a NoiseSource stepper), the draws of the coming noisy steps are taken a
    block at a time and multiplied by their steps' e in one operation, bit for bit e·noise step by step.
    From the first step whose network output or noise is not an array of x's dtype and shape (a float16
    network, for one), the run takes the generic `update`."""
    dtype, shape = x.dtype, x.shape
    program = compiled(plan, dtype)
    rows = plan.coeffs.tolist()  # for the steps that take the generic update
    clip, threshold = plan.clip, plan.threshold
    bounds = (np.array(-clip, dtype), np.array(clip, dtype)) if clip else None
    scratch = np.empty(shape, dtype)
    multiply, add, ndarray = np.multiply, np.add, np.ndarray
    take = getattr(noise, "take", None)
    noise_es = [e for _, e, *_ in program if e is not None]  # e of each noisy step, in order
    pending, scaled, drawn = [], False, 0  # the block's e·noise (or raw draws), last step first; steps done
    carry = np.zeros(shape, dtype)  # what the step before handed on: x0, or the next step's d·x0
    carry_before = carry
    generic, before = False, None  # the generic update from here on; the step before's (x, out)
    for i, (t, e, ahead, adds_carry, carry_x, carry_out, behind) in enumerate(program):
        step_noise = None
        if e is not None:
            if take is None:
                step_noise = noise(i)
            else:
                if not pending:
                    pending, scaled = _noise_block(take, noise_es[drawn:], dtype, shape)
                step_noise = pending.pop()
            drawn += 1
        if not (generic or step_noise is None or scaled or _fits(step_noise, dtype, shape)):
            generic, carry = True, _generic_x0(plan, i, adds_carry, carry, before)
        if not generic:  # ahead of the call: x_next's terms without `out`, and carry_x·x
            arrays = [x, None, None, carry, carry_before]
            total = made = None
            if ahead is not None:
                (slot, coefficient), rest = ahead
                total = multiply(arrays[slot], coefficient)
                for slot, coefficient in rest:  # positional `out`: the keyword costs more than the arithmetic
                    multiply(arrays[slot], coefficient, scratch)
                    add(total, scratch, total)
            if adds_carry:  # d·x0, made by the step before
                total = carry.copy() if total is None else add(total, carry, total)
            if step_noise is not None:
                term = step_noise if scaled else multiply(step_noise, e, scratch)  # (a raw draw: fits)
                total = term.copy() if total is None else add(total, term, total)
            if carry_x is not None:
                made = multiply(x, carry_x)

        out = denoise(x, t)

        if not (generic or (type(out) is ndarray and out.dtype == dtype and out.shape == shape)):
            generic, carry = True, _generic_x0(plan, i, adds_carry, carry, before)
        if not generic:
            if carry_out is not None:  # the carry: x0 = T(p·x + q·out), or d'·x0 for the next step
                if made is None:
                    made = multiply(out, carry_out)
                else:
                    multiply(out, carry_out, scratch)
                    add(made, scratch, made)
            if made is not None:
                if threshold is not None:
                    made = dynamic_threshold(made, threshold)
                elif bounds is not None:
                    _clip(made, *bounds, made)
                arrays[X0] = made
            arrays[OUT] = out
            for slot, coefficient in behind:
                if total is None:
                    total = multiply(arrays[slot], coefficient)
                else:
                    multiply(arrays[slot], coefficient, scratch)
                    add(total, scratch, total)
            before = (x, out)
            x = total
        else:
            row = rows[i]
            if step_noise is not None and scaled:  # the draw already carries its e
                row = [*row[:NOISE_COEFF], 1.0, *row[NOISE_COEFF + 1 :]]
            x, made = update(row, x, out, carry, step_noise, clip, carry_before, threshold)
        carry, carry_before = made, carry
        if callback is not None:
            callback(i, t, x)
    return x


def _generic_x0(plan: SamplerPlan, i: int, adds_carry: bool, carry, before):
    """The x0 of the step before i as the generic update has it, where the in-place loop hands step i the
    carry: x0 itself, or d·x0 where step i adds the carried term (then x0 again from that step's x, out)."""
    if i == 0 or not adds_carry:  # x0 itself, or a term the generic update does not read (d = 0)
        return carry
    p, q = plan.coeffs[i - 1, :2].tolist()
    x, out = before
    _, x0 = update([p, q, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], x, out, None, None, plan.clip, None, plan.threshold)
    return x0


def _noise_block(take, es: list, dtype, shape) -> tuple[list, bool]:
    """The next block of step noise from `take`, as far as the noisy steps `es` (their e, in order) go, last
    step first (for `pop`), and whether it is scaled: each draw times its step's e (one multiplication for
    the block), or the raw draws where they are not arrays of the loop's dtype and shape."""
    draws = take()
    count = min(len(draws), len(es))
    draws = draws[:count]
    if type(draws) is np.ndarray and draws.dtype == dtype and draws.shape == (count, *shape):
        factors = np.array(es[:count], dtype).reshape(count, *(1,) * len(shape))
        return list(np.multiply(draws, factors))[::-1], True
    return list(draws)[::-1], False


def _fits(array, dtype, shape) -> bool:
    """An array the in-place update may read: ndarray of the loop's dtype and shape (None: not read)."""
    return array is None or (type(array) is np.ndarray and array.dtype == dtype and array.shape == shape)


def compiled(plan: SamplerPlan, dtype) -> list:
    """Per step of `plan` on arrays of `dtype`: (t, e, ahead, adds carry, carry x, carry out, behind), made
    once per plan and dtype (kept with the plan).

    `e` is the noise coefficient, None on a step without noise. `ahead` is x_next's first (slot, coefficient)
    pair before the network call and the other pairs, or None; the step's carry from the step before (if it
    adds it) and its noise follow them. `behind` are the pairs after the call. `carry x` and `carry out` are
    the coefficients on x and out of what the step hands the next steps (None where zero, both None where
    nothing): x0 = T(p·x + q·out), or, on a linear plan with one x0 of history, the next step's whole term
    d'·x0, so that the next step adds it without a product."""
    dtype = np.dtype(dtype)
    return plan.derived(("host", dtype.str), lambda plan: _compile(plan, dtype))


def _compile(plan: SamplerPlan, dtype) -> list:
    coeffs = plan.coeffs.tolist()
    fused = fused_rows(plan)
    carries_term = fused[0] is not None and plan.history == 1  # linear, one x0 of history: carry d'·x0
    steps = []
    for i, (t, row) in enumerate(zip(plan.timesteps.tolist(), coeffs, strict=True)):
        next_d = coeffs[i + 1][5] if i + 1 < len(coeffs) else 0.0
        after_d2 = coeffs[i + 2][7] if i + 2 < len(coeffs) else 0.0
        carry_scale = next_d if carries_term else None  # None: the carry is x0 itself
        steps.append((t, *_program(row, fused[i], next_d != 0.0 or after_d2 != 0.0, carry_scale, dtype)))
    return steps


def _program(row, fused, read_later: bool, carry_scale, dtype) -> tuple:
    """(e, ahead, adds carry, carry x, carry out, behind) of one step: the non-zero terms, in update's order
    (fused: x_next on x and out directly, where x0 is linear). Where every term of x0 or of x_next is zero,
    x·0, as the generic update. Each coefficient is a 0-d array of the sample's dtype: the value a Python
    float takes in the product anyway, without the ufunc's promotion of a Python scalar (about 0.7 µs a
    product)."""

    def terms(*pairs):
        return tuple((slot, np.array(c, dtype)) for slot, c in pairs if c != 0.0)

    p, q, a, b, c, d, e, d2 = row
    adds_carry = False
    if fused is not None:
        a_fused, b_fused, d, e, d2 = fused
        adds_carry = carry_scale is not None and d != 0.0  # the step before made d·x0
        ahead = terms((X, a_fused), (X0_PREV, 0.0 if adds_carry else d), (X0_PREV2, d2))
        behind = terms((OUT, b_fused))
        if carry_scale is not None:  # this step's carry: the next step's d'·x0, or nothing
            p, q = p * carry_scale, q * carry_scale
            read_later = carry_scale != 0.0
    else:
        ahead, behind = terms((X, a), (X0_PREV, d), (X0_PREV2, d2)), terms((OUT, b), (X0, c))
        read_later = True  # x0 is read by this step's c
    carry_x = carry_out = None
    if read_later:
        carry_x = np.array(p, dtype) if p != 0.0 or q == 0.0 else None  # p = q = 0: x·0
        carry_out = np.array(q, dtype) if q != 0.0 else None
    if not ahead and not behind and not adds_carry and e == 0.0:
        ahead = ((X, np.array(0.0, dtype)),)
    noise = np.array(e, dtype) if e != 0.0 else None
    return noise, ((ahead[0], ahead[1:]) if ahead else None), adds_carry, carry_x, carry_out, behind


def fused_rows(plan: SamplerPlan) -> list:
    """Per step, the fused coefficients (a + c·p, b + c·q, d, e, d2) of x_next on (x, out, x0_prev, noise,
    x0_prev2) where x0 is linear (no clipping, no thresholding); else None. x_next then never reads this
    step's x0, and DDIM, DDPM and the Euler samplers, which read no x0 history, skip x0 altogether: 3 array
    operations a step instead of 8 (5 with noise). The coefficients are summed in float64, so x_next can
    differ from the unfused update in the last bit of float32."""
    coeffs = plan.coeffs
    if plan.clip or plan.threshold is not None:
        return [None] * len(coeffs)
    return [(a + c * p, b + c * q, d, e, d2) for p, q, a, b, c, d, e, d2 in coeffs.tolist()]
