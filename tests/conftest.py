"""Fixtures shared across the suite: a tiny random checkpoint and the bundle exported from it."""

from __future__ import annotations

import signal

import pytest

# A suite started in the background (`make test &`, some CI runners) inherits SIGINT as ignored, and so would
# every dtk process a test starts: Ctrl-C tests would then hang. Python's own handler makes exec reset it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """torch and ONNX Runtime share this process on 2 cores: keep their thread pools from spinning."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A `tiny` U-Net on 1×16×16 images with random (non-zero) weights, saved as a dtk checkpoint."""
    import torch

    from dtk.checkpoint import Checkpoint, save_checkpoint
    from dtk.runtime.schedule import DiffusionConfig
    from dtk.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.preset("tiny", image_size=16, in_channels=1, out_channels=1)
    model = UNet(config)
    with torch.no_grad():  # DDPM zero-initialises output layers; give them weights so outputs carry signal
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(
        model_config=config,
        diffusion=DiffusionConfig(),
        model_state=state,
        ema_state=state,
        step=0,
        train_state=None,
    )
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """`tiny_checkpoint` exported to a verified fp32 bundle with batch range 1..4."""
    from dtk.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(tiny_checkpoint, out, ExportOptions(batch=(1, 2, 4)))
    return out
