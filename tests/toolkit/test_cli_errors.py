"""Faults answered with one line, never a traceback: OS errors name the file (read-only folders, a full
disk, a directory where a file belongs), SIGTERM and Ctrl-C exit 130, and nothing half-written remains."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dtk.cli import main

SAMPLE = ["--num", "1", "--steps", "2", "--no-progress"]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_full_disk_is_one_line_and_leaves_nothing(tiny_bundle, tiny_disk, capsys):
    (tiny_disk / "ballast").write_bytes(b"\0" * (64 * 1024 - 512))  # the disk is (almost) full
    out = tiny_disk / "grid.png"
    assert main(["sample", str(tiny_bundle), *SAMPLE, "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == f"error: {out}: cannot write (No space left on device)"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ballast"]


def test_read_only_folder_is_one_line(tiny_bundle, tiny_checkpoint, tiny_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert main(["sample", str(tiny_bundle), *SAMPLE, "--out", str(tiny_disk / "g.png")]) == 1
    assert (
        _one_line(capsys.readouterr().err) == f"error: {tiny_disk}: cannot write here (Read-only file system)"
    )
    out = tiny_disk / "bundle"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--no-verify", "--no-progress"]) == 1
    assert (
        _one_line(capsys.readouterr().err) == f"error: {tiny_disk}: cannot write here (Read-only file system)"
    )
    assert list(tiny_disk.iterdir()) == []


def test_a_writer_failing_with_enospc_names_the_target(tiny_bundle, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_bundle), *SAMPLE, "--out", str(out)]) == 1
    assert _one_line(capsys.readouterr().err) == f"error: {out}: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_out_an_existing_directory(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.mkdir()
    assert main(["sample", str(tiny_bundle), *SAMPLE, "--out", str(out)]) == 1
    assert _one_line(capsys.readouterr().err) == f"error: {out}: is a directory; give a .png file name"
    assert list(out.iterdir()) == []


def test_a_bare_os_error_is_one_line(monkeypatch, capsys):
    from dtk.cli import inspect as inspect_cli

    def broken(path):
        raise OSError(errno.EIO, "Input/output error", "/dev/sdz")

    monkeypatch.setattr("dtk.export.inspect.describe", broken)
    assert inspect_cli is not None
    assert main(["inspect", "somewhere.onnx"]) == 1
    assert _one_line(capsys.readouterr().err) == "error: /dev/sdz: input/output error"


def test_sigterm_during_export_exits_130_and_keeps_the_old_bundle(tiny_bundle, tiny_checkpoint, tmp_path):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "DTK_FAULT_PAUSE": "bundle-written", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dtk", "export", str(tiny_checkpoint), "-o", str(out), "--batch", "3"]
    process = subprocess.Popen(
        [*command, "--no-verify", "--no-progress", "--exporter", "torchscript"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "paused at bundle-written" in line:
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, "".join(lines) + rest
    assert rest == "interrupted\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # its temporary folder and lock went too


# torch.export wraps a KeyboardInterrupt raised while it traces in its own error; dtk must still exit 130
SLOW_TRACE = textwrap.dedent(
    """
    import sys, time
    from dtk import unet

    forward = unet.UNet.forward

    def slow(self, *args, **kwargs):
        print("dtk: tracing", file=sys.stderr, flush=True)
        time.sleep(120)
        return forward(self, *args, **kwargs)

    unet.UNet.forward = slow
    from dtk.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_ctrl_c_during_torch_export_exits_130(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRACE, "export", str(tiny_checkpoint), "-o", str(out), "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "dtk: tracing" in line:
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, "".join(lines) + rest
    assert rest == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_raw_pickle_is_one_line_without_torchs_warning(tmp_path):
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": "dtk.checkpoint"}, protocol=4))
    run = subprocess.run([sys.executable, "-m", "dtk", "inspect", str(path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert (
        run.stderr == f"error: {path}: not a dtk checkpoint (not a PyTorch file of tensors and plain data)\n"
    )


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_opset_too_new_is_one_line_before_any_work(tiny_checkpoint, tmp_path, capfd, exporter):
    from dtk.export.onnx_export import max_opset

    newest = max_opset(exporter)  # 20 and 23 with the pinned torch
    assert 18 <= newest < 99
    out = tmp_path / "bundle"
    args = ["export", str(tiny_checkpoint), "-o", str(out), "--opset", "99", "--no-progress"]
    assert main([*args, "--exporter", exporter]) == 1
    err = capfd.readouterr().err  # capfd: the exporters print from C++ too, past sys.stderr
    assert err == f"error: opset 99 is newer than the {exporter} exporter writes here (at most {newest})\n"
    assert not out.exists()


def test_multi_line_messages_are_joined(capsys, monkeypatch):
    from dtk.runtime.errors import DtkError

    def checker_text(path):
        raise DtkError("the exported ONNX graph failed onnx.checker: bad node\n\n==> Context: Bad node spec")

    monkeypatch.setattr("dtk.export.inspect.describe", checker_text)
    assert main(["inspect", "x.onnx"]) == 1
    assert capsys.readouterr().err == (
        "error: the exported ONNX graph failed onnx.checker: bad node | ==> Context: Bad node spec\n"
    )


def test_out_a_mount_point_is_one_line(tiny_checkpoint, tiny_disk, capsys):
    args = ["export", str(tiny_checkpoint), "-o", str(tiny_disk), "--no-verify", "--no-progress"]
    assert main([*args, "--exporter", "torchscript"]) == 1
    assert _one_line(capsys.readouterr().err) == (
        f"error: {tiny_disk}: is a mount point; write the bundle to a folder inside it"
    )
    assert list(tiny_disk.iterdir()) == [] and [p.name for p in tiny_disk.parent.iterdir()] == ["disk"]
