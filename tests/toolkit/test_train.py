"""`dtk train`: a short run writes model.pt and grids; resuming equals not stopping; seeds; errors; CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from tiny_training import TINY_TRAINING_FLAGS, tiny_train_config

from dtk.checkpoint import load_checkpoint
from dtk.cli import main
from dtk.distributed import select_device
from dtk.runtime.errors import DtkError
from dtk.train import TrainConfig, autocast_dtype, learning_rate, train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_short_run_writes_checkpoint_and_sample_grids(tmp_path):
    config = tiny_train_config(
        tmp_path / "run", steps=4, sample_every=2, sample_num=4, sample_steps=3, save_every=3
    )
    path = train(config)
    assert path == tmp_path / "run" / "model.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "log.csv",
        "loss.png",
        "model.pt",
        "samples_000002.png",
        "samples_000004.png",
    ]
    with Image.open(path.parent / "samples_000004.png") as grid:
        assert grid.mode == "L"  # digits are grayscale
    ckpt = load_checkpoint(path)
    assert ckpt.step == 4 and ckpt.model_config.in_channels == 1 and ckpt.model_config.image_size == 8
    assert ckpt.diffusion.clip_sample is True
    assert ckpt.train_state["ema_updates"] == 4 and ckpt.train_state["world_size"] == 1
    assert ckpt.train_state["config"]["channel_mults"] == [1, 2]
    changed = [k for k, v in ckpt.model_state.items() if not torch.equal(v, ckpt.ema_state[k])]
    assert changed  # the EMA lags the raw weights


def _tensors(state):
    """Every tensor in a nested state (optimizer states included), in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # dropout and grad accumulation on, so every source of randomness takes part
    extra = dict(dropout=0.1, grad_accum=2, hflip=True)
    straight = load_checkpoint(train(tiny_train_config(tmp_path / "straight", steps=4, **extra)))
    train(tiny_train_config(tmp_path / "split", steps=2, **extra))
    resumed = load_checkpoint(train(tiny_train_config(tmp_path / "split", steps=4, resume=True, **extra)))
    assert resumed.step == straight.step == 4
    for name, tensor in straight.model_state.items():
        assert torch.equal(resumed.model_state[name], tensor), name
        assert torch.equal(resumed.ema_state[name], straight.ema_state[name]), name
    a, b = _tensors(straight.train_state["optimizer"]), _tensors(resumed.train_state["optimizer"])
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_seed_decides_the_result(tmp_path):
    first = load_checkpoint(train(tiny_train_config(tmp_path / "a", steps=2, seed=5)))
    again = load_checkpoint(train(tiny_train_config(tmp_path / "b", steps=2, seed=5)))
    other = load_checkpoint(train(tiny_train_config(tmp_path / "c", steps=2, seed=6)))
    weight = "conv_in.weight"
    assert torch.equal(first.model_state[weight], again.model_state[weight])
    assert not torch.equal(first.model_state[weight], other.model_state[weight])


@pytest.mark.parametrize(
    "overrides", [dict(prediction_type="v_prediction", min_snr_gamma=5.0, beta_schedule="cosine")]
)
def test_other_objectives_train(tmp_path, overrides):
    ckpt = load_checkpoint(train(tiny_train_config(tmp_path / "run", steps=2, **overrides)))
    assert ckpt.diffusion.prediction_type == "v_prediction" and ckpt.diffusion.beta_schedule == "cosine"
    assert all(torch.isfinite(v).all() for v in ckpt.model_state.values())


def test_learning_rate_warms_up_linearly():
    config = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [learning_rate(config, s) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert learning_rate(dataclasses.replace(config, warmup_steps=0), 0) == 1e-3


def test_precision_choice_on_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    with pytest.raises(DtkError, match="precision fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)


def test_resume_refuses_a_different_model_or_a_finished_run(tmp_path):
    train(tiny_train_config(tmp_path / "run", steps=2))
    with pytest.raises(
        DtkError, match=r"cannot resume with different settings: --base-channels 16 \(the run has 8\)"
    ):
        train(tiny_train_config(tmp_path / "run", steps=4, resume=True, base_channels=16))
    with pytest.raises(DtkError, match="already trained for 2 steps; pass --steps above 2"):
        train(tiny_train_config(tmp_path / "run", steps=2, resume=True))
    with pytest.raises(DtkError, match="no such checkpoint file"):
        train(tiny_train_config(tmp_path / "empty", steps=2, resume=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(preset="huge"), "unknown preset 'huge'"),
        (dict(precision="fp8"), "unknown precision 'fp8'"),
        (dict(image_size=10), "image size 10 is not divisible by 4"),
        (dict(device="cuda:0"), "CUDA is not available"),
    ],
)
def test_bad_settings(tmp_path, overrides, message):
    if "device" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    overrides = {"channel_mults": (1, 2, 2), **overrides} if "image_size" in overrides else overrides
    with pytest.raises(DtkError, match=message):
        train(tiny_train_config(tmp_path / "run", **overrides))


def test_device_selection():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected or torch.backends.mps.is_available()
    assert select_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "xla", "cuda:x"):
        with pytest.raises(DtkError, match=f"unknown device '{bad}'"):
            select_device(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    settings = dict(device="cuda", precision=precision, sample_every=4, sample_num=4, sample_steps=3)
    train(tiny_train_config(tmp_path / "run", steps=2, **settings))
    ckpt = load_checkpoint(train(tiny_train_config(tmp_path / "run", steps=4, resume=True, **settings)))
    assert ckpt.step == 4 and (tmp_path / "run" / "samples_000004.png").exists()
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ckpt.model_state.values())
    assert (ckpt.train_state["grad_scaler"] is not None) == (precision == "fp16")


def test_help_documents_every_config_field(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name


def test_cli_trains_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", *TINY_TRAINING_FLAGS]
    args += ["--attention-resolutions", "", "--batch-size", "4", "--steps", "1", "--sample-every", "0"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.model_config.channel_mults == (1, 2) and ckpt.model_config.attention_resolutions == ()
    capsys.readouterr()
    assert main(["train", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere: no such dataset folder" in err and "Traceback" not in err
    assert main(["train", "--channel-mults", "1,x"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
