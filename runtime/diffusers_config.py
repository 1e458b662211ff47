"""A DiffusionConfig as the config of the diffusers scheduler class that samples as a dtk sampler does.

Used for the bundle's `scheduler_config.json` and by the tests that pin dtk's samplers to diffusers. The
fields written are exactly those the class reads; `reproduction_gaps` says where diffusers would still
sample differently (dtk clips and thresholds x0 on every sampler, diffusers on some)."""

from __future__ import annotations

_COMMON = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
)
_THRESHOLDING = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
CLASS_FIELDS = {
    "DDPMScheduler": (*_COMMON, "variance_type", "clip_sample", "clip_sample_range", *_THRESHOLDING),
    "DDIMScheduler": (*_COMMON, "clip_sample", "clip_sample_range", "set_alpha_to_one", *_THRESHOLDING),
    "DPMSolverMultistepScheduler": (
        *_COMMON,
        *_THRESHOLDING,
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "use_karras_sigmas",
        "final_sigmas_type",
        "lambda_min_clipped",
    ),
    "UniPCMultistepScheduler": (
        *_COMMON,
        *_THRESHOLDING,
        "solver_type",
        "lower_order_final",
        "disable_corrector",
        "use_karras_sigmas",
        "final_sigmas_type",
    ),
    "EulerDiscreteScheduler": (*_COMMON, "use_karras_sigmas", "final_sigmas_type"),
    "EulerAncestralDiscreteScheduler": _COMMON,
}
SAMPLER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-sde": "DPMSolverMultistepScheduler",
    "dpmpp-3m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
}
_DPM_SETTINGS = {
    "dpmpp-2m": {"solver_order": 2, "algorithm_type": "dpmsolver++"},
    "dpmpp-3m": {"solver_order": 3, "algorithm_type": "dpmsolver++"},
    "dpmpp-2m-sde": {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
}


def diffusers_config(config, sampler: str) -> dict:
    """`config` (a DiffusionConfig) as {"_class_name": ..., field: value} for `sampler`'s scheduler class."""
    class_name = SAMPLER_CLASSES[sampler]
    values = config.to_dict()
    out = {"_class_name": class_name, **{name: values[name] for name in CLASS_FIELDS[class_name]}}
    if config.beta_schedule == "cosine":
        out["beta_schedule"] = "squaredcos_cap_v2"
    out.update(_DPM_SETTINGS.get(sampler, {}))
    if out.get("lambda_min_clipped", 0.0) is None:
        del out["lambda_min_clipped"]  # diffusers' default, -inf: no clipping
    if class_name == "UniPCMultistepScheduler":
        out["solver_order"] = 2
        out["solver_type"] = config.solver_type if config.solver_type in ("bh1", "bh2") else "bh2"
    if class_name == "DPMSolverMultistepScheduler":
        out["solver_type"] = config.solver_type if config.solver_type in ("midpoint", "heun") else "midpoint"
    clips_by_threshold = "clip_sample" not in out and "thresholding" in out and not config.thresholding
    if clips_by_threshold and config.clip_sample and config.clip_sample_range == 1.0:
        out.update(thresholding=True, sample_max_value=1.0)  # thresholding with s ∈ [1, 1] clips to ±1
    return out


def reproduction_gaps(config, sampler: str) -> list[str]:
    """What diffusers' scheduler from `diffusers_config` would not do that dtk's `sampler` does."""
    class_name = SAMPLER_CLASSES[sampler]
    fields = CLASS_FIELDS[class_name]
    if config.thresholding and "thresholding" not in fields:
        return [f"{class_name} has no dynamic thresholding (dtk's {sampler} thresholds x0)"]
    clips_alike = "clip_sample" in fields or ("thresholding" in fields and config.clip_sample_range == 1.0)
    if config.clip_sample and not config.thresholding and not clips_alike:
        return [
            f"{class_name} cannot clip x0 to ±{config.clip_sample_range} as dtk's {sampler} does "
            "(diffusers clips only in DDPM and DDIM, and thresholds to ±1 elsewhere)"
        ]
    return []
