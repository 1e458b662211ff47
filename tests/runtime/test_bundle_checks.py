"""A bundle is what it claims: every dtk.json field type-checked, betas agree with the config, files stay
inside the bundle, the ONNX is the exported one (size, then sha256 once), and the API refuses wrong types."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from field_edits import set_field

from dtk.cli import main
from dtk.runtime import Pipeline, integrity
from dtk.runtime.errors import DtkError
from dtk.runtime.manifest import load_manifest


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _edit(bundle, change) -> None:
    path = bundle / "dtk.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            set_field("diffusion", "num_train_timesteps", 1000.0),
            "num_train_timesteps must be an integer, got 1000.0",
        ),
        (set_field("diffusion", "num_train_timesteps", 10**10), "num_train_timesteps 10000000000 is absurd"),
        (set_field("diffusion", "clip_sample", "yes"), "clip_sample must be true or false, got 'yes'"),
        (set_field("diffusion", "clip_sample_range", -1.0), "clip_sample_range must be positive, got -1.0"),
        (set_field("diffusion", "beta_end", 1.5), r"beta_end must lie in \(0, 1\), got 1.5"),
        (
            set_field("diffusion", "steps_offset", 1000),
            r"steps_offset 1000 is beyond the schedule's last timestep \(999\)",
        ),
        (set_field("files", "onnx", None), "files.onnx must be a file name in the bundle, got None"),
        (set_field("files", "onnx", 5), "files.onnx must be a file name in the bundle, got 5"),
        (set_field("files", "onnx", "../../model.pt"), "files.onnx '../../model.pt' leaves the bundle"),
        (set_field("files", "onnx", "/etc/passwd"), "files.onnx '/etc/passwd' leaves the bundle"),
        (
            set_field("files", "plan", "../other/unet.plan"),
            "files.plan '../other/unet.plan' leaves the bundle",
        ),
        (set_field("parity", []), "parity must be an object, got \\[\\]"),
        (set_field("schema_version", -1), "schema_version must be at least 1, got -1"),
        (set_field("io", "batch", "max", 1e12), "io.batch.max must be an integer, got 1000000000000.0"),
        (set_field("io", "batch", "max", 10**12), "io.batch.max must be at most 65536, got 1000000000000"),
        (set_field("image", "size", [16.5, 16]), "image.size must be an integer, got 16.5"),
        (set_field("image", "in_channels", True), "image.in_channels must be an integer, got True"),
        (set_field("opset", "18"), "opset must be an integer, got '18'"),
        (set_field("io", "inputs", {"name": "sample"}), "io.inputs must be a list of tensors"),
    ],
)
def test_bad_field_is_one_line_naming_the_file(bundle, change, message):
    _edit(bundle, change)
    with pytest.raises(DtkError, match=message) as error:
        load_manifest(bundle)
    assert str(error.value).startswith(f"{bundle / 'dtk.json'}: ") and "\n" not in str(error.value)


def test_betas_that_disagree_with_the_config_are_refused(bundle, capsys):
    def scale(data):
        data["diffusion"]["betas"] = [b * 1.5 for b in data["diffusion"]["betas"]]  # still in (0, 1)

    _edit(bundle, scale)
    assert (
        main(["sample", str(bundle), "--num", "1", "--steps", "2", "--out", str(bundle.parent / "g.png")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {bundle / 'dtk.json'}: betas disagree with the schedule config (linear, T=1000)"
    )
    assert len(err.splitlines()) == 1 and not (bundle.parent / "g.png").exists()


def test_betas_after_a_float32_round_trip_are_accepted(bundle):
    def float32(data):
        data["diffusion"]["betas"] = np.asarray(data["diffusion"]["betas"], np.float32).astype(float).tolist()

    _edit(bundle, float32)
    assert load_manifest(bundle).diffusion.num_train_timesteps == 1000


def _other_model(bundle, same_size: bool) -> None:
    onnx_path = bundle / "unet.onnx"
    data = bytearray(onnx_path.read_bytes())
    if same_size:
        data[len(data) // 2] ^= 0xFF  # one weight byte differs: another model of the same architecture
    else:
        data += b"\0" * 16
    onnx_path.write_bytes(bytes(data))


@pytest.mark.parametrize("same_size", [False, True])
def test_replaced_onnx_is_refused_on_load_and_by_inspect(bundle, capsys, same_size):
    _other_model(bundle, same_size)
    problem = "does not match the sha256 the export recorded" if same_size else "bytes, but the export wrote"
    with pytest.raises(DtkError, match=problem):
        Pipeline.load(bundle)
    assert (
        main(["sample", str(bundle), "--num", "1", "--steps", "2", "--out", str(bundle.parent / "g.png")])
        == 1
    )
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {bundle / 'unet.onnx'}: ") and problem in err and len(err.splitlines()) == 1
    )
    assert main(["inspect", str(bundle)]) == 1
    captured = capsys.readouterr()
    assert "matches_export=False" in captured.out
    assert captured.err == (
        f"error: {bundle}: unet.onnx does not match the sha256 the export recorded (not the exported model)\n"
    )


def test_the_hash_is_computed_once_until_the_file_changes(bundle, monkeypatch):
    calls = []
    real = integrity.sha256
    monkeypatch.setattr(integrity, "sha256", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        Pipeline.load(bundle, threads=1).close()
    assert len(calls) == 1
    onnx_path = bundle / "unet.onnx"
    stat = onnx_path.stat()
    os.utime(onnx_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    Pipeline.load(bundle, threads=1).close()
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num": 2.5}, "num must be an integer, got 2.5"),
        ({"num": "4"}, "num must be an integer, got '4'"),
        ({"max_batch": 1.5}, "max_batch must be an integer, got 1.5"),
        ({"eta": "0.5"}, "eta must be a finite number, got '0.5'"),
        ({"steps": 2.0}, "steps must be an integer, got 2.0"),
        ({"sampler": 5}, "sampler must be a sampler name, got 5"),
        ({"callback": 3}, "callback must be callable, got 3"),
    ],
)
def test_sample_argument_types_are_dtk_errors(tiny_bundle, kwargs, message):
    with Pipeline.load(tiny_bundle, threads=1) as pipe, pytest.raises(DtkError, match=message):
        pipe.sample(**{"num": 1, "steps": 2, **kwargs})


def test_load_argument_errors(tiny_bundle):
    with pytest.raises(
        DtkError, match="Pipeline.load takes a bundle directory, .onnx or .plan path, got None"
    ):
        Pipeline.load(None)
    with pytest.raises(
        DtkError, match="unknown option thread for the onnxruntime backend; it takes providers"
    ):
        Pipeline.load(tiny_bundle, thread=1)
