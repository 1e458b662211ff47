"""examples/edge_app.py, run as a user would: a PNG grid, a timing report, and one clean line on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

APP = Path(__file__).resolve().parents[1] / "examples" / "edge_app.py"


def run_app(*args):
    return subprocess.run(
        [sys.executable, str(APP), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_edge_app_writes_a_grid_and_prints_timings(tiny_bundle, tmp_path):
    out = tmp_path / "samples.png"
    run = run_app(tiny_bundle, "--num", 4, "--steps", 5, "--sampler", "dpmpp-2m", "--out", out)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["backend", "load", "warm-up", "sample", "write"]
    assert lines[0] == "backend  onnxruntime"
    assert "4 images x 5 steps (dpmpp-2m)" in lines[3]
    assert "ms per batched step" in lines[3]  # 5 steps counted through the progress callback
    grid = np.asarray(Image.open(out))
    assert grid.dtype == np.uint8 and grid.ndim == 2  # one grayscale grid holding the 4 16x16 images
    assert grid.size >= 4 * 16 * 16 and grid.std() > 10


def test_edge_app_reports_a_bad_bundle_in_one_line(tmp_path):
    run = run_app(tmp_path / "missing", "--out", tmp_path / "x.png")
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "no such file or directory" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "x.png").exists()
