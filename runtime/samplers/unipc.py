"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", Algorithms 2–3, the B(h) variants): the order-2 multistep predictor UniP-2 and, on every step after
the first, the corrector UniC that revises x_t with the network output just taken there (no extra call).

As diffusers' UniPCMultistepScheduler with solver_order=2, predict_x0=True, solver_type "bh2" (or "bh1"),
lower_order_final, disable_corrector, use_karras_sigmas and final_sigmas_type.

Why it is still one plan row per step: the corrected x_c(i) = σ_i/σ_{i−1}·x_c(i−1) + (x0 terms), and the
predictor that made x_i began with the same σ_i/σ_{i−1}·x_c(i−1). So x_c(i) = x_i + (corrector's x0 terms)
− (previous predictor's x0 terms), and the predictor's x_{i+1} = σ_{i+1}/σ_i·x_c(i) + (x0 terms) is linear in
x_i and x0 over three steps: the table's two history terms, with no extra state."""

from __future__ import annotations

import math

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers.plan import SamplerPlan, x0_coefficients, x0_transform
from dtk.runtime.samplers.sigmas import alpha_sigma, solver_schedule
from dtk.runtime.schedule import DiffusionConfig

ORDER = 2


def unipc_plan(config: DiffusionConfig, steps: int) -> SamplerPlan:
    ts, sigmas = solver_schedule("unipc", config, steps)
    S = len(ts)
    alphas, vp_sigmas = alpha_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lambdas = -np.log(sigmas)
    bh1 = config.solver_type == "bh1"
    orders = [min(ORDER, S - i if config.lower_order_final else ORDER, i + 1) for i in range(S)]
    coeffs = np.zeros((S, 8))
    previous = np.zeros(3)  # the last predictor's weights on (x0_{i-1}, x0_{i-2}, x0_{i-3})
    for i in range(S):
        p, q = x0_coefficients(config.prediction_type, alphas[i], vp_sigmas[i])
        a = vp_sigmas[i + 1] / vp_sigmas[i]
        predictor = _predictor(orders[i], lambdas, alphas[i + 1], i, bh1)
        if not np.all(np.isfinite(predictor)):
            raise DtkError(f"unipc: order {orders[i]} on the step to σ = 0 diverges; keep lower_order_final")
        weights = predictor
        if i > 0 and (i - 1) not in config.disable_corrector:
            corrector = _corrector(orders[i - 1], lambdas, alphas[i], i, bh1)
            weights = a * (corrector - np.array([0.0, previous[0], previous[1]])) + predictor
        coeffs[i] = (p, q, a, 0.0, weights[0], weights[1], 0.0, weights[2])
        previous = predictor
    return SamplerPlan("unipc", ts, coeffs, *x0_transform(config))


def _b_of_h(hh: float, bh1: bool) -> float:
    return hh if bh1 else math.expm1(hh)


def _predictor(order: int, lambdas, alpha_next: float, i: int, bh1: bool) -> np.ndarray:
    """UniP's weights of (x0_i, x0_{i−1}, x0_{i−2}) in x_{i+1} = σ_{i+1}/σ_i·x_c(i) + Σ w·x0."""
    h = lambdas[i + 1] - lambdas[i]
    h_phi_1 = math.expm1(-h)
    weights = np.array([-alpha_next * h_phi_1, 0.0, 0.0])
    if order == 2:  # D1 = (x0_{i−1} − x0_i) / r with ρ = 1/2
        r = (lambdas[i - 1] - lambdas[i]) / h
        pull = alpha_next * _b_of_h(-h, bh1) * 0.5 / r
        weights += np.array([pull, -pull, 0.0])
    return weights


def _corrector(order: int, lambdas, alpha_i: float, i: int, bh1: bool) -> np.ndarray:
    """UniC's weights of (x0_i, x0_{i−1}, x0_{i−2}) in x_c(i) − σ_i/σ_{i−1}·x_c(i−1)."""
    h = lambdas[i] - lambdas[i - 1]
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = _b_of_h(hh, bh1)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    weights = np.array([0.0, -alpha_i * h_phi_1, 0.0])
    if order == 1:
        rho_t = 0.5
    else:
        r = (lambdas[i - 2] - lambdas[i - 1]) / h
        rho_1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array(b))
        pull = alpha_i * B_h * rho_1 / r  # D1 = (x0_{i−2} − x0_{i−1}) / r
        weights += np.array([0.0, pull, -pull])
    return weights + alpha_i * B_h * rho_t * np.array([-1.0, 1.0, 0.0])  # D1_t = x0_i − x0_{i−1}
