"""`dtk export`: flags, parity table, failures that exit non-zero and leave no bundle, --engine, --triton."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from dtk.cli import main
from dtk.runtime.manifest import load_manifest


def test_help_documents_every_flag(capsys):
    from dtk.cli.export import command

    assert main(["export", "--help"]) == 0
    help_text = capsys.readouterr().out
    flags = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert len(flags) > 25
    for flag in flags:
        assert flag in help_text, flag
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"{param.name} has no help text"


def test_export_prints_the_parity_table(tiny_checkpoint, tmp_path, capsys):
    out, repo = tmp_path / "bundle", tmp_path / "triton"
    args = [
        "export",
        str(tiny_checkpoint),
        "-o",
        str(out),
        "--batch",
        "2",
        "--opset",
        "17",
        "--chain-steps",
        "5",
    ]
    triton = ["--triton", str(repo), "--triton-kind", "cpu", "--serve-steps", "7", "--serve-sampler", "ddpm"]
    assert main([*args, "--no-progress", *triton]) == 0
    stdout = capsys.readouterr().out
    assert "parity (fp32, CPUExecutionProvider vs PyTorch fp32)" in stdout
    assert stdout.count("single call") == 3 and "5-step ddim chain" in stdout and "parity passed" in stdout
    assert f"wrote {out}: unet.onnx" in stdout and "fixed batch 2" in stdout

    manifest = load_manifest(out)
    assert manifest.opset == 17 and manifest.batch == {"min": 2, "opt": 2, "max": 2}
    model = onnx.load(str(out / "unet.onnx"))
    assert model.opset_import[0].version == 17
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 1, 16, 16]
    config = (repo / "dtk_unet" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in config and "KIND_CPU" in config
    sampler = (repo / "dtk_sampler" / "config.pbtxt").read_text()
    assert 'backend: "python"' in sampler and "max_batch_size: 2" in sampler
    assert 'string_value: "7"' in sampler and 'string_value: "ddpm"' in sampler
    assert f"wrote Triton model {repo / 'dtk_sampler'}" in stdout


def test_parity_failure_exits_non_zero_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["export", str(tiny_checkpoint), "-o", str(out), "--batch", "1", "--chain-steps", "2"]
    assert main([*args, "--atol", "0", "--rtol", "0", "--chain-atol", "0", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "parity FAILED" in captured.out
    assert captured.err.startswith("error: parity check failed (fp32)")
    assert "No bundle was written" in captured.err and "Traceback" not in captured.err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written directory either


def test_no_verify_and_engine_flags(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from dtk.export import tensorrt
    from dtk.runtime.errors import DtkError

    calls = []

    def fake_build_engine(bundle_dir, options, progress=True):
        calls.append((Path(bundle_dir), options))
        raise DtkError("TensorRT is not installed (pip install 'dtk[tensorrt]', or JetPack on Jetson)")

    monkeypatch.setattr(tensorrt, "build_engine", fake_build_engine)
    out = tmp_path / "bundle"
    args = ["export", str(tiny_checkpoint), "-o", str(out), "--batch", "1", "--no-verify", "--no-progress"]
    engine = [
        "--engine",
        "--workspace",
        "256",
        "--opt-level",
        "2",
        "--hardware-compat",
        "--timing-cache",
        "t.cache",
    ]
    assert main([*args, *engine]) == 1
    captured = capsys.readouterr()
    assert "parity check skipped (--no-verify)" in captured.err
    assert "TensorRT is not installed" in captured.err and f"dtk build-engine {out}" in captured.err
    assert "parity (" not in captured.out

    manifest = load_manifest(out)  # the ONNX bundle stands on its own
    assert manifest.parity == {"verified": False, "passed": None, "reason": "--no-verify"}
    ((bundle_dir, options),) = calls
    assert bundle_dir == out
    assert (options.workspace, options.opt_level, options.hardware_compat) == (256, 2, "ampere+")
    assert (
        str(options.timing_cache) == "t.cache" and options.precision == "fp32" and not options.version_compat
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "1:x"], "is not N, MIN:MAX or MIN:OPT:MAX"),
        (["--opset", "16"], "16 is not in the range x>=17"),
        (["--precision", "int4"], "'int4' is not one of"),
        (["--calibration-size", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_flags(tiny_checkpoint, tmp_path, capsys, args, message):
    assert main(["export", str(tiny_checkpoint), "-o", str(tmp_path / "b"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"just some bytes, not a checkpoint")
    assert main(["export", str(junk), "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {junk}: not a dtk checkpoint") and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_killed_export_leaves_nothing_that_looks_valid(tiny_checkpoint, tmp_path):
    """SIGKILL once unet.onnx is written but before parity and the manifest: the bundle path does not exist,
    only a hidden .partial directory."""
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "dtk", "export", str(tiny_checkpoint), "-o", str(out), "--batch", "1"]
    process = subprocess.Popen(
        [*command, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".bundle.*.partial/unet.onnx")) and time.monotonic() < deadline:
            assert process.poll() is None, "export ended before it could be interrupted"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert list(tmp_path.glob(".bundle.*.partial/unet.onnx")), "the export was killed too early"
    assert not out.exists()
    leftovers = {p.name for p in tmp_path.iterdir()} - {".bundle.lock"}  # the lock goes with the next writer
    assert len(leftovers) == 1 and leftovers.pop().endswith(".partial")
    assert main(["inspect", str(out)]) == 1
