"""The noise schedule, defined once (numpy): betas, alphas_cumprod, inference timesteps and sigmas.

Field names follow diffusers' scheduler configs, so configs map both ways: every field of diffusers' DDPM,
DDIM, DPMSolverMultistep, UniPCMultistep, EulerDiscrete and EulerAncestralDiscrete schedulers is either a
field here (honoured by the samplers), folded into `sampler` (`_class_name`, `solver_order`,
`algorithm_type`), or refused by `from_dict` with one line naming it. Training (torch) and every sampler
read their numbers from here.
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
SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m", "unipc", "euler", "euler-ancestral")
DEFAULT_SAMPLER = "ddim"  # for a bundle or checkpoint whose config names none
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SOLVER_TYPES = (
    "midpoint",
    "heun",
    "bh1",
    "bh2",
)  # DPM-Solver reads midpoint/heun, UniPC bh1/bh2 (as diffusers)
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers' names for the same settings
_ALIASES = {
    "beta_schedule": {"squaredcos_cap_v2": "cosine"},
    "variance_type": {
        None: "fixed_small",
        "fixed_small_log": "fixed_small",
    },  # same σ (diffusers clamps 1e-20)
    "solver_type": {"logrho": "midpoint"},
}
# diffusers scheduler class → dtk sampler; DPMSolverMultistep also reads solver_order and algorithm_type
SCHEDULER_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp-2m",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-ancestral",
}
_DPM_SAMPLERS = {
    ("dpmsolver++", 2): "dpmpp-2m",
    ("dpmsolver++", 3): "dpmpp-3m",
    ("sde-dpmsolver++", 2): "dpmpp-2m-sde",
}
# diffusers fields dtk's samplers do not implement: accepted only at the value that changes nothing
_REFUSED = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "flow_shift": (1.0,),
    "time_shift_type": ("exponential",),
    "shift_terminal": (None,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "predict_x0": (True,),
    "solver_p": (None,),
}
_INT_FIELDS = ("num_train_timesteps", "steps_offset")
_BOOL_FIELDS = (
    "clip_sample",
    "thresholding",
    "set_alpha_to_one",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
)
_FLOAT_FIELDS = (
    "beta_start",
    "beta_end",
    "clip_sample_range",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process, what the network predicts and how to sample it; diffusers' scheduler field names.

    `sampler` is the bundle's default sampler (set by a diffusers config's scheduler class); None: the
    caller's default. The sampler-specific fields apply where diffusers applies them: variance_type to ddpm,
    set_alpha_to_one to ddim, solver_type/lower_order_final/euler_at_final/lambda_min_clipped to the
    DPM-Solvers, disable_corrector to UniPC, use_karras_sigmas/final_sigmas_type to DPM-Solver and UniPC.
    clip_sample and thresholding (x0 clipping, dynamic thresholding) apply to every sampler."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str = "fixed_small"
    set_alpha_to_one: bool = True
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float | None = None  # None: no clipping (diffusers' -inf)
    disable_corrector: tuple = ()
    sampler: str | None = None

    def __post_init__(self):
        for field, aliases in _ALIASES.items():
            value = getattr(self, field)
            if isinstance(value, (str, type(None))) and value in aliases:
                object.__setattr__(self, field, aliases[value])
        _check_types(self)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.sampler is not None:
            _check_choice("sampler", self.sampler, SAMPLERS)
        if self.num_train_timesteps < 2:
            raise DtkError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise DtkError(f"steps_offset must not be negative, got {self.steps_offset}")
        if not 0.0 < self.beta_start < 1.0 or not 0.0 < self.beta_end < 1.0:
            raise DtkError(
                f"beta_start and beta_end must lie in (0, 1), got {self.beta_start}, {self.beta_end}"
            )
        if not self.clip_sample_range > 0:
            raise DtkError(f"clip_sample_range must be positive, got {self.clip_sample_range}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise DtkError(
                f"dynamic_thresholding_ratio must lie in (0, 1], got {self.dynamic_thresholding_ratio}"
            )
        if not self.sample_max_value >= 1.0:
            raise DtkError(f"sample_max_value must be at least 1, got {self.sample_max_value}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["disable_corrector"] = list(self.disable_corrector)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DiffusionConfig:
        """Build from a dtk config or a diffusers scheduler config; refuse (DtkError, one line) any field that
        dtk would otherwise not apply. Keys starting with "_" are diffusers metadata, except `_class_name`,
        which sets the default sampler."""
        data = dict(data)
        class_name = data.pop("_class_name", None)
        solver_order, algorithm_type = data.pop("solver_order", None), data.pop("algorithm_type", None)
        for key in [k for k in data if isinstance(k, str) and k.startswith("_")]:
            del data[key]
        for key, inert in _REFUSED.items():
            if key in data:
                value = data.pop(key)
                if not any(value is v or (v is not None and value == v) for v in inert):
                    shown = f"a list of {len(value)}" if isinstance(value, list) else repr(value)
                    raise DtkError(f"{key} ({shown}) is not supported by dtk's samplers")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise DtkError(f"unknown scheduler field {unknown[0]!r}: dtk would not apply it")
        if class_name is not None or solver_order is not None or algorithm_type is not None:
            sampler = _sampler_from_diffusers(class_name, solver_order, algorithm_type)
            if data.get("sampler") not in (None, sampler):
                raise DtkError(f"sampler {data['sampler']!r} contradicts the scheduler class {class_name}")
            data["sampler"] = sampler
        if isinstance(data.get("disable_corrector"), list):
            data["disable_corrector"] = tuple(data["disable_corrector"])
        return cls(**data)

    def to_diffusers(self, sampler: str | None = None) -> dict:
        """This config as diffusers' scheduler for `sampler` (default: `self.sampler`, else ddpm) takes it:
        `_class_name` and exactly the fields that class reads."""
        from dtk.runtime.diffusers_config import diffusers_config

        return diffusers_config(self, sampler or self.sampler or "ddpm")

    @property
    def betas(self) -> np.ndarray:
        return make_betas(self)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self.betas)

    @property
    def sigmas(self) -> np.ndarray:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t), the variance-exploding noise level of each training timestep."""
        abar = self.alphas_cumprod
        return np.sqrt((1.0 - abar) / abar)


def _sampler_from_diffusers(class_name, solver_order, algorithm_type) -> str:
    if class_name is None:
        class_name = "DPMSolverMultistepScheduler"  # solver_order / algorithm_type name a DPM-Solver
    if class_name not in SCHEDULER_CLASSES:
        raise DtkError(
            f"scheduler class {class_name!r} has no dtk sampler; "
            f"dtk samples as {', '.join(SCHEDULER_CLASSES)}"
        )
    sampler = SCHEDULER_CLASSES[class_name]
    if sampler == "dpmpp-2m":
        key = (algorithm_type or "dpmsolver++", 2 if solver_order is None else solver_order)
        if key not in _DPM_SAMPLERS:
            raise DtkError(
                f"{class_name} with algorithm_type={key[0]!r}, solver_order={key[1]!r} is not supported "
                "(dtk has dpmsolver++ of order 2 and 3, and sde-dpmsolver++ of order 2)"
            )
        return _DPM_SAMPLERS[key]
    if algorithm_type is not None:
        raise DtkError(f"algorithm_type is a DPMSolverMultistepScheduler field, not one of {class_name}")
    if solver_order is not None and (sampler != "unipc" or solver_order != 2):
        raise DtkError(f"solver_order={solver_order!r} is not supported for {class_name} (UniPC: 2)")
    return sampler


def _check_types(config: DiffusionConfig) -> None:
    def wrong(field, value, kind):
        raise DtkError(f"{field} must be {kind}, got {value!r}")

    for field in _INT_FIELDS:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            wrong(field, value, "an integer")
    for field in _BOOL_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, (bool, np.bool_)):
            wrong(field, value, "true or false")
    for field in _FLOAT_FIELDS:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            wrong(field, value, "a number")
        if not math.isfinite(value):
            wrong(field, value, "a finite number")
    clipped = config.lambda_min_clipped
    if clipped is not None and (
        isinstance(clipped, bool) or not isinstance(clipped, (int, float)) or math.isnan(clipped)
    ):
        wrong("lambda_min_clipped", clipped, "a number or null")
    if clipped is not None and math.isinf(clipped) and clipped < 0:
        object.__setattr__(config, "lambda_min_clipped", None)  # diffusers' -inf: no clipping
    for field in ("beta_schedule", "prediction_type", "timestep_spacing", "variance_type", "solver_type"):
        if not isinstance(getattr(config, field), str):
            wrong(field, getattr(config, field), "a string")
    steps = config.disable_corrector
    if not isinstance(steps, (tuple, list)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps
    ):
        wrong("disable_corrector", steps, "a list of step indices")
    object.__setattr__(config, "disable_corrector", tuple(int(s) for s in steps))


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
