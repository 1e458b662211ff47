"""`export_bundle`: the bundle's files and manifest, fp16, diffusers models, external data, atomicity."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dtk.checkpoint import load_checkpoint
from dtk.export.bundle import ExportOptions, export_bundle
from dtk.runtime.errors import DtkError
from dtk.runtime.files import sha256
from dtk.runtime.manifest import load_manifest


def run(onnx_path, x, t):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"sample": x, "timestep": np.asarray(t, dtype=np.float32)})[0]


def test_tiny_bundle_manifest(tiny_bundle, tiny_checkpoint):
    manifest = load_manifest(tiny_bundle)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["dtk.json", "scheduler_config.json", "unet.onnx"]
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs + manifest.outputs] == [
        ("sample", "float32", ["batch", 1, 16, 16]),
        ("timestep", "float32", ["batch"]),
        ("model_output", "float32", ["batch", 1, 16, 16]),
    ]
    assert manifest.batch == {"min": 1, "opt": 2, "max": 4}
    assert (manifest.precision, manifest.opset, manifest.image_size) == ("fp32", 18, (16, 16))
    assert manifest.source["sha256"] == sha256(tiny_checkpoint)
    assert manifest.export["onnx_sha256"] == sha256(tiny_bundle / "unet.onnx")
    assert manifest.export["simplified"] and manifest.export["nodes"] < manifest.export["nodes_exported"]
    assert "float32 [batch]" in manifest.export["timestep"]
    ckpt = load_checkpoint(tiny_checkpoint)
    assert manifest.model["parameters"] == sum(v.numel() for v in ckpt.model_state.values())
    assert manifest.model["config"] == ckpt.model_config.to_dict()
    np.testing.assert_allclose(manifest.betas, np.linspace(1e-4, 0.02, 1000))

    parity = manifest.parity
    assert parity["verified"] and parity["passed"] and parity["atol"] == 1e-4
    cases = [(c["batch"], c["timesteps"]) for c in parity["cases"]]
    assert cases == [(1, [0]), (1, [500]), (1, [999]), (4, [0, 1, 500, 999])]
    assert max(c["max_abs"] for c in parity["cases"]) < 1e-5  # measured ~6e-7
    assert parity["chain"]["steps"] == 20 and parity["chain"]["passed"]

    model = onnx.load(str(tiny_bundle / "unet.onnx"))
    assert model.opset_import[0].version == 18
    props = {p.key: p.value for p in model.metadata_props}
    assert props["dtk.timestep"].startswith("float32 [batch]")


def test_tiny_bundle_runs_every_batch_in_range(tiny_bundle):
    for batch in (1, 3, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 16, 16), dtype=np.float32)
        out = run(tiny_bundle / "unet.onnx", x, np.arange(batch) * 100.0)
        assert out.shape == x.shape and np.all(np.isfinite(out))


def test_fp16_export_keeps_fragile_ops_in_fp32(tiny_checkpoint, tmp_path):
    manifest = export_bundle(
        tiny_checkpoint,
        tmp_path / "b16",
        ExportOptions(batch=3, precision="fp16", chain_steps=10),
        progress=False,
    )
    assert manifest.precision == "fp16" and manifest.parity["passed"]
    assert manifest.parity["atol"] == 2e-2
    assert all(s.dtype == "float32" for s in manifest.inputs + manifest.outputs)
    assert max(c["max_abs"] for c in manifest.parity["cases"]) < 5e-3  # measured ~3e-4

    model = onnx.load(str(tmp_path / "b16" / "unet.onnx"))
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def out_types(op):
        return Counter(types[n.output[0]] for n in model.graph.node if n.op_type == op)

    assert set(out_types("Conv")) == {fp16}
    for op in ("InstanceNormalization", "Softmax", "Sin", "Cos"):
        assert set(out_types(op)) == {fp32}, op
    producer = {o: n for n in model.graph.node for o in n.output}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):  # QKᵀ and softmax·V in fp32
        assert producer[softmax.input[0]].op_type == "MatMul" and types[softmax.input[0]] == fp32
        readers = [n for n in model.graph.node if softmax.output[0] in n.input]
        assert [n.op_type for n in readers] == ["MatMul"] and types[readers[0].output[0]] == fp32
    # the time MLP (Gemm on the timestep branch) stays fp32; weights of fp16 convs are stored fp16
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {types[w] for w in conv_weights} == {fp16}
    assert manifest.export["fp16"]["fp32_nodes"]["timestep"] > 0
    assert manifest.export["fp16"]["casts"] > 0
    assert types["model_output"] == fp32


def test_diffusers_export_with_external_data(tmp_path, small_unet2d):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = small_unet2d()
    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True
    )
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    options = ExportOptions(batch=(1, 2, 3), external_data=True, chain_steps=10)
    manifest = export_bundle(tmp_path / "pipe", tmp_path / "bundle", options, progress=False)

    bundle = tmp_path / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "dtk.json",
        "scheduler_config.json",
        "unet.onnx",
        "unet.onnx.data",
    ]
    assert manifest.export["external_data"] and manifest.export["onnx_data"] == "unet.onnx.data"
    assert manifest.export["onnx_data_sha256"] == sha256(bundle / "unet.onnx.data")
    assert (bundle / "unet.onnx").stat().st_size < 100_000 < (bundle / "unet.onnx.data").stat().st_size
    d = manifest.diffusion
    assert (d.beta_schedule, d.prediction_type, d.clip_sample) == ("cosine", "v_prediction", True)
    assert (
        manifest.source["kind"] == "diffusers" and manifest.model["architecture"] == "diffusers.UNet2DModel"
    )
    assert manifest.parity["passed"] and max(c["max_abs"] for c in manifest.parity["cases"]) < 1e-5

    # the graph agrees with diffusers itself at a timestep the parity check did not use
    import torch

    x = np.random.default_rng(5).standard_normal((3, 1, 8, 8), dtype=np.float32)
    t = np.array([7.0, 321.0, 654.0], dtype=np.float32)
    with torch.no_grad():
        expected = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    np.testing.assert_allclose(run(bundle / "unet.onnx", x, t), expected, atol=1e-5)


def test_interrupted_export_leaves_nothing_valid(tiny_checkpoint, tmp_path, monkeypatch):
    from dtk.export import onnx_export

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "dtk.json").write_text("{}")  # an earlier bundle (any content) must survive a failed re-export

    def interrupted(module, sample_shape, path, **kwargs):
        path.write_bytes(b"\x08\x09half an onnx file")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint, out, ExportOptions(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial directory left behind
    assert (out / "dtk.json").read_text() == "{}"

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint, fresh, ExportOptions(), progress=False)
    assert not fresh.exists()


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tiny_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DtkError, match="not a dtk bundle; refusing"):
        export_bundle(tiny_checkpoint, tmp_path, ExportOptions(), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "options, problem",
    [
        (ExportOptions(precision="int4"), "unknown precision"),
        (ExportOptions(batch=(4, 2, 8)), "min <= opt <= max"),
        (ExportOptions(batch=0), "min <= opt <= max"),
        (ExportOptions(opset=16), "opset 16 is too old"),
        (ExportOptions(atol=-1.0), "atol must be non-negative"),
        (ExportOptions(weights="best"), "unknown weights"),
    ],
)
def test_bad_options(tiny_checkpoint, tmp_path, options, problem):
    with pytest.raises(DtkError, match=problem):
        export_bundle(tiny_checkpoint, tmp_path / "b", options, progress=False)
    assert not (tmp_path / "b").exists()


def test_manifest_of_an_unknown_schema_version(tiny_bundle, tmp_path):
    data = json.loads((tiny_bundle / "dtk.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "dtk.json").write_text(json.dumps(data))
    with pytest.raises(DtkError, match="schema version 99 is newer than this dtk reads"):
        load_manifest(tmp_path)
