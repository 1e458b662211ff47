"""A runtime-only install (`pip install 'dtk[runtime]'`: no torch, no onnx) answers the commands that need
them with one line naming the extra to install, and still inspects bundles."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# in the child: torch, onnx and their kin cannot be imported, as in the CPU and Jetson images
CHILD = textwrap.dedent(
    """
    import sys

    class Missing:
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in ("torch", "onnx", "onnxscript", "onnxslim", "sklearn", "diffusers"):
                raise ModuleNotFoundError(f"No module named {root!r}", name=root)
            return None

    sys.meta_path.insert(0, Missing())
    from dtk.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _dtk(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (
            ["train", "--dataset", "digits", "--steps", "1", "--out", "run"],
            "torch, which is not installed here: pip install 'dtk[train]'",
        ),
        (
            ["export", "{checkpoint}", "-o", "bundle", "--no-progress"],
            "onnx, which is not installed here: pip install 'dtk[export]'",  # the first it imports
        ),
        (
            ["sample", "{checkpoint}", "--out", "g.png"],
            "torch, which is not installed here: pip install 'dtk[train]'",
        ),
    ],
)
def test_commands_that_need_torch_or_onnx_name_the_extra(
    tiny_checkpoint, tiny_bundle, tmp_path, command, extra
):
    args = [a.format(checkpoint=tiny_checkpoint, onnx=tiny_bundle / "unet.onnx") for a in command]
    run = _dtk(*args, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert run.stderr == f"error: dtk {command[0]} needs {extra}\n"
    assert list(tmp_path.iterdir()) == []


def test_inspect_a_bundle_without_torch_or_onnx(tiny_bundle):
    run = _dtk("inspect", tiny_bundle)
    assert run.returncode == 0, run.stderr
    assert "kind: dtk bundle" in run.stdout and "matches_export=True" in run.stdout


def test_inspect_an_onnx_without_the_onnx_package(tiny_bundle):
    run = _dtk("inspect", tiny_bundle / "unet.onnx")
    assert run.returncode == 0, run.stderr
    assert "kind: onnx" in run.stdout and f"bundle: {tiny_bundle}" in run.stdout
    assert "  - name=sample, dtype=float32, shape=[batch, 1, 16, 16]" in run.stdout
    assert (
        "not_shown: opset, nodes and initializers need the onnx package: pip install 'dtk[export]'"
        in run.stdout
    )
