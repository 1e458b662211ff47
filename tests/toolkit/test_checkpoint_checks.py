"""A checkpoint's content is checked before use: weights of the wrong shape, type or dtype, and config values
of the wrong type or outside their domain are one-line errors naming the file."""

from __future__ import annotations

import pytest
import torch
from field_edits import set_field

from dtk.checkpoint import Checkpoint, load_checkpoint
from dtk.cli import main
from dtk.runtime.schedule import DiffusionConfig
from dtk.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _data() -> dict:
    torch.manual_seed(0)
    config = UNetConfig.preset("tiny", image_size=8, in_channels=1, out_channels=1, base_channels=8)
    state = {k: v.clone() for k, v in UNet(config).state_dict().items()}
    return Checkpoint(config, DiffusionConfig(), state, None, 10, None).to_dict()


def _save(tmp_path, data) -> str:
    path = tmp_path / "model.pt"
    torch.save(data, path)
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            set_field("diffusion", "num_train_timesteps", 1000.0),
            "num_train_timesteps must be an integer, got 1000.0",
        ),
        (set_field("diffusion", "beta_end", 1.5), r"beta_end must lie in \(0, 1\), got 1.5"),
        (set_field("diffusion", "beta_start", -0.1), r"beta_start must lie in \(0, 1\), got -0.1"),
        (set_field("diffusion", "steps_offset", -2), "steps_offset must be 0 or more, got -2"),
        (set_field("model_config", "base_channels", 8.5), "base_channels must be an integer, got 8.5"),
        (
            set_field("model_config", "channel_mults", "12"),
            "channel_mults must be a list of integers, got '12'",
        ),
        (set_field("step", 2.5), "step must be an integer, got 2.5"),
        (set_field("model_state", "conv_in.weight", [1.0, 2.0]), "weight conv_in.weight is not a tensor"),
    ],
)
def test_bad_content_on_load(tmp_path, capsys, change, message):
    data = _data()
    change(data)
    path = _save(tmp_path, data)
    with pytest.raises(Exception, match=message):
        load_checkpoint(path)
    assert main(["inspect", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (
            torch.zeros(3, 3),
            r"weight conv_in.weight has shape \[3, 3\], the U-Net config needs \[8, 1, 3, 3\]",
        ),
        (torch.zeros(8, 1, 3, 3, dtype=torch.int64), "weight conv_in.weight is torch.int64, the U-Net needs"),
    ],
)
def test_bad_weights_when_the_model_is_built(tmp_path, capsys, weight, message):
    data = _data()
    data["model_state"]["conv_in.weight"] = weight
    path = _save(tmp_path, data)
    with pytest.raises(Exception, match=message):
        load_checkpoint(path).build_model()
    out = tmp_path / "bundle"
    assert main(["export", path, "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: weight conv_in.weight ") and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_full_disk_on_save_is_one_line_and_leaves_nothing(tiny_disk):
    from dtk.checkpoint import save_checkpoint
    from dtk.runtime.errors import DtkError

    config = UNetConfig.preset("tiny", image_size=8, in_channels=1, out_channels=1, base_channels=8)
    state = UNet(config).state_dict()
    path = tiny_disk / "model.pt"
    with pytest.raises(DtkError) as error:
        save_checkpoint(path, Checkpoint(config, DiffusionConfig(), state, None, 1, None))
    assert str(error.value).startswith(f"{path}: cannot write (no space left on device: ")
    assert list(tiny_disk.iterdir()) == []
