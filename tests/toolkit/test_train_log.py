"""What a training run leaves and says: log.csv and loss.png, --keep, progress without a terminal, the
attention warning, and a real SIGTERM that saves the run so it resumes exactly."""

from __future__ import annotations

import csv
import functools
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_training import TINY_TRAINING_FLAGS, tiny_train_config

from dtk.checkpoint import load_checkpoint
from dtk.cli import main
from dtk.runtime.errors import DtkError
from dtk.train import TrainConfig, train
from dtk.train_log import TrainingLog

pytestmark = pytest.mark.usefixtures("single_thread")

# batches of 4 at TrainConfig's lr (2e-3, pinned below), with progress lines: what these tests read back
_config = functools.partial(tiny_train_config, batch_size=4, lr=2e-3, progress=True)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_csv_and_loss_plot_follow_the_run_across_a_resume(tmp_path, capsys):
    out = tmp_path / "run"
    train(_config(out, steps=5, log_every=2, save_every=3))
    rows = _rows(out / "log.csv")
    assert list(rows[0]) == ["step", "loss", "ema_loss", "lr", "images_per_s", "wall_s"]
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]  # every 2 steps and at each save
    assert float(rows[0]["lr"]) == pytest.approx(2e-3)  # warmed up at step 2 (the lr of the step taken)
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    walls = [float(r["wall_s"]) for r in rows]
    assert walls == sorted(walls)
    with Image.open(out / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (700, 500)

    train(TrainConfig(out=str(out), steps=8, log_every=2, resume=True))
    resumed = _rows(out / "log.csv")
    assert [int(r["step"]) for r in resumed] == [2, 3, 4, 5, 6, 8]
    assert resumed[:4] == rows  # the earlier rows are kept as they were
    assert float(resumed[4]["wall_s"]) > walls[-1]  # wall time adds up over the resumed runs


def test_the_ema_loss_is_bias_corrected_and_continues_across_a_resume(tmp_path):
    """m_n = 0.98·m_(n−1) + 0.02·loss_n from m_0 = 0, logged as m_n / (1 − 0.98^n)."""
    losses = [1.0, 0.5, 0.25, 0.4, 0.3, 0.2]
    straight = TrainingLog(tmp_path / "straight", 0, 6, 1, 4, "off", print)
    for step, loss in enumerate(losses, start=1):
        straight.step(step, loss, 1e-3)
    ema = [row["ema_loss"] for row in straight.rows]
    # 1, (0.0196 + 0.01) / 0.0396, (0.029008 + 0.005) / 0.058808: averages of the losses so far (without the
    # correction, started at the first loss, they were 1, 0.99, 0.9752)
    assert ema[:3] == pytest.approx([1.0, 74 / 99, 0.034008 / 0.058808], rel=1e-12)
    # a run resumed at step 3 takes the average back from its log.csv and goes on as if never stopped
    (tmp_path / "split").mkdir()
    first = TrainingLog(tmp_path / "split", 0, 6, 1, 4, "off", print)
    for step, loss in enumerate(losses[:3], start=1):
        first.step(step, loss, 1e-3)
    first.write()
    resumed = TrainingLog(tmp_path / "split", 3, 6, 1, 4, "off", print)
    for step, loss in enumerate(losses[3:], start=4):
        resumed.step(step, loss, 1e-3)
    assert [row["ema_loss"] for row in resumed.rows] == pytest.approx(ema, rel=1e-5)  # log.csv keeps 6 digits


def test_threads_sets_torchs_cpu_threads_for_the_run(tmp_path, capsys):
    before = torch.get_num_threads()  # 1 here (single_thread)
    train(_config(tmp_path / "run", steps=1, progress=False, threads=2))
    assert "1 process(es) on cpu (2 threads), precision" in capsys.readouterr().out
    assert torch.get_num_threads() == before  # given back when the run ends
    train(_config(tmp_path / "default", steps=1, progress=False))
    assert f"on cpu ({before} thread{'s' if before > 1 else ''})" in capsys.readouterr().out
    with pytest.raises(DtkError, match="--threads must be at least 1, got 0"):
        train(_config(tmp_path / "bad", threads=0))
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--threads", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "Invalid value for '--threads'" in capsys.readouterr().err


def test_progress_without_a_terminal_is_plain_lines(tmp_path, capsys):
    train(_config(tmp_path / "a", steps=4, log_every=2))
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "loss " in lines[0] and "images/s" in lines[0] and "\r" not in out.out + out.err
    train(_config(tmp_path / "b", steps=4, log_every=1, save_every=2, progress=False))
    said = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in said if line.startswith("step ")] == ["step 2/4"]  # one per save
    assert said[-1].startswith(f"wrote {tmp_path / 'b' / 'model.pt'} at step 4")


def test_keep_keeps_the_last_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(_config(out, steps=5, save_every=1, keep=2, progress=False))
    assert sorted(p.name for p in out.glob("model*.pt")) == ["model-4.pt", "model-5.pt", "model.pt"]
    assert load_checkpoint(out / "model-4.pt").step == 4
    assert (out / "model-5.pt").read_bytes() == (out / "model.pt").read_bytes()


def test_an_attention_level_that_does_not_exist_is_warned_about(tmp_path, capsys):
    # tiny's attention at 4 px: at 32 px its levels are 32, 16 and 8
    config = dict(image_size=32, channel_mults=None, attention_resolutions=None, batch_size=2)
    train(_config(tmp_path / "run", steps=1, progress=False, **config))
    assert (
        "warning: attention resolutions 4 match no level of this U-Net at 32 px (levels 32,16,8): only the "
        "middle block has self-attention" in capsys.readouterr().out
    )
    train(_config(tmp_path / "ok", steps=1, progress=False))
    assert "warning" not in capsys.readouterr().out


CLI = [
    *TINY_TRAINING_FLAGS,
    "--batch-size", "4", "--sample-every", "0", "--save-every", "0", "--device", "cpu", "--log-every", "1",
]  # fmt: skip


def test_sigterm_saves_the_run_and_it_resumes_exactly(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dtk", "train", *CLI]
    child = subprocess.Popen(
        [*command, "--out", str(run), "--steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in child.stdout:
            if line.startswith("step 3/"):
                break
        child.send_signal(signal.SIGTERM)
        rest, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err == "interrupted\n"
    said = [line for line in rest.splitlines() if line.startswith("SIGTERM")]
    stopped = load_checkpoint(run / "model.pt").step
    assert 3 <= stopped < 100
    assert said == [
        f"SIGTERM: saved {run / 'model.pt'} at step {stopped} of 100000; "
        f"continue with: dtk train --out {run} --resume"
    ]
    # the saved run resumes exactly: the same weights as a run that was never stopped
    steps = str(stopped + 2)
    assert main(["train", "--out", str(run), "--resume", "--steps", steps]) == 0
    assert main(["train", *CLI, "--out", str(straight), "--steps", steps, "--no-progress"]) == 0
    a, b = load_checkpoint(run / "model.pt"), load_checkpoint(straight / "model.pt")
    assert a.step == b.step == stopped + 2
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert all(torch.equal(a.ema_state[k], b.ema_state[k]) for k in a.ema_state)
