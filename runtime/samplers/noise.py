"""Seeded host noise, one generator per image, so an image depends on its seed and index only.

Image k of a run draws from `np.random.Generator(np.random.PCG64([seed, k]))`: first its initial latent, then
one [C, H, W] standard normal per noisy step. Splitting a run into batches (`first_index`) or changing the
backend does not change which numbers an image gets.

Step noise is drawn a block of steps at a time: one draw of [K, C, H, W] gives exactly the numbers of K draws
of [C, H, W], and a generator called between network evaluations runs with cold caches (about 20 µs a call
on small images, against 3 µs hot). Draws past the run's last step are simply never used."""

from __future__ import annotations

import math

import numpy as np

BLOCK_BYTES = 4 << 20  # step noise drawn ahead, over all images of the batch
MAX_BLOCK_STEPS = 32


class NoiseSource:
    def __init__(self, seed: int, first_index: int = 0):
        if int(seed) < 0 or int(first_index) < 0:
            raise ValueError(f"seed and first_index must be non-negative, got {seed}, {first_index}")
        self.seed = int(seed)
        self.first_index = int(first_index)
        self._keys: list[tuple[int, int]] | None = None  # (seed, index) per image, when given explicitly
        self._generators: list[np.random.Generator] = []
        self._block: np.ndarray | None = None  # [K, num, C, H, W] drawn ahead
        self._next = 0  # the block's first step not handed out

    @classmethod
    def per_image(cls, seeds) -> NoiseSource:
        """Image k draws from PCG64([seeds[k], 0]): the numbers `NoiseSource(seeds[k])` gives its image 0."""
        source = cls(0)
        source._keys = [(int(s), 0) for s in seeds]
        if any(s < 0 for s, _ in source._keys):
            raise ValueError(f"seeds must be non-negative, got {list(seeds)}")
        return source

    def initial(self, num: int, shape_chw, steps: int = 0) -> np.ndarray:
        """float32 [num, C, H, W]: the starting latents of images first_index .. first_index + num − 1.

        `steps`: the noisy steps the run will take. The first block of their noise is then drawn in the same
        call as the latents, one call per image, and held for `stepper`: the same numbers."""
        if num < 1:
            raise ValueError(f"num must be at least 1, got {num}")
        if self._generators:
            raise RuntimeError("NoiseSource.initial() was already called; use a new NoiseSource per batch")
        keys = self._keys or [(self.seed, self.first_index + k) for k in range(num)]
        if len(keys) != num:
            raise ValueError(f"NoiseSource.initial({num}) for {len(keys)} per-image seeds")
        self._generators = [np.random.Generator(np.random.PCG64(list(key))) for key in keys]
        shape = tuple(int(s) for s in shape_chw)
        ahead = min(steps, _steps_per_block(num, shape)) if steps > 0 else 0
        draws = self._draw((1 + ahead, *shape))  # per image: its latent, then its first steps' noise
        if ahead:
            self._block, self._next = np.ascontiguousarray(draws[:, 1:].swapaxes(0, 1)), 0
        return np.ascontiguousarray(draws[:, 0])

    def step(self, num: int, shape_chw) -> np.ndarray:
        """float32 [num, C, H, W]: the next step's noise for the same images (a view of the block drawn ahead,
        which nothing writes into again)."""
        return self.stepper(num, shape_chw)(None)

    def stepper(self, num: int, shape_chw, steps: int | None = None) -> StepNoise:
        """→ noise(i), which gives what `step(num, shape_chw)` gives, its arguments checked here once: the
        host loop calls it between network evaluations, where every check runs with cold caches.

        `steps`: how many draws the run will take, if known. The blocks then hold no draw past the last one
        (blocks of 32 steps drew 14 steps too many for a 50-step run, at about 14 ns a number here)."""
        if num != len(self._generators):
            raise RuntimeError(
                f"NoiseSource.step({num}) after initial({len(self._generators)}): same images only"
            )
        shape = tuple(int(s) for s in shape_chw)
        if self._block is not None and self._block.shape[2:] != shape:
            raise RuntimeError(f"NoiseSource.step: shape {shape} after {self._block.shape[2:]}")
        return StepNoise(self, shape, steps)

    def _steps(self, shape, count: int) -> np.ndarray:
        """The next `count` steps' noise, [count, num, C, H, W]: drawn per image [num, K, C, H, W], kept
        step-major so that each step is one contiguous view."""
        return np.ascontiguousarray(self._draw((count, *shape)).swapaxes(0, 1))

    def _draw(self, shape) -> np.ndarray:
        noise = np.empty((len(self._generators), *(int(s) for s in shape)), dtype=np.float32)
        for generator, image in zip(self._generators, noise, strict=True):
            generator.standard_normal(dtype=np.float32, out=image)
        return noise


def _steps_per_block(num: int, shape) -> int:
    """How many steps of float32 noise for `num` images of `shape` fit in BLOCK_BYTES (at least one)."""
    return max(1, BLOCK_BYTES // (4 * num * math.prod(shape)))


class StepNoise:
    """A run's step noise from one NoiseSource: `noise(i)` is the next draw [num, C, H, W] (i is not read);
    `take()` hands out at once every draw held and not yet given, or else the next block: [K, num, C, H, W],
    the same numbers. The host loop takes a block at a time and scales it by its steps' e in one operation."""

    def __init__(self, source: NoiseSource, shape: tuple, steps: int | None):
        self.source, self.shape = source, shape
        held = 0 if source._block is None else len(source._block) - source._next
        self.remaining = None if steps is None else max(0, steps - held)  # draws not yet drawn, or None
        self.fit = _steps_per_block(len(source._generators), shape)

    def __call__(self, i) -> np.ndarray:
        source = self.source
        if source._block is None or source._next == len(source._block):
            self._next_block()
        source._next += 1
        return source._block[source._next - 1]

    def take(self) -> np.ndarray:
        source = self.source
        if source._block is None or source._next == len(source._block):
            self._next_block()
        start = source._next
        source._next = len(source._block)
        return source._block[start:]

    def _next_block(self) -> None:
        count = min(self.fit, MAX_BLOCK_STEPS if self.remaining is None else max(1, self.remaining))
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - count)
        self.source._block, self.source._next = self.source._steps(self.shape, count), 0
