"""`dtk train` refuses, before training, what would lose a run or fail later: an existing run without
--resume, an --out that is a file or cannot be written, non-finite or out-of-range flags, sample steps beyond
the schedule, and a damaged training state on --resume."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from dtk.checkpoint import load_checkpoint, save_checkpoint
from dtk.cli import main
from dtk.runtime.errors import DtkError
from dtk.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

# 8x8 digits, a U-Net of ~40k parameters: a step takes milliseconds
TINY = [
    "--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "4",
    "--batch-size", "4", "--sample-every", "0", "--save-every", "0", "--device", "cpu", "--no-progress",
]  # fmt: skip


def _train(out: Path, *flags: str) -> int:
    return main(["train", "--out", str(out), *TINY, *flags])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_an_existing_run_is_refused_without_resume_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "3") == 0
    before = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert _train(out, "--steps", "1") == 1
    err = _one_error_line(capsys)
    assert "the run exists" in err and "--resume" in err and "--overwrite" in err
    assert (out / "model.pt").read_bytes() == before
    assert load_checkpoint(out / "model.pt").step == 3
    assert _train(out, "--steps", "1", "--overwrite") == 0  # on purpose: start over
    assert load_checkpoint(out / "model.pt").step == 1
    assert _train(out, "--steps", "2", "--overwrite", "--resume") == 1
    assert "pass one" in _one_error_line(capsys)


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    assert _train(out, "--dataset", str(tmp_path / "nowhere"), "--steps", "1") == 1
    assert "no such dataset folder" in _one_error_line(capsys)
    assert not out.exists()


def test_out_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert _train(out, "--steps", "1") == 1
    assert "notes.txt: is a file, not a run folder" in _one_error_line(capsys)
    assert out.read_text() == "mine"


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create or write in, also as root (sysfs refuses mkdir)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked / "run"
    candidate = Path("/sys") / f"dtk-test-{uuid.uuid4().hex}"
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    pytest.skip("no folder here refuses writes to root")


def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    out = _unwritable(tmp_path)
    assert _train(out, "--steps", "100000") == 1  # would take minutes if it trained first
    err = _one_error_line(capsys)
    assert f"{out}: cannot write the run folder here" in err
    assert "training" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "nan"], "nan is not a finite number"),
        (["--lr", "inf"], "inf is not a finite number"),
        (["--lr", "0"], "0.0 is not in the range x>0"),
        (["--dropout", "1.5"], "1.5 is not in the range 0.0<=x<1.0"),
        (["--ema-decay", "nan"], "nan is not a finite number"),
        (["--weight-decay", "-inf"], "-inf is not in the range x>=0"),
        (["--min-snr-gamma", "inf"], "inf is not a finite number"),
        (["--grad-clip", "nan"], "nan is not a finite number"),
        (["--steps", "0"], "0 is not in the range x>=1"),
        (["--seed", "-1"], "-1 is not in the range x>=0"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys, flags, message):
    assert _train(tmp_path / "run", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", float("nan"), "--lr must be a finite number, got nan"),
        ("lr", -1.0, "--lr must be above 0, got -1.0"),
        ("ema_decay", 1.0, r"--ema-decay must be in \[0, 1\), got 1.0"),
        ("steps", 2.5, "--steps must be an integer, got 2.5"),
        ("grad_clip", float("inf"), "--grad-clip must be a finite number, got inf"),
    ],
)
def test_the_python_api_checks_the_same(tmp_path, field, value, message):
    with pytest.raises(DtkError, match=message):
        train(TrainConfig(out=str(tmp_path / "run"), **{field: value}))
    assert not (tmp_path / "run").exists()


def test_sample_steps_beyond_the_schedule_are_refused_up_front(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--num-train-timesteps", "20", "--sample-steps", "50", "--sample-every", "2", "--steps", "1000"]
    assert _train(out, *argv) == 1
    err = _one_error_line(capsys)
    assert "--sample-steps 50 with --sampler ddim" in err and "num_train_timesteps (20)" in err
    assert "training" not in capsys.readouterr().out and not (out / "model.pt").exists()
    # without grids the sample steps do not matter
    assert _train(out, "--num-train-timesteps", "20", "--sample-steps", "50", "--steps", "1") == 0


def _damage(path: Path, change) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


def _optimizer_entry(data):
    return next(iter(data["train_state"]["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(train_state=[1, 2]), "damaged training state: expected a dict, found list"),
        (
            lambda d: d["train_state"].update(optimizer="adam"),
            "the optimizer state is not an AdamW state dict",
        ),
        (lambda d: d["train_state"].update(ema_updates="4"), "ema_updates is '4', not a count"),
        (lambda d: d["train_state"].pop("config"), "damaged training state: the run's settings are missing"),
        (
            lambda d: _optimizer_entry(d).update(exp_avg=torch.zeros(3)),
            "the optimizer's exp_avg of parameter 0 does not fit it",
        ),
        (
            lambda d: _optimizer_entry(d)["exp_avg_sq"].fill_(float("nan")),
            "the optimizer's exp_avg_sq of parameter 0 holds NaN",
        ),
        (
            lambda d: d["ema_state"].update({"conv_in.weight": torch.zeros(2, 2)}),
            "EMA weights conv_in.weight is (2, 2), the model needs (8, 1, 3, 3)",
        ),
        (lambda d: d["train_state"]["config"].update(lr="fast"), "the run's settings are invalid"),
    ],
)
def test_a_damaged_train_state_is_refused_in_one_line(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    _damage(out / "model.pt", change)
    before = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--steps", "4", "--resume", "--no-progress"]) == 1
    err = _one_error_line(capsys)
    assert f"{out / 'model.pt'}: " in err and message in err
    assert (out / "model.pt").read_bytes() == before


def test_a_checkpoint_without_training_state_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    ckpt = load_checkpoint(out / "model.pt")
    ckpt.train_state = None
    save_checkpoint(out / "model.pt", ckpt)
    assert main(["train", "--out", str(out), "--steps", "4", "--resume"]) == 1
    assert "has no training state to resume from" in _one_error_line(capsys)
