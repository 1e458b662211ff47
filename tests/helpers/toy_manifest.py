"""A small hand-made dtk.json `Manifest`, for tests whose denoiser is a fake or a toy graph (no export)."""

from __future__ import annotations

from dtk.runtime.manifest import Manifest, TensorSpec
from dtk.runtime.schedule import DiffusionConfig


def toy_manifest(batch=(1, 2, 4), timestep_dtype="float32", chw=(1, 4, 4), clip_sample=False) -> Manifest:
    """An unconditional manifest for sample [B, *chw]; `batch` is (min, opt, max), a fixed batch when min =
    max (then the graph's batch dimension is that number, else "batch")."""
    config = DiffusionConfig(clip_sample=clip_sample)
    dim = batch[0] if batch[0] == batch[2] else "batch"
    return Manifest(
        image_size=chw[1:],
        in_channels=chw[0],
        out_channels=chw[0],
        inputs=[TensorSpec("sample", "float32", [dim, *chw]), TensorSpec("timestep", timestep_dtype, [dim])],
        outputs=[TensorSpec("model_output", "float32", [dim, *chw])],
        batch=dict(zip(("min", "opt", "max"), batch, strict=True)),
        diffusion=config,
        betas=config.betas,
    )
