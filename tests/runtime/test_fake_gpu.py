"""The fake GPU fails where the real APIs fail: each rule the fake models, pinned on the fake itself.

The real behaviours, from the sources: TensorRT OSS python/src/infer/pyCore.cpp (factories bound with
py::init returning nullptr on failure), the CUDA driver API's current-context rules and module loading,
stream capture rules, and IExecutionContext.set_tensor_address's 256-byte alignment.
"""

from __future__ import annotations

import threading

import fake_gpu
import numpy as np
import pytest


def _ok(result):
    error, *values = result
    assert int(error) == 0, error
    return values[0] if values else None


def _code(result) -> str:
    return result[0].name


@pytest.fixture
def gpu():
    return fake_gpu.FakeGpu(devices=2)


class _Logger:
    def __init__(self):
        self.messages = []

    def log(self, severity, msg):
        self.messages.append(msg)


def test_builder_and_runtime_raise_typeerror_with_the_reason_logged():
    gpu = fake_gpu.FakeGpu()
    gpu.tensorrt_cuda_fails = True
    trt = fake_gpu.fake_tensorrt(gpu)
    for factory in (trt.Builder, trt.Runtime):
        logger = _Logger()
        with pytest.raises(TypeError, match="factory function returned nullptr"):
            factory(logger)
        assert "CUDA initialization failure with error: 35" in logger.messages[0]


def test_a_thread_uses_only_what_its_current_device_owns(gpu):
    rt, drv = gpu.runtime, gpu.driver
    _ok(rt.cudaSetDevice(1))
    stream = _ok(rt.cudaStreamCreateWithFlags(1))
    module = _ok(drv.cuModuleLoadData(fake_gpu.cubin_for(87)))
    _ok(rt.cudaSetDevice(0))
    assert _code(rt.cudaStreamSynchronize(stream)) == "cudaErrorInvalidResourceHandle"
    assert _code(drv.cuModuleUnload(module)) == "CUDA_ERROR_INVALID_CONTEXT"
    answers = []
    worker = threading.Thread(target=lambda: answers.append(drv.cuModuleLoadData(fake_gpu.cubin_for(87))))
    worker.start()
    worker.join()
    assert _code(answers[0]) == "CUDA_ERROR_INVALID_CONTEXT"  # a new thread has no current context yet
    _ok(rt.cudaSetDevice(1))
    _ok(drv.cuModuleUnload(module))
    _ok(rt.cudaStreamDestroy(stream))
    assert gpu.live() == {}


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (lambda f: b"garbage", "CUDA_ERROR_INVALID_IMAGE"),
        (lambda f: f.cubin_for(80), "CUDA_ERROR_NO_BINARY_FOR_GPU"),  # a cubin for another sm
        (
            lambda f: f.ptx_for(87, (9, 1)),
            "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        ),  # NVRTC newer than the driver
        (lambda f: f.ptx_for(90, (8, 5)), "CUDA_ERROR_NO_BINARY_FOR_GPU"),  # PTX for a newer GPU
        (lambda f: f.ptx_for(87, (8, 5))[:-1], "CUDA_ERROR_INVALID_PTX"),  # not NUL-terminated
        (lambda f: f.ptx_for(80, (8, 5)), "CUDA_SUCCESS"),  # older PTX is JIT-compiled
        (lambda f: f.cubin_for(87), "CUDA_SUCCESS"),
    ],
)
def test_module_loading_takes_only_images_for_this_gpu(image, code):
    gpu = fake_gpu.FakeGpu(compute_capability=(8, 7), driver_ptx=(9, 0))
    _ok(gpu.runtime.cudaSetDevice(0))
    assert _code(gpu.driver.cuModuleLoadData(image(fake_gpu))) == code


def test_nvrtc_logs_have_their_real_length_and_buffers_must_be_bytearrays():
    gpu = fake_gpu.FakeGpu()
    rtc = gpu.nvrtc
    program = _ok(rtc.nvrtcCreateProgram(b"no kernel here", b"x.cu", 0, [], []))
    assert (
        _code(rtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=sm_87"])) == "NVRTC_ERROR_COMPILATION"
    )
    size = _ok(rtc.nvrtcGetProgramLogSize(program))
    log = bytearray(size)
    _ok(rtc.nvrtcGetProgramLog(program, log))
    assert log.endswith(b'"x.cu".\n\0') and size > 40
    good = _ok(rtc.nvrtcCreateProgram(b"dtk_sampler_update", b"y.cu", 0, [], []))
    _ok(rtc.nvrtcCompileProgram(good, 1, [b"--gpu-architecture=sm_87"]))
    assert _ok(rtc.nvrtcGetProgramLogSize(good)) == 1
    with pytest.raises(TypeError, match="expected bytes, memoryview found"):
        rtc.nvrtcGetProgramLog(good, memoryview(bytearray(1)))
    with pytest.raises(AssertionError, match="immutable bytes"):
        rtc.nvrtcGetProgramLog(good, b"?")


def test_capture_rules(gpu):
    rt = gpu.runtime
    _ok(rt.cudaSetDevice(0))
    stream = _ok(rt.cudaStreamCreateWithFlags(1))
    mode = fake_gpu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _ok(rt.cudaStreamBeginCapture(stream, mode))
    assert _code(rt.cudaStreamSynchronize(stream)) == "cudaErrorStreamCaptureUnsupported"
    error, graph = rt.cudaStreamEndCapture(stream)
    assert error.name == "cudaErrorStreamCaptureInvalidated" and graph is None
    _ok(rt.cudaStreamBeginCapture(stream, mode))
    graph = _ok(rt.cudaStreamEndCapture(stream))  # a clean capture of nothing
    assert graph in gpu.graphs


def test_a_kernels_first_launch_inside_a_capture_fails_before_cuda_12_3():
    from dtk.runtime.backends.cuda import CudaError, CudaSession, UpdateKernel
    from dtk.runtime.backends.update_kernel import COEFF_SLOTS

    for capture_loads in (False, True):
        gpu = fake_gpu.FakeGpu(capture_loads=capture_loads)
        with pytest.MonkeyPatch.context() as mp:
            fake_gpu.install(mp, gpu)
            session = CudaSession(0)
            kernel = UpdateKernel(session)
            buffer = session.device_buffer(4 * 16)  # x0 history: [2, n]
            coeffs = session.device_buffer(4 * COEFF_SLOTS)

            def step(kernel=kernel, buffer=buffer, coeffs=coeffs):
                kernel.launch(buffer, buffer, buffer, buffer, coeffs, 8, 8)

            if capture_loads:
                session.capture(step)
            else:
                with pytest.raises(CudaError, match="CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"):
                    session.capture(step)
            session.close()
            assert gpu.live() == {}


def _engine(gpu, io_dtype="float32", batch=(1, 2, 4)):
    import json

    trt = fake_gpu.fake_tensorrt(gpu)
    logger = _Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    dtype = "HALF" if io_dtype == "float16" else "FLOAT"
    network._inputs = [trt.ITensor("sample", (-1, 1, 4, 4), dtype), trt.ITensor("timestep", (-1,), dtype)]
    network._outputs = [trt.ITensor("model_output", (-1, 1, 4, 4), dtype)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("sample", (batch[0], 1, 4, 4), (batch[1], 1, 4, 4), (batch[2], 1, 4, 4))
    profile.set_shape("timestep", (batch[0],), (batch[1],), (batch[2],))
    assert config.add_optimization_profile(profile) == 0
    plan = builder.build_serialized_network(network, config)
    assert json.loads(bytes(plan))["io"][0]["dtype"] == dtype
    return trt, logger, trt.Runtime(logger).deserialize_cuda_engine(plan)


def test_execute_inside_a_capture_needs_one_run_outside_after_a_shape_change(gpu):
    rt = gpu.runtime
    _ok(rt.cudaSetDevice(0))
    trt, logger, engine = _engine(gpu)
    context = engine.create_execution_context()
    for name, count in (("sample", 4 * 16), ("timestep", 4), ("model_output", 4 * 16)):
        assert context.set_tensor_address(name, _ok(rt.cudaMalloc(4 * count)))
    assert not context.set_tensor_address("sample", _ok(rt.cudaMalloc(512)) + 4)  # not 256-byte aligned
    assert "not 256-byte aligned" in logger.messages[-1]
    context.set_input_shape("sample", (2, 1, 4, 4))
    context.set_input_shape("timestep", (2,))
    stream = _ok(rt.cudaStreamCreateWithFlags(1))
    mode = fake_gpu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _ok(rt.cudaStreamBeginCapture(stream, mode))
    assert context.execute_async_v3(int(stream)) is False
    assert _code(rt.cudaStreamEndCapture(stream)) == "cudaErrorStreamCaptureInvalidated"
    assert context.execute_async_v3(int(stream)) is True  # outside a capture
    _ok(rt.cudaStreamSynchronize(stream))
    _ok(rt.cudaStreamBeginCapture(stream, mode))
    assert context.execute_async_v3(int(stream)) is True
    _ok(rt.cudaStreamEndCapture(stream))
    context.set_input_shape("sample", (3, 1, 4, 4))  # a new shape: outside once again first
    _ok(rt.cudaStreamBeginCapture(stream, mode))
    assert context.execute_async_v3(int(stream)) is False


def test_fp16_io_plans_compute_in_fp16(gpu):
    rt = gpu.runtime
    _ok(rt.cudaSetDevice(0))
    trt, logger, engine = _engine(gpu, "float16")
    assert trt.nptype(engine.get_tensor_dtype("sample")) == np.float16
    context = engine.create_execution_context()
    pointers = {name: _ok(rt.cudaMalloc(2 * 64)) for name in ("sample", "timestep", "model_output")}
    for name, ptr in pointers.items():
        context.set_tensor_address(name, ptr)
    context.set_input_shape("sample", (1, 1, 4, 4))
    context.set_input_shape("timestep", (1,))
    x = np.linspace(-1, 1, 16, dtype=np.float16)
    gpu.view(pointers["sample"], 16, np.float16)[:] = x
    gpu.view(pointers["timestep"], 1, np.float16)[:] = 100
    stream = _ok(rt.cudaStreamCreateWithFlags(1))
    assert context.execute_async_v3(int(stream))
    _ok(rt.cudaStreamSynchronize(stream))
    want = fake_gpu.fake_unet(x.reshape(1, 1, 4, 4), np.full(1, 100, np.float16)).reshape(-1)
    np.testing.assert_array_equal(gpu.view(pointers["model_output"], 16, np.float16), want)


def test_version_compatible_plans_need_host_code_allowed_and_hardware_compat_not_on_jetson():
    gpu = fake_gpu.FakeGpu()
    trt = fake_gpu.fake_tensorrt(gpu)
    logger = _Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    network._inputs = [trt.ITensor("sample", (1, 1, 4, 4)), trt.ITensor("timestep", (1,))]
    network._outputs = [trt.ITensor("model_output", (1, 1, 4, 4))]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    plan = builder.build_serialized_network(network, config)
    runtime = trt.Runtime(logger)
    assert runtime.deserialize_cuda_engine(plan) is None and "host code" in logger.messages[-1]
    runtime.engine_host_code_allowed = True
    assert runtime.deserialize_cuda_engine(plan) is not None

    jetson = fake_gpu.FakeGpu(integrated=True)
    trt = fake_gpu.fake_tensorrt(jetson)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert builder.build_serialized_network(network, config) is None
    assert "not supported on this platform" in logger.messages[-1]
