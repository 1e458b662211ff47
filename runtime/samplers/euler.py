"""Euler and Euler ancestral (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 1 with S_churn = 0; the ancestral step of k-diffusion's sample_euler_ancestral).

As diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler. They step the variance-exploding
x_ve = x/α in σ; dtk keeps x = α·x_ve (what the network is fed, `scale_model_input`), so each step is a row
of the plan: x_ve' = x_ve + (σ_down − σ)·(x_ve − x0)/σ + σ_up·z, with σ_down = σ', σ_up = 0 for Euler.
dtk starts both from unit noise; diffusers' linspace and trailing spacings start from σ_max/√(1 + σ_max²) of
it (1 − 2·10⁻⁵ on the linear schedule). use_karras_sigmas would need fractional timesteps: refused."""

from __future__ import annotations

import math

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers.plan import SamplerPlan, check_steps, check_timesteps, x0_coefficients, x0_transform
from dtk.runtime.samplers.sigmas import alpha_sigma, refuse_karras
from dtk.runtime.schedule import DiffusionConfig, timesteps


def euler_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    return _euler_plan("euler", config, steps, ancestral=False)


def euler_ancestral_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    return _euler_plan("euler-ancestral", config, steps, ancestral=True)


def euler_timesteps(sampler: str, config: DiffusionConfig, steps: int) -> np.ndarray:
    """diffusers' Euler set_timesteps: DDPM's leading and trailing; linspace unrounded, so integer only
    when S − 1 divides T − 1."""
    check_steps(steps, config.num_train_timesteps)
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)[::-1]
        if not np.allclose(ts, ts.round(), rtol=0, atol=1e-9):
            raise DtkError(
                f"{sampler}: linspace spacing with {steps} steps gives fractional timesteps, which the "
                f"network was not trained on; use S with S − 1 dividing {T - 1}, or another spacing"
            )
        return check_timesteps(sampler, ts.round().astype(np.int64), config)
    ts = timesteps(T, steps, config.timestep_spacing, config.steps_offset)[:steps]
    return check_timesteps(sampler, ts, config)


def _euler_plan(name: str, config: DiffusionConfig, steps: int, ancestral: bool) -> SamplerPlan:
    refuse_karras(name, config)
    ts = euler_timesteps(name, config, steps)
    train_sigmas = config.sigmas
    last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.append(train_sigmas[ts], last)
    alphas, vp_sigmas = alpha_sigma(sigmas)
    coeffs = np.zeros((len(ts), 8))
    for i in range(len(ts)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        p, q = x0_coefficients(config.prediction_type, alphas[i], vp_sigmas[i])
        if ancestral:
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        else:
            sigma_up, sigma_down = 0.0, sigma_next
        to_vp = alphas[i + 1]  # x_next = α'·x_ve'
        a = to_vp * (sigma_down / sigma) / alphas[i]
        coeffs[i] = (p, q, a, 0.0, to_vp * (1.0 - sigma_down / sigma), 0.0, to_vp * sigma_up, 0.0)
    return SamplerPlan(name, ts, coeffs, *x0_transform(config))
