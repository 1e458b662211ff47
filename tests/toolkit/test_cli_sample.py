"""`dtk sample` on a checkpoint and on a bundle: files written, same seed same grid, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dtk.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_sample_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    grid, images_dir = tmp_path / "grid.png", tmp_path / "images"
    argv = ["sample", str(tiny_checkpoint), "--num", "3", "--steps", "3", "--sampler", "ddpm", "--seed", "4"]
    argv += ["--out", str(grid), "--images-dir", str(images_dir), "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"wrote {grid}: 3 images, 3 ddpm steps on pytorch in " in captured.out
    assert f"wrote 3 images to {images_dir}" in captured.out
    assert "sampling (ddpm)" in captured.err  # the progress bar
    with Image.open(grid) as image:
        assert image.mode == "L" and image.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 per row, 16 px + 2 px gaps
    singles = sorted(images_dir.iterdir())
    assert [p.name for p in singles] == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]

    from dtk.reference import sample_checkpoint
    from dtk.runtime.images import to_uint8

    expected = to_uint8(
        sample_checkpoint(tiny_checkpoint, 3, 3, "ddpm", seed=4, device="cpu", progress=False)
    )
    for k, path in enumerate(singles):
        np.testing.assert_array_equal(_pixels(path), expected[k, ..., 0])
    np.testing.assert_array_equal(_pixels(grid)[2:18, 20:36], expected[1, ..., 0])


def test_same_seed_same_grid_whatever_the_batch(tiny_checkpoint, tmp_path):
    base = ["sample", str(tiny_checkpoint), "--num", "3", "--steps", "2", "--no-progress", "--nrow", "3"]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "b.png"), "--batch-size", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "c.png"), "--seed", "1"]) == 0
    a, b, c = (_pixels(tmp_path / f"{name}.png").astype(int) for name in "abc")
    assert a.shape == (20, 56)
    assert np.abs(a - b).max() <= 1  # batch split: same noise per image, float rounding only
    assert np.abs(a - c).max() > 20


def test_sample_a_bundle(request, tmp_path, capsys):
    pytest.importorskip("dtk.export.bundle")
    bundle = request.getfixturevalue("tiny_bundle")
    grid = tmp_path / "grid.png"
    argv = ["sample", str(bundle), "--num", "2", "--steps", "2", "--sampler", "dpmpp-2m", "--out", str(grid)]
    assert main([*argv, "--backend", "onnxruntime", "--device", "cpu", "--no-progress"]) == 0
    assert "2 images, 2 dpmpp-2m steps on onnxruntime" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.size == (2 * 18 + 2, 18 + 2)
    onnx_grid = tmp_path / "onnx.png"
    assert main(["sample", str(bundle / "unet.onnx"), *argv[2:-1], str(onnx_grid), "--no-progress"]) == 0
    np.testing.assert_array_equal(_pixels(onnx_grid), _pixels(grid))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "1001"], "error: steps must be between 1 and num_train_timesteps (1000), got 1001"),
        (["--sampler", "ddpm", "--eta", "0.5"], "error: eta applies to the ddim sampler only"),
        (["--backend", "onnxruntime"], "error: --backend onnxruntime is for bundles, .onnx and .plan"),
        (["--out", "grid.jpg"], "error: grid.jpg: the grid is written as PNG: use a .png name"),
        (["--device", "tpu"], "error: unknown device 'tpu'"),
    ],
)
def test_checkpoint_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, extra, message):
    argv = ["sample", str(tiny_checkpoint), "--steps", "2", "--num", "1", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--no-progress", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.pt", None, "missing.pt: no such file or directory"),
        ("notes.pt", b"not a checkpoint", "notes.pt: not a dtk checkpoint"),
        ("model.onnx", b"not onnx", "dtk.json: no dtk manifest here"),
    ],
)
def test_bad_paths_are_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert main(["sample", str(path), "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_bad_choices_are_usage_errors(tiny_checkpoint, capsys):
    assert main(["sample", str(tiny_checkpoint), "--sampler", "euler-a"]) == 2
    assert (
        "Invalid value for '--sampler': 'euler-a' is not one of 'ddpm', 'ddim', 'dpmpp-2m', 'dpmpp-2m-sde'"
        in capsys.readouterr().err
    )
    assert main(["sample", str(tiny_checkpoint), "--eta", "2"]) == 2
    assert main(["sample", str(tiny_checkpoint), "--seed", "-1"]) == 2


def test_the_console_command_prints_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dtk", "sample", str(tmp_path / "nothing.pt")], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr == f"error: {tmp_path / 'nothing.pt'}: no such file or directory\n"
