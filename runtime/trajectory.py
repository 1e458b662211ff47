"""The reverse chain as a picture: x_T → x_0 for a few images at a few steps (`dtk sample --trajectory`).

Row r is image r; the first column is its initial noise x_T, the others x_t after evenly spaced steps of the
sampler, the last the finished sample. A `TrajectoryRecorder` is a step callback `(step_index, timestep, x)`
that keeps just those frames, chunk after chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtk.runtime.samplers import NoiseSource

ROWS = 4
COLUMNS = 8  # x_T and seven steps
MIN_CELL = 64  # pixels


class TrajectoryRecorder:
    def __init__(self, seed: int, num: int, steps: int, shape_chw, rows: int = ROWS, columns: int = COLUMNS):
        self.rows = min(rows, num)
        picks = np.linspace(0, steps - 1, min(columns - 1, steps)).round().astype(int)
        self.steps = sorted(set(picks.tolist()))  # step indices after which x_t is kept
        self.timesteps: dict[int, int] = {}
        # image k's x_T is what its generator draws first, whatever the backend
        self.initial = NoiseSource(seed).initial(self.rows, shape_chw)
        self.frames = np.zeros((self.rows, len(self.steps), *shape_chw), dtype=np.float32)
        self._first = 0  # index of the first image of the current chunk
        self._next = 0

    def __call__(self, step_index: int, timestep: int, x) -> None:
        if step_index == 0:  # a new chunk begins
            self._first, self._next = self._next, self._next + len(x)
        if step_index not in self.steps or self._first >= self.rows:
            return
        column = self.steps.index(step_index)
        self.timesteps[column] = int(timestep)
        take = min(len(x), self.rows - self._first)
        self.frames[self._first : self._first + take, column] = np.asarray(x[:take], dtype=np.float32)

    def picture(self) -> np.ndarray:
        """uint8 [rows · columns, H, W, C], row-major: one row of the grid per image."""
        from dtk.runtime.images import to_uint8

        chain = np.concatenate([self.initial[:, None], self.frames], axis=1)  # [rows, columns, C, H, W]
        pixels = to_uint8(chain.reshape(-1, *chain.shape[2:]))
        scale = max(1, MIN_CELL // pixels.shape[1])  # small images enlarged, pixel for pixel
        return pixels.repeat(scale, axis=1).repeat(scale, axis=2)

    def save(self, path) -> Path:
        from dtk.runtime.images import save_grid

        return save_grid(self.picture(), path, nrow=1 + len(self.steps))

    def caption(self) -> str:
        ts = ", ".join(str(self.timesteps.get(c, "?")) for c in range(len(self.steps)))
        return f"x_T, then x_t after t = {ts}"
