"""Fixtures for the toolkit tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.fixture
def single_thread():
    """Run torch on one thread: the tests' models are tiny, and on a busy 2-core machine two OpenMP threads
    wait on each other far longer than they compute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped elsewhere): real ENOSPC and, remounted, EROFS."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
