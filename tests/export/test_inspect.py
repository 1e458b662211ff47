"""`describe`: bundles, .onnx and .plan files, and clear errors for broken ones."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from dtk.export.inspect import describe, format_description
from dtk.runtime.errors import DtkError
from dtk.runtime.files import sha256
from dtk.runtime.sidecar import PlanSidecar


def test_bundle(tiny_bundle):
    info = describe(tiny_bundle)
    assert info["kind"] == "dtk bundle"
    assert info["io"] == {
        "sample": "float32 [batch, 1, 16, 16]",
        "timestep": "float32 [batch]",
        "model_output": "float32 [batch, 1, 16, 16]",
    }
    assert (
        info["batch"] == {"min": 1, "opt": 2, "max": 4}
        and info["precision"] == "fp32"
        and info["opset"] == 18
    )
    schedule = info["schedule"]
    assert schedule["beta_schedule"] == "linear" and schedule["num_train_timesteps"] == 1000
    assert schedule["beta_first"] == pytest.approx(1e-4) and schedule["beta_last"] == pytest.approx(0.02)
    assert schedule["alphas_cumprod_last"] == pytest.approx(4.0358e-5, rel=1e-3)
    assert info["parity"]["verified"] and info["parity"]["passed"] and info["parity"]["cases"] == 4
    files = {f["name"]: f for f in info["files"]}
    assert files["unet.onnx"]["sha256"] == sha256(tiny_bundle / "unet.onnx")
    assert files["unet.onnx"]["matches_export"] is True
    text = format_description(info)
    assert "timestep: float32 [batch]" in text and "alphas_cumprod_last" in text


def test_modified_onnx_is_flagged(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with open(bundle / "unet.onnx", "ab") as f:
        f.write(b"\x00")
    files = {f["name"]: f for f in describe(bundle)["files"]}
    assert files["unet.onnx"]["matches_export"] is False


def test_onnx_file(tiny_bundle):
    info = describe(tiny_bundle / "unet.onnx")
    assert info["kind"] == "onnx" and info["opset"]["ai.onnx"] == 18
    assert [(i["name"], i["dtype"], i["shape"]) for i in info["inputs"]] == [
        ("sample", "float32", ["batch", 1, 16, 16]),
        ("timestep", "float32", ["batch"]),
    ]
    assert info["outputs"][0]["name"] == "model_output" and info["precision"] == "fp32"
    assert info["nodes"] > 100 and info["op_types"]["Conv"] > 10
    assert info["metadata"]["dtk.timestep"].startswith("float32 [batch]")
    assert info["files"][0]["bytes"] == (tiny_bundle / "unet.onnx").stat().st_size
    assert info["bundle"] == str(tiny_bundle)


def test_truncated_onnx(tiny_bundle, tmp_path):
    data = (tiny_bundle / "unet.onnx").read_bytes()
    broken = tmp_path / "unet.onnx"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(DtkError, match="not a valid ONNX model: truncated or corrupt"):
        describe(broken)


def _orin_plan(folder):
    """A plan file with the sidecar of a TensorRT 10.3 build on a Jetson Orin (sm_87)."""
    plan = folder / "unet.plan"
    plan.write_bytes(b"serialized engine")
    PlanSidecar(
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability=(8, 7),
        precision="fp16",
        profiles=[{"sample": {"min": [1, 1, 16, 16], "opt": [2, 1, 16, 16], "max": [4, 1, 16, 16]}}],
        onnx_sha256="ab" * 32,
        plan_sha256=hashlib.sha256(b"serialized engine").hexdigest(),
    ).save(plan)
    return plan


def test_plan_with_sidecar(tmp_path):
    plan = _orin_plan(tmp_path)
    info = describe(plan)
    assert info["kind"] == "tensorrt plan" and info["tensorrt_version"] == "10.3.0"
    assert info["gpu"] == "Orin (sm_87)" and info["precision"] == "fp16"
    assert info["plan_matches_sidecar"] is True
    assert [f["name"] for f in info["files"]] == ["unet.plan", "unet.plan.json"]


def test_plan_without_sidecar(tmp_path):
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"serialized engine")
    with pytest.raises(DtkError, match="has no sidecar unet.plan.json.*rebuild it on the target"):
        describe(plan)


def test_other_paths(tmp_path):
    with pytest.raises(DtkError, match="no such file"):
        describe(tmp_path / "missing.onnx")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DtkError, match="unknown kind of file"):
        describe(tmp_path / "notes.txt")
    with pytest.raises(DtkError, match="no dtk manifest here"):
        describe(tmp_path)


def test_plan_says_whether_it_runs_here(tmp_path, monkeypatch):
    from dtk.runtime import sidecar as sidecar_module
    from dtk.runtime.sidecar import Target

    plan = _orin_plan(tmp_path)
    assert describe(plan)["runs_here"].startswith("cannot tell: ")  # no TensorRT on this machine
    monkeypatch.setattr(sidecar_module, "current_target", lambda device=0: Target("10.3.0", "Orin", (8, 7)))
    assert describe(plan)["runs_here"] == "yes"
    monkeypatch.setattr(sidecar_module, "current_target", lambda device=0: Target("10.8.0", "H200", (9, 0)))
    verdict = describe(plan)["runs_here"]
    assert verdict.startswith("no: built with TensorRT 10.3.0, this machine has TensorRT 10.8.0")
    assert "this GPU is H200 (sm_90)" in verdict
