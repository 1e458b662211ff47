"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): the multistep 2M and 3M solvers on the data prediction x0 (Algorithm 2 and its third-order
extension), and 2M SDE (sec. 5, the SDE variant).

As diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" (solver_order 2 or 3) or
"sde-dpmsolver++" (solver_order 2), solver_type "midpoint" or "heun", and its lower_order_final,
euler_at_final, use_karras_sigmas, final_sigmas_type and lambda_min_clipped: first order on the first step,
second order next, and lower orders at the end for short runs and wherever the run lands on σ = 0."""

from __future__ import annotations

import math

import numpy as np

from dtk.runtime.samplers.plan import SamplerPlan, x0_coefficients, x0_transform
from dtk.runtime.samplers.sigmas import alpha_sigma, solver_schedule
from dtk.runtime.schedule import DiffusionConfig


def dpmpp_2m_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    return _dpmpp_plan("dpmpp-2m", config, steps, order=2, sde=False)


def dpmpp_3m_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    return _dpmpp_plan("dpmpp-3m", config, steps, order=3, sde=False)


def dpmpp_2m_sde_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    return _dpmpp_plan("dpmpp-2m-sde", config, steps, order=2, sde=True)


def step_orders(config: DiffusionConfig, steps: int, order: int) -> list[int]:
    """The order diffusers' step() uses at each step: warm-up from 1, lower at the end where configured."""
    S, short = steps, config.lower_order_final and steps < 15
    orders = []
    for i in range(S):
        final = i == S - 1 and (config.euler_at_final or short or config.final_sigmas_type == "zero")
        if min(i, order) < 1 or final:
            orders.append(1)
        elif order == 2 or min(i, order) < 2 or (i == S - 2 and short):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _dpmpp_plan(name: str, config: DiffusionConfig, steps: int, order: int, sde: bool) -> SamplerPlan:
    ts, sigmas = solver_schedule(name, config, steps)
    alphas, vp_sigmas = alpha_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lambdas = -np.log(sigmas)  # +inf where the run ends on σ = 0
    heun = config.solver_type == "heun"
    coeffs = np.zeros((len(ts), 8))
    for i, k in enumerate(step_orders(config, len(ts), order)):
        p, q = x0_coefficients(config.prediction_type, alphas[i], vp_sigmas[i])
        alpha_next, ratio = alphas[i + 1], sigmas[i + 1] / sigmas[i]  # ratio = e^{-h}
        h = lambdas[i + 1] - lambdas[i]
        if sde:  # e^{-2h} in place of e^{-h}, and the noise that keeps the marginals
            a = vp_sigmas[i + 1] / vp_sigmas[i] * ratio
            base = alpha_next * (1.0 - ratio**2)
            corr = alpha_next * ((1.0 - ratio**2) / (-2.0 * h) + 1.0) if k > 1 else 0.0
            noise = vp_sigmas[i + 1] * math.sqrt(1.0 - ratio**2)
        else:
            a = vp_sigmas[i + 1] / vp_sigmas[i]
            base = alpha_next * (1.0 - ratio)  # −α_t(e^{−h} − 1)
            corr = alpha_next * ((ratio - 1.0) / h + 1.0) if k > 1 else 0.0
            noise = 0.0
        m = _history_weights(k, lambdas, i, base, corr, heun or k == 3, sde, alpha_next, ratio, h)
        coeffs[i] = (p, q, a, 0.0, m[0], m[1], noise, m[2])
    return SamplerPlan(name, ts, coeffs, *x0_transform(config))


def _history_weights(order, lambdas, i, base, corr, heun, sde, alpha_next, ratio, h) -> np.ndarray:
    """Weights of (x0_i, x0_{i−1}, x0_{i−2}) in x_next: base·D0 + (corr or base/2)·D1 (+ the D2 term)."""
    D0 = np.array([1.0, 0.0, 0.0])
    if order == 1:
        return base * D0
    h = lambdas[i + 1] - lambdas[i]
    r0 = (lambdas[i] - lambdas[i - 1]) / h
    D1_0 = np.array([1.0, -1.0, 0.0]) / r0
    if order == 2:
        return base * D0 + (corr if heun else 0.5 * base) * D1_0
    r1 = (lambdas[i - 1] - lambdas[i - 2]) / h
    D1_1 = np.array([0.0, 1.0, -1.0]) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    third = alpha_next * ((ratio - 1.0 + h) / h**2 - 0.5)
    return base * D0 + corr * D1 - third * D2
