"""The TensorRT backend's lifecycle against the fakes: failures TensorRT and CUDA really produce, teardown.

Each test pins a behaviour of the real APIs that the fake models (tests/runtime/fake_gpu.py): factories that
raise instead of returning None, per-thread current contexts, module-load errors, capture rules, shape state.
"""

from __future__ import annotations

import re
import sys
import threading

import fake_gpu
import gpu_standin
import numpy as np
import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import SamplerPlan, sample_loop


def _open(tmp_path, monkeypatch, gpu=None, cuda_graph=False, **options):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    gpu = gpu or fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    plan, manifest = fake_gpu.plan_file(tmp_path, **options)
    return gpu, TensorRTDenoiser(plan, manifest, cuda_graph=cuda_graph)


def _plan(steps=4) -> SamplerPlan:
    rng = np.random.default_rng(0)
    return SamplerPlan(
        "test", np.linspace(900, 20, steps).astype(np.int64), rng.uniform(-1, 1, (steps, 7)), 1.0
    )


def _noise(shape):
    rng = np.random.default_rng(1)
    return lambda i: rng.standard_normal(shape, dtype=np.float32)


def test_a_runtime_tensorrt_cannot_create_is_one_line_with_tensorrts_reason(tmp_path, monkeypatch):
    """trt.Runtime never returns None: pybind11 raises TypeError after TensorRT logged why."""
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    gpu = fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    plan, manifest = fake_gpu.plan_file(tmp_path)
    gpu.tensorrt_cuda_fails = True
    with pytest.raises(DtkError) as caught:
        TensorRTDenoiser(plan, manifest)
    message = str(caught.value)
    assert message.startswith(f"TensorRT could not create a runtime for {plan}: [defaultAllocator.cpp")
    assert "CUDA initialization failure with error: 35" in message and "\n" not in message
    assert gpu.live() == {}


def test_close_synchronises_before_releasing_the_tensorrt_objects(tmp_path, monkeypatch):
    """A chain that stops half way (here the noise source fails) leaves work on the stream: the context and
    engine must outlive it."""
    gpu, denoiser = _open(tmp_path, monkeypatch)
    x = np.zeros((2, 1, 8, 8), np.float32)
    plan = _plan()
    draws = _noise(x.shape)

    def noise(i):
        if i >= 2:
            raise RuntimeError("the noise source broke")
        return draws(i)

    with pytest.raises(RuntimeError, match="noise source broke"), denoiser:
        denoiser.run_chain(plan, x, noise)
    assert gpu.violations == []
    assert gpu.live() == {}


def test_close_makes_its_gpu_current_first(tmp_path, monkeypatch):
    """cuModuleUnload acts on the current context: another library switching GPUs must not break close."""
    from dtk.runtime.backends.cuda import Cuda

    gpu, denoiser = _open(tmp_path, monkeypatch, fake_gpu.FakeGpu(devices=2))
    x = np.zeros((1, 1, 8, 8), np.float32)
    denoiser.run_chain(_plan(2), x, _noise(x.shape))
    Cuda().rt("cudaSetDevice", 1)
    denoiser.close()
    assert gpu.live() == {}


def test_a_denoiser_works_from_another_thread(tmp_path, monkeypatch):
    """Current contexts are per thread: a fresh thread has none until dtk makes its GPU current."""
    gpu, denoiser = _open(tmp_path, monkeypatch, fake_gpu.FakeGpu(devices=2))
    x = np.ones((2, 1, 8, 8), np.float32)
    results = []
    with denoiser:
        worker = threading.Thread(
            target=lambda: results.append(denoiser.run_chain(_plan(3), x, _noise(x.shape)))
        )
        worker.start()
        worker.join()
    assert len(results) == 1 and results[0].shape == x.shape and np.isfinite(results[0]).all()
    assert gpu.live() == {}


def test_a_refused_batch_leaves_no_stale_shape(tmp_path, monkeypatch):
    """set_input_shape for the sample succeeded, for the timestep failed: the next call at the old batch must
    set both shapes again, not trust a context that holds the refused batch's sample shape."""
    gpu, denoiser = _open(tmp_path, monkeypatch)
    with denoiser:
        x2, x3 = np.ones((2, 1, 8, 8), np.float32), np.ones((3, 1, 8, 8), np.float32)
        denoiser(x2, np.zeros(2, np.float32))
        context = denoiser._context
        real = context.set_input_shape

        def refuse_timestep_at_3(name, shape):
            if name == "timestep" and shape[0] == 3:
                context._engine._logger.log(1, "timestep: batch 3 refused")
                return False
            return real(name, shape)

        context.set_input_shape = refuse_timestep_at_3
        with pytest.raises(DtkError, match=r"TensorRT refused batch 3: timestep: batch 3 refused$"):
            denoiser(x3, np.zeros(3, np.float32))
        out = denoiser(x2, np.full(2, 7.0, np.float32))
        np.testing.assert_array_equal(out, fake_gpu.fake_unet(x2, np.full(2, 7.0)))
        assert context._shapes["sample"] == (2, 1, 8, 8)


def test_an_earlier_harmless_error_is_not_the_reason_of_a_later_failure(tmp_path, monkeypatch):
    gpu, denoiser = _open(tmp_path, monkeypatch)
    with denoiser:
        denoiser._logger.log(1, "an earlier, harmless error")
        context = denoiser._context
        context.execute_async_v3 = lambda stream_handle: (
            context._engine._logger.log(1, "out of memory"),
            False,
        )[1]
        with pytest.raises(DtkError) as caught:
            denoiser(np.ones((1, 1, 8, 8), np.float32), np.zeros(1, np.float32))
    assert str(caught.value).endswith("TensorRT failed to run the plan (out of memory)")


@pytest.mark.parametrize(
    ("gpu_options", "code"),
    [
        ({"compute_capability": (12, 0), "driver_ptx": (8, 5)}, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"),
        ({"compute_capability": (8, 6), "nvrtc_ptx": (8, 5)}, None),  # a cubin for sm_86: loads
    ],
)
def test_a_kernel_the_driver_cannot_load_falls_back_to_the_host_update(
    tmp_path, monkeypatch, gpu_options, code
):
    """NVRTC newer than the driver: its PTX (or cubin) is refused by cuModuleLoadData; the chain still runs,
    with the update on the host and a warning naming the error."""
    gpu, denoiser = _open(tmp_path, monkeypatch, fake_gpu.FakeGpu(**gpu_options))
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8), dtype=np.float32)
    plan = _plan(3)
    table = {
        i: np.random.default_rng(i).standard_normal(x.shape, dtype=np.float32) for i in range(plan.steps)
    }
    want = sample_loop(lambda s, t: fake_gpu.fake_unet(s, np.full(len(s), t)), x, plan, table.__getitem__)
    with denoiser:
        if code:
            with pytest.warns(RuntimeWarning, match=f"{code}.*applying the sampler update on the host"):
                got = denoiser.run_chain(plan, x, table.__getitem__)
            assert gpu.launches == []
        else:
            got = denoiser.run_chain(plan, x, table.__getitem__)
            assert gpu.launches
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert gpu.live() == {}


def test_other_module_load_errors_are_not_hidden(monkeypatch):
    from dtk.runtime.backends.cuda import CudaError, CudaSession

    gpu = fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    session = CudaSession(0)
    with pytest.raises(CudaError, match="cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE"):
        session.load_function(b"not a module", "dtk_sampler_update")
    session.close()
    assert gpu.live() == {}


@pytest.mark.parametrize("capture_loads", [False, True])
def test_the_kernel_is_loaded_before_the_capture(tmp_path, monkeypatch, capture_loads):
    """Drivers before CUDA 12.3 cannot load a module inside a capture: the first launch happens eagerly."""
    gpu, denoiser = _open(
        tmp_path, monkeypatch, fake_gpu.FakeGpu(capture_loads=capture_loads), cuda_graph=True
    )
    x = np.zeros((2, 1, 8, 8), np.float32)
    with denoiser:
        denoiser.run_chain(_plan(3), x, _noise(x.shape))
    assert [launch["n"] for launch in gpu.launches] == [0, 2 * 64]  # eager over nothing, then captured


def test_nvrtc_writes_into_bytearrays_only(monkeypatch):
    """`b" " * n` for n == 1 (an empty compiler log) is the interned b" ": writing into it changes b" "
    process-wide. The fake refuses bytes; dtk must hand NVRTC a bytearray."""
    from dtk.runtime.backends.cuda import Cuda, _program_log, compile_update_kernel

    gpu = fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    cuda = Cuda()
    image = compile_update_kernel(cuda, (8, 7))
    assert isinstance(image, bytes) and image == fake_gpu.cubin_for(87)
    program = cuda.rtc("nvrtcCreateProgram", b"dtk_sampler_update", b"x.cu", 0, [], [])
    cuda.rtc("nvrtcCompileProgram", program, 1, [b"--gpu-architecture=sm_87"])
    assert _program_log(cuda, program) == ""  # a 1-byte log: just the NUL
    assert b" " == bytes([32])  # noqa: SIM300 (the interned literal is the point)


def test_a_compile_error_shows_nvrtcs_log(monkeypatch):
    from dtk.runtime.backends import cuda as cuda_module

    gpu = fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    monkeypatch.setattr(cuda_module, "UPDATE_KERNEL_SOURCE", 'extern "C" __global__ void other() {}')
    with pytest.raises(DtkError, match=r"(?s)NVRTC could not compile.*identifier \"dtk_sampler_update\""):
        cuda_module.compile_update_kernel(cuda_module.Cuda(), (8, 7))


def test_fp16_io_plans_are_called_in_fp16(tmp_path, monkeypatch):
    gpu, denoiser = _open(tmp_path, monkeypatch, bundle_options={"io_dtype": "float16"}, precision="fp16")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with denoiser:
        out = denoiser(x, np.full(3, 500.0, np.float32))
        want = fake_gpu.fake_unet(x.astype(np.float16), np.full(3, 500.0, np.float16))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, want.astype(np.float32))
        with pytest.raises(DtkError, match="run_chain needs float32 I/O"):
            denoiser.run_chain(_plan(2), x, _noise(x.shape))


def test_a_version_compatible_plan_needs_host_code_allowed(tmp_path, monkeypatch):
    """The fake refuses such a plan without engine_host_code_allowed, as TensorRT does."""
    gpu, denoiser = _open(tmp_path, monkeypatch, version_compat=True)
    with denoiser:
        assert denoiser._runtime.engine_host_code_allowed is True
        x = np.ones((1, 1, 8, 8), np.float32)
        np.testing.assert_array_equal(denoiser(x, 3), fake_gpu.fake_unet(x, np.full(1, 3.0)))


def test_an_insufficient_driver_names_both_cuda_versions(monkeypatch):
    """cuda-python 13 on JetPack 6's CUDA 12.6 driver: say which versions clash and what to install."""
    from dtk.runtime.backends.cuda import gpu_info

    fake_gpu.install(monkeypatch, fake_gpu.FakeGpu(driver=False, driver_version=12060))
    with pytest.raises(DtkError) as caught:
        gpu_info(0)
    message = str(caught.value)
    assert "cudaErrorInsufficientDriver" in message
    assert re.search(
        r"the NVIDIA driver supports CUDA 12\.6, these cuda-python bindings are [\d.]+ \(CUDA 13\.0\)",
        message,
    )
    assert "pip install 'cuda-python>=12.6,<13'" in message and "dtk[jetson]" in message


def test_the_gpu_checks_chain_comparison_on_the_fake(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's device-chain-against-host-loop numbers, computed here on the fake (the real
    run is tests/runtime/test_gpu_standin.py on a GPU)."""
    gpu, denoiser = _open(tmp_path, monkeypatch, cuda_graph=True)
    with denoiser:
        result = gpu_standin.chain_against_host(denoiser, batch=2, steps=6, sampler="ddim")
    assert result["max_abs_latent"] < 1e-5 and result["max_levels"] == 0 and result["images_within_1_level"]
    assert (result["steps"], result["batch"], result["cuda_graph"]) == (6, 2, True)


def test_the_gpu_standins_plan_opens_in_the_backend(tmp_path, monkeypatch):
    """The stand-in's plan, sidecar and engine metadata pass TensorRTDenoiser's checks (here on the fake GPU;
    running it needs CUDA: tests/runtime/test_gpu_standin.py)."""
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.manifest import load_manifest

    pytest.importorskip("torch")
    gpu = fake_gpu.FakeGpu()
    fake_gpu.install(monkeypatch, gpu)
    monkeypatch.setitem(sys.modules, "tensorrt", gpu_standin.standin_tensorrt(module=None))
    bundle = fake_gpu.write_fake_bundle(tmp_path / "bundle")
    plan = gpu_standin.write_standin_plan(bundle)
    with TensorRTDenoiser(plan, load_manifest(bundle)) as denoiser:
        assert denoiser.batch_range == (1, 4) and denoiser._context._addresses.keys() == {
            "sample", "timestep", "model_output"
        }  # fmt: skip
    assert gpu.live() == {}
