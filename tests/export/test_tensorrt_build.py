"""`build_engine` / `dtk build-engine`: the TensorRT 10 vs 11 split, profiles, limits, caches and errors.

Everything but the last test runs against a fake `tensorrt` module and a fake GPU (tests/runtime/fake_gpu.py)
that record what dtk asks of them. The last test builds a real engine and compares it with ONNX Runtime; it is
skipped where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import fake_gpu
import numpy as np
import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.files import sha256
from dtk.runtime.manifest import load_manifest


@pytest.fixture
def gpu(monkeypatch):
    from dtk.runtime.backends import cuda

    fake = fake_gpu.FakeGpu(name="NVIDIA Jetson Fake", compute_capability=(8, 7))
    monkeypatch.setattr(cuda, "_load_bindings", lambda: cuda.Bindings(fake.runtime, fake.driver, fake.nvrtc))
    return fake


def _tensorrt(monkeypatch, gpu, version):
    trt = fake_gpu.fake_tensorrt(gpu, version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture
def trt10(monkeypatch, gpu):
    return _tensorrt(monkeypatch, gpu, "10.3.0")


@pytest.fixture
def trt11(monkeypatch, gpu):
    return _tensorrt(monkeypatch, gpu, "11.0.0")


def _build(bundle, progress=False, **options):
    from dtk.export.tensorrt import EngineOptions, build_engine

    return build_engine(bundle, EngineOptions(**options), progress=progress)


def _bundle(tmp_path, **kwargs):
    return fake_gpu.write_fake_bundle(tmp_path / "bundle", **kwargs)


def test_tensorrt10_takes_fp16_as_a_builder_flag_with_the_batch_profile(tmp_path, trt10):
    bundle = _bundle(tmp_path, batch=(1, 2, 4), channels=3, size=8)
    plan = _build(bundle, precision="fp16", workspace=256, opt_level=5)

    (build,) = trt10._builds
    config = build["config"]
    assert build["network_flags"] == 0  # weakly typed
    assert trt10.BuilderFlag.FP16 in config._flags
    assert trt10.BuilderFlag.TF32 in config._flags  # TensorRT's default, untouched for fp16
    assert config._pool_limits == {trt10.MemoryPoolType.WORKSPACE: 256 * 2**20}
    assert config.builder_optimization_level == 5
    assert config.hardware_compatibility_level == trt10.HardwareCompatibilityLevel.NONE
    assert build["profile"] == {
        "sample": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)),
        "timestep": ((1,), (2,), (4,)),
    }

    assert plan == bundle / "unet.plan"
    sidecar = json.loads((bundle / "unet.plan.json").read_text())
    assert sidecar["tensorrt_version"] == "10.3.0"
    assert sidecar["gpu_name"] == "NVIDIA Jetson Fake"
    assert sidecar["compute_capability"] == [8, 7]
    assert sidecar["precision"] == "fp16"
    assert sidecar["strongly_typed"] is False
    assert sidecar["profiles"] == [
        {
            "sample": {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]},
            "timestep": {"min": [1], "opt": [2], "max": [4]},
        }
    ]
    assert sidecar["onnx_sha256"] == sha256(bundle / "unet.onnx")
    assert sidecar["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert sidecar["build"]["workspace"] == 256 and sidecar["build"]["opt_level"] == 5
    assert load_manifest(bundle).plan == "unet.plan"


def test_tensorrt10_fp32_is_plain_fp32(tmp_path, trt10):
    _build(_bundle(tmp_path))
    config = trt10._builds[0]["config"]
    assert trt10.BuilderFlag.FP16 not in config._flags
    assert trt10.BuilderFlag.TF32 not in config._flags  # cleared: fp32 parity with ONNX Runtime
    assert config._pool_limits == {}  # no --workspace: TensorRT's own default
    assert config.builder_optimization_level == 3


def test_tensorrt11_builds_strongly_typed_with_the_onnx_precision(tmp_path, trt11):
    bundle = _bundle(tmp_path, precision="fp16")
    _build(bundle)  # the fake 11 has no BuilderFlag.FP16: touching it would raise AttributeError

    (build,) = trt11._builds
    assert build["network_flags"] == 1 << int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert not hasattr(trt11.BuilderFlag, "FP16")
    sidecar = json.loads((bundle / "unet.plan.json").read_text())
    assert sidecar["precision"] == "fp16"
    assert sidecar["strongly_typed"] is True
    assert sidecar["tensorrt_version"] == "11.0.0"


def test_tensorrt11_refuses_a_precision_the_onnx_does_not_have(tmp_path, trt11):
    bundle = _bundle(tmp_path, precision="fp32")
    with pytest.raises(DtkError, match=r"TensorRT 11 builds strongly typed.*dtk export --precision fp16"):
        _build(bundle, precision="fp16")
    assert not (bundle / "unet.plan").exists()
    assert trt11._builds == []


def test_strongly_typed_on_tensorrt10_sets_the_flag_and_no_precision_flag(tmp_path, trt10):
    _build(_bundle(tmp_path, precision="fp16"), strongly_typed=True)
    build = trt10._builds[0]
    assert build["network_flags"] == 1 << int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 2
    assert trt10.BuilderFlag.FP16 not in build["config"]._flags


def _int8_bundle(tmp_path):
    """A fake bundle whose manifest says int8, with the quantization section an int8 manifest must have."""
    bundle = _bundle(tmp_path, precision="int8")
    data = json.loads((bundle / "dtk.json").read_text())
    data["quantization"] = {"format": "QDQ", "checks": {"verified": False, "reason": "fake"}}
    (bundle / "dtk.json").write_text(json.dumps(data))
    return bundle


def test_tensorrt10_builds_an_int8_bundle_with_the_int8_flag_and_no_calibrator(tmp_path, trt10):
    bundle = _int8_bundle(tmp_path)
    _build(bundle)
    (build,) = trt10._builds
    assert build["network_flags"] == 0  # weakly typed: the Q/DQ layers need the INT8 flag
    assert trt10.BuilderFlag.INT8 in build["config"]._flags
    assert trt10.BuilderFlag.FP16 not in build["config"]._flags
    assert not hasattr(build["config"], "int8_calibrator")  # explicit quantization: scales are in the graph
    assert json.loads((bundle / "unet.plan.json").read_text())["precision"] == "int8"


def test_strongly_typed_int8_builds_need_no_precision_flag(tmp_path, trt10, monkeypatch, gpu):
    _build(_int8_bundle(tmp_path), strongly_typed=True)
    assert trt10.BuilderFlag.INT8 not in trt10._builds[0]["config"]._flags
    trt11 = _tensorrt(monkeypatch, gpu, "11.0.0")  # the fake 11 has no INT8 flag: touching it would raise
    bundle = _int8_bundle(tmp_path / "11")
    _build(bundle)
    assert trt11._builds[0]["network_flags"] == 1 << int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert json.loads((bundle / "unet.plan.json").read_text())["strongly_typed"] is True


def test_int8_engines_come_only_from_int8_bundles(tmp_path, trt10):
    with pytest.raises(DtkError, match=r"an int8 engine cannot come from this fp32 bundle.*--precision int8"):
        _build(_bundle(tmp_path / "fp32"), precision="int8")
    with pytest.raises(DtkError, match=r"an fp16 engine cannot come from this int8 bundle"):
        _build(_int8_bundle(tmp_path / "int8"), precision="fp16")
    assert trt10._builds == []


def test_compatibility_options_reach_the_config_and_the_sidecar(tmp_path, trt10):
    bundle = _bundle(tmp_path)
    _build(bundle, hardware_compat="ampere+", version_compat=True)
    config = trt10._builds[0]["config"]
    assert config.hardware_compatibility_level == trt10.HardwareCompatibilityLevel.AMPERE_PLUS
    assert trt10.BuilderFlag.VERSION_COMPATIBLE in config._flags
    sidecar = json.loads((bundle / "unet.plan.json").read_text())
    assert (sidecar["hardware_compat"], sidecar["version_compat"]) == ("ampere+", True)


def test_fixed_batch_needs_no_profile(tmp_path, trt10):
    bundle = _bundle(tmp_path, batch=(2, 2, 2))
    _build(bundle)
    assert trt10._builds[0]["config"]._profiles == []
    sidecar = json.loads((bundle / "unet.plan.json").read_text())
    assert sidecar["profiles"][0]["sample"] == {"min": [2, 1, 8, 8], "opt": [2, 1, 8, 8], "max": [2, 1, 8, 8]}


def test_every_parser_error_is_surfaced_and_nothing_is_written(tmp_path, trt10):
    errors = [
        {"desc": "No importer registered for op: FancyNorm", "node_name": "/down.0/norm", "op": "FancyNorm"},
        {"desc": "Invalid weights", "node": 7},
    ]
    bundle = _bundle(tmp_path, errors=errors)
    with pytest.raises(DtkError) as caught:
        _build(bundle)
    message = str(caught.value)
    assert message.startswith(f"{bundle / 'unet.onnx'}: TensorRT's ONNX parser failed")
    assert "node /down.0/norm (FancyNorm): No importer registered for op: FancyNorm" in message
    assert "node #7: Invalid weights" in message
    assert not (bundle / "unet.plan").exists() and not (bundle / "unet.plan.json").exists()
    assert load_manifest(bundle).plan is None


def test_unreadable_onnx_is_a_parser_error(tmp_path, trt10):
    bundle = _bundle(tmp_path)
    (bundle / "unet.onnx").write_bytes(b"\x08\x07truncated")
    with pytest.raises(DtkError, match="Failed to parse ONNX model from file"):
        _build(bundle)


def test_graph_inputs_must_be_the_manifests(tmp_path, trt10):
    import onnx

    bundle = _bundle(tmp_path)
    model = onnx.load(bundle / "unet.onnx")
    model.graph.input[0].name = "x"
    model.graph.node[0].input[0] = "x"
    onnx.save(model, bundle / "unet.onnx")
    with pytest.raises(
        DtkError, match=r"has inputs \['timestep', 'x'\], the manifest names \['sample', 'timestep'\]"
    ):
        _build(bundle)


def test_a_failed_build_reports_tensorrt_errors_and_keeps_the_previous_plan(tmp_path, trt10):
    bundle = _bundle(tmp_path)
    _build(bundle)
    before = {name: (bundle / name).read_bytes() for name in ("unet.plan", "unet.plan.json", "dtk.json")}
    (bundle / "unet.onnx").write_bytes(
        fake_gpu.fake_onnx("batch", [1, 8, 8], build_error="Out of memory: tactic needs 2 GiB")
    )
    with pytest.raises(
        DtkError, match="TensorRT could not build an engine: Out of memory: tactic needs 2 GiB"
    ):
        _build(bundle)
    assert {name: (bundle / name).read_bytes() for name in before} == before
    assert not list(bundle.glob(".*partial"))


def test_timing_cache_is_loaded_and_written_back(tmp_path, trt10, capsys):
    bundle, cache = _bundle(tmp_path), tmp_path / "trt.cache"
    _build(bundle, timing_cache=cache)
    assert json.loads(cache.read_bytes()[len(b"FAKECACHE") :])["entries"] == 1
    _build(bundle, timing_cache=cache)  # the second build starts from the first one's cache
    assert json.loads(cache.read_bytes()[len(b"FAKECACHE") :])["entries"] == 2
    assert "warning" not in capsys.readouterr().err

    stale = {"version": "10.0.1", "gpu": "NVIDIA Jetson Fake", "entries": 40}
    cache.write_bytes(b"FAKECACHE" + json.dumps(stale).encode())
    _build(bundle, timing_cache=cache)
    assert "timing cache is from another TensorRT or GPU" in capsys.readouterr().err
    assert json.loads(cache.read_bytes()[len(b"FAKECACHE") :]) == {**stale, "version": "10.3.0", "entries": 1}


def test_progress_shows_the_build_phases(tmp_path, trt10, capsys):
    _build(_bundle(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "Building engine" in err and "Tactic selection" in err


def test_ctrl_c_during_the_build_cancels_it(tmp_path, trt10, monkeypatch):
    import tqdm

    def interrupted(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", interrupted)
    bundle = _bundle(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _build(bundle, progress=True)
    assert not (bundle / "unet.plan").exists()


def test_without_tensorrt_and_gpu_one_error_says_what_is_missing(tmp_path, monkeypatch):
    from dtk.runtime.backends import cuda

    fake = fake_gpu.FakeGpu(driver=False)
    monkeypatch.setattr(cuda, "_load_bindings", lambda: cuda.Bindings(fake.runtime, fake.driver, fake.nvrtc))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails
    with pytest.raises(DtkError) as caught:
        _build(_bundle(tmp_path))
    message = str(caught.value)
    assert message.startswith("cannot build a TensorRT engine here: TensorRT is not installed")
    assert "pip install dtk[tensorrt]" in message and "JetPack 6" in message
    assert "no CUDA GPU is usable here (cudaGetDeviceCount failed: cudaErrorInsufficientDriver" in message


def test_on_this_machine_the_error_names_the_real_reason(tmp_path, monkeypatch):
    """No fakes: whatever this machine lacks (here TensorRT and a GPU), a DtkError says so."""
    if importlib.util.find_spec("tensorrt") is None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    try:
        _build(_bundle(tmp_path))
    except DtkError as e:
        assert str(e).startswith("cannot build a TensorRT engine here: ")
    else:
        pytest.skip("this machine has TensorRT and a GPU")


def test_engine_options_are_checked():
    from dtk.export.tensorrt import EngineOptions

    assert EngineOptions(hardware_compat=True).hardware_compat == "ampere+"
    assert EngineOptions(hardware_compat=False).hardware_compat == "none"
    for bad in ({"precision": "int4"}, {"opt_level": 6}, {"workspace": 0}, {"hardware_compat": "turing+"}):
        with pytest.raises(DtkError):
            EngineOptions(**bad)


def test_cli_maps_flags_to_options(tmp_path, trt10, capsys):
    from dtk.cli import main

    bundle = _bundle(tmp_path)
    code = main(["build-engine", str(bundle), "--precision", "fp16", "--workspace", "64", "--opt-level", "1",
                 "--hardware-compat", "--version-compat", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {bundle / 'unet.plan'}")
    assert "TensorRT 10.3.0, NVIDIA Jetson Fake (sm_87), fp16, batch 1..4" in out
    config = trt10._builds[0]["config"]
    assert trt10.BuilderFlag.FP16 in config._flags and trt10.BuilderFlag.VERSION_COMPATIBLE in config._flags
    assert config._pool_limits[trt10.MemoryPoolType.WORKSPACE] == 64 * 2**20
    assert config.builder_optimization_level == 1
    assert config.hardware_compatibility_level == trt10.HardwareCompatibilityLevel.AMPERE_PLUS


def test_cli_without_tensorrt_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from dtk.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(_bundle(tmp_path)), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build a TensorRT engine here: TensorRT is not installed")
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_on_a_directory_without_a_bundle(tmp_path, capsys):
    from dtk.cli import main

    assert main(["build-engine", str(tmp_path)]) == 1
    assert "no dtk manifest here" in capsys.readouterr().err


# -- real TensorRT -------------------------------------------------------------------------------------------


def _tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        from dtk.runtime.backends.cuda import gpu_info

        gpu_info(0)
    except DtkError:
        return False
    return True


@pytest.mark.tensorrt
@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_real_engine_matches_onnxruntime(tiny_bundle, tmp_path):
    import shutil

    import onnxruntime as ort

    from dtk.export.tensorrt import EngineOptions, build_engine
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    plan_path = build_engine(bundle, EngineOptions(timing_cache=tmp_path / "cache"), progress=False)
    manifest = load_manifest(bundle)
    session = ort.InferenceSession(str(bundle / manifest.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    T = manifest.diffusion.num_train_timesteps
    with TensorRTDenoiser(plan_path, manifest, cuda_graph=True) as denoiser:
        for batch in (1, 4):
            x = rng.standard_normal((batch, 1, 16, 16), dtype=np.float32)
            for t in (0, T // 2, T - 1):
                timestep = np.full(batch, t, dtype=np.float32)
                want = session.run(None, {"sample": x, "timestep": timestep})[0]
                np.testing.assert_allclose(denoiser(x, timestep), want, atol=2e-4, rtol=1e-3)

        plan = make_plan("dpmpp-2m", manifest.diffusion, 10)
        source = NoiseSource(0)
        x = source.initial(2, (1, 16, 16))
        on_host = sample_loop(lambda s, t: denoiser(s, np.full(2, t, np.float32)), x, plan, None)
        on_device = denoiser.run_chain(plan, x, None)
        np.testing.assert_allclose(on_device, on_host, atol=1e-4, rtol=1e-4)


# -- what TensorRT really does on failure, and the engine check ----------------------------------------------


def test_a_builder_tensorrt_cannot_create_is_one_line_with_tensorrts_reason(tmp_path, trt10, gpu):
    """trt.Builder never returns None: pybind11 raises TypeError after TensorRT logged the CUDA error."""
    gpu.tensorrt_cuda_fails = True
    with pytest.raises(DtkError) as caught:
        _build(_bundle(tmp_path))
    message = str(caught.value)
    assert message.startswith("TensorRT could not create a builder: [defaultAllocator.cpp")
    assert "CUDA initialization failure with error: 35" in message and "\n" not in message


def test_hardware_compat_is_refused_on_jetson_before_building(tmp_path, monkeypatch):
    fake = fake_gpu.FakeGpu(name="Orin", compute_capability=(8, 7), integrated=True, sm_count=8)
    trt = fake_gpu.install(monkeypatch, fake)
    bundle = _bundle(tmp_path)
    with pytest.raises(DtkError, match=r"--hardware-compat is not supported on Orin: .*integrated GPU"):
        _build(bundle, hardware_compat="ampere+")
    assert trt._builds == [] and not (bundle / "unet.plan").exists()
    old = fake_gpu.FakeGpu(name="Tesla T4", compute_capability=(7, 5))
    fake_gpu.install(monkeypatch, old)
    with pytest.raises(DtkError, match=r"needs an Ampere or newer GPU \(sm_80\+\); Tesla T4 is sm_75"):
        _build(bundle, hardware_compat="ampere+")


def test_the_sidecar_identifies_the_gpu_and_platform(tmp_path, monkeypatch):
    from dtk.runtime.sidecar import this_platform

    fake = fake_gpu.FakeGpu(name="Orin", compute_capability=(8, 7), integrated=True, sm_count=8)
    fake_gpu.install(monkeypatch, fake)
    bundle = _bundle(tmp_path)
    _build(bundle)
    sidecar = json.loads((bundle / "unet.plan.json").read_text())
    assert (sidecar["architecture"], sidecar["integrated"], sidecar["sm_count"]) == ("Ampere", True, 8)
    assert sidecar["platform"] == this_platform() and sidecar["schema_version"] == 2


def test_a_profile_tensorrt_refuses_is_an_error(tmp_path, trt10, monkeypatch):
    from dtk.export import tensorrt as build_module

    real = build_module._profile_shapes

    def inverted(manifest):
        shapes = real(manifest)
        return {name: (high, opt, low) for name, (low, opt, high) in shapes.items()}

    monkeypatch.setattr(build_module, "_profile_shapes", inverted)
    bundle = _bundle(tmp_path)
    with pytest.raises(
        DtkError, match=r"TensorRT refused the batch profile .*the profile needs MIN <= OPT <= MAX"
    ):
        _build(bundle)
    assert trt10._builds == [] and not (bundle / "unet.plan").exists()


def test_an_earlier_parser_warning_is_not_the_build_failures_reason(tmp_path, trt10, monkeypatch):
    bundle = _bundle(tmp_path, build_error="Out of memory")
    real = trt10.OnnxParser.parse_from_file

    def parse_with_a_logged_error(self, model):
        self._logger.log(1, "a parser error TensorRT recovered from")
        return real(self, model)

    monkeypatch.setattr(trt10.OnnxParser, "parse_from_file", parse_with_a_logged_error)
    with pytest.raises(DtkError) as caught:
        _build(bundle)
    assert str(caught.value).endswith("TensorRT could not build an engine: Out of memory")


def test_the_engine_is_checked_against_onnxruntime_and_the_result_kept(tmp_path, trt10):
    bundle = _bundle(tmp_path)
    _build(bundle)
    parity = json.loads((bundle / "unet.plan.json").read_text())["parity"]
    assert parity["passed"] is True and parity["provider"] == "TensorRT"
    assert parity["reference"] == "ONNX Runtime CPUExecutionProvider"
    assert (parity["atol"], parity["rtol"], parity["chain_atol"]) == (2e-4, 1e-3, 1e-3)
    assert [c["batch"] for c in parity["cases"]] == [1, 1, 1, 4]  # t near 0, T/2, T-1 at batch 1; all at 4
    assert parity["cases"][3]["timesteps"] == [0, 1, 500, 999]
    assert parity["chain"]["steps"] == 20 and parity["chain"]["passed"]
    assert max(c["max_abs"] for c in parity["cases"]) < 1e-6  # the fake engine computes the ONNX graph

    from dtk.export.inspect import describe

    check = describe(bundle)["plan"]["engine_check"]
    assert check["passed"] is True and check["verified"] is True


def test_an_engine_that_differs_from_onnxruntime_leaves_no_plan(tmp_path, trt10, capsys):
    from dtk.cli import main

    bundle = _bundle(tmp_path)
    _build(bundle)
    before = {name: (bundle / name).read_bytes() for name in ("unet.plan", "unet.plan.json", "dtk.json")}
    (bundle / "unet.onnx").write_bytes(fake_gpu.fake_onnx("batch", [1, 8, 8], engine_error=0.01))
    assert main(["build-engine", str(bundle), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "parity (fp32, TensorRT vs ONNX Runtime CPUExecutionProvider)" in err and "FAIL" in err
    assert "error: the engine does not match ONNX Runtime (fp32): batch 1 t=0: max |Δ| 0.01" in err
    assert "No unet.plan was written" in err and "--atol/--rtol/--chain-atol" in err
    assert {name: (bundle / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in bundle.iterdir()) == [
        "dtk.json",
        "unet.onnx",
        "unet.plan",
        "unet.plan.json",
    ]

    loosened = ["--atol", "0.02", "--chain-atol", "0.1"]
    assert main(["build-engine", str(bundle), "--no-progress", *loosened]) == 0
    assert json.loads((bundle / "unet.plan.json").read_text())["parity"]["atol"] == 0.02
    assert main(["build-engine", str(bundle), "--no-progress", "--no-verify"]) == 0
    assert "not compared with ONNX Runtime" in capsys.readouterr().err
    assert json.loads((bundle / "unet.plan.json").read_text())["parity"] == {}


def test_several_engines_per_bundle_each_with_its_sidecar(tmp_path, monkeypatch, capsys):
    from dtk.cli import main
    from dtk.runtime.pipeline import Pipeline

    bundle = _bundle(tmp_path)
    fake_gpu.install(
        monkeypatch, fake_gpu.FakeGpu(name="NVIDIA H200", compute_capability=(9, 0), sm_count=132)
    )
    assert main(["build-engine", str(bundle), "--no-progress"]) == 0
    orin = fake_gpu.FakeGpu(name="Orin", compute_capability=(8, 7), integrated=True, sm_count=8)
    fake_gpu.install(monkeypatch, orin)
    assert main(["build-engine", str(bundle), "--no-progress", "--engine-name", "orin-nx-fp16",
                 "--precision", "fp16"]) == 0  # fmt: skip
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["dtk.json", "unet-orin-nx-fp16.plan", "unet-orin-nx-fp16.plan.json", "unet.onnx",
                     "unet.plan", "unet.plan.json"]  # fmt: skip
    assert load_manifest(bundle).plan == "unet-orin-nx-fp16.plan"
    capsys.readouterr()

    fake_gpu.install(
        monkeypatch, fake_gpu.FakeGpu(name="NVIDIA H200", compute_capability=(9, 0), sm_count=132)
    )
    with Pipeline.load(bundle, backend="tensorrt") as pipe:
        assert pipe.denoiser.plan_path.name == "unet.plan"
    assert "using engine unet.plan of 2: built for NVIDIA H200 (sm_90), fp32" in capsys.readouterr().err

    from dtk.export.inspect import describe

    engines = describe(bundle)["engines"]
    assert [(e["name"], e["checked"]) for e in engines] == [
        ("unet-orin-nx-fp16.plan", "passed"),
        ("unet.plan", "passed"),
    ]
    with pytest.raises(DtkError, match="engine name 'Orin NX'"):
        _build(bundle, engine_name="Orin NX")


def test_the_plan_waits_for_an_export_that_holds_the_bundle(tmp_path, trt10):
    import threading

    from dtk.runtime.files import locked

    bundle = _bundle(tmp_path)
    built = threading.Event()
    with locked(bundle):  # what `dtk export -o bundle` holds while it swaps the folder
        worker = threading.Thread(target=lambda: (_build(bundle), built.set()))
        worker.start()
        assert not built.wait(1.0)
        assert not (bundle / "unet.plan").exists()
    worker.join(60)
    assert built.is_set() and (bundle / "unet.plan").is_file()


def test_a_bundle_exported_again_during_the_build_gets_no_stale_plan(tmp_path, trt10, monkeypatch):
    from dtk.export import tensorrt

    bundle = _bundle(tmp_path)
    original = tensorrt._checked

    def reexport_during_check(*args, **kwargs):
        result = original(*args, **kwargs)
        graph = bundle / "unet.onnx"
        graph.write_bytes(graph.read_bytes() + b" ")  # another model's graph lands meanwhile
        return result

    monkeypatch.setattr(tensorrt, "_checked", reexport_during_check)
    with pytest.raises(DtkError, match="exported again while the engine was built"):
        _build(bundle)
    assert not (bundle / "unet.plan").exists()
