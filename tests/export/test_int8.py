"""`dtk export --precision int8`: calibration, Q/DQ placement, the checks against fp32, manifest, inspect."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from tiny_training import tiny_train_config

from dtk.cli import main
from dtk.export import calibration as calibration_module
from dtk.export.bundle import ExportOptions, export_bundle
from dtk.export.calibration import noised_inputs, stratified_timesteps
from dtk.export.int8_checks import CHAIN_MEAN_ABS, pooled_features
from dtk.runtime.errors import DtkError
from dtk.runtime.manifest import load_manifest
from dtk.runtime.schedule import DiffusionConfig

# float outputs: this 45k-parameter model's images move by 4.6/255 with int8 outputs (1.7/255 with float
# ones); the 0.7M-parameter digits model passes with int8 outputs (benchmarks/results/int8_sensitivity.json)
INT8 = dict(precision="int8", batch=(1, 8, 16), calibration_size=64, check_samples=64, int8_outputs="float")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from dtk.train import train

    # enough steps, larger batches and a faster EMA than the other tests' runs: this model draws digits
    out = tmp_path_factory.mktemp("digits") / "run"
    return train(tiny_train_config(out, steps=300, batch_size=32, lr=3e-3, warmup_steps=20, ema_decay=0.99))


@pytest.fixture(scope="module")
def int8_bundle(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    export_bundle(digits_checkpoint, out, ExportOptions(**INT8), progress=False)
    return out


def test_stratified_timesteps_cover_the_whole_schedule():
    t = stratified_timesteps(10, 1000, np.random.default_rng(0))
    assert sorted(t // 100) == list(range(10))  # one per tenth of the schedule
    assert len(set(t)) == 10 and t.min() >= 0 and t.max() <= 999
    assert list(t) != sorted(t)  # shuffled, so batches mix timesteps


def test_noised_inputs_follow_the_closed_form_forward_process():
    images = np.linspace(-1, 1, 4 * 16, dtype=np.float32).reshape(4, 1, 4, 4)
    config = DiffusionConfig()
    x_t, t = noised_inputs(images, config, 4, seed=3)
    rng = np.random.default_rng(3)
    chosen = rng.choice(4, 4, replace=False)
    expected_t = stratified_timesteps(4, 1000, rng)
    noise = rng.standard_normal((4, 1, 4, 4), dtype=np.float32)
    abar = config.alphas_cumprod[expected_t].reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(t, expected_t.astype(np.float32))
    np.testing.assert_allclose(x_t, np.sqrt(abar) * images[chosen] + np.sqrt(1 - abar) * noise, atol=1e-6)


def test_pooled_features():
    images = np.arange(2 * 1 * 16 * 16, dtype=np.float64).reshape(2, 1, 16, 16)
    features = pooled_features(images)
    assert features.shape == (2, 64)
    assert features[0, 0] == pytest.approx(images[0, 0, :2, :2].mean())
    rgb = np.stack([images[:, 0]] * 3, axis=1)  # colour is averaged to one plane: at most 64 features
    np.testing.assert_allclose(pooled_features(rgb), features)
    assert pooled_features(np.zeros((3, 1, 6, 6))).shape == (3, 36)  # 6 is its own largest divisor ≤ 8


def test_int8_graph_has_qdq_on_the_convolutions_and_not_on_the_float_layers(int8_bundle):
    manifest = load_manifest(int8_bundle)
    model = onnx.load(str(int8_bundle / "unet.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    kept = manifest.quantization["kept_float"]
    float_names = {name for names in kept.values() for name in names}
    assert len(kept["first_conv"]) == 1 and len(kept["last_conv"]) == 1
    assert kept["timestep_embedding"] and kept["attention"] and kept["group_norm"]

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        quantized = conv.input[0] in dq_outputs and conv.input[1] in dq_outputs
        assert quantized == (conv.name not in float_names), conv.name
    for name in float_names:
        assert not dq_outputs.intersection(nodes[name].input), name
    assert manifest.quantization["quantized_ops"]["Conv"] == len(convs) - 2
    initializer_types = {t.name: t.data_type for t in model.graph.initializer}
    weights = [initializer_types.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert onnx.TensorProto.INT8 in weights  # weights stored as int8
    zero_points = [
        onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("zero_point")
    ]
    assert zero_points and all(not z.any() for z in zero_points)  # symmetric: TensorRT's requirement


def test_int8_manifest_records_calibration_and_checks(int8_bundle, digits_checkpoint):
    manifest = load_manifest(int8_bundle)
    assert manifest.precision == "int8" and manifest.source["dataset"] == "digits"
    q = manifest.quantization
    calibration = q["calibration"]
    assert (calibration["data"], calibration["size"], calibration["method"]) == ("digits", 64, "minmax")
    assert calibration["dataset_images"] == 1797
    checks = q["checks"]
    assert checks["verified"] and checks["passed"] and checks["samples"] == 64
    assert checks["chain"]["bound_255"] == pytest.approx(4.0)
    assert 0 < checks["chain_mean_abs"] <= CHAIN_MEAN_ABS
    assert checks["fd_int8"] <= checks["quality"]["bound"]
    assert manifest.parity["passed"] and manifest.parity["precision"] == "fp32"  # the graph before int8


def test_int8_bundle_samples_through_the_torch_free_runtime(int8_bundle, tmp_path):
    child = textwrap.dedent(
        """
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx") or name.startswith("dtk.export"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Refuse())
        import numpy as np
        from dtk.runtime import Pipeline
        with Pipeline.load(sys.argv[1], threads=1) as pipe:
            np.save(sys.argv[2], pipe.sample(num=4, steps=10, sampler="ddim", seed=1))
        """
    )
    out = tmp_path / "images.npy"
    run = subprocess.run(
        [sys.executable, "-c", child, str(int8_bundle), str(out)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    images = np.load(out)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 20  # digits: dark background, bright strokes


def test_inspect_shows_calibration_and_checks(int8_bundle, capsys):
    assert main(["inspect", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert "precision: int8" in out and "quantization:" in out
    assert "data: digits" in out and "method: minmax" in out and "size: 64" in out
    assert "images: mean |Δ|" in out and "≤ 4/255" in out and "Fréchet distance int8" in out
    assert main(["inspect", str(int8_bundle / "unet.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"


def test_calibration_on_zeros_fails_the_export_and_writes_nothing(
    digits_checkpoint, tmp_path, monkeypatch, capsys
):
    def zeros(images, diffusion, size, seed):
        x_t, t = noised_inputs(images, diffusion, size, seed)
        return np.zeros_like(x_t), np.zeros_like(t)

    monkeypatch.setattr(calibration_module, "noised_inputs", zeros)
    out = tmp_path / "bundle"
    args = ["export", str(digits_checkpoint), "-o", str(out), "--precision", "int8", "--no-progress"]
    code = main([*args, "--batch", "1:8:16", "--calibration-size", "64", "--int8-outputs", "float"])
    captured = capsys.readouterr()
    assert code != 0 and "error: int8 check failed: images differ from fp32's by" in captured.err
    chain = next(line for line in captured.out.splitlines() if line.strip().startswith("images"))
    assert chain.endswith("FAIL") and float(chain.split("|Δ|")[1].split("/255")[0]) > 255 * CHAIN_MEAN_ABS
    assert "Traceback" not in captured.err and not out.exists() and list(tmp_path.iterdir()) == []


def test_default_int8_outputs_feed_the_float_paths_from_int8(digits_checkpoint, tmp_path):
    """The default graph (what ONNX Runtime's CPU int8 kernels need) also quantizes convolution outputs."""
    out = tmp_path / "bundle"
    options = ExportOptions(precision="int8", batch=(1, 8, 16), calibration_size=16, verify=False)
    manifest = export_bundle(digits_checkpoint, out, options, progress=False)
    q = manifest.quantization
    assert q["outputs"] == "int8" and q["checks"] == {"verified": False, "reason": "--no-verify"}
    assert q["quantized_ops"]["Add"] > 0  # residual adds read convolution outputs back from int8
    assert q["qdq_nodes"]["QuantizeLinear"] > q["quantized_ops"]["Conv"]
    assert load_manifest(out).quantization == q


def test_calibration_data_problems(digits_checkpoint, tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 0).save(flat / f"{i}.png")
    out = tmp_path / "bundle"
    args = ["export", str(digits_checkpoint), "-o", str(out), "--precision", "int8", "--no-progress"]
    assert main([*args, "--calibration-data", str(flat)]) != 0
    assert "every calibration image is the same flat colour" in capsys.readouterr().err
    assert main([*args, "--calibration-data", str(tmp_path / "missing")]) != 0
    assert "no such dataset folder" in capsys.readouterr().err
    with pytest.raises(DtkError, match="records no training dataset; give the calibration images"):
        export_bundle(tiny_checkpoint, out, ExportOptions(**INT8), progress=False)
    with pytest.raises(DtkError, match="unknown calibration method"):
        export_bundle(tiny_checkpoint, out, ExportOptions(**INT8, calibration_method="guess"))
    assert not out.exists()


def test_manifest_refuses_int8_without_a_quantization_section(int8_bundle, tmp_path):
    data = json.loads((int8_bundle / "dtk.json").read_text())
    del data["quantization"]
    (tmp_path / "dtk.json").write_text(json.dumps(data))
    with pytest.raises(DtkError, match="an int8 bundle needs a quantization section"):
        load_manifest(tmp_path)
