"""Seeded host noise, one generator per image, so an image depends on its seed and index only.

Image k of a run draws from `np.random.Generator(np.random.PCG64([seed, k]))`: first its initial latent, then
one [C, H, W] standard normal per noisy step. Splitting a run into batches (`first_index`) or changing the
backend does not change which numbers an image gets."""

from __future__ import annotations

import numpy as np


class NoiseSource:
    def __init__(self, seed: int, first_index: int = 0):
        if int(seed) < 0 or int(first_index) < 0:
            raise ValueError(f"seed and first_index must be non-negative, got {seed}, {first_index}")
        self.seed = int(seed)
        self.first_index = int(first_index)
        self._generators: list[np.random.Generator] = []

    def initial(self, num: int, shape_chw) -> np.ndarray:
        """float32 [num, C, H, W]: the starting latents of images first_index .. first_index + num − 1."""
        if num < 1:
            raise ValueError(f"num must be at least 1, got {num}")
        if self._generators:
            raise RuntimeError("NoiseSource.initial() was already called; use a new NoiseSource per batch")
        self._generators = [
            np.random.Generator(np.random.PCG64([self.seed, self.first_index + k])) for k in range(num)
        ]
        return self._draw(shape_chw)

    def step(self, num: int, shape_chw) -> np.ndarray:
        """float32 [num, C, H, W]: the next step's noise for the same images."""
        if num != len(self._generators):
            raise RuntimeError(
                f"NoiseSource.step({num}) after initial({len(self._generators)}): same images only"
            )
        return self._draw(shape_chw)

    def _draw(self, shape_chw) -> np.ndarray:
        noise = np.empty((len(self._generators), *(int(s) for s in shape_chw)), dtype=np.float32)
        for generator, image in zip(self._generators, noise, strict=True):
            generator.standard_normal(dtype=np.float32, out=image)
        return noise
