"""The noise schedule, defined once (numpy): betas, alphas_cumprod and inference timesteps.

Field names follow diffusers' scheduler configs, so configs map both ways.
Training (torch) and every sampler read their numbers from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from dtk.runtime.errors import DtkError

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' names for the same schedules
_ALIASES = {"squaredcos_cap_v2": "cosine"}


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network predicts; diffusers' scheduler field names."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "beta_schedule", _ALIASES.get(self.beta_schedule, self.beta_schedule))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise DtkError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DiffusionConfig:
        """Build from a dtk or diffusers scheduler config; keys dtk does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_diffusers(self) -> dict:
        """The same config as a diffusers scheduler would take it."""
        out = self.to_dict()
        if self.beta_schedule == "cosine":
            out["beta_schedule"] = "squaredcos_cap_v2"
        return out

    @property
    def betas(self) -> np.ndarray:
        return make_betas(self)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self.betas)


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise DtkError(f"unknown {field} {value!r}; choose one of {', '.join(choices)}")


def make_betas(config: DiffusionConfig) -> np.ndarray:
    """β_1..β_T as float64."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":  # Ho et al. 2020
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(β)
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    return cosine_betas(n)


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1), capped."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float64)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = Π_{s≤t} (1 − β_s)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """Descending int64 timesteps for `num_inference_steps` steps, as diffusers' DDPM/DDIM `set_timesteps`.

    leading:  multiples of T // steps from 0 (plus steps_offset);  trailing: counted back from T − 1;
    linspace: evenly spread over [0, T − 1], rounded."""
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise DtkError(f"steps must be between 1 and num_train_timesteps ({T}), got {n}")
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    else:  # a float step can make arange yield n + 1 values (diffusers keeps the stray -1); keep n
        ts = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    ts = ts.astype(np.int64).copy()
    if ts.max() > T - 1:
        raise DtkError(
            f"steps_offset {steps_offset} pushes timestep {ts.max()} past the last trained one ({T - 1})"
        )
    return ts
