"""Fixtures for the export tests: a small random diffusers UNet2DModel, a class-conditional checkpoint and
its bundle."""

from __future__ import annotations

import pytest


@pytest.fixture
def small_unet2d():
    """Factory: a random diffusers UNet2DModel on 1x8x8 images (~30k parameters), with attention."""

    def make(**overrides):
        import torch
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        config = dict(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=8,
        )
        config.update(overrides)
        return UNet2DModel(**config).eval()

    return make


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    """A random class-conditional U-Net on 1×8×8 (3 classes + null), saved as a dtk checkpoint."""
    import torch

    from dtk.checkpoint import Checkpoint, save_checkpoint
    from dtk.runtime.schedule import DiffusionConfig
    from dtk.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.preset(
        "tiny",
        image_size=8,
        in_channels=1,
        out_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_class_embeds=4,
    )
    model = UNet(config)
    with torch.no_grad():  # give the zero-initialised layers weights, so labels change the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {"num_classes": 3, "names": ["circle", "square", "triangle"], "null_class": 3}
    ckpt = Checkpoint(config, DiffusionConfig(), state, state, 0, None, classes=classes)
    path = tmp_path_factory.mktemp("conditional") / "model.pt"
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def conditional_bundle(conditional_checkpoint, tmp_path_factory):
    from dtk.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("conditional-bundle") / "bundle"
    export_bundle(conditional_checkpoint, out, ExportOptions(batch=(1, 2, 8), chain_steps=5), progress=False)
    return out
