"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with σ_t(η) of eq. 16), as diffusers'
DDIMScheduler: η = 0 is deterministic, η = 1 has DDPM's posterior variance."""

from __future__ import annotations

import math

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers.plan import (
    SamplerPlan,
    ddpm_timesteps,
    eps_coefficients,
    x0_coefficients,
    x0_transform,
)
from dtk.runtime.schedule import DiffusionConfig


def ddim_plan(
    config: DiffusionConfig, steps: int, eta: float = 0.0, set_alpha_to_one: bool | None = None
) -> SamplerPlan:
    """`set_alpha_to_one` (default: the config's): the step after t's last uses ᾱ = 1 rather than ᾱ_0."""
    if set_alpha_to_one is None:
        set_alpha_to_one = config.set_alpha_to_one
    if not 0.0 <= eta <= 1.0:
        raise DtkError(f"eta must be between 0 and 1, got {eta}")
    ts = ddpm_timesteps("ddim", config, steps)
    alphas_cumprod = config.alphas_cumprod
    final_abar = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    stride = config.num_train_timesteps // steps  # diffusers steps back by T // S whatever the spacing
    coeffs = np.zeros((len(ts), 7))
    for i, t in enumerate(ts):
        prev = t - stride
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev] if prev >= 0 else final_abar
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        p, q = x0_coefficients(config.prediction_type, alpha, sigma)
        u, w = eps_coefficients(config.prediction_type, alpha, sigma)
        std = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))  # σ_t(η), eq. 16
        direction = math.sqrt(max(1.0 - abar_prev - std**2, 0.0))  # "direction pointing to x_t", eq. 12
        # x_prev = √ᾱ_prev·x0 + direction·ε + σ_t·z, with ε from the unclipped output
        coeffs[i] = (p, q, direction * u, direction * w, math.sqrt(abar_prev), 0.0, std)
    return SamplerPlan("ddim", ts, coeffs, *x0_transform(config))
