"""A sampler as data: timesteps plus a per-step coefficient table, applied by one array-agnostic `update`.

Every sampler here reduces to, per step i with network output `out` at timestep t_i:

    x0     = p*x + q*out                       (clipped to ±clip when clip is set)
    x_next = a*x + b*out + c*x0 + d*x0_prev + e*noise

with scalars (p, q, a, b, c, d, e) = coeffs[i]. The same `update` runs on numpy arrays, torch tensors and
device buffers; the TensorRT path evaluates exactly this formula in a CUDA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig, timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")
COEFF_NAMES = ("p", "q", "a", "b", "c", "d", "e")


@dataclass(frozen=True)
class SamplerPlan:
    """What a sampling run does: the t fed to the network at each step and that step's update coefficients."""

    name: str
    timesteps: np.ndarray  # int64 [S]
    coeffs: np.ndarray  # float64 [S, 7]: p, q, a, b, c, d, e
    clip: float | None  # x0 is clipped to [-clip, clip], or not at all

    def __post_init__(self):
        timesteps = np.asarray(self.timesteps, dtype=np.int64)
        coeffs = np.asarray(self.coeffs, dtype=np.float64)
        if timesteps.ndim != 1 or coeffs.shape != (len(timesteps), len(COEFF_NAMES)):
            raise ValueError(
                f"plan needs timesteps [S] and coeffs [S, 7], got {timesteps.shape}, {coeffs.shape}"
            )
        if not np.all(np.isfinite(coeffs)):
            raise ValueError(f"{self.name}: non-finite coefficients in the plan")
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "coeffs", coeffs)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def needs_noise(self) -> np.ndarray:
        """bool [S]: the steps that add fresh Gaussian noise (and so consume one draw per image)."""
        return self.coeffs[:, 6] != 0


def update(row, x, out, x0_prev, noise, clip):
    """One sampler step with array operators only → (x_next, x0). `noise` may be None where e == 0."""
    p, q, a, b, c, d, e = (float(v) for v in row)
    x0 = _weighted_sum((p, x), (q, out))
    if clip:
        x0 = x0.clip(-clip, clip)
    x_next = _weighted_sum((a, x), (b, out), (c, x0), (d, x0_prev), (e, noise))
    return x_next, x0


def _weighted_sum(*terms):
    """Σ coefficient·array over the terms with a non-zero coefficient (most samplers leave some out).

    Skipping them keeps the host loop cheap: on small images each array operation costs about 1 µs."""
    total = None
    for coefficient, array in terms:
        if coefficient != 0.0:
            term = coefficient * array
            total = term if total is None else total + term
    return total if total is not None else terms[0][1] * 0.0


def make_plan(sampler: str, config: DiffusionConfig, steps: int, *, eta: float = 0.0) -> SamplerPlan:
    """The plan of `sampler` ("ddpm", "ddim" or "dpmpp-2m") for `steps` steps on `config`'s schedule.

    `eta` is DDIM's η (0: deterministic DDIM, 1: DDPM-like variance); the other samplers take none."""
    from dtk.runtime.samplers import ddim, ddpm, dpmpp

    if sampler not in SAMPLERS:
        raise DtkError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise DtkError(f"steps must be an integer, got {steps!r}")
    if sampler == "ddim":
        return ddim.ddim_plan(config, int(steps), eta=eta)
    if eta != 0.0:
        raise DtkError(f"eta applies to the ddim sampler only (got eta={eta} with {sampler})")
    if sampler == "ddpm":
        return ddpm.ddpm_plan(config, int(steps))
    return dpmpp.dpmpp_2m_plan(config, int(steps))


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
