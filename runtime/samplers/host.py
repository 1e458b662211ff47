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


class HostUpdate:
    """`update` for one sampling run on numpy arrays of one shape and dtype (anything else, a float16 network
    output for one, goes to the generic `update`)."""

    def __init__(self, plan: SamplerPlan, like: np.ndarray):
        self.clip, self.threshold = plan.clip, plan.threshold
        self.dtype, self.shape = like.dtype, like.shape
        self.scratch = np.empty(like.shape, like.dtype)
        self.fused = fused_rows(plan)

    def __call__(self, i, row, x, out, x0_prev, noise, x0_prev2=None):
        """→ (x_next, x0), as `update(row, x, out, x0_prev, noise, clip, x0_prev2, threshold)` for step i;
        x0 is None on a fused step (no later step reads it)."""
        fits = self._fits
        if not (fits(x) and fits(out)) or not (
            (x0_prev is None or fits(x0_prev))
            and (noise is None or fits(noise))
            and (x0_prev2 is None or fits(x0_prev2))
        ):
            return update(row, x, out, x0_prev, noise, self.clip, x0_prev2, self.threshold)
        fused = self.fused[i]
        if fused is not None:
            a, b, d, e, d2 = fused
            terms = ((a, x), (b, out), (d, x0_prev), (d2, x0_prev2), (e, noise))
            return self._weighted_sum(terms), None
        p, q, a, b, c, d, e, d2 = row
        x0 = self._weighted_sum(((p, x), (q, out)))
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, self.threshold)
        elif self.clip:  # x0.clip(-clip, clip), without its Python wrapper
            np.maximum(x0, -self.clip, out=x0)
            np.minimum(x0, self.clip, out=x0)
        x_next = self._weighted_sum(((a, x), (b, out), (c, x0), (d, x0_prev), (d2, x0_prev2), (e, noise)))
        return x_next, x0

    def _fits(self, array) -> bool:
        return type(array) is np.ndarray and array.dtype == self.dtype and array.shape == self.shape

    def _weighted_sum(self, terms):
        """Σ coefficient·array over the non-zero coefficients, in a new array (plan._weighted_sum)."""
        total, scratch, multiply, add = None, self.scratch, np.multiply, np.add
        for coefficient, array in terms:
            if coefficient != 0.0:
                if total is None:
                    total = multiply(array, coefficient)
                else:  # positional `out`: the keyword costs more than the arithmetic on small images
                    multiply(array, coefficient, scratch)
                    add(total, scratch, total)
        return total if total is not None else terms[0][1] * 0.0


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
