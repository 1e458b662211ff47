"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2).

As diffusers' DPMSolverMultistepScheduler with solver_order=2, algorithm_type="dpmsolver++",
solver_type="midpoint", lower_order_final=True and final_sigmas_type="zero": first order on the first step and
on the last, which lands on σ = 0 (x = x0); second order in between. Like diffusers, it does not clip x0."""

from __future__ import annotations

import numpy as np

from dtk.runtime.samplers.plan import SamplerPlan, check_steps, check_timesteps, x0_coefficients
from dtk.runtime.schedule import DiffusionConfig


def dpm_timesteps(config: DiffusionConfig, steps: int) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler.set_timesteps: S + 1 points with the last (t = 0) dropped,
    except for trailing spacing, which is the DDPM one."""
    check_steps(steps, config.num_train_timesteps)
    T, n = config.num_train_timesteps, steps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + config.steps_offset
    else:
        ts = (np.arange(T, 0, -T / n).round() - 1)[:n]
    return check_timesteps("dpmpp-2m", ts.astype(np.int64), config)


def dpmpp_2m_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    ts = dpm_timesteps(config, steps)
    abar = config.alphas_cumprod[ts]
    # x_t = alpha·x0 + sigma·ε; ve = sigma/alpha is the VE noise level (0 after the last step), λ = -log(ve)
    alphas = np.append(np.sqrt(abar), 1.0)
    sigmas = np.append(np.sqrt(1.0 - abar), 0.0)
    ve = sigmas / alphas
    lambdas = -np.log(ve[:-1])
    coeffs = np.zeros((len(ts), 7))
    for i in range(len(ts)):
        p, q = x0_coefficients(config.prediction_type, alphas[i], sigmas[i])
        a = sigmas[i + 1] / sigmas[i]
        k = alphas[i + 1] * (1.0 - ve[i + 1] / ve[i])  # α_next·(1 − e^{−h}), h = λ_next − λ_i
        if i == 0 or i == len(ts) - 1:  # DPM-Solver++(1), i.e. DDIM, on x0
            coeffs[i] = (p, q, a, 0.0, k, 0.0, 0.0)
        else:  # 2M: D0 = x0_i, D1 = (x0_i − x0_{i−1}) / r, r = h_{i−1} / h_i
            r = (lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])
            coeffs[i] = (p, q, a, 0.0, k * (1.0 + 0.5 / r), -k * 0.5 / r, 0.0)
    return SamplerPlan("dpmpp-2m", ts, coeffs, None)
