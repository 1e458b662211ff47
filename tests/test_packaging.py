"""The layout promises of DESIGN.md: one namespace over the stage folders, and imports that stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"toolkit": "dtk", "export": "dtk.export", "runtime": "dtk.runtime"}


def _declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared():
    found = set()
    for folder, namespace in STAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((namespace, *rel)))
    assert found == _declared_packages()


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_runtime_import_is_light():
    loaded = _modules_after("import dtk.runtime")
    assert not loaded & {"torch", "onnx", "onnxruntime", "tensorrt", "cuda", "PIL", "dtk.export", "dtk.unet"}


def test_cli_imports_no_heavy_library_up_front():
    loaded = _modules_after("import dtk.cli; dtk.cli.cli.list_commands(None)")
    assert not loaded & {"torch", "onnx", "onnxruntime", "tensorrt", "cuda"}


def test_cli_help_and_version():
    run = subprocess.run([sys.executable, "-m", "dtk", "--help"], capture_output=True, text=True, check=True)
    for name in ("train", "sample", "export", "build-engine", "inspect", "bench"):
        assert name in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "dtk", "--version"], capture_output=True, text=True, check=True
    )
    assert "dtk, version 0.1.0" in run.stdout


def test_unknown_command_fails_cleanly():
    run = subprocess.run([sys.executable, "-m", "dtk", "frobnicate"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "No such command" in run.stderr
    assert "Traceback" not in run.stderr
