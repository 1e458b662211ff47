"""`dtk export -o DIR` never destroys data: it replaces only a bundle dtk wrote, keeps a plan unless --force,
and a kill at any moment leaves the old bundle or the new one at DIR; the next run cleans up after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dtk.cli import main
from dtk.runtime.manifest import load_manifest

EXPORT = ["--no-verify", "--no-progress", "--no-simplify", "--exporter", "torchscript"]  # fast: ~1 s


def _copy_bundle(tiny_bundle, where: Path) -> Path:
    shutil.copytree(tiny_bundle, where)
    return where


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_bundle_holding_the_checkpoint_and_user_files_is_kept(
    tiny_bundle, tiny_checkpoint, tmp_path, capsys
):
    folder = _copy_bundle(tiny_bundle, tmp_path / "run")
    shutil.copyfile(tiny_checkpoint, folder / "model.pt")
    (folder / "notes.txt").write_text("my notes")
    before = _snapshot(folder)
    assert main(["export", str(folder / "model.pt"), "-o", str(folder), *EXPORT]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: {folder}: holds files dtk did not write there (model.pt, notes.txt); refusing to replace "
        "the bundle (move them out or choose another -o)"
    )
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_plan_is_not_deleted_without_force(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    folder = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    (folder / "unet.plan").write_bytes(b"engine built on the Orin")
    (folder / "unet.plan.json").write_text("{}")
    (folder / "unet-orin-nx.plan").write_bytes(b"a second engine (build-engine --engine-name orin-nx)")
    (folder / ".unet.plan.lock").write_bytes(b"")  # what a killed build-engine left: dtk's, not the user's
    before = _snapshot(folder)
    assert main(["export", str(tiny_checkpoint), "-o", str(folder), *EXPORT, "--batch", "3"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: {folder}: holds a TensorRT engine that this export would delete "
        "(unet-orin-nx.plan, unet.plan, unet.plan.json); pass --force to replace it, or choose another -o"
    )
    assert _snapshot(folder) == before

    assert main(["export", str(tiny_checkpoint), "-o", str(folder), *EXPORT, "--batch", "3", "--force"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["dtk.json", "unet.onnx"]
    assert load_manifest(folder).batch == {"min": 3, "opt": 3, "max": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no lock, no .partial, no .old


def test_out_is_the_current_directory(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(tiny_checkpoint), "-o", ".", *EXPORT]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert (
        line
        == "error: .: is the current directory (or holds it); give a bundle folder by name, e.g. -o bundle"
    )
    assert list(tmp_path.iterdir()) == []


def test_out_a_symlink_replaces_the_target_and_keeps_the_link(tiny_bundle, tiny_checkpoint, tmp_path):
    real = _copy_bundle(tiny_bundle, tmp_path / "bundles" / "v1")
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    assert main(["export", str(tiny_checkpoint), "-o", str(link), *EXPORT, "--batch", "3"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert load_manifest(real).batch["max"] == 3
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(["export", str(tiny_checkpoint), "-o", str(dangling), *EXPORT]) == 1
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def _start(command: list[str], pause: str, cwd=None, child: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "DTK_FAULT_PAUSE": pause, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", child, *command] if child else [sys.executable, "-m", "dtk", *command]
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )


def _wait_for(process: subprocess.Popen, text: str, timeout: float = 240) -> list[str]:
    """Read the child's stderr until a line holds `text`; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    raise AssertionError(f"never saw {text!r}: {''.join(lines)}")


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def test_kill_right_after_the_swap_leaves_the_new_bundle(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    out = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    process = _start(
        ["export", str(tiny_checkpoint), "-o", str(out), *EXPORT, "--batch", "3"], "bundle-swapped"
    )
    _wait_for(process, "paused at bundle-swapped")
    _kill(process)
    assert load_manifest(out).batch["max"] == 3  # the new bundle is in place
    partial = [p.name for p in tmp_path.glob(".bundle.*.partial")]
    assert len(partial) == 1  # the old bundle, set aside, not yet removed
    assert load_manifest(tmp_path / partial[0]).batch["max"] == 4

    assert main(["export", str(tiny_checkpoint), "-o", str(out), *EXPORT, "--batch", "2"]) == 0
    assert load_manifest(out).batch["max"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the next run cleaned up


# where the file system cannot exchange two names, dtk renames twice: a kill between the renames leaves the
# old bundle at .bundle.old, and the next writer puts it back before anything else
NO_EXCHANGE = textwrap.dedent(
    """
    import errno, sys
    import dtk.runtime.files as files

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "not supported here")

    files._exchange = no_exchange
    from dtk.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_kill_between_two_renames_is_undone_by_the_next_run(tiny_bundle, tiny_checkpoint, tmp_path):
    out = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    command = ["export", str(tiny_checkpoint), "-o", str(out), *EXPORT, "--batch", "3"]
    process = _start(command, "bundle-set-aside", child=NO_EXCHANGE)
    _wait_for(process, "paused at bundle-set-aside")
    _kill(process)
    assert not out.exists() and load_manifest(tmp_path / ".bundle.old").batch["max"] == 4

    from dtk.runtime.files import atomic_dir

    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:  # the next writer, failing on its own
        assert load_manifest(out).batch["max"] == 4  # the old bundle came back first
        (tmp / "dtk.json").write_text("half")
        raise RuntimeError("parity failed")
    assert load_manifest(out).batch["max"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_concurrent_exports_are_serialised(tiny_bundle, tiny_checkpoint, tmp_path):
    out = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    first = _start(
        ["export", str(tiny_checkpoint), "-o", str(out), *EXPORT, "--batch", "3"], "bundle-written"
    )
    _wait_for(first, "paused at bundle-written")
    second = _start(["export", str(tiny_checkpoint), "-o", str(out), *EXPORT, "--batch", "2"], "")
    _wait_for(second, f"waiting for another dtk writing {out}")
    assert load_manifest(out).batch["max"] == 4  # nothing replaced while the first holds the lock
    _kill(first)
    assert second.wait(timeout=240) == 0, second.stderr.read()
    second.stderr.close()
    assert load_manifest(out).batch["max"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert json.loads((out / "dtk.json").read_text())["io"]["batch"] == {"min": 2, "opt": 2, "max": 2}
