"""The DDPM U-Net: parameter counts pinned per preset, shapes, config checks, traceability."""

from __future__ import annotations

import math

import pytest
import torch

from dtk.runtime.errors import DtkError
from dtk.unet import UNet, UNetConfig, count_parameters, timestep_embedding

pytestmark = pytest.mark.usefixtures("single_thread")


def test_ddpm_cifar10_has_ho_et_al_parameter_count():
    config = UNetConfig.preset("ddpm-cifar10")
    assert (config.base_channels, config.channel_mults, config.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (config.attention_resolutions, config.dropout, config.image_size) == ((16,), 0.1, 32)
    assert count_parameters(UNet(config)) == 35_746_307  # 35.7M: Ho et al. 2020, and diffusers' UNet2DModel


@pytest.mark.parametrize(
    ("preset", "size", "channels", "expected"),
    [("tiny", 16, 1, 686_769), ("tiny", 32, 3, 637_043), ("small", 32, 3, 6_079_811)],
)
def test_preset_parameter_counts(preset, size, channels, expected):
    config = UNetConfig.preset(preset, image_size=size, in_channels=channels, out_channels=channels)
    assert count_parameters(UNet(config)) == expected


@pytest.mark.parametrize(
    ("size", "in_ch", "out_ch", "mults"),
    [(16, 1, 1, (1, 2, 4)), (8, 3, 3, (1, 2)), (24, 4, 2, (1, 2, 2)), (12, 2, 6, (1, 1))],
)
def test_any_channel_count_and_divisible_size(size, in_ch, out_ch, mults):
    config = UNetConfig.preset(
        "tiny", image_size=size, in_channels=in_ch, out_channels=out_ch, base_channels=8, channel_mults=mults
    )
    model = UNet(config)
    out = model(torch.randn(3, in_ch, size, size), torch.tensor([0, 500, 999]))
    assert out.shape == (3, out_ch, size, size)


def test_output_layers_start_at_zero():
    """DDPM zero-initialises the last layer of every residual branch and the output conv."""
    model = UNet(UNetConfig.preset("tiny", in_channels=1, out_channels=1))
    assert torch.count_nonzero(model(torch.randn(2, 1, 16, 16), torch.tensor([3, 7]))) == 0
    assert not model.conv_out.weight.any()
    assert not model.down[0].blocks[0].conv2.weight.any()


def _randomised(config: UNetConfig) -> UNet:
    torch.manual_seed(0)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def test_timestep_int_float_and_scalar_agree():
    model = _randomised(
        UNetConfig.preset("tiny", image_size=8, in_channels=1, out_channels=1, channel_mults=(1, 2))
    )
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        by_int = model(x, torch.tensor([250, 250]))
        by_float = model(x, torch.tensor([250.0, 250.0]))
        by_scalar = model(x, torch.tensor(250))
        other = model(x, torch.tensor([10, 10]))
    torch.testing.assert_close(by_int, by_float)
    torch.testing.assert_close(by_int, by_scalar)
    assert not torch.allclose(by_int, other)  # the timestep matters


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    # frequencies exp(-ln(10000) * i / 2) = 1, 0.01; layout [sin..., cos...]
    expected = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]]
    )
    torch.testing.assert_close(emb, expected)


def test_traced_model_handles_other_batch_sizes():
    config = UNetConfig.preset("tiny", image_size=8, in_channels=1, out_channels=1, channel_mults=(1, 2))
    model = _randomised(config)
    traced = torch.jit.trace(model, (torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])), check_trace=False)
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0.0, 10.0, 100.0, 500.0, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(traced(x, t), model(x, t))


def test_config_round_trips_through_dict():
    config = UNetConfig.preset("small", image_size=16, in_channels=1, out_channels=1)
    data = config.to_dict()
    assert data["channel_mults"] == [1, 2, 2, 2]
    assert UNetConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 18}, "image size 18 is not divisible by 4"),
        ({"base_channels": 12}, "12 channels cannot be split into 8 GroupNorm groups"),
        ({"num_heads": 3}, "cannot be split into 3 attention heads"),
        ({"channel_mults": ()}, "channel_mults must be positive"),
        ({"dropout": 1.5}, "dropout must be in [0, 1)"),
        ({"in_channels": 0}, "in_channels must be at least 1"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(DtkError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        UNetConfig.preset("tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(DtkError, match="unknown U-Net preset 'huge'"):
        UNetConfig.preset("huge")
    with pytest.raises(DtkError, match="unknown U-Net config field"):
        UNetConfig.from_dict({**UNetConfig.preset("tiny").to_dict(), "colour": 1})
