"""The PyTorch reference: TorchDenoiser on numpy arrays; sample_checkpoint on torch tensors, host noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    from dtk.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


def test_torch_denoiser_is_the_model_on_numpy(checkpoint):
    from dtk.reference import TorchDenoiser

    model = checkpoint.build_model()
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    t = np.array([0, 500, 999], dtype=np.int64)
    with TorchDenoiser(checkpoint.build_model(), device="cpu") as denoiser:
        out = denoiser(x, t)
        assert denoiser.name == "pytorch" and denoiser.batch_range[0] == 1
    with torch.inference_mode():
        expected = model(torch.from_numpy(x), torch.from_numpy(t).float()).numpy()
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.abs(out).mean() > 1e-3  # the fixture's weights carry signal
    assert denoiser.model is None  # closed on exit


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m"])
def test_torch_sampling_equals_the_numpy_loop(checkpoint, sampler):
    """sample_checkpoint runs the runtime's loop on tensors; on numpy with TorchDenoiser it gives the same."""
    from dtk.reference import TorchDenoiser, sample_checkpoint

    images = sample_checkpoint(
        checkpoint, num=2, steps=4, sampler=sampler, seed=3, device="cpu", progress=False
    )
    assert images.dtype == np.float32 and images.shape == (2, 1, 16, 16)
    plan = make_plan(sampler, checkpoint.diffusion, 4)
    source = NoiseSource(3)
    denoiser = TorchDenoiser(checkpoint.build_model())

    def denoise(x, t):
        return denoiser(x, np.full(len(x), t, dtype=np.float32))

    expected = sample_loop(
        denoise, source.initial(2, (1, 16, 16)), plan, lambda i: source.step(2, (1, 16, 16))
    )
    np.testing.assert_allclose(images, expected, rtol=1e-6, atol=1e-5)  # values up to ~60: float32 rounding


def test_same_seed_same_images_whatever_the_batch(checkpoint):
    from dtk.reference import sample_checkpoint

    settings = {"num": 3, "steps": 3, "sampler": "ddpm", "seed": 9, "device": "cpu", "progress": False}
    whole = sample_checkpoint(checkpoint, **settings)
    split = sample_checkpoint(checkpoint, batch_size=2, **settings)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    other = sample_checkpoint(checkpoint, **{**settings, "seed": 10})
    assert np.abs(other - whole).max() > 0.1
    assert np.abs(whole[0] - whole[1]).max() > 0.1


def test_sample_checkpoint_takes_a_path_and_shows_progress(tiny_checkpoint, capsys):
    from dtk.reference import sample_checkpoint

    images = sample_checkpoint(tiny_checkpoint, num=1, steps=2, sampler="ddim", seed=0, device="cpu")
    assert images.shape == (1, 1, 16, 16) and np.all(np.isfinite(images))
    assert "sampling (ddim)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 1001}, "steps must be between 1 and num_train_timesteps \\(1000\\), got 1001"),
        ({"sampler": "plms"}, "unknown sampler 'plms'"),
        ({"num": 0}, "num must be at least 1"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_requests_are_refused(checkpoint, kwargs, message):
    from dtk.reference import sample_checkpoint

    settings = {"num": 1, "steps": 2, "sampler": "ddim", "seed": 0, "device": "cpu", "progress": False}
    with pytest.raises(DtkError, match=message):
        sample_checkpoint(checkpoint, **{**settings, **kwargs})


def test_missing_checkpoint_is_refused(tmp_path):
    from dtk.reference import sample_checkpoint

    with pytest.raises(DtkError, match="missing.pt"):
        sample_checkpoint(tmp_path / "missing.pt", num=1, steps=2, sampler="ddim", seed=0)
