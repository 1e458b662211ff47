"""The plan's update on numpy arrays with in-place arithmetic: the host loop's hot path.

The same terms as `plan.update`, in the same order and in the same precision, so the results are bit for bit
those of the generic update; only the temporaries differ. The generic update allocates two arrays per term
(the product and the running sum); here each product goes into one scratch buffer reused across steps and is
added into the sum in place, so a step allocates two arrays (x0 and x_next) whatever the sampler. Both are new
every step: a caller (a step callback) may keep them, and the next step never writes into them.
"""

from __future__ import annotations

import numpy as np

from dtk.runtime.samplers.plan import SamplerPlan, dynamic_threshold, update

try:  # the clip ufunc itself: one call, where np.clip's wrappers cost more than clipping a small image
    from numpy._core.umath import clip as _clip
except ImportError:  # numpy 1.x
    from numpy.core.umath import clip as _clip

X, OUT, X0, X0_PREV, X0_PREV2, NOISE = range(6)  # the arrays a step's terms read, by slot


class HostUpdate:
    """`update` for one sampling run on numpy arrays of one shape and dtype (anything else, a float16 network
    output for one, goes to the generic `update`).

    The step's terms are compiled once per plan into (slot, coefficient) pairs with the zero coefficients left
    out: between two network evaluations the caches are cold, and every Python operation the step does costs
    several times its hot price. The arrays this update made itself are not checked again."""

    def __init__(self, plan: SamplerPlan, like: np.ndarray):
        self.clip, self.threshold = plan.clip, plan.threshold
        self.dtype, self.shape = like.dtype, like.shape
        self.scratch = np.empty(like.shape, like.dtype)
        self.programs = plan.derived(("host", like.dtype.str), lambda plan: _programs(plan, like.dtype))
        if self.clip:
            self.bounds = np.array(-self.clip, like.dtype), np.array(self.clip, like.dtype)
        self._made = (None, None, None)  # the last step's x_next and x0, and the x0 before: known to fit

    def __call__(self, i, row, x, out, x0_prev, noise, x0_prev2=None):
        """→ (x_next, x0), as `update(row, x, out, x0_prev, noise, clip, x0_prev2, threshold)` for step i;
        x0 is None on a fused step (no later step reads it)."""
        fits, (made_x, made_x0, made_x0_before) = self._fits, self._made
        if not (
            fits(out)
            and (noise is None or fits(noise))
            and (x is made_x or fits(x))
            and (x0_prev is None or x0_prev is made_x0 or fits(x0_prev))
            and (x0_prev2 is None or x0_prev2 is made_x0_before or fits(x0_prev2))
        ):
            self._made = (None, None, None)
            return update(row, x, out, x0_prev, noise, self.clip, x0_prev2, self.threshold)
        x0_terms, x_terms = self.programs[i]
        arrays = [x, out, None, x0_prev, x0_prev2, noise]
        x0 = None
        if x0_terms is not None:
            x0 = arrays[X0] = _weighted_sum(x0_terms, arrays, self.scratch)
            if self.threshold is not None:
                x0 = arrays[X0] = dynamic_threshold(x0, self.threshold)
            elif self.clip:
                _clip(x0, *self.bounds, out=x0)
        x_next = _weighted_sum(x_terms, arrays, self.scratch)
        self._made = (x_next, x0, made_x0)
        return x_next, x0

    def _fits(self, array) -> bool:
        return type(array) is np.ndarray and array.dtype == self.dtype and array.shape == self.shape


def _weighted_sum(terms, arrays, scratch):
    """Σ coefficient·array over a step's terms, in a new array, in the order of `plan._weighted_sum`."""
    if not terms:
        return arrays[X] * 0.0
    (slot, coefficient), *rest = terms
    multiply, add = np.multiply, np.add
    total = multiply(arrays[slot], coefficient)
    for slot, coefficient in rest:  # positional `out`: the keyword costs more than the arithmetic
        multiply(arrays[slot], coefficient, scratch)
        add(total, scratch, total)
    return total


def _programs(plan: SamplerPlan, dtype) -> list:
    """Per step of `plan`, its program on arrays of `dtype`."""
    rows = zip(plan.coeffs.tolist(), fused_rows(plan), strict=True)
    return [_program(row, fused, dtype) for row, fused in rows]


def _program(row, fused, dtype) -> tuple:
    """(x0 terms or None, x_next terms) of one step: the non-zero (slot, coefficient) pairs, in update's
    order. Each coefficient is a 0-d array of the sample's dtype: the value a Python float takes in the
    product anyway, without the ufunc's promotion of a Python scalar (about 0.7 µs a product)."""

    def terms(*pairs):
        return tuple((slot, np.array(c, dtype)) for slot, c in pairs if c != 0.0)

    if fused is not None:
        a, b, d, e, d2 = fused
        return None, terms((X, a), (OUT, b), (X0_PREV, d), (X0_PREV2, d2), (NOISE, e))
    p, q, a, b, c, d, e, d2 = row
    return terms((X, p), (OUT, q)), terms((X, a), (OUT, b), (X0, c), (X0_PREV, d), (X0_PREV2, d2), (NOISE, e))


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
