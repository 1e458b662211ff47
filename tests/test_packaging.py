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


def _extra(name: str) -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def _resolved(extra: str, release: str, machine: str) -> list[str]:
    """The requirements of `extra` on a machine whose kernel is `release`."""
    from packaging.requirements import Requirement

    environment = {"platform_release": release, "platform_machine": machine, "sys_platform": "linux"}
    out = []
    for line in _extra(extra):
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            out.append(f"{requirement.name}{requirement.specifier}")
    return sorted(out)


def test_jetson_gets_cuda_python_12_and_no_tensorrt_from_pypi():
    """JetPack 6: CUDA 12.6 and TensorRT 10.3 from JetPack. cuda-python 13 refuses its driver, and PyPI's
    TensorRT 11 would shadow JetPack's."""
    from packaging.specifiers import SpecifierSet

    jetson = _resolved("tensorrt", "5.15.148-tegra", "aarch64")
    assert jetson == ["cuda-python<13,>=12.6"] == _resolved("jetson", "5.15.148-tegra", "aarch64")
    assert "13.0.0" not in SpecifierSet(jetson[0].removeprefix("cuda-python"))
    assert _resolved("tensorrt", "6.8.0-45-generic", "x86_64") == ["cuda-python>=12", "tensorrt>=10"]
    assert _resolved("tensorrt", "6.8.0-1015-nvidia-64k", "aarch64") == ["cuda-python>=12", "tensorrt>=10"]
