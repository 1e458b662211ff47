"""Timesteps and noise levels of the multistep solvers (DPM-Solver++, UniPC), as diffusers' set_timesteps.

The solvers work on σ = √((1 − ᾱ)/ᾱ), the variance-exploding noise level, with x_t = α·x0 + α·σ·ε and
α = 1/√(1 + σ²); λ = −log σ is the half log-SNR they step in. Karras sigmas (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5, ρ = 7) space σ between the
schedule's extremes and feed the network the rounded timestep whose σ is nearest in log."""

from __future__ import annotations

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers.plan import check_steps, check_timesteps
from dtk.runtime.schedule import DiffusionConfig

KARRAS_RHO = 7.0


def solver_schedule(sampler: str, config: DiffusionConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [S], σ float64 [S + 1]): the σ of each step and, last, the one the run ends at."""
    check_steps(steps, config.num_train_timesteps)
    train_sigmas = config.sigmas
    clipped = sampler.startswith("dpmpp")  # lambda_min_clipped is a DPM-Solver field only
    ts = solver_timesteps(config, steps, _last_timestep(config, train_sigmas) if clipped else None)
    if config.use_karras_sigmas:
        if clipped and config.beta_schedule == "cosine":
            raise DtkError(
                f"{sampler}: use_karras_sigmas on the cosine schedule gives fractional timesteps "
                "(diffusers' DPM-Solver does not round them there); use unipc, or another schedule"
            )
        sigmas = karras_sigmas(train_sigmas[0], train_sigmas[-1], steps)
        ts = np.round(sigma_to_t(sigmas, np.log(train_sigmas))).astype(np.int64)
    else:
        sigmas = train_sigmas[ts]
    last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
    return check_timesteps(sampler, ts, config), np.append(sigmas, last)


def solver_timesteps(config: DiffusionConfig, steps: int, last_timestep: int | None = None) -> np.ndarray:
    """S + 1 points with the last (t = 0) dropped, except for trailing spacing, which is the DDPM one."""
    T, n = config.num_train_timesteps, steps
    last = T if last_timestep is None else last_timestep
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + config.steps_offset
    else:
        ts = (np.arange(last, 0, -T / n).round() - 1)[:n]
    return ts.astype(np.int64)


def _last_timestep(config: DiffusionConfig, train_sigmas: np.ndarray) -> int:
    """T minus the timesteps whose λ falls below lambda_min_clipped (for the cosine schedule's tail)."""
    if config.lambda_min_clipped is None:
        return config.num_train_timesteps
    lambdas = -np.log(train_sigmas)  # decreasing in t
    return int(config.num_train_timesteps - np.searchsorted(lambdas[::-1], config.lambda_min_clipped))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, steps)
    low, high = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (high + ramp * (low - high)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ, interpolating log σ between the two training timesteps around it."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(
        np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, len(log_train_sigmas) - 2
    )
    w = (log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[low + 1])
    return low + np.clip(w, 0.0, 1.0)


def alpha_sigma(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(α, α·σ): the VP scale of x0 and of ε at each VE noise level σ."""
    alphas = 1.0 / np.sqrt(1.0 + np.asarray(sigmas, dtype=np.float64) ** 2)
    return alphas, alphas * sigmas


def refuse_karras(sampler: str, config: DiffusionConfig) -> None:
    if config.use_karras_sigmas:
        raise DtkError(
            f"{sampler}: use_karras_sigmas gives fractional timesteps (diffusers feeds them unrounded); "
            "use it with dpmpp-2m, dpmpp-2m-sde, dpmpp-3m or unipc"
        )
