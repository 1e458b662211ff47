"""Every TensorRT name dtk uses, and every name the fake TensorRT provides, exists in TensorRT 10's stubs.

The stubs are `tensorrt-stubs` (10.13, generated from the real bindings). That package depends on `tensorrt`
itself and ships a `tensorrt/` folder that would make `import tensorrt` succeed as an empty namespace package,
so `make` installs it with --no-deps into .venv/tensorrt-stubs, off sys.path, and this test reads the .pyi
files.
Parameter names are compared too (callers and TensorRT's Python wrappers may pass them by keyword).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
from pathlib import Path

import fake_gpu
import pytest

ROOT = Path(__file__).parents[2]
STUBS = Path(os.environ.get("DTK_TENSORRT_STUBS", ROOT / ".venv" / "tensorrt-stubs"))
STUB_FILE = STUBS / "tensorrt_bindings" / "tensorrt.pyi"
SOURCES = [
    "runtime/backends/tensorrt.py",
    "export/tensorrt.py",
    "runtime/sidecar.py",
    "export/engine_check.py",
]

pytestmark = pytest.mark.skipif(
    not STUB_FILE.is_file(), reason=f"tensorrt-stubs not installed in {STUBS} (run `make .venv/.installed`)"
)


def _parse(text: str) -> ast.Module:
    """The stubs, mended where the generator wrote invalid Python (10.13: a default before a non-default, a
    parameter named `in`): that line loses its defaults, a keyword parameter gets a trailing `_`."""
    lines = text.splitlines()
    for _ in range(20):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as e:
            line = lines[e.lineno - 1]
            mended = re.sub(r"\s*=\s*[^,()]+(?=[,)])", "", line)
            if mended == line:
                mended = re.sub(r"\b(in|is|from|lambda|def|class|global)(?=\s*:)", r"\1_", line)
            lines[e.lineno - 1] = mended
    raise AssertionError("the stubs do not parse")


def _stub_api() -> dict[str, dict[str, list[list[str]] | None]]:
    """{class or function name: {member: [parameter-name lists, one per overload] or None for attributes}}."""
    tree = _parse(STUB_FILE.read_text())
    api: dict[str, dict] = {}

    def params(fn) -> list[str]:
        args = fn.args
        return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg != "self"]

    def members(cls: ast.ClassDef, into: dict) -> None:
        for node in cls.body:
            if isinstance(node, ast.FunctionDef):
                is_property = any(
                    getattr(d, "id", getattr(d, "attr", "")) == "property" for d in node.decorator_list
                )
                if is_property or any(getattr(d, "attr", "") == "setter" for d in node.decorator_list):
                    into.setdefault(node.name, None)
                else:
                    overloads = into.get(node.name) or []
                    into[node.name] = [*overloads, params(node)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                into.setdefault(node.target.id, None)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        into.setdefault(target.id, None)
            elif isinstance(node, ast.ClassDef):  # nested, e.g. ILogger.Severity
                into.setdefault(node.name, None)
                members(node, api.setdefault(f"{cls.name}.{node.name}", {}))

    package = _parse((STUBS / "tensorrt_bindings" / "__init__.pyi").read_text())
    for node in tree.body + package.body:
        if isinstance(node, ast.ClassDef):
            members(node, api.setdefault(node.name, {}))
        elif isinstance(node, ast.FunctionDef):
            api[node.name] = {"__call__": [params(node)]}
    return api


@pytest.fixture(scope="module")
def stubs():
    return _stub_api()


def test_every_trt_name_dtk_uses_exists(stubs):
    """`trt.X` and `trt.X.Y` in dtk's TensorRT code."""
    used = set()
    for source in SOURCES:
        text = (ROOT / source).read_text()
        used |= set(re.findall(r"\btrt\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)", text))
    used = {name for name in used if not name.startswith("__version__")}
    missing = []
    for name in sorted(used):
        top, _, member = name.partition(".")
        if top not in stubs or (member and member not in stubs[top] and member != "Severity"):
            missing.append(name)
    assert (
        "Builder" in used and "BuilderFlag.FP16" in used and "HardwareCompatibilityLevel.AMPERE_PLUS" in used
    )
    assert missing == []


def _public(obj) -> dict[str, object]:
    return {
        name: value for name, value in vars(obj).items() if not name.startswith("_") or name == "__init__"
    }


def test_every_name_the_fake_provides_exists_with_the_same_parameters(stubs):
    gpu = fake_gpu.FakeGpu()
    trt = fake_gpu.fake_tensorrt(gpu, "10.3.0")
    problems, checked = [], 0
    for name, value in _public(trt).items():
        if name in ("__version__", "__init__") or isinstance(value, type(sys)):
            continue
        if name not in stubs:
            problems.append(f"trt.{name} is not in TensorRT 10")
            continue
        if inspect.isfunction(value):
            if [list(inspect.signature(value).parameters)] != stubs[name]["__call__"]:
                problems.append(f"trt.{name}{inspect.signature(value)} vs {stubs[name]['__call__']}")
            continue
        if isinstance(value, type) and hasattr(value, "__members__"):  # an enum: its members
            problems += [f"trt.{name}.{m}" for m in value.__members__ if m not in stubs[name]]
            continue
        for member, attribute in _public(value).items():
            if member == "__init__" and member not in stubs[name]:
                continue  # TensorRT makes these itself (builder.create_*, engine.create_*): the fake's own
            checked += 1
            stub = stubs[name].get(member, "missing") if member in stubs[name] else "missing"
            if stub == "missing":
                problems.append(f"trt.{name}.{member} is not in TensorRT 10")
            elif callable(attribute) and not isinstance(attribute, type) and stub is not None:
                ours = [p for p in inspect.signature(attribute).parameters if p != "self"]
                if ours not in stub:
                    problems.append(f"trt.{name}.{member}({', '.join(ours)}) vs {stub}")
    assert checked > 30
    assert problems == []


def test_the_fake_logger_severities_are_tensorrts(stubs):
    trt = fake_gpu.fake_tensorrt(fake_gpu.FakeGpu())
    assert set(trt.ILogger.Severity.__members__) <= set(stubs["ILogger.Severity"])
