"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7).

As diffusers' DDPMScheduler: the full Markov chain, or a strided one with fewer steps than T; variance_type
"fixed_small" (the posterior's β̃_t) or "fixed_large" (β_t, no noise on a step at t = 0)."""

from __future__ import annotations

import math

import numpy as np

from dtk.runtime.samplers.plan import SamplerPlan, ddpm_timesteps, x0_coefficients, x0_transform
from dtk.runtime.schedule import DiffusionConfig


def ddpm_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    ts = ddpm_timesteps("ddpm", config, steps)
    alphas_cumprod = config.alphas_cumprod
    coeffs = np.zeros((len(ts), 7))
    for i, t in enumerate(ts):
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0
        alpha = abar / abar_prev  # of the (possibly strided) step t -> t_prev
        beta = 1.0 - alpha
        p, q = x0_coefficients(config.prediction_type, math.sqrt(abar), math.sqrt(1.0 - abar))
        # posterior q(x_prev | x_t, x0) = N(c*x0 + a*x_t, variance)  (eq. 7)
        c = math.sqrt(abar_prev) * beta / (1.0 - abar)
        a = math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)
        if config.variance_type == "fixed_large":
            variance = beta if t > 0 else 0.0
        else:
            variance = (1.0 - abar_prev) / (1.0 - abar) * beta  # β̃_t; zero on the last step
        coeffs[i] = (p, q, a, 0.0, c, 0.0, math.sqrt(variance))
    return SamplerPlan("ddpm", ts, coeffs, *x0_transform(config))
