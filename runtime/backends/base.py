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
