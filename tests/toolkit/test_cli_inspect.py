"""`dtk inspect`: checkpoints, bundles and .onnx files as text or JSON; broken files as one error line."""

from __future__ import annotations

import json

from dtk.cli import main


def test_checkpoint(tiny_checkpoint, capsys):
    assert main(["inspect", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "dtk checkpoint" and info["image_shape"] == [1, 16, 16]
    assert info["schedule"]["num_train_timesteps"] == 1000


def test_bundle_text(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "kind: dtk bundle" in out
    assert "sample: float32 [batch, 1, 16, 16]" in out and "timestep: float32 [batch]" in out
    assert "precision: fp32" in out and "opset: 18" in out and "beta_schedule: linear" in out
    assert "passed: True" in out and "name=unet.onnx" in out and "matches_export=True" in out


def test_onnx_json(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle / "unet.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx" and [i["name"] for i in info["inputs"]] == ["sample", "timestep"]


def test_broken_files_are_one_error_line(tiny_bundle, tmp_path, capsys):
    truncated = tmp_path / "unet.onnx"
    truncated.write_bytes((tiny_bundle / "unet.onnx").read_bytes()[:5000])
    assert main(["inspect", str(truncated)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {truncated}: not a valid ONNX model: truncated or corrupt (DecodeError); re-export it\n"
    )

    manifest = json.loads((tiny_bundle / "dtk.json").read_text())
    manifest["schema_version"] = 2
    (tmp_path / "dtk.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(tmp_path)]) == 1
    assert "schema version 2 is newer than this dtk reads (1); upgrade dtk" in capsys.readouterr().err

    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["inspect", str(junk)]) == 1
    assert "not a dtk checkpoint" in capsys.readouterr().err
