"""`dtk sample --npy` writes the raw float samples; `--trajectory` draws the reverse chain x_T → x_0."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dtk.cli import main
from dtk.runtime.images import to_uint8
from dtk.runtime.samplers import NoiseSource

pytestmark = pytest.mark.usefixtures("single_thread")

CELL, PAD = 64, 2  # 16 px images enlarged four times, the grid's padding


def _cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    top, left = PAD + row * (CELL + PAD), PAD + column * (CELL + PAD)
    return grid[top : top + CELL, left : left + CELL]


@pytest.mark.parametrize("source", ["tiny_checkpoint", "tiny_bundle"])
def test_npy_and_trajectory(request, tmp_path, capsys, source):
    path = request.getfixturevalue(source)
    npy, chain, grid = tmp_path / "s.npy", tmp_path / "chain.png", tmp_path / "grid.png"
    argv = ["sample", str(path), "--num", "5", "--steps", "10", "--sampler", "ddpm", "--seed", "3"]
    argv += ["--batch-size", "2", "--out", str(grid), "--npy", str(npy), "--trajectory", str(chain)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {npy}: float32 [5, 1, 16, 16]" in out
    assert f"wrote {chain}: x_T, then x_t after t = " in out
    latents = np.load(npy)
    assert latents.dtype == np.float32 and latents.shape == (5, 1, 16, 16)
    with Image.open(chain) as picture:
        pixels = np.asarray(picture)
    assert pixels.shape == (4 * (CELL + PAD) + PAD, 8 * (CELL + PAD) + PAD)  # 4 images, x_T and 7 steps
    for row in range(4):  # the last column is the sample itself, the first its initial noise
        image = to_uint8(latents[row : row + 1])[0, ..., 0]
        np.testing.assert_array_equal(_cell(pixels, row, 7), image.repeat(4, 0).repeat(4, 1))
        noise = to_uint8(NoiseSource(3, first_index=row).initial(1, (1, 16, 16)))[0, ..., 0]
        np.testing.assert_array_equal(_cell(pixels, row, 0), noise.repeat(4, 0).repeat(4, 1))
    # the steps in between move from noise towards the sample
    distance = [np.abs(_cell(pixels, 0, c).astype(int) - _cell(pixels, 0, 7)).mean() for c in range(8)]
    assert distance[0] > distance[4] > distance[7] == 0


def test_output_names_are_checked_before_sampling(tiny_checkpoint, tmp_path, capsys):
    for flag, name, message in (
        ("--npy", "s.png", "the samples are written as NumPy .npy: use a .npy name"),
        ("--trajectory", "chain.jpg", "the trajectory is written as PNG: use a .png name"),
    ):
        argv = ["sample", str(tiny_checkpoint), "--out", str(tmp_path / "g.png"), flag, str(tmp_path / name)]
        assert main(argv) == 1
        assert capsys.readouterr().err == f"error: {tmp_path / name}: {message}\n"
        assert not any(tmp_path.iterdir())
