"""The denoiser protocol every backend implements: (sample, timestep) → model output, owning its resources."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Denoiser(Protocol):
    """One network evaluation on host arrays.

    `sample` is float32 [B, C, H, W]; `timestep` is [B] in the dtype the graph was exported with.
    `batch_range` is (min, max) batch the model accepts (equal for a fixed-batch export)."""

    name: str
    batch_range: tuple[int, int]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class TimestepArrays:
    """Integer t broadcast to a read-only [batch] array of one dtype, made once per (t, batch): the sampling
    loop asks for the same few every run, and building one per step costs several µs on cold caches."""

    LIMIT = 4096  # (t, batch) pairs kept; past that the cache starts again

    def __init__(self, dtype):
        self.dtype, self._arrays = np.dtype(dtype), {}

    def __call__(self, t: int, batch: int) -> np.ndarray:
        array = self._arrays.get((t, batch))
        if array is None:
            if len(self._arrays) >= self.LIMIT:
                self._arrays.clear()
            array = self._arrays[t, batch] = np.full(batch, t, dtype=self.dtype)
            array.flags.writeable = False
        return array

    def __iter__(self):
        """The (t, batch) pairs held."""
        return iter(self._arrays)


class DenoiserBase:
    """Context-manager plumbing shared by the backends."""

    name = "denoiser"
    batch_range = (1, 1)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
