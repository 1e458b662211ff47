"""The PyTorch reference: a checkpoint's U-Net as a Denoiser on numpy arrays, and sampling on torch tensors.

The runtime's samplers and noise run unchanged here (the update uses array operators only), so a checkpoint
sampled with PyTorch and its exported bundle sampled with ONNX Runtime or TensorRT get the same noise per
image and differ only by the backends' arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dtk.runtime.backends.base import DenoiserBase
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop


class TorchDenoiser(DenoiserBase):
    """A U-Net behind the Denoiser protocol: float32 numpy [B, C, H, W] and timesteps [B] in, numpy out."""

    name = "pytorch"
    batch_range = (1, 2**31 - 1)

    def __init__(self, model: torch.nn.Module, device="cpu", dtype: torch.dtype = torch.float32):
        from dtk.distributed import select_device

        self.device = select_device(str(device))
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()

    @torch.inference_mode()
    def forward(self, sample: torch.Tensor, t: int | float) -> torch.Tensor:
        """The network on a tensor batch at one timestep t (as float32 [B], like the exported graph)."""
        timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=self.device)
        return self.model(sample.to(self.dtype), timestep).to(sample.dtype)

    @torch.inference_mode()
    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(self.device, self.dtype)
        t = torch.as_tensor(np.asarray(timestep, dtype=np.float32), device=self.device)
        return self.model(x, t).float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def sample_checkpoint(
    ckpt,
    num: int,
    steps: int,
    sampler: str,
    seed: int,
    eta: float = 0.0,
    device="auto",
    batch_size: int | None = None,
    progress: bool = True,
    weights: str = "ema",
    step_callback=None,
) -> np.ndarray:
    """Sample `num` images from a checkpoint (a `Checkpoint` or a path) → float32 [num, C, H, W] in ~[-1, 1].

    Images are run in batches of `batch_size` (default: all at once); image k always gets the noise of
    `NoiseSource(seed, first_index=k)`, so the batching does not change it. `step_callback(step_index,
    timestep, x)` sees each batch's current sample (float32 numpy) after every step."""
    from dtk.checkpoint import load_checkpoint
    from dtk.runtime.errors import DtkError

    if isinstance(ckpt, (str, Path)):
        ckpt = load_checkpoint(ckpt)
    if num < 1:
        raise DtkError(f"num must be at least 1, got {num}")
    if batch_size is not None and batch_size < 1:
        raise DtkError(f"batch size must be at least 1, got {batch_size}")
    plan = make_plan(sampler, ckpt.diffusion, steps, eta=eta)
    config = ckpt.model_config
    shape = (config.in_channels, config.image_size, config.image_size)
    denoiser = TorchDenoiser(ckpt.build_model(weights), device=device)
    size = batch_size or num
    starts = range(0, num, size)
    bar = _progress_bar(len(starts) * plan.steps, sampler, progress)
    images = []
    try:
        for first in starts:
            count = min(size, num - first)
            source = NoiseSource(seed, first_index=first)
            x = torch.from_numpy(source.initial(count, shape)).to(denoiser.device)

            def noise(i, source=source, count=count):
                return torch.from_numpy(source.step(count, shape)).to(denoiser.device)

            def on_step(i, t, x):
                bar.update(1)
                if step_callback is not None:
                    step_callback(i, t, x.float().cpu().numpy())

            with torch.inference_mode():
                x = sample_loop(denoiser.forward, x, plan, noise, on_step)
            images.append(x.float().cpu().numpy())
    finally:
        bar.close()
    return np.concatenate(images)


def _progress_bar(total: int, sampler: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"sampling ({sampler})", unit="step", leave=False, disable=not enabled)
