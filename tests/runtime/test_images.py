"""Images: float → uint8 conversion, grids and single PNGs, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dtk.runtime.errors import DtkError
from dtk.runtime.images import make_grid, save_grid, save_images, to_uint8


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_to_uint8_pinned():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=np.float32).reshape(1, 1, 1, 7)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 1)
    assert out.ravel().tolist() == [0, 0, 64, 128, 191, 255, 255]


def test_to_uint8_moves_channels_last():
    x = np.zeros((2, 3, 4, 5), dtype=np.float32)
    x[:, 1] = 1.0
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3) and out[0, 0, 0].tolist() == [128, 255, 128]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_to_uint8_refuses_non_finite_samples(bad):
    x = np.zeros((1, 1, 2, 2), dtype=np.float32)
    x[0, 0, 1, 1] = bad
    with pytest.raises(DtkError, match="NaN or infinite"):
        to_uint8(x)


def test_to_uint8_refuses_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        to_uint8(np.zeros((3, 4, 4)))


def test_grid_layout():
    images = np.arange(1, 6, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((5, 2, 3, 1), dtype=np.uint8)
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1:3, 1:4, 0].tolist() == [[1] * 3] * 2 and grid[1:3, 5:8, 0].tolist() == [[2] * 3] * 2
    assert grid[7:9, 1:4, 0].tolist() == [[5] * 3] * 2 and not grid[7:9, 5:8].any()  # empty last cell
    assert not grid[0].any() and not grid[:, 4].any()  # padding is black
    assert make_grid(images).shape == (2 * 4 + 2, 3 * 5 + 2, 1)  # default: ⌈√5⌉ = 3 per row


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_grid_writes_a_png(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 6, 7, channels), dtype=np.uint8)
    path = save_grid(images, tmp_path / "out" / "grid.png")
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == mode and image.size == (2 * 9 + 2, 2 * 8 + 2)  # (W, H)
    pixels = _read(path).reshape(18, 20, channels)
    np.testing.assert_array_equal(pixels[2:8, 11:18], images[1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temporary files left


def test_save_images(tmp_path):
    images = np.stack([np.full((3, 3, 3), k * 40, dtype=np.uint8) for k in range(3)])
    paths = save_images(images, tmp_path / "images", prefix="digit")
    assert [p.name for p in paths] == ["digit_0000.png", "digit_0001.png", "digit_0002.png"]
    np.testing.assert_array_equal(_read(paths[2]), images[2])


def test_bad_paths_are_refused(tmp_path):
    images = np.zeros((1, 2, 2, 1), dtype=np.uint8)
    with pytest.raises(DtkError, match="grid.jpg: images are written as PNG"):
        save_grid(images, tmp_path / "grid.jpg")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DtkError, match="exists and is not a directory"):
        save_images(images, tmp_path / "file")
    with pytest.raises(DtkError, match="is not a directory"):
        save_grid(images, tmp_path / "file" / "grid.png")


def test_bad_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="uint8 images"):
        save_grid(np.zeros((1, 2, 2, 1), dtype=np.float32), tmp_path / "g.png")
    with pytest.raises(ValueError, match="uint8 images"):
        save_grid(np.zeros((1, 2, 2, 4), dtype=np.uint8), tmp_path / "g.png")
    with pytest.raises(ValueError, match="uint8 images"):
        save_images(np.zeros((0, 2, 2, 1), dtype=np.uint8), tmp_path)
