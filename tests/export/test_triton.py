"""Triton model repositories: the config parses as Triton's ModelConfig and says what the bundle is."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest

from dtk.export.triton import (
    SAMPLER_SOURCE,
    SamplerOptions,
    TritonOptions,
    render_pbtxt,
    sampler_config,
    triton_config,
    write_sampler_model,
    write_serving_repository,
    write_triton_repository,
)
from dtk.runtime.errors import DtkError
from dtk.runtime.files import sha256
from dtk.runtime.manifest import load_manifest


def model_config_proto():
    """Triton's ModelConfig from tritonclient's generated model_config_pb2, or None when not installed.

    Loaded by path: `import tritonclient.grpc` would also import grpcio, which the proto does not need."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("dtk_tests_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def parse(text: str):
    message = model_config_proto()
    if message is None:
        pytest.skip("tritonclient is not installed; the explicit field checks above still ran")
    from google.protobuf import text_format

    return text_format.Parse(text, message())


def test_dynamic_batch_config(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    config = triton_config(manifest, TritonOptions(instances=2))
    # every field, explicitly
    assert config["name"] == "dtk_unet" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 4
    assert config["input"] == [
        {"name": "sample", "data_type": "TYPE_FP32", "dims": [1, 16, 16]},
        {"name": "timestep", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}},
    ]
    assert config["output"] == [{"name": "model_output", "data_type": "TYPE_FP32", "dims": [1, 16, 16]}]
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert config["dynamic_batching"] == {"preferred_batch_size": [2, 4], "max_queue_delay_microseconds": 100}
    (warmup,) = config["model_warmup"]
    assert warmup["batch_size"] == 4
    assert warmup["inputs"] == [
        {"key": "sample", "value": {"data_type": "TYPE_FP32", "dims": [1, 16, 16], "random_data": True}},
        {"key": "timestep", "value": {"data_type": "TYPE_FP32", "dims": [1], "zero_data": True}},
    ]

    parsed = parse(render_pbtxt(config))
    assert parsed.name == "dtk_unet" and parsed.platform == "onnxruntime_onnx" and parsed.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in parsed.input] == [
        ("sample", 11, [1, 16, 16]),  # 11 = TYPE_FP32
        ("timestep", 11, [1]),
    ]
    assert parsed.input[1].HasField("reshape") and list(parsed.input[1].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in parsed.output] == [("model_output", [1, 16, 16])]
    assert parsed.instance_group[0].count == 2 and parsed.instance_group[0].kind == 1  # KIND_GPU
    assert list(parsed.dynamic_batching.preferred_batch_size) == [2, 4]
    assert parsed.model_warmup[0].batch_size == 4
    assert parsed.model_warmup[0].inputs["sample"].random_data
    assert parsed.model_warmup[0].inputs["timestep"].zero_data


def test_fixed_batch_config(tiny_bundle):
    manifest = dataclasses.replace(load_manifest(tiny_bundle), batch={"min": 2, "opt": 2, "max": 2})
    manifest.inputs[0].shape = [2, 1, 16, 16]
    manifest.inputs[1].shape = [2]
    manifest.outputs[0].shape = [2, 1, 16, 16]
    config = triton_config(manifest, TritonOptions(kind="cpu", warmup=True))
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert [i["dims"] for i in config["input"]] == [[2, 1, 16, 16], [2]]
    assert "reshape" not in config["input"][1]
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert config["model_warmup"][0]["batch_size"] == 1  # Triton: 1 for models without batching
    parsed = parse(render_pbtxt(config))
    assert parsed.max_batch_size == 0 and list(parsed.input[0].dims) == [2, 1, 16, 16]
    assert parsed.instance_group[0].kind == 2  # KIND_CPU


def test_repository_layout(tiny_bundle, tmp_path):
    model_dir = write_triton_repository(tiny_bundle, tmp_path / "repo", TritonOptions(name="digits"))
    assert model_dir == tmp_path / "repo" / "digits"
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "dtk.json",
    ]
    assert sha256(model_dir / "1" / "model.onnx") == sha256(tiny_bundle / "unet.onnx")
    assert parse((model_dir / "config.pbtxt").read_text()).name == "digits"
    # writing again replaces the model directory in place
    write_triton_repository(tiny_bundle, tmp_path / "repo", TritonOptions(name="digits", instances=3))
    assert "count: 3" in (model_dir / "config.pbtxt").read_text()


def test_plan_needs_a_plan_and_a_gpu(tiny_bundle, tmp_path):
    with pytest.raises(DtkError, match="has no TensorRT plan"):
        write_triton_repository(tiny_bundle, tmp_path / "repo", TritonOptions(model="plan"))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = load_manifest(bundle)
    manifest.plan = "unet.plan"
    manifest.save(bundle)
    (bundle / "unet.plan").write_bytes(b"engine bytes")
    model_dir = write_triton_repository(bundle, tmp_path / "repo")  # auto picks the plan
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert 'platform: "tensorrt_plan"' in (model_dir / "config.pbtxt").read_text()
    with pytest.raises(DtkError, match="GPU only"):
        write_triton_repository(bundle, tmp_path / "repo", TritonOptions(kind="cpu"))


def test_batch_range_must_start_at_one(tiny_bundle):
    manifest = dataclasses.replace(load_manifest(tiny_bundle), batch={"min": 2, "opt": 2, "max": 4})
    with pytest.raises(DtkError, match="export with --batch 1:OPT:MAX for Triton"):
        triton_config(manifest, TritonOptions())


def test_refuses_to_replace_other_directories(tiny_bundle, tmp_path):
    (tmp_path / "repo" / "dtk_unet").mkdir(parents=True)
    (tmp_path / "repo" / "dtk_unet" / "mine.txt").write_text("x")
    with pytest.raises(DtkError, match="not a Triton model directory"):
        write_triton_repository(tiny_bundle, tmp_path / "repo")


def test_sampler_config(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    config = sampler_config(manifest, SamplerOptions(steps=20, sampler="dpmpp-2m", instances=2))
    assert config["name"] == "dtk_sampler" and config["backend"] == "python"
    assert config["max_batch_size"] == 4  # the bundle's largest batch
    assert config["input"] == [
        {"name": "seed", "data_type": "TYPE_INT64", "dims": [1]},
        {"name": "steps", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
        {"name": "eta", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    ]
    assert config["output"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [16, 16, 1]}]
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}
    parameters = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
    assert parameters == {
        "bundle": "bundle",
        "default_steps": "20",
        "default_sampler": "dpmpp-2m",
        "backend": "auto",
        "threads": "0",
        "cuda_graph": "false",
    }
    parsed = parse(render_pbtxt(config))
    assert parsed.backend == "python" and parsed.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in parsed.input] == [
        ("seed", 9, [1], False),  # 9 = TYPE_INT64
        ("steps", 8, [1], True),  # 8 = TYPE_INT32
        ("eta", 11, [1], True),
    ]
    assert parsed.output[0].data_type == 2 and list(parsed.output[0].dims) == [16, 16, 1]  # 2 = TYPE_UINT8
    assert parsed.parameters["default_sampler"].string_value == "dpmpp-2m"
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000


def test_a_conditional_sampler_takes_labels_and_the_scale(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    classes = {"num_classes": 3, "names": ["a", "b", "c"], "null_class": 3}
    config = sampler_config(dataclasses.replace(manifest, classes=classes), SamplerOptions())
    assert config["input"][3:] == [
        {"name": "class_label", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
        {"name": "guidance_scale", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    ]
    parsed = parse(render_pbtxt(config))
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in parsed.input][3:] == [
        ("class_label", 9, [1], True),
        ("guidance_scale", 11, [1], True),
    ]
    unconditional = sampler_config(manifest, SamplerOptions())
    assert [i["name"] for i in unconditional["input"]] == ["seed", "steps", "eta"]  # as before


def sampler_model(monkeypatch):
    """model.py of `dtk_sampler`, imported outside Triton: the grouping helpers need no pb_utils."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("pb_utils"))
    spec = importlib.util.spec_from_file_location("dtk_tests_triton_sampler_model", SAMPLER_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requests_group_by_settings_with_labels_per_image(monkeypatch):
    """(sampler, steps, eta, scale) make one run; labels differ inside it (one per image, concatenated), a
    request without labels giving None entries (the null class); a run of unlabelled requests only (an
    unconditional bundle's) passes labels=None."""
    sampling_runs = sampler_model(monkeypatch).sampling_runs
    guided, plain = ("ddim", 4, 0.0, 3.0), ("ddim", 4, 0.0, 1.0)
    read = [
        (0, guided, [1, 2], [0, 2]),
        (1, plain, [3], None),
        (2, guided, [4], None),
        (3, guided, [5], [1]),
        (4, plain, [6], [2]),
        (5, plain, [7], None),
    ]
    assert sampling_runs(read) == [
        (guided, [(0, [1, 2], [0, 2]), (2, [4], None), (3, [5], [1])], [0, 2, None, 1]),
        (plain, [(1, [3], None), (4, [6], [2]), (5, [7], None)], [None, 2, None]),
    ]
    unconditional = [(0, plain, [1, 2], None), (1, guided, [3], None), (2, plain, [4], None)]
    assert sampling_runs(unconditional) == [
        (plain, [(0, [1, 2], None), (2, [4], None)], None),
        (guided, [(1, [3], None)], None),
    ]
    assert sampling_runs([]) == []


def test_sampler_defaults_are_checked(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    with pytest.raises(DtkError, match="steps must be between 1 and num_train_timesteps"):
        sampler_config(manifest, SamplerOptions(steps=5000))
    with pytest.raises(DtkError, match="unknown sampler 'plms'"):
        sampler_config(manifest, SamplerOptions(sampler="plms"))
    with pytest.raises(DtkError, match="instance kind"):
        sampler_config(manifest, SamplerOptions(kind="tpu"))


def test_serving_repository_holds_both_models(tiny_bundle, tmp_path):
    sampler_dir, unet_dir = write_serving_repository(
        tiny_bundle, tmp_path / "repo", SamplerOptions(), TritonOptions(kind="cpu")
    )
    assert (sampler_dir.name, unet_dir.name) == ("dtk_sampler", "dtk_unet")
    assert sorted(str(p.relative_to(sampler_dir)) for p in sampler_dir.rglob("*")) == [
        "1",
        "1/bundle",
        "1/bundle/dtk.json",
        "1/bundle/unet.onnx",
        "1/model.py",
        "config.pbtxt",
    ]
    assert (sampler_dir / "1" / "model.py").read_text() == SAMPLER_SOURCE.read_text()
    assert sha256(sampler_dir / "1" / "bundle" / "unet.onnx") == sha256(tiny_bundle / "unet.onnx")
    assert parse((sampler_dir / "config.pbtxt").read_text()).name == "dtk_sampler"
    (tmp_path / "repo" / "other").mkdir()  # not ours: refused, not replaced
    with pytest.raises(DtkError, match="not a Triton model directory"):
        write_sampler_model(tiny_bundle, tmp_path / "repo", SamplerOptions(name="other"))


def test_sampler_model_carries_every_engine(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    for name in ("unet.plan", "unet.plan.json", "unet-orin.plan", "unet-orin.plan.json"):
        (bundle / name).write_bytes(name.encode())
    model_dir = write_sampler_model(bundle, tmp_path / "repo")
    copied = sorted(p.name for p in (model_dir / "1" / "bundle").iterdir())
    assert copied == sorted(
        ["dtk.json", "unet.onnx", "unet.plan", "unet.plan.json", "unet-orin.plan", "unet-orin.plan.json"]
    )
    assert (model_dir / "1" / "bundle" / "unet-orin.plan").read_bytes() == b"unet-orin.plan"
