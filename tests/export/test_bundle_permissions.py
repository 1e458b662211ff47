"""Bundle folders and files follow the umask like any other tool's output (the Docker images read a bundle
mounted read-only as another user), also the external weights file."""

from __future__ import annotations

import os
import stat

import pytest

from dtk.export.bundle import ExportOptions, export_bundle


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_bundle_modes_follow_the_umask(tiny_checkpoint, tmp_path, umask):
    out = tmp_path / "bundle"
    options = ExportOptions(batch=1, verify=False, simplify=False, exporter="torchscript", external_data=True)
    export_bundle(tiny_checkpoint, out, options, progress=False)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {name: 0o666 & ~umask for name in ("dtk.json", "unet.onnx", "unet.onnx.data")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
