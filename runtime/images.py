"""Samples as pictures: float [-1, 1] NCHW → uint8 NHWC, a PNG grid, or one PNG per image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import atomic_path

try:  # the clip ufunc itself, without np.clip's wrappers
    from numpy._core.umath import clip as _clip
except ImportError:  # numpy 1.x
    from numpy.core.umath import clip as _clip

_MODES = {1: "L", 3: "RGB"}


def to_uint8(x) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] → uint8 [N, H, W, C]; values outside the range are clipped.

    rint((clip(x) + 1) · 127.5), with each step a ufunc into one buffer: it runs once per sample, right
    after the last network call, where each numpy wrapper costs several µs."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {x.shape}")
    if not np.logical_and.reduce(np.isfinite(x), axis=None):
        raise DtkError("the sampled images contain NaN or infinite values (the model or sampler diverged)")
    scaled = _clip(x, -1.0, 1.0)
    np.add(scaled, 1.0, scaled)
    np.multiply(scaled, 127.5, scaled)
    np.rint(scaled, scaled)
    return np.ascontiguousarray(scaled.astype(np.uint8).transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] → one uint8 image, `nrow` images per row with `padding` black pixels around each."""
    images = _check_images(images)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(images: np.ndarray, path, nrow: int | None = None) -> Path:
    """Write `images` (uint8 [N, H, W, C], C = 1 or 3) as one PNG grid at `path`."""
    return _save_png(make_grid(images, nrow), Path(path))


def save_images(images: np.ndarray, directory, prefix: str = "sample") -> list[Path]:
    """Write each image as `<directory>/<prefix>_0000.png`, ... and return the paths."""
    images = _check_images(images)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise file_error(directory, "exists and is not a directory")
    width = max(4, len(str(len(images) - 1)))
    paths = [directory / f"{prefix}_{k:0{width}d}.png" for k in range(len(images))]
    return [_save_png(image, path, clean=False) for image, path in zip(images, paths, strict=True)]


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in _MODES or len(images) == 0:
        raise ValueError(f"expected uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
    return images


def _save_png(image: np.ndarray, path: Path, clean: bool = True) -> Path:
    from PIL import Image

    if path.suffix.lower() != ".png":
        raise file_error(path, "images are written as PNG: use a .png name")
    if path.parent.exists() and not path.parent.is_dir():
        raise file_error(path.parent, "is not a directory")
    picture = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
    with atomic_path(path, clean=clean) as tmp:
        picture.save(tmp, format="PNG")
    return path
