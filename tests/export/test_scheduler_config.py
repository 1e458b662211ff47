"""scheduler_config.json: written into every bundle, loaded by diffusers, and sampling as dtk does."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dtk.export.scheduler_config import SCHEDULER_CONFIG_NAME, write_scheduler_config
from dtk.runtime.manifest import load_manifest
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop
from dtk.runtime.schedule import DiffusionConfig

# diffusers' DPMSolverMultistepScheduler calls np.array() on a tensor, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 1, 4, 4)
CONFIGS = [
    ("ddim", DiffusionConfig(clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing")),
    ("dpmpp-2m", DiffusionConfig(beta_schedule="cosine", clip_sample=True, use_karras_sigmas=False)),
    ("dpmpp-3m", DiffusionConfig(use_karras_sigmas=True, timestep_spacing="trailing")),
    ("unipc", DiffusionConfig(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)),
    ("euler", DiffusionConfig(prediction_type="v_prediction")),
]


def _network(config):
    abar = config.alphas_cumprod

    def network(x, t):
        alpha, sigma = float(np.sqrt(abar[t])), float(np.sqrt(1 - abar[t]))
        tanh = torch.tanh if isinstance(x, torch.Tensor) else np.tanh
        x0 = 1.3 * tanh(1.5 * x + 0.3 * np.sin(t / 50.0))
        eps = (x - alpha * x0) / sigma
        return alpha * eps - sigma * x0 if config.prediction_type == "v_prediction" else eps

    return network


@pytest.mark.parametrize("sampler, config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_diffusers_loads_it_and_samples_as_dtk(tmp_path, sampler, config):
    """from_pretrained on the bundle folder: the scheduler class of the default sampler, the same run."""
    import diffusers

    config = dataclasses.replace(config, sampler=sampler)
    path, gaps = write_scheduler_config(tmp_path, config)
    assert path == tmp_path / SCHEDULER_CONFIG_NAME and gaps == []
    data = json.loads(path.read_text())
    scheduler = getattr(diffusers, data["_class_name"]).from_pretrained(tmp_path)
    assert type(scheduler).__name__ == {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}.get(
        sampler, type(scheduler).__name__
    )
    back = DiffusionConfig.from_dict(data)  # and back: the same dtk config, or one that samples the same
    if config.clip_sample and sampler not in ("ddpm", "ddim"):  # clipping to ±1 as thresholding with max 1
        config = dataclasses.replace(config, clip_sample=False, thresholding=True, sample_max_value=1.0)
    if sampler == "unipc":  # UniPC reads midpoint as bh2, as diffusers does; it writes the name it reads
        config = dataclasses.replace(config, solver_type="bh2")
    assert back == config
    again = type(scheduler).from_config(scheduler.config)
    assert dict(again.config) == dict(scheduler.config)

    steps, network = 10, _network(config)
    x = NoiseSource(0).initial(2, SHAPE[1:])
    ours = sample_loop(network, x.copy(), make_plan(sampler, config, steps), None)
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(x) * scheduler.init_noise_sigma
    if sampler == "euler":  # its leading spacing starts from √(σ_max² + 1)
        sample = torch.from_numpy(x) * float(np.sqrt(1 + scheduler.sigmas[0].item() ** 2))
    for t in scheduler.timesteps.tolist():
        model_input = scheduler.scale_model_input(sample, t)
        out = torch.from_numpy(np.asarray(network(model_input.numpy(), int(round(t)))))
        sample = scheduler.step(out, t, sample).prev_sample
    np.testing.assert_allclose(ours, sample.numpy(), rtol=0, atol=5e-4)


def test_what_diffusers_cannot_do_is_said(tmp_path):
    _, gaps = write_scheduler_config(tmp_path, DiffusionConfig(clip_sample=True, sampler="euler-ancestral"))
    assert len(gaps) == 1 and "cannot clip x0" in gaps[0] and gaps[0].startswith(SCHEDULER_CONFIG_NAME)
    _, gaps = write_scheduler_config(tmp_path, DiffusionConfig(clip_sample=True, clip_sample_range=2.0))
    assert gaps == []  # the default sampler (ddim) clips in diffusers too


def test_every_bundle_carries_it(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert manifest.scheduler_config == SCHEDULER_CONFIG_NAME
    data = json.loads((tiny_bundle / SCHEDULER_CONFIG_NAME).read_text())
    assert data["_class_name"] == "DDIMScheduler"  # a dtk checkpoint names no sampler: dtk's default
    assert DiffusionConfig.from_dict(data) == dataclasses.replace(manifest.diffusion, sampler="ddim")


def test_a_diffusers_scheduler_class_sets_the_default_sampler(tmp_path, small_unet2d):
    from dtk.export.source import load_source

    small_unet2d().save_pretrained(tmp_path / "unet")
    scheduler = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "use_karras_sigmas": True}
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps(scheduler))
    diffusion = load_source(tmp_path / "unet").diffusion
    assert diffusion.sampler == "dpmpp-3m" and diffusion.use_karras_sigmas
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    assert load_source(tmp_path / "unet").diffusion.sampler == "ddim"
