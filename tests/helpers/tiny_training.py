"""The settings of the tests' short training runs: 8×8 digits on a 45k-parameter `tiny` U-Net, on the CPU."""

from __future__ import annotations

# a step takes milliseconds; no sample grids or intermediate checkpoints unless a test asks for them
TINY_TRAINING = dict(
    dataset="digits",
    preset="tiny",
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    attention_resolutions=(4,),
    batch_size=8,
    lr=1e-3,
    warmup_steps=2,
    sample_every=0,
    save_every=0,
    device="cpu",
    progress=False,
)

# the same data and model as `dtk train` flags (tiny's attention is at 4 px already)
TINY_TRAINING_FLAGS = [
    "--dataset", "digits", "--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2",
]  # fmt: skip


def tiny_train_config(out, **overrides):
    """A TrainConfig writing to `out` with TINY_TRAINING's settings; `overrides` set any field."""
    from dtk.train_config import TrainConfig

    return TrainConfig(out=str(out), **{**TINY_TRAINING, **overrides})
