"""Fixtures for the export tests: a small random diffusers UNet2DModel."""

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
