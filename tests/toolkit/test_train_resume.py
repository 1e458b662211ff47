"""`dtk train --out RUN --steps N --resume` (the README's command) continues the run with its own settings:
bit-identical to an uninterrupted run; a conflicting flag is refused; the intervals may change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dtk.checkpoint import load_checkpoint, save_checkpoint
from dtk.cli import main
from dtk.train_config import TrainConfig, learning_rate

pytestmark = pytest.mark.usefixtures("single_thread")

# Every setting away from its default, so a resume that fell back to a default would show.
SETTINGS = [
    "--dataset", "shapes", "--image-size", "8", "--channels", "1", "--hflip", "--base-channels", "8",
    "--channel-mults", "1,2", "--attention-resolutions", "4", "--dropout", "0.1", "--num-groups", "4",
    "--num-train-timesteps", "50", "--beta-schedule", "squaredcos_cap_v2", "--batch-size", "3",
    "--grad-accum", "2", "--lr", "7e-4", "--lr-schedule", "cosine", "--warmup-steps", "2", "--seed", "11",
    "--ema-decay", "0.9", "--sample-every", "3", "--sample-num", "2", "--sample-steps", "4",
    "--save-every", "2", "--device", "cpu",
]  # fmt: skip


def _train(*argv) -> int:
    return main(["train", *map(str, argv)])


def _same_tensors(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_the_readme_resume_command_equals_an_uninterrupted_run(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train("--out", straight, "--steps", 6, *SETTINGS) == 0
    # the split run as if it had stopped at step 4 of its planned 6, then the README's command
    assert _train("--out", split, "--steps", 6, "--keep", 5, *SETTINGS) == 0
    (split / "model-4.pt").replace(split / "model.pt")
    (split / "samples_000006.png").unlink()
    capsys.readouterr()
    assert _train("--out", split, "--steps", 6, "--resume") == 0
    out = capsys.readouterr().out
    assert f"resuming {split / 'model.pt'} at step 4" in out
    a, b = load_checkpoint(straight / "model.pt"), load_checkpoint(split / "model.pt")
    assert a.step == b.step == 6
    assert _same_tensors(a.model_state, b.model_state) and _same_tensors(a.ema_state, b.ema_state)
    assert _same_tensors(a.train_state["optimizer"], b.train_state["optimizer"])
    ours = b.train_state["config"]
    assert (
        ours["seed"] == 11 and ours["lr"] == 7e-4 and ours["batch_size"] == 3 and ours["dataset"] == "shapes"
    )
    assert ours["lr_schedule"] == "cosine" and ours["keep"] == 5 and ours["out"] == str(split)
    # the sample grids are the run's: same sampler, size and seed
    assert (split / "samples_000006.png").read_bytes() == (straight / "samples_000006.png").read_bytes()


def test_extending_a_constant_schedule_run_is_exact(tmp_path, capsys):
    settings = [s for s in SETTINGS if s not in ("--lr-schedule", "cosine")]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train("--out", straight, "--steps", 5, *settings) == 0
    assert _train("--out", split, "--steps", 3, *settings) == 0
    assert _train("--out", split, "--steps", 5, "--resume", "--save-every", 1) == 0  # intervals may change
    a, b = load_checkpoint(straight / "model.pt"), load_checkpoint(split / "model.pt")
    assert _same_tensors(a.model_state, b.model_state) and _same_tensors(a.ema_state, b.ema_state)
    assert b.train_state["config"]["save_every"] == 1


def test_a_conflicting_flag_is_refused_a_matching_one_accepted(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", run, "--steps", 2, *SETTINGS) == 0
    before = (run / "model.pt").read_bytes()
    capsys.readouterr()
    assert _train("--out", run, "--steps", 4, "--resume", "--lr", "1e-3", "--image-size", "16") == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {run / 'model.pt'}: cannot resume with different settings: --image-size 16 (the run has 8); "
        "--lr 0.001 (the run has 0.0007); leave these flags out to continue the run as it was configured\n"
    )
    assert (run / "model.pt").read_bytes() == before
    assert _train("--out", run, "--steps", 3, "--resume", "--lr", "7e-4", "--seed", "11") == 0
    assert load_checkpoint(run / "model.pt").step == 3


FOLDER_RUN = [
    "--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "",
    "--batch-size", "2", "--warmup-steps", "1", "--sample-every", "0", "--device", "cpu", "--no-progress",
]  # fmt: skip


def test_a_folder_run_resumes_from_another_working_directory(tmp_path, monkeypatch, capsys):
    """The run stores its image folder as an absolute path (a built-in stays a name): --resume works from
    anywhere, and the folder given again relative to the new directory is the run's own."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "images").mkdir(parents=True)
    elsewhere.mkdir()
    for k in range(4):
        Image.new("L", (8, 8), 60 * k).save(work / "images" / f"{k}.png")
    monkeypatch.chdir(work)
    assert _train("--out", "run", "--dataset", "images", "--steps", 2, *FOLDER_RUN) == 0
    run = work / "run"
    stored = load_checkpoint(run / "model.pt").train_state["config"]["dataset"]
    assert Path(stored).is_absolute() and Path(stored).resolve() == (work / "images").resolve()
    monkeypatch.chdir(elsewhere)
    assert _train("--out", run, "--steps", 3, "--resume", "--threads", 1) == 0  # threads: this invocation's
    assert _train("--out", run, "--steps", 4, "--resume", "--dataset", "../work/images") == 0
    assert load_checkpoint(run / "model.pt").step == 4
    capsys.readouterr()
    assert _train("--out", run, "--steps", 5, "--resume", "--dataset", "images") == 1  # not this one here
    assert "--dataset " in capsys.readouterr().err
    # a run saved before folders were stored absolute resumes from the directory it was started in
    ckpt = load_checkpoint(run / "model.pt")
    ckpt.train_state["config"]["dataset"] = "images"
    save_checkpoint(run / "model.pt", ckpt)
    monkeypatch.chdir(work)
    assert _train("--out", "run", "--steps", 5, "--resume") == 0
    assert load_checkpoint(run / "model.pt").train_state["config"]["dataset"] == stored
    # built-in names are stored as names
    assert _train("--out", tmp_path / "digits", "--dataset", "digits", "--steps", 1, *FOLDER_RUN) == 0
    assert load_checkpoint(tmp_path / "digits" / "model.pt").train_state["config"]["dataset"] == "digits"


def test_resuming_a_finished_run_asks_for_more_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", run, "--steps", 2, *SETTINGS) == 0
    capsys.readouterr()
    assert _train("--out", run, "--resume") == 1  # --steps not given: the run's own 2
    assert "already trained for 2 steps; pass --steps above 2" in capsys.readouterr().err


def test_cosine_schedule():
    config = TrainConfig(lr=1e-3, warmup_steps=2, steps=10, lr_schedule="cosine")
    lrs = [learning_rate(config, s) for s in range(11)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[6] == pytest.approx(5e-4)  # halfway through the decay
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and all(
        x >= y for x, y in zip(lrs[1:], lrs[2:], strict=False)
    )


def test_resuming_a_cosine_run_with_more_steps_says_the_schedule_changed(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", run, "--steps", 2, *SETTINGS) == 0
    capsys.readouterr()
    assert _train("--out", run, "--steps", 4, "--resume") == 0
    assert "cosine learning-rate schedule was planned to end at step 2 and now ends at step 4" in (
        capsys.readouterr().out
    )
