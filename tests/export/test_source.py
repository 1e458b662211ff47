"""What `dtk export` reads: dtk checkpoints and diffusers UNet2DModel folders; errors for the rest."""

from __future__ import annotations

import json

import pytest
import torch

from dtk.export.source import load_source
from dtk.runtime.errors import DtkError


def test_checkpoint_source(tiny_checkpoint):
    source = load_source(tiny_checkpoint)
    assert source.sample_shape == (1, 16, 16)
    assert source.info["kind"] == "dtk-checkpoint" and source.info["weights"] == "ema"
    assert len(source.info["sha256"]) == 64
    assert source.model_info["parameters"] == sum(p.numel() for p in source.module.parameters())
    with torch.no_grad():
        out = source.module(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0]))
    assert out.shape == (2, 1, 16, 16)


def test_diffusers_pipeline_folder_maps_the_scheduler(tmp_path, small_unet2d):
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    DDPMPipeline(unet=small_unet2d(), scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    source = load_source(tmp_path / "pipe")
    d = source.diffusion
    assert (d.beta_schedule, d.prediction_type, d.clip_sample, d.timestep_spacing) == (
        "cosine",
        "v_prediction",
        False,
        "trailing",
    )
    assert source.info["kind"] == "diffusers" and source.info["scheduler"].endswith("scheduler_config.json")
    assert source.sample_shape == (1, 8, 8)
    assert source.model_info["architecture"] == "diffusers.UNet2DModel"
    # the wrapped module returns the tensor, not diffusers' output object
    with torch.no_grad():
        assert source.module(torch.randn(1, 1, 8, 8), torch.tensor([10.0])).shape == (1, 1, 8, 8)


def test_diffusers_unet_folder_without_scheduler_warns(tmp_path, small_unet2d):
    small_unet2d().save_pretrained(tmp_path / "unet")
    source = load_source(tmp_path / "unet")
    assert source.diffusion.beta_schedule == "linear" and source.diffusion.num_train_timesteps == 1000
    assert any("no scheduler_config.json" in w for w in source.warnings)
    # a scheduler_config.json beside the weights is picked up
    (tmp_path / "unet" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 500, "beta_end": 0.012})
    )
    source = load_source(tmp_path / "unet")
    assert (source.diffusion.num_train_timesteps, source.diffusion.beta_end) == (500, 0.012)
    assert source.warnings == []


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(DtkError, match="not a dtk checkpoint"):
        load_source(junk)


@pytest.mark.parametrize(
    "files, problem",
    [
        ({}, "no config.json"),
        ({"config.json": "{not json"}, "not valid JSON"),
        (
            {"config.json": {"_class_name": "UNet2DConditionModel"}},
            "UNet2DConditionModel; dtk exports diffusers",
        ),
        (
            {"config.json": {"_class_name": "UNet2DModel", "time_embedding_type": "fourier"}},
            "not a DDPM model",
        ),
        ({"config.json": {"_class_name": "UNet2DModel", "num_class_embeds": 10}}, "class-conditional"),
        ({"config.json": {"_class_name": "UNet2DModel"}}, "no weights"),
    ],
)
def test_bad_diffusers_folders(tmp_path, files, problem):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DtkError, match=problem):
        load_source(folder)


@pytest.mark.parametrize(
    "scheduler, problem",
    [
        ({"trained_betas": [0.1, 0.2]}, "trained_betas \\(a list of 2\\) is not supported"),
        ({"beta_schedule": "sigmoid"}, "unknown beta_schedule 'sigmoid'"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr \\(True\\) is not supported"),
        ({"_class_name": "PNDMScheduler"}, "scheduler class 'PNDMScheduler' has no dtk sampler"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "not supported"),
        ({"variance_type": "learned_range"}, "unknown variance_type 'learned_range'"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an integer"),
        ({"skip_prk_steps": True}, "unknown scheduler field 'skip_prk_steps'"),
    ],
)
def test_unsupported_scheduler_configs(tmp_path, small_unet2d, scheduler, problem):
    small_unet2d().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(DtkError, match=problem) as error:
        load_source(tmp_path / "unet")
    assert "scheduler_config.json" in str(error.value)


def test_exported_files_are_refused(tmp_path):
    onnx_file = tmp_path / "unet.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(DtkError, match="already exported"):
        load_source(onnx_file)
    with pytest.raises(DtkError, match="no such file"):
        load_source(tmp_path / "missing.pt")
