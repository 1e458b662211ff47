"""A sampler as data: timesteps plus a per-step coefficient table, applied by one array-agnostic `update`.

Every sampler here reduces to, per step i with network output `out` at timestep t_i:

    x0     = T(p*x + q*out)
    x_next = a*x + b*out + c*x0 + d*x0_prev + d2*x0_prev2 + e*noise

with scalars (p, q, a, b, c, d, e, d2) = coeffs[i]; x0_prev and x0_prev2 are the x0 of the two steps before
(zero before there were any), and T is the plan's x0 transform, the same on every step:
- none;
- clipping to [-clip, clip] (diffusers' `clip_sample`, `clip_sample_range`);
- dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep
  Language Understanding", sec. 2.3; diffusers' `thresholding`): per image, s = the `ratio` quantile of |x0|
  over all its pixels, clamped to [1, max_value]; x0 = clip(x0, -s, s) / s.
Thresholding wins over clipping, as in diffusers.

`update` adds up x_next in the order a, d, d2, e, b, c: the terms that do not read the network's output
first, so that the host loop (samplers/host.py) can sum them before the call and, where x0 is clipped or
thresholded, still give these results bit for bit.

Multistep solvers (DPM-Solver++(2M/3M), UniPC) are linear in the x0 history, so two history terms cover
them; UniPC's corrector, which revises x_t with the new x0 before the predictor runs, folds into the same row
(samplers/unipc.py). Stochastic samplers put their noise in e. Classifier-free guidance would combine two
network outputs into `out` before the update; nothing here changes. The same `update` runs on numpy arrays,
torch tensors and device buffers; the TensorRT path evaluates exactly this formula in a CUDA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import SAMPLERS, DiffusionConfig, timesteps

COEFF_NAMES = ("p", "q", "a", "b", "c", "d", "e", "d2")
NOISE = COEFF_NAMES.index("e")


@dataclass(frozen=True)
class Threshold:
    """Dynamic thresholding of x0: the quantile `ratio` of |x0| per image, clamped to [1, max_value]."""

    ratio: float
    max_value: float


@dataclass(frozen=True)
class SamplerPlan:
    """What a sampling run does: the t fed to the network at each step and that step's update coefficients."""

    name: str
    timesteps: np.ndarray  # int64 [S]
    coeffs: np.ndarray  # float64 [S, 8]: p, q, a, b, c, d, e, d2 (a [S, 7] table gets d2 = 0)
    clip: float | None  # x0 is clipped to [-clip, clip], or not at all
    threshold: Threshold | None = None  # dynamic thresholding of x0 (then clip is None)

    def __post_init__(self):
        timesteps = np.asarray(self.timesteps, dtype=np.int64)
        coeffs = np.asarray(self.coeffs, dtype=np.float64)
        if coeffs.ndim == 2 and coeffs.shape[1] == len(COEFF_NAMES) - 1:
            coeffs = np.pad(coeffs, ((0, 0), (0, 1)))
        if timesteps.ndim != 1 or coeffs.shape != (len(timesteps), len(COEFF_NAMES)):
            raise ValueError(
                f"plan needs timesteps [S] and coeffs [S, 8], got {timesteps.shape}, {coeffs.shape}"
            )
        if not np.all(np.isfinite(coeffs)):
            raise ValueError(f"{self.name}: non-finite coefficients in the plan")
        if self.threshold is not None and self.clip:
            raise ValueError(f"{self.name}: a plan either clips or thresholds x0")
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "coeffs", coeffs)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @cached_property
    def needs_noise(self) -> np.ndarray:
        """bool [S], read-only: the steps that add fresh Gaussian noise (each takes one draw per image)."""
        needs = self.coeffs[:, NOISE] != 0
        needs.flags.writeable = False
        return needs

    @cached_property
    def noisy_steps(self) -> int:
        """How many steps add noise: the draws a run takes per image."""
        return int(self.needs_noise.sum())

    @cached_property
    def history(self) -> int:
        """How many past x0 the update reads: 1, or 2 where d2 is used."""
        return 2 if np.any(self.coeffs[:, 7] != 0) else 1

    def derived(self, key, make):
        """`make(self)`, computed once per plan and key and kept with it: what a loop compiles from the plan
        (samplers/host.py's steps) is then paid once per plan, not once per run."""
        cache = self.__dict__.setdefault("_derived", {})  # a frozen dataclass: its __dict__ is still open
        if key not in cache:
            cache[key] = make(self)
        return cache[key]


def update(row, x, out, x0_prev, noise, clip, x0_prev2=None, threshold: Threshold | None = None):
    """One sampler step with array operators only → (x_next, x0). `noise` may be None where e == 0, and
    `x0_prev2` where d2 == 0."""
    p, q, a, b, c, d, e, *rest = (float(v) for v in row)
    d2 = rest[0] if rest else 0.0
    x0 = _weighted_sum((p, x), (q, out))
    if threshold is not None:
        x0 = dynamic_threshold(x0, threshold)
    elif clip:
        x0 = x0.clip(-clip, clip)
    x_next = _weighted_sum((a, x), (d, x0_prev), (d2, x0_prev2), (e, noise), (b, out), (c, x0))
    return x_next, x0


def dynamic_threshold(x0, threshold: Threshold):
    """Saharia et al.'s dynamic thresholding per image of x0 [B, ...], on numpy arrays or torch tensors."""
    flat = x0.reshape(x0.shape[0], -1)
    if hasattr(flat, "new_zeros"):  # torch: diffusers' own formula (torch.quantile interpolates linearly)
        s = flat.abs().float().quantile(threshold.ratio, dim=1).clamp(1.0, threshold.max_value)
        s = s.to(flat.dtype)[:, None]
        return (flat.clamp(-s, s) / s).reshape(x0.shape)
    xp = flat.__array_namespace__() if hasattr(flat, "__array_namespace__") else np
    s = np.quantile(xp.abs(flat), threshold.ratio, axis=1).clip(1.0, threshold.max_value)
    s = s.astype(flat.dtype, copy=False)[:, None]
    return (xp.clip(flat, -s, s) / s).reshape(x0.shape)


def _weighted_sum(*terms):
    """Σ coefficient·array over the terms with a non-zero coefficient (most samplers leave some out).

    Skipping them keeps the host loop cheap: on small images each array operation costs about 1 µs."""
    total = None
    for coefficient, array in terms:
        if coefficient != 0.0:
            term = coefficient * array
            total = term if total is None else total + term
    return total if total is not None else terms[0][1] * 0.0


def x0_transform(config: DiffusionConfig) -> tuple[float | None, Threshold | None]:
    """(clip, threshold) of a plan on `config`: thresholding if set, else clipping if set (as diffusers)."""
    if config.thresholding:
        return None, Threshold(config.dynamic_thresholding_ratio, config.sample_max_value)
    return (config.clip_sample_range if config.clip_sample else None), None


def make_plan(sampler: str, config: DiffusionConfig, steps: int, *, eta: float = 0.0) -> SamplerPlan:
    """The plan of `sampler` (one of SAMPLERS) for `steps` steps on `config`'s schedule and options.

    `eta` is DDIM's η (0: deterministic DDIM, 1: DDPM-like variance); the other samplers take none."""
    from dtk.runtime.samplers import ddim, ddpm, dpmpp, euler, unipc

    if sampler not in SAMPLERS:
        raise DtkError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise DtkError(f"steps must be an integer, got {steps!r}")
    if sampler == "ddim":
        return ddim.ddim_plan(config, int(steps), eta=eta)
    if eta != 0.0:
        raise DtkError(f"eta applies to the ddim sampler only (got eta={eta} with {sampler})")
    builders = {
        "ddpm": ddpm.ddpm_plan,
        "dpmpp-2m": dpmpp.dpmpp_2m_plan,
        "dpmpp-2m-sde": dpmpp.dpmpp_2m_sde_plan,
        "dpmpp-3m": dpmpp.dpmpp_3m_plan,
        "unipc": unipc.unipc_plan,
        "euler": euler.euler_plan,
        "euler-ancestral": euler.euler_ancestral_plan,
    }
    return builders[sampler](config, int(steps))


def check_steps(steps: int, num_train_timesteps: int) -> None:
    if not 1 <= steps <= num_train_timesteps:
        raise DtkError(
            f"steps must be between 1 and num_train_timesteps ({num_train_timesteps}), got {steps}"
        )


def ddpm_timesteps(sampler: str, config: DiffusionConfig, steps: int) -> np.ndarray:
    """diffusers' DDPM/DDIM `set_timesteps` for `steps`, checked.

    diffusers' trailing spacing yields steps + 1 values ending in -1 for some counts (61 of 1000, ...); the
    plan keeps the first `steps`, which are diffusers' own."""
    check_steps(steps, config.num_train_timesteps)
    ts = timesteps(config.num_train_timesteps, steps, config.timestep_spacing, config.steps_offset)[:steps]
    return check_timesteps(sampler, ts, config)


def check_timesteps(sampler: str, timesteps: np.ndarray, config: DiffusionConfig) -> np.ndarray:
    """Refuse timesteps a network was never trained on, or repeated ones (too many steps for the spacing)."""
    T = config.num_train_timesteps
    if timesteps.min() < 0 or timesteps.max() > T - 1 or np.any(np.diff(timesteps) >= 0):
        raise DtkError(
            f"{sampler}: {len(timesteps)} steps with {config.timestep_spacing!r} spacing and steps_offset "
            f"{config.steps_offset} give timesteps outside 0..{T - 1} or repeated ones; use fewer steps"
        )
    return timesteps


def x0_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) with x0 = p*x + q*out, for x_t = alpha*x0 + sigma*ε (alpha = √ᾱ_t, sigma = √(1-ᾱ_t))."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":  # v = alpha*ε - sigma*x0  (Salimans & Ho 2022)
        return alpha, -sigma
    return 0.0, 1.0  # "sample": the network predicts x0 itself


def eps_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(u, w) with ε = u*x + w*out: the noise the network implies, from its unclipped output."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    return 1.0 / sigma, -alpha / sigma
