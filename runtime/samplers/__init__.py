"""Samplers as plans (timesteps + update coefficients) and the array-agnostic loop that runs them."""

from dtk.runtime.samplers.loop import sample_loop
from dtk.runtime.samplers.noise import NoiseSource
from dtk.runtime.samplers.plan import SAMPLERS, SamplerPlan, Threshold, make_plan, update

__all__ = ["SAMPLERS", "NoiseSource", "SamplerPlan", "Threshold", "make_plan", "sample_loop", "update"]
