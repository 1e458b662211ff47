"""DDP under torchrun: two CPU processes (gloo) train together, stay in sync, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from tiny_training import TINY_TRAINING_FLAGS

from dtk.checkpoint import load_checkpoint


def test_two_process_gloo_training(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "dtk", "train", *TINY_TRAINING_FLAGS, "--batch-size", "4", "--steps", "3"]
    command += ["--save-every", "2", "--sample-every", "3", "--sample-num", "4", "--sample-steps", "2"]
    command += ["--device", "cpu", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    # the weights are compared across ranks at every save (step 2 and the end); a mismatch fails the run
    assert "2 ranks in sync" in run.stdout
    assert run.stdout.count("training tiny U-Net") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == ["log.csv", "loss.png", "model.pt", "samples_000003.png"]
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.step == 3 and ckpt.train_state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.model_state.values())
