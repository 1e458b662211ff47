"""The sampler update of dtk.runtime.samplers.plan as CUDA source (compiled by NVRTC), and its coefficients.

One element per thread, in fp32, in place over a batch of images:
    out = out_u + s*(out - out_u)  with classifier-free guidance (out: the conditional half), else out
    x0 = p*x + q*out;  then dynamic thresholding (per image) or clipping, if the plan has either
    x_next = a*x + b*out + c*x0 + d*x0_prev + d2*x0_prev2 + e*noise
    x <- x_next;  x0_prev2 <- x0_prev;  x0_prev <- x0
The coefficients come from a device buffer, so a captured CUDA graph replays every step with that step's
numbers. The grid is (blocks per image, images); dynamic thresholding needs the quantile of |x0| over the
whole image before any of it is overwritten, so with it the first block of each image does all of that image
(the others return): it finds the two order statistics around the quantile by bisection on the float bits of
|x0| (31 counting passes each, a block reduction per pass) and interpolates them as numpy and torch do. The
clamps keep NaN as NaN, like numpy's clip. Terms whose coefficient is zero are left out, as the host update
leaves them out (so a NaN there does not propagate). With guidance (`out_u` not null) the network's
unconditional output is read from `out_u` and s from the coefficients; x_next is also written to `x_copy`
when given (the second half of a 2B engine input, so the next call sees x twice)."""

from __future__ import annotations

import math

import numpy as np

UPDATE_KERNEL_NAME = "dtk_sampler_update"
# p, q, a, b, c, d, e, d2, clip (<= 0: none), quantile's lower index (< 0: no thresholding), its fraction,
# max, guidance scale s (read only with an unconditional output)
COEFF_SLOTS = 13
BLOCK_SIZE = 256  # a power of two: the block reduction halves it

UPDATE_KERNEL_SOURCE = r"""
#define DTK_BLOCK 256

__host__ __device__ inline float dtk_add_term(float total, float coefficient, float value)
{
    return coefficient != 0.0f ? total + coefficient * value : total;
}

// the network output the update uses: out_u + s*(out_c - out_u) with guidance, else out as it is
__host__ __device__ inline float dtk_model_out(
    const float* out, const float* out_u, const float* coeffs, long long i)
{
    return out_u ? out_u[i] + coeffs[12] * (out[i] - out_u[i]) : out[i];
}

__host__ __device__ inline float dtk_x0_raw(float x, float out, const float* coeffs)
{
    return dtk_add_term(dtk_add_term(0.0f, coeffs[0], x), coeffs[1], out);
}

// |v| as an unsigned key with the order of the values (NaN sorts last, as in numpy)
__host__ __device__ inline unsigned int dtk_abs_key(float v)
{
    union { float f; unsigned int u; } bits;
    bits.f = v;
    return bits.u & 0x7fffffffu;
}

__host__ __device__ inline float dtk_key_value(unsigned int key)
{
    union { float f; unsigned int u; } bits;
    bits.u = key;
    return bits.f;
}

// Bisection for the smallest key with more than k keys <= it (the k-th smallest, from 0): feed it
// count_le(mid) until low == high.
struct DtkBisection { unsigned int low, high; };

__host__ __device__ inline unsigned int dtk_bisection_mid(DtkBisection b)
{
    return b.low + (b.high - b.low) / 2u;
}

__host__ __device__ inline DtkBisection dtk_bisection_step(
    DtkBisection b, long long count_le_mid, long long k)
{
    const unsigned int mid = dtk_bisection_mid(b);
    if (count_le_mid > k) {
        b.high = mid;
    } else {
        b.low = mid + 1u;
    }
    return b;
}

// s = the interpolated quantile between the order statistics, clamped to [1, max_value] (diffusers' clamp)
__host__ __device__ inline float dtk_threshold_scale(
    unsigned int low_key, unsigned int high_key, const float* coeffs)
{
    const float low = dtk_key_value(low_key), high = dtk_key_value(high_key), fraction = coeffs[10];
    const float diff = high - low;
    const float q = fraction >= 0.5f ? high - diff * (1.0f - fraction) : low + diff * fraction;
    return q < 1.0f ? 1.0f : (q > coeffs[11] ? coeffs[11] : q);
}

// scale > 0: the image's threshold; otherwise coeffs[8] > 0 clips
__host__ __device__ inline void dtk_update_element(
    float x, float out, float x0_prev, float x0_prev2, float noise, const float* coeffs, float scale,
    float* x_next, float* x0)
{
    const float a = coeffs[2], b = coeffs[3], c = coeffs[4], d = coeffs[5], e = coeffs[6], d2 = coeffs[7];
    const float clip = coeffs[8];
    float v = dtk_x0_raw(x, out, coeffs);
    if (scale > 0.0f) {
        v = (v < -scale ? -scale : (v > scale ? scale : v)) / scale;
    } else if (clip > 0.0f) {
        v = v < -clip ? -clip : (v > clip ? clip : v);
    }
    float next = dtk_add_term(dtk_add_term(0.0f, a, x), d, x0_prev);  // update's order: a, d, d2, e, b, c
    next = dtk_add_term(dtk_add_term(next, d2, x0_prev2), e, noise);
    next = dtk_add_term(dtk_add_term(next, b, out), c, v);
    *x_next = next;
    *x0 = v;
}

__device__ long long dtk_count_le(
    const float* x, const float* out, const float* out_u, const float* coeffs, long long count,
    unsigned int key, long long* shared)
{
    long long mine = 0;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        mine += dtk_abs_key(dtk_x0_raw(x[i], dtk_model_out(out, out_u, coeffs, i), coeffs)) <= key;
    }
    shared[threadIdx.x] = mine;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2u; half > 0u; half /= 2u) {
        if (threadIdx.x < half) {
            shared[threadIdx.x] += shared[threadIdx.x + half];
        }
        __syncthreads();
    }
    const long long total = shared[0];
    __syncthreads();
    return total;
}

__device__ unsigned int dtk_select(
    const float* x, const float* out, const float* out_u, const float* coeffs, long long count, long long k,
    long long* shared)
{
    DtkBisection b = {0u, 0x7fffffffu};
    while (b.low < b.high) {
        const long long le = dtk_count_le(x, out, out_u, coeffs, count, dtk_bisection_mid(b), shared);
        b = dtk_bisection_step(b, le, k);
    }
    return b.low;
}

extern "C" __global__ void dtk_sampler_update(
    float* __restrict__ x,              // [n] x_t in, x_next out
    float* __restrict__ x0_history,     // [2n] the previous two steps' x0 in, this step's and the last out
    const float* __restrict__ out,      // [n] network output at x_t (with guidance: the conditional one)
    const float* __restrict__ noise,    // [n] fresh N(0, 1) noise, read only when e != 0
    const float* __restrict__ coeffs,   // [13] p..d2, clip, quantile index, fraction, max, s
    long long n,
    long long image_n,                  // elements per image; the grid's y is the image
    const float* __restrict__ out_u,    // [n] the unconditional output, or null: no guidance
    float* __restrict__ x_copy)         // [n] x_next written here too, or null
{
    __shared__ long long shared[DTK_BLOCK];
    const bool thresholding = coeffs[9] >= 0.0f;
    if (thresholding && blockIdx.x != 0) {
        return;
    }
    const long long begin = (long long)blockIdx.y * image_n;
    float scale = 0.0f;
    if (thresholding) {
        const long long k = (long long)coeffs[9];
        const float* image_out_u = out_u ? out_u + begin : out_u;
        const unsigned int low = dtk_select(x + begin, out + begin, image_out_u, coeffs, image_n, k, shared);
        const unsigned int high = k + 1 < image_n
            ? dtk_select(x + begin, out + begin, image_out_u, coeffs, image_n, k + 1, shared)
            : low;
        scale = dtk_threshold_scale(low, high, coeffs);
    }
    const float e = coeffs[6], d2 = coeffs[7];
    const long long first = thresholding ? threadIdx.x : (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = thresholding ? blockDim.x : (long long)blockDim.x * gridDim.x;
    for (long long i = begin + first; i < begin + image_n && i < n; i += stride) {
        float x_next, x0;
        const float prev = x0_history[i], prev2 = d2 != 0.0f ? x0_history[n + i] : 0.0f;
        const float step_noise = e != 0.0f ? noise[i] : 0.0f;
        const float model_out = dtk_model_out(out, out_u, coeffs, i);
        dtk_update_element(x[i], model_out, prev, prev2, step_noise, coeffs, scale, &x_next, &x0);
        x[i] = x_next;
        if (x_copy) {
            x_copy[i] = x_next;
        }
        x0_history[n + i] = prev;
        x0_history[i] = x0;
    }
}
"""


def kernel_coefficients(plan, image_elements: int, guidance_scale: float = 1.0) -> np.ndarray:
    """float32 [S, COEFF_SLOTS]: each step's row of the kernel's coefficient buffer for `plan` on images of
    `image_elements` values (the quantile's position depends on it, as in numpy: ratio·(n − 1)), and the
    guidance scale (used only by a launch given the unconditional output)."""
    rows = np.zeros((plan.steps, COEFF_SLOTS), dtype=np.float64)
    rows[:, 12] = guidance_scale
    rows[:, :8] = plan.coeffs
    rows[:, 8] = plan.clip or 0.0
    rows[:, 9] = -1.0
    if plan.threshold is not None:
        position = plan.threshold.ratio * (image_elements - 1)
        rows[:, 9] = math.floor(position)
        rows[:, 10] = position - math.floor(position)
        rows[:, 11] = plan.threshold.max_value
    return rows.astype(np.float32)
