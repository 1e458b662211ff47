"""OnnxRuntimeDenoiser on small hand-built graphs: I/O read from the session, manifest checks, providers,
batch limits, and the IOBinding chain (run here on CPU OrtValues) against the numpy sample loop."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from toy_manifest import toy_manifest

from dtk.runtime.backends.onnxruntime import OnnxRuntimeDenoiser, tensorrt_ep_options, update_graph
from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop
from dtk.runtime.samplers.plan import update

CHW = (1, 4, 4)


def toy_onnx(path, batch="batch", timestep_type="float", names=("sample", "timestep", "model_output")):
    """model_output = 0.5·tanh(sample) + 0.001·t: a graph whose every output value is known in closed form."""
    import onnx
    from onnx import TensorProto, helper

    t_type = {"float": TensorProto.FLOAT, "int64": TensorProto.INT64}[timestep_type]
    sample, timestep, output = names
    nodes = [
        helper.make_node("Tanh", [sample], ["tanh"]),
        helper.make_node("Mul", ["tanh", "half"], ["scaled"]),
        helper.make_node("Cast", [timestep], ["t_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t_float", "column"], ["t_column"]),
        helper.make_node("Mul", ["t_column", "milli"], ["t_scaled"]),
        helper.make_node("Add", ["scaled", "t_scaled"], [output]),
    ]
    initializers = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("milli", TensorProto.FLOAT, [], [0.001]),
        helper.make_tensor("column", TensorProto.INT64, [4], [-1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info(sample, TensorProto.FLOAT, [batch, *CHW]),
            helper.make_tensor_value_info(timestep, t_type, [batch]),
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, *CHW])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return toy_onnx(tmp_path_factory.mktemp("toy") / "unet.onnx")


def expected(x, t):
    return 0.5 * np.tanh(x) + 0.001 * np.asarray(t, dtype=np.float32).reshape(-1, 1, 1, 1)


def test_reads_io_from_the_session_and_computes_the_graph(toy_path):
    with OnnxRuntimeDenoiser(toy_path, toy_manifest(), threads=1) as denoiser:
        assert (denoiser.sample_name, denoiser.timestep_name, denoiser.output_name) == (
            "sample",
            "timestep",
            "model_output",
        )
        assert denoiser.sample_shape == ["batch", 1, 4, 4]
        assert denoiser.timestep_dtype == np.float32
        assert denoiser.batch_range == (1, 4)
        x = np.linspace(-2, 2, 3 * 16).reshape(3, *CHW)  # float64: cast to the graph's float32
        out = denoiser(x, np.array([999.0, 500.0, 0.0]))
        assert out.dtype == np.float32 and out.shape == (3, *CHW)
        np.testing.assert_allclose(out, expected(x, [999, 500, 0]), atol=1e-6)
        assert out[0, 0, 0, 0] == pytest.approx(0.5 * np.tanh(-2.0) + 0.999, abs=1e-6)
        np.testing.assert_allclose(denoiser(x, 250), expected(x, [250] * 3), atol=1e-6)  # scalar broadcast


def test_integer_timesteps_are_made_once_per_batch_and_read_only(toy_path):
    with OnnxRuntimeDenoiser(toy_path, toy_manifest(), threads=1) as denoiser:
        x = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, *CHW)
        for t in (999, 500, 999):
            np.testing.assert_allclose(denoiser(x, t), expected(x, [t, t]), atol=1e-6)
        np.testing.assert_allclose(denoiser(x[:1], 999), expected(x[:1], [999]), atol=1e-6)
        assert sorted(denoiser._timestep_arrays) == [(500, 2), (999, 1), (999, 2)]
        t = denoiser._timesteps(999, 2)
        assert t is denoiser._timesteps(999, 2) and t.dtype == np.float32 and not t.flags.writeable
        assert denoiser._timesteps(np.int64(7), 2).tolist() == [7.0, 7.0]  # other scalars as before


def test_session_options_and_providers_are_explicit(toy_path):
    with OnnxRuntimeDenoiser(toy_path, threads=1) as denoiser:
        options = denoiser.session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.inter_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert denoiser.providers == [("CPUExecutionProvider", {})]
        assert denoiser.session.get_providers() == ["CPUExecutionProvider"]
        assert denoiser.batch_range[0] == 1  # no manifest, symbolic batch: no upper bound from the graph


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP present")
def test_missing_gpu_provider_is_a_clear_error(toy_path):
    with pytest.raises(DtkError, match="'cuda' is not available.*onnxruntime-gpu"):
        OnnxRuntimeDenoiser(toy_path, providers=["cuda", "cpu"])


def test_int64_timestep_is_fed_as_int64(tmp_path):
    path = toy_onnx(tmp_path / "unet.onnx", timestep_type="int64")
    with OnnxRuntimeDenoiser(path, toy_manifest(timestep_dtype="int64"), threads=1) as denoiser:
        assert denoiser.timestep_dtype == np.int64
        x = np.zeros((2, *CHW), dtype=np.float32)
        np.testing.assert_allclose(denoiser(x, np.array([10.0, 20.0])), expected(x, [10, 20]), atol=1e-7)


def test_batch_outside_the_range_is_refused(toy_path):
    with OnnxRuntimeDenoiser(toy_path, toy_manifest(batch=(2, 2, 4)), threads=1) as denoiser:
        for batch in (1, 5):
            with pytest.raises(DtkError, match=rf"batch {batch} is outside the model's batch range \(2..4\)"):
                denoiser(np.zeros((batch, *CHW), np.float32), 1)


def test_fixed_batch_graph(tmp_path):
    path = toy_onnx(tmp_path / "unet.onnx", batch=2)
    with OnnxRuntimeDenoiser(path, toy_manifest(batch=(2, 2, 2)), threads=1) as denoiser:
        assert denoiser.batch_range == (2, 2)
        with pytest.raises(DtkError, match=r"batch 3 is outside the model's batch range \(exactly 2\)"):
            denoiser(np.zeros((3, *CHW), np.float32), 1)
    with pytest.raises(DtkError, match="fixed batch 2 but dtk.json says 1..4"):
        OnnxRuntimeDenoiser(path, toy_manifest(batch=(1, 2, 4)))


def test_wrong_sample_shape_is_refused(toy_path):
    with (
        OnnxRuntimeDenoiser(toy_path, threads=1) as denoiser,
        pytest.raises(DtkError, match=r"\[B, 1, 4, 4\]"),
    ):
        denoiser(np.zeros((1, 1, 8, 8), np.float32), 1)


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (toy_manifest(timestep_dtype="int64"), "timestep is float32, dtk.json says int64"),
        (toy_manifest(chw=(3, 4, 4)), r"sample is \[1, 4, 4\] per image, dtk.json says \[3, 4, 4\]"),
    ],
)
def test_manifest_mismatch_names_the_file(toy_path, manifest, problem):
    with pytest.raises(DtkError, match=rf"unet.onnx: does not match dtk.json: .*{problem}"):
        OnnxRuntimeDenoiser(toy_path, manifest)


def test_renamed_tensor_does_not_match_the_manifest(tmp_path):
    path = toy_onnx(tmp_path / "unet.onnx", names=("x", "t", "eps"))
    with pytest.raises(DtkError, match="no tensor named 'sample'"):
        OnnxRuntimeDenoiser(path, toy_manifest())
    with OnnxRuntimeDenoiser(path, threads=1) as denoiser:  # without a manifest the graph's names are used
        assert (denoiser.sample_name, denoiser.timestep_name, denoiser.output_name) == ("x", "t", "eps")


def test_bad_files(tmp_path):
    with pytest.raises(DtkError, match="no such ONNX file"):
        OnnxRuntimeDenoiser(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(DtkError, match="garbage.onnx: ONNX Runtime cannot load it"):
        OnnxRuntimeDenoiser(garbage)


def test_closed_denoiser_refuses_calls(toy_path):
    denoiser = OnnxRuntimeDenoiser(toy_path, threads=1)
    denoiser.close()
    with pytest.raises(DtkError, match="closed"):
        denoiser(np.zeros((1, *CHW), np.float32), 1)


def test_update_graph_is_the_sampler_update():
    import onnx

    onnx.checker.check_model(onnx.load_from_string(update_graph()), full_check=True)
    session = ort.InferenceSession(update_graph(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x, out, x0_prev, noise = (rng.standard_normal((2, *CHW)).astype(np.float32) for _ in range(4))
    row = np.array([1.3, -0.7, 0.9, 0.2, -0.4, 0.1, 0.05])
    for clip in (None, 0.5):
        bound = np.array(clip or np.finfo(np.float32).max, dtype=np.float32)
        feed = {
            "x": x,
            "out": out,
            "x0_prev": x0_prev,
            "noise": noise,
            "clip_min": np.array(-bound),
            "clip_max": bound,
        }
        feed.update({name: np.array(v, dtype=np.float32) for name, v in zip("pqabcde", row, strict=True)})
        x_next, x0 = session.run(["x_next", "x0"], feed)
        want_next, want_x0 = update(row, x, out, x0_prev, noise, clip)
        np.testing.assert_allclose(x0, want_x0, atol=1e-6)
        np.testing.assert_allclose(x_next, want_next, atol=1e-6)
    assert np.abs(x0).max() == pytest.approx(0.5)  # the last pass clipped


@pytest.mark.parametrize(("sampler", "clip_sample"), [("ddpm", True), ("ddim", False), ("dpmpp-2m", False)])
def test_bound_chain_matches_the_numpy_loop(toy_path, sampler, clip_sample):
    manifest = toy_manifest(clip_sample=clip_sample)
    plan = make_plan(sampler, manifest.diffusion, 8)

    def chain(io_binding):
        source, steps = NoiseSource(3), []
        with OnnxRuntimeDenoiser(toy_path, manifest, threads=1, io_binding=io_binding) as denoiser:
            out = denoiser.run_chain(
                plan, source.initial(3, CHW), lambda i: source.step(3, CHW), lambda i, t, x: steps.append(t)
            )
        assert steps == list(plan.timesteps)
        return out

    results = [chain(False), chain(True)]
    source = NoiseSource(3)
    reference = sample_loop(
        lambda x, t: expected(x, [t] * len(x)), source.initial(3, CHW), plan, lambda i: source.step(3, CHW)
    )
    np.testing.assert_allclose(results[0], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert results[1].dtype == np.float32 and np.abs(results[1]).max() > 0.1


def test_tensorrt_ep_profile_covers_the_manifest_batch_range(toy_path):
    options = tensorrt_ep_options(toy_manifest(batch=(1, 2, 4)), toy_path)
    assert options["trt_profile_min_shapes"] == "sample:1x1x4x4,timestep:1"
    assert options["trt_profile_opt_shapes"] == "sample:2x1x4x4,timestep:2"
    assert options["trt_profile_max_shapes"] == "sample:4x1x4x4,timestep:4"
    assert options["trt_engine_cache_path"] == str(toy_path.parent / "ort_trt_cache")


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu"
)
def test_cuda_chain_matches_cpu(toy_path):
    manifest = toy_manifest()
    plan = make_plan("ddpm", manifest.diffusion, 10)
    results = []
    for providers in (["cpu"], ["cuda"]):
        source = NoiseSource(1)
        with OnnxRuntimeDenoiser(toy_path, manifest, providers=providers) as denoiser:
            assert denoiser.io_binding == (providers == ["cuda"])
            results.append(
                denoiser.run_chain(plan, source.initial(4, CHW), lambda i, s=source: s.step(4, CHW))
            )
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_the_update_session_takes_the_cuda_ep_where_the_tensorrt_ep_was():
    """providers tensorrt (or tensorrt,cpu): without the CUDA EP the update would run on the CPU and copy the
    sample device→host→device every step."""
    from dtk.runtime.backends.onnxruntime import update_providers

    trt = ("TensorrtExecutionProvider", {"device_id": 1, "trt_engine_cache_enable": True})
    cpu = ("CPUExecutionProvider", {})
    cuda = ("CUDAExecutionProvider", {"device_id": 1})
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert update_providers([trt], gpu_build, 1) == [cuda]
    assert update_providers([trt, cpu], gpu_build, 1) == [cuda, cpu]
    assert update_providers([trt, ("CUDAExecutionProvider", {"device_id": 1}), cpu], gpu_build, 1) == [
        cuda,
        cpu,
    ]
    assert update_providers([trt, cpu], ["TensorrtExecutionProvider", "CPUExecutionProvider"], 1) == [cpu]
    assert update_providers([cpu], gpu_build, 0) == [cpu]
