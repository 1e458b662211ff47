"""What the diffusers-style `Pipeline.__call__` takes and returns: generators as seeds, output types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtk.runtime.errors import DtkError

OUTPUT_TYPES = ("np", "uint8", "pil", "latent")
SEED_BOUND = 2**63


@dataclass
class PipelineOutput:
    """diffusers' `ImagePipelineOutput`: `.images` as `output_type` asked."""

    images: object


def seeds_for(generator, num_images: int) -> tuple[int, list[int] | None]:
    """(seed, per-image seeds or None) for `generator`: an int, an np.random.Generator (one draw:
    `int(generator.integers(2**63))`), a list of either with one entry per image, or None (fresh entropy)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images:
            raise DtkError(f"got {len(generator)} generators for {num_images} images: pass one per image")
        return 0, [_seed(g) for g in generator]
    if generator is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] % SEED_BOUND), None
    return _seed(generator), None


def _seed(generator) -> int:
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(SEED_BOUND))
    if isinstance(generator, bool) or not isinstance(generator, (int, np.integer)) or generator < 0:
        raise DtkError(
            f"generator must be a non-negative int seed or an np.random.Generator, got {generator!r}"
        )
    return int(generator)


def convert_images(latents: np.ndarray, output_type: str):
    """float32 [N, C, H, W] in [-1, 1] → what `output_type` names (see `Pipeline.__call__`)."""
    from dtk.runtime.images import to_uint8

    if output_type == "latent":
        return latents
    pixels = to_uint8(latents)  # checks the samples are finite
    if output_type == "uint8":
        return pixels
    if output_type == "np":
        return np.ascontiguousarray((latents.clip(-1.0, 1.0).transpose(0, 2, 3, 1) + 1.0) / 2.0, np.float32)
    from PIL import Image

    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
