"""INT8 calibration inputs: real training images noised to timesteps spread over the whole schedule.

A diffusion U-Net's activations change with the timestep (Q-Diffusion, Li et al. 2023; PTQ4DM, Shang et al.
2023), so one timestep, or random tensors, give ranges that fit none of the chain. Each calibration image x₀
gets its own timestep, stratified over [0, T−1] (one per stratum of width T/N, seeded), and becomes
x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε through the training code's forward process (`dtk.diffusion.NoiseSchedule`, which
reads ᾱ from `dtk.runtime.schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtk.runtime.errors import DtkError

CALIBRATION_BATCH = 16  # images per calibration call; ranges do not depend on it


@dataclass
class CalibrationSet:
    """Noised calibration inputs, and where they came from (for the manifest)."""

    samples: np.ndarray  # float32 [N, C, H, W], x_t
    timesteps: np.ndarray  # float32 [N], t per image
    data: str  # dataset name or folder
    images: np.ndarray  # float32 [M, C, H, W] in [-1, 1]: every image of the dataset (the quality reference)
    seed: int

    def __len__(self) -> int:
        return len(self.timesteps)

    def batches(self, batch: int = CALIBRATION_BATCH):
        """{"sample", "timestep"} feeds of at most `batch` images."""
        for start in range(0, len(self), batch):
            yield {
                "sample": self.samples[start : start + batch],
                "timestep": self.timesteps[start : start + batch],
            }

    def to_dict(self) -> dict:
        t = self.timesteps
        return {
            "data": self.data,
            "size": len(self),
            "dataset_images": len(self.images),
            "timesteps": f"one per image, stratified over [{int(t.min())}, {int(t.max())}]",
            "noise": "closed-form forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps",
            "seed": self.seed,
        }


def load_images(data: str, image_size: int, channels: int) -> np.ndarray:
    """A built-in dataset or an image folder as float32 [N, C, S, S] in [-1, 1] (dtk.data's loading)."""
    from dtk.data import load_dataset

    images = load_dataset(data, image_size, channels).images.numpy()
    return images.astype(np.float32) / 127.5 - 1.0


def stratified_timesteps(count: int, num_train_timesteps: int, rng: np.random.Generator) -> np.ndarray:
    """`count` int64 timesteps, one drawn uniformly in each of `count` equal strata of [0, T−1], shuffled."""
    edges = np.linspace(0, num_train_timesteps, count + 1)
    t = np.floor(edges[:-1] + rng.random(count) * (edges[1:] - edges[:-1])).astype(np.int64)
    return rng.permutation(np.clip(t, 0, num_train_timesteps - 1))


def noised_inputs(images: np.ndarray, diffusion, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_t float32 [size, C, H, W], t float32 [size]) from `size` images drawn without replacement
    (with replacement only when the dataset is smaller)."""
    import torch

    from dtk.diffusion import NoiseSchedule

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size, replace=size > len(images))
    t = stratified_timesteps(size, diffusion.num_train_timesteps, rng)
    noise = rng.standard_normal((size, *images.shape[1:]), dtype=np.float32)
    x_t = NoiseSchedule(diffusion).q_sample(
        torch.from_numpy(images[chosen]), torch.from_numpy(t), torch.from_numpy(noise)
    )
    return x_t.numpy().astype(np.float32), t.astype(np.float32)


def calibration_set(source, data: str | None, size: int, seed: int = 0) -> CalibrationSet:
    """The calibration set for `source` (a dtk.export.source.ModelSource): `data`, or the dataset its
    checkpoint was trained on."""
    if size < 1:
        raise DtkError(f"calibration size must be at least 1, got {size}")
    data = data or source.info.get("dataset")
    if not data:
        raise DtkError(
            f"{source.info.get('path', 'the model')}: records no training dataset; "
            "give the calibration images with --calibration-data DIR|digits|shapes"
        )
    images = load_images(data, source.image_size[0], source.in_channels)
    if source.image_size[0] != source.image_size[1]:
        raise DtkError(f"calibration needs square images, the model takes {source.image_size}")
    if float(images.std()) == 0.0:
        raise DtkError(f"{data}: every calibration image is the same flat colour; calibrate on real images")
    samples, timesteps = noised_inputs(images, source.diffusion, size, seed)
    return CalibrationSet(samples, timesteps, data, images, seed)


def reader(calibration: CalibrationSet):
    """An onnxruntime.quantization CalibrationDataReader over the set."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = calibration.batches()

        def get_next(self):
            return next(self._feeds, None)

        def rewind(self):
            self._feeds = calibration.batches()

    return Reader()
