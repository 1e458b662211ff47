"""The sampling loop on numpy arrays, its update in place and split around the network call: the host's hot
path.

The same terms as `plan.update`, in the same order and in the same precision, so the results are bit for bit
those of the generic update; only the temporaries differ. The generic update allocates two arrays per term
(the product and the running sum); here each product goes into one scratch buffer reused across steps and is
added into the sum in place, so a step allocates two arrays (x0 and x_next) whatever the sampler. Both are new
every step: a caller (a step callback) may keep them, and the next step never writes into them.

A network call leaves the caches full of its own work, and every Python and numpy operation right after it
costs two to three times its hot price. So each step is cut in two around the call. Ahead of it, while the
caches still hold the last update, the loop sums the terms that do not read the network's output (a·x,
d·x0_prev, d2·x0_prev2, e·noise, and p·x of x0); behind it only the terms of `out` remain (q·out into x0, the
x0 transform, b·out and c·x0). The steps are compiled once per plan into (slot, coefficient) pairs with the
zero coefficients left out, and only what can change (the network output, the step noise) is checked.
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
    A step whose network output or noise is not an array of x's dtype and shape (a float16 network, for one)
    takes the generic `update`, as do the two steps after it: they read its x0."""
    dtype, shape = x.dtype, x.shape
    program = compiled(plan, dtype)
    rows = plan.coeffs.tolist()  # for a step that takes the generic update
    clip, threshold = plan.clip, plan.threshold
    bounds = (np.array(-clip, dtype), np.array(clip, dtype)) if clip else None
    scratch = np.empty(shape, dtype)
    multiply, add, ndarray = np.multiply, np.add, np.ndarray
    take = getattr(noise, "take", None)
    noise_es = [e for _, e, *_ in program if e is not None]  # e of each noisy step, in order
    pending, drawn = [], 0  # the block's e·noise (or its raw draws), last step first; noisy steps done
    x0_prev = np.zeros(shape, dtype)
    x0_prev2 = x0_prev
    generic_until = 0  # the steps before this one take the generic update
    for i, (t, e, ahead, x0_ahead, x0_behind, behind) in enumerate(program):
        step_noise, scaled = None, False
        if e is not None:
            if take is None:
                step_noise = noise(i)
            else:
                if not pending:
                    pending = _noise_block(take, noise_es[drawn:], dtype, shape)
                step_noise, scaled = pending.pop()
            drawn += 1
        in_place = i >= generic_until and (step_noise is None or scaled or _fits(step_noise, dtype, shape))
        if in_place:  # ahead of the call: x_next's terms without `out`, and p·x of x0
            arrays = [x, None, None, x0_prev, x0_prev2]
            total = partial_x0 = None
            if ahead is not None:
                (slot, coefficient), rest = ahead
                total = multiply(arrays[slot], coefficient)
                for slot, coefficient in rest:  # positional `out`: the keyword costs more than the arithmetic
                    multiply(arrays[slot], coefficient, scratch)
                    add(total, scratch, total)
            if step_noise is not None:
                term = step_noise if scaled else multiply(step_noise, e, scratch)
                if total is None:
                    total = term.copy()
                else:
                    add(total, term, total)
            if x0_ahead is not None:
                partial_x0 = multiply(x, x0_ahead)

        out = denoise(x, t)

        if in_place and type(out) is ndarray and out.dtype == dtype and out.shape == shape:
            x0 = None
            if x0_behind is not None or partial_x0 is not None:  # x0 = p·x + q·out, then its transform
                if partial_x0 is None:
                    x0 = multiply(out, x0_behind)
                else:
                    x0 = partial_x0
                    if x0_behind is not None:
                        multiply(out, x0_behind, scratch)
                        add(x0, scratch, x0)
                if threshold is not None:
                    x0 = dynamic_threshold(x0, threshold)
                elif bounds is not None:
                    _clip(x0, *bounds, x0)
                arrays[X0] = x0
            arrays[OUT] = out
            for slot, coefficient in behind:
                if total is None:
                    total = multiply(arrays[slot], coefficient)
                else:
                    multiply(arrays[slot], coefficient, scratch)
                    add(total, scratch, total)
            x = total
        else:
            row = rows[i] if not scaled else [*rows[i][:NOISE_COEFF], 1.0, *rows[i][NOISE_COEFF + 1 :]]
            x, x0 = update(row, x, out, x0_prev, step_noise, clip, x0_prev2, threshold)
            if not (_fits(x, dtype, shape) and _fits(x0, dtype, shape)):
                generic_until = i + 3
        x0_prev, x0_prev2 = x0, x0_prev
        if callback is not None:
            callback(i, t, x)
    return x


def _noise_block(take, es: list, dtype, shape) -> list:
    """The next block of step noise from `take`, as far as the noisy steps `es` (their e, in order) go: each
    draw times its step's e (one multiplication for the block), paired with True; or the raw draws, paired
    with False, where they are not arrays of the loop's dtype and shape. Last step first, for `pop`."""
    draws = take()
    count = min(len(draws), len(es))
    draws = draws[:count]
    if type(draws) is np.ndarray and draws.dtype == dtype and draws.shape == (count, *shape):
        factors = np.array(es[:count], dtype).reshape(count, *(1,) * len(shape))
        return [(term, True) for term in reversed(list(np.multiply(draws, factors)))]
    return [(draw, False) for draw in reversed(list(draws))]


def _fits(array, dtype, shape) -> bool:
    """An array the in-place update may read: ndarray of the loop's dtype and shape (None: not read)."""
    return array is None or (type(array) is np.ndarray and array.dtype == dtype and array.shape == shape)


def compiled(plan: SamplerPlan, dtype) -> list:
    """Per step of `plan` on arrays of `dtype`: (t, e, ahead, x0 ahead, x0 behind, behind), made once per plan
    and dtype (kept with the plan). `e` is the noise coefficient, None on a step without noise; `ahead` is
    x_next's first (slot, coefficient) pair before the network call and the other pairs, or None (the noise
    term follows them); `behind` the pairs after the call; `x0 ahead` and `x0 behind` are p and q of x0, or
    None where zero (both None: the step does not need x0)."""
    dtype = np.dtype(dtype)
    return plan.derived(("host", dtype.str), lambda plan: _compile(plan, dtype))


def _compile(plan: SamplerPlan, dtype) -> list:
    rows = zip(plan.timesteps.tolist(), plan.coeffs.tolist(), fused_rows(plan), strict=True)
    return [(t, *_program(row, fused, dtype)) for t, row, fused in rows]


def _program(row, fused, dtype) -> tuple:
    """(e, ahead, x0 ahead, x0 behind, behind) of one step: the non-zero terms, in update's order. Where every
    term of x0 or of x_next is zero, x·0, as the generic update. Each coefficient is a 0-d array of the
    sample's dtype: the value a Python float takes in the product anyway, without the ufunc's promotion of a
    Python scalar (about 0.7 µs a product)."""

    def terms(*pairs):
        return tuple((slot, np.array(c, dtype)) for slot, c in pairs if c != 0.0)

    if fused is not None:
        a, b, d, e, d2 = fused
        ahead, behind = terms((X, a), (X0_PREV, d), (X0_PREV2, d2)), terms((OUT, b))
        x0_ahead = x0_behind = None
    else:
        p, q, a, b, c, d, e, d2 = row
        ahead, behind = terms((X, a), (X0_PREV, d), (X0_PREV2, d2)), terms((OUT, b), (X0, c))
        x0_ahead = np.array(p, dtype) if p != 0.0 or q == 0.0 else None  # p = q = 0: x0 = x·0
        x0_behind = np.array(q, dtype) if q != 0.0 else None
    if not ahead and not behind and e == 0.0:
        ahead = ((X, np.array(0.0, dtype)),)
    noise = np.array(e, dtype) if e != 0.0 else None
    return noise, ((ahead[0], ahead[1:]) if ahead else None), x0_ahead, x0_behind, behind


def fused_rows(plan: SamplerPlan) -> list:
    """Per step, the fused coefficients (a + c·p, b + c·q, d, e, d2) of x_next on (x, out, x0_prev, noise,
    x0_prev2) where x0 is linear (no clipping, no thresholding) and no later step reads it; else None.

    DDIM, DDPM and the Euler samplers then skip x0 altogether: 3 array operations a step instead of 8 (5 with
    noise). The coefficients are summed in float64, so x_next can differ from the unfused update in the last
    bit of float32."""
    coeffs = plan.coeffs
    if plan.clip or plan.threshold is not None:
        return [None] * len(coeffs)
    read_later = np.zeros(len(coeffs), dtype=bool)
    read_later[:-1] |= coeffs[1:, 5] != 0  # d of the next step
    read_later[:-2] |= coeffs[2:, 7] != 0  # d2 of the step after
    return [
        None if read else (a + c * p, b + c * q, d, e, d2)
        for read, (p, q, a, b, c, d, e, d2) in zip(read_later.tolist(), coeffs.tolist(), strict=True)
    ]
