"""A run folder (what `dtk train --out RUN` writes) is accepted wherever a checkpoint is: export, sample,
inspect and bench --checkpoint; `dtk bench` given a checkpoint points to --checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from dtk.cli import main
from dtk.runs import checkpoint_or_run, run_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def run(tiny_checkpoint, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "model.pt")
    (folder / "log.csv").write_text("step,loss,ema_loss,lr,images_per_s,wall_s\n")
    return folder


def test_a_run_folder_is_its_model_pt(run, tmp_path):
    assert run_checkpoint(run) == checkpoint_or_run(run) == run / "model.pt"
    bundle = tmp_path / "bundle"  # a bundle that keeps its source checkpoint beside it stays a bundle
    bundle.mkdir()
    (bundle / "dtk.json").write_text("{}")
    (bundle / "model.pt").write_bytes(b"")
    assert run_checkpoint(bundle) is None and checkpoint_or_run(bundle) == bundle
    assert run_checkpoint(tmp_path / "nothing") is None and run_checkpoint(run / "model.pt") is None


def test_inspect_a_run_folder(run, capsys):
    assert main(["inspect", str(run), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(run / "model.pt"), "--json"]) == 0
    assert from_run == json.loads(capsys.readouterr().out)
    assert from_run["kind"] == "dtk checkpoint" and from_run["path"] == str(run / "model.pt")


def test_sample_a_run_folder(run, tmp_path, capsys):
    args = ["--num", "2", "--steps", "2", "--no-progress"]
    assert main(["sample", str(run), *args, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", str(run / "model.pt"), *args, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "on pytorch" in capsys.readouterr().out


def test_export_a_run_folder(run, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", str(run), "-o", str(out), "--batch", "1", "--no-verify", "--no-progress"]) == 0
    manifest = json.loads((out / "dtk.json").read_text())
    assert manifest["source"]["kind"] == "dtk-checkpoint"
    assert manifest["source"]["path"] == str((run / "model.pt").resolve())


def test_bench_a_run_folder_and_a_checkpoint_given_as_bundle(run, capsys):
    quick = ["--warmup", "1x", "--iterations", "2", "--duration", "0", "--no-system"]
    assert main(["bench", "--checkpoint", str(run), *quick]) == 0
    assert "torch" in capsys.readouterr().out
    for given in (run, run / "model.pt"):
        assert main(["bench", str(given), *quick]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"error: {given}: is a checkpoint, not a bundle: time PyTorch with "
            f"`dtk bench --checkpoint {given}`, or export it first (dtk export {given} -o bundle/)\n"
        )
