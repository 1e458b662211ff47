"""TensorRTDenoiser against a fake TensorRT and a fake GPU (tests/runtime/fake_gpu.py).

The fake GPU keeps device memory in host memory, queues stream work until a synchronize, records and replays
graphs, and runs the update kernel's formula on the buffers the launch names. So these tests pin buffer sizes,
tensor bindings, the order of copies, engine runs and kernel launches, graph replay with per-step numbers, and
that close frees everything. They say nothing about real CUDA or TensorRT: see test_update_kernel.py and the
`tensorrt` test in tests/export/test_tensorrt_build.py for those.
"""

from __future__ import annotations

import hashlib
import sys

import fake_gpu
import numpy as np
import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import SamplerPlan, sample_loop


def _install(monkeypatch, gpu, version="10.3.0"):
    return fake_gpu.install(monkeypatch, gpu, version)


@pytest.fixture
def gpu(monkeypatch):
    fake = fake_gpu.FakeGpu()
    _install(monkeypatch, fake)
    return fake


def _plan_file(tmp_path, batch=(1, 2, 4), channels=1, size=8, **options):
    bundle_options = {"channels": channels, "size": size}
    return fake_gpu.plan_file(tmp_path, batch, bundle_options=bundle_options, **options)


def _denoiser(tmp_path, **kwargs):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest = _plan_file(tmp_path)
    return TensorRTDenoiser(plan, manifest, **kwargs)


def _sampler_plan(steps=6, seed=0, clip=1.0) -> SamplerPlan:
    """Arbitrary coefficients: every term of the update is exercised, noise on some steps only."""
    rng = np.random.default_rng(seed)
    coeffs = rng.uniform(-1.5, 1.5, size=(steps, 7))
    coeffs[1::3, 6] = 0.0  # steps without noise
    timesteps = np.linspace(900, 20, steps).astype(np.int64)
    return SamplerPlan("test", timesteps, coeffs, clip)


def _noise_table(plan, shape, seed=1):
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(shape, dtype=np.float32) for i in range(plan.steps)}


def _host_chain(plan, x, table, callback=None):
    """sample_loop with the fake engine's function: what run_chain must reproduce."""
    return sample_loop(
        lambda s, t: fake_gpu.fake_unet(s, np.full(len(s), t)), x, plan, table.__getitem__, callback
    )


def test_call_matches_the_engine_with_buffers_for_the_largest_batch(tmp_path, gpu):
    with _denoiser(tmp_path) as denoiser:
        assert denoiser.batch_range == (1, 4)
        # sample, timestep and output on the device (4 images max), and as much pinned staging
        sizes = sorted(size for _, size, kind in gpu.memory.values() if kind == "device")
        assert sizes == sorted([4 * 64 * 4, 4 * 4, 4 * 64 * 4])
        assert gpu.live() == {"device": 3, "pinned": 3, "streams": 1}
        context = denoiser._context
        assert set(context._addresses) == {"sample", "timestep", "model_output"}
        assert all(gpu.region(ptr, 4, "device") for ptr in context._addresses.values())

        rng = np.random.default_rng(0)
        for batch in (3, 1, 4):
            x = rng.standard_normal((batch, 1, 8, 8), dtype=np.float32)
            t = np.full(batch, 417, dtype=np.float32)
            out = denoiser(x, t)
            assert out.dtype == np.float32 and out.shape == (batch, 1, 8, 8)
            np.testing.assert_array_equal(out, fake_gpu.fake_unet(x, t))
        assert context._shapes["sample"] == (4, 1, 8, 8)
        assert gpu.live() == {"device": 3, "pinned": 3, "streams": 1}  # allocated once


def test_a_scalar_timestep_is_broadcast(tmp_path, gpu):
    with _denoiser(tmp_path) as denoiser:
        x = np.ones((2, 1, 8, 8), dtype=np.float32)
        np.testing.assert_array_equal(denoiser(x, 10), fake_gpu.fake_unet(x, np.full(2, 10.0)))


def test_wrong_batches_and_shapes_are_refused(tmp_path, gpu):
    with _denoiser(tmp_path) as denoiser:
        with pytest.raises(DtkError, match=r"batch 5 is outside this plan's batch range 1\.\.4"):
            denoiser(np.zeros((5, 1, 8, 8), np.float32), np.zeros(5, np.float32))
        with pytest.raises(
            DtkError, match=r"sample has shape \(2, 3, 8, 8\), this plan takes \[B, 1, 8, 8\]"
        ):
            denoiser(np.zeros((2, 3, 8, 8), np.float32), np.zeros(2, np.float32))


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_run_chain_matches_the_host_loop(tmp_path, gpu, cuda_graph):
    plan = _sampler_plan()
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8), dtype=np.float32)
    table = _noise_table(plan, x.shape)
    want_steps, got_steps, drawn = [], [], []

    def noise(i):
        drawn.append(i)
        return table[i]

    want = _host_chain(plan, x, table, lambda i, t, s: want_steps.append((i, t, s.copy())))
    with _denoiser(tmp_path, cuda_graph=cuda_graph) as denoiser:
        quiet = denoiser.run_chain(
            plan, x, table.__getitem__
        )  # no callback: nothing syncs but the stream order
        got = denoiser.run_chain(plan, x, noise, lambda i, t, s: got_steps.append((i, t, s)))
    np.testing.assert_allclose(quiet, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert drawn == [i for i in range(plan.steps) if plan.needs_noise[i]]  # the host generator's order
    assert [(i, t) for i, t, _ in got_steps] == [(i, t) for i, t, _ in want_steps]
    for (_, _, got_x), (_, _, want_x) in zip(got_steps, want_steps, strict=True):
        np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
    assert np.array_equal(
        x, np.random.default_rng(2).standard_normal((3, 1, 8, 8), dtype=np.float32)
    )  # untouched


def test_the_sample_stays_on_the_device_between_steps(tmp_path, gpu):
    plan = _sampler_plan(steps=5)
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with _denoiser(tmp_path) as denoiser:
        gpu.log.clear()
        denoiser.run_chain(plan, x, _noise_table(plan, x.shape).__getitem__)
    want = ["H2D", "memset"]  # x in, x0_prev = 0
    for (
        needs_noise
    ) in plan.needs_noise.tolist():  # timestep, coefficients, noise when the step adds some; engine; update
        want += ["H2D", "H2D"] + ["H2D"] * needs_noise + ["engine", "update"]
    assert gpu.log == want + ["D2H"]  # x comes back once, at the end
    assert [launch["n"] for launch in gpu.launches] == [2 * 64] * 5
    # the grid is (blocks per image, images): one block covers an image of 64
    assert all(launch["block"] == (256, 1, 1) and launch["grid"] == (1, 2, 1) for launch in gpu.launches)


def test_a_cuda_graph_is_captured_once_per_batch_and_replayed(tmp_path, gpu):
    plan = _sampler_plan(steps=4)
    with _denoiser(tmp_path, cuda_graph=True) as denoiser:
        for batch in (2, 2, 3):
            x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8), dtype=np.float32)
            table = _noise_table(plan, x.shape)
            got = denoiser.run_chain(plan, x, table.__getitem__)
            np.testing.assert_allclose(got, _host_chain(plan, x, table), rtol=1e-6, atol=1e-6)
            assert gpu.live()["graphs"] == gpu.live()["graph_execs"] == 1
        # per capture (batch 2, then batch 3) one eager launch over no elements loads the kernel outside the
        # capture, then the captured one: replays reuse it
        assert [launch["n"] for launch in gpu.launches] == [0, 2 * 64, 0, 3 * 64]
        assert gpu.log.count("update") == 3 * plan.steps + 2  # + the two eager launches


def test_device_call_runs_the_engine_on_resident_buffers(tmp_path, gpu):
    for cuda_graph in (False, True):
        with _denoiser(tmp_path / str(cuda_graph), cuda_graph=cuda_graph) as denoiser:
            x = np.full((3, 1, 8, 8), 2.0, dtype=np.float32)
            denoiser(x, np.full(3, 5.0, np.float32))
            call = denoiser.device_call()
            gpu.log.clear()
            for _ in range(3):
                call()
            assert gpu.log == ["engine"] * 3  # no copies
            output = gpu.view(denoiser._context._addresses["model_output"], 3 * 64, np.float32)
            np.testing.assert_array_equal(output, fake_gpu.fake_unet(x, np.full(3, 5.0)).reshape(-1))


def test_close_frees_every_allocation(tmp_path, gpu):
    denoiser = _denoiser(tmp_path, cuda_graph=True)
    plan = _sampler_plan(steps=3)
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    denoiser.run_chain(plan, x, _noise_table(plan, x.shape).__getitem__)
    denoiser.device_call()()
    assert gpu.live() == {"device": 6, "pinned": 5, "streams": 1, "modules": 1, "graphs": 2, "graph_execs": 2}
    denoiser.close()
    assert gpu.live() == {}
    denoiser.close()  # twice is fine
    with pytest.raises(DtkError, match="closed"):
        denoiser(x, np.zeros(2, np.float32))


def test_a_plan_for_another_gpu_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    _install(monkeypatch, fake_gpu.FakeGpu())
    plan, manifest = _plan_file(tmp_path)
    other = fake_gpu.FakeGpu(name="NVIDIA H200", compute_capability=(9, 0))
    _install(monkeypatch, other)
    with pytest.raises(
        DtkError, match=r"built for NVIDIA Fake GPU \(sm_87\), this GPU is NVIDIA H200 \(sm_90\)"
    ):
        TensorRTDenoiser(plan, manifest)
    assert other.live() == {}


def test_a_plan_for_another_tensorrt_is_refused(tmp_path, monkeypatch):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    fake = fake_gpu.FakeGpu()
    _install(monkeypatch, fake, "10.3.0")
    plan, manifest = _plan_file(tmp_path)
    _install(monkeypatch, fake, "10.8.0")
    with pytest.raises(DtkError, match=r"built with TensorRT 10\.3\.0, this machine has TensorRT 10\.8\.0"):
        TensorRTDenoiser(plan, manifest)


def test_a_version_compatible_plan_loads_with_host_code_allowed(tmp_path, monkeypatch):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    fake = fake_gpu.FakeGpu()
    _install(monkeypatch, fake)
    plan, manifest = _plan_file(tmp_path, version_compat=True)
    with TensorRTDenoiser(plan, manifest) as denoiser:
        assert denoiser._runtime.engine_host_code_allowed is True


def test_a_plan_that_does_not_match_its_sidecar_is_refused(tmp_path, gpu):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest = _plan_file(tmp_path)
    plan.write_bytes(plan.read_bytes() + b" ")
    with pytest.raises(DtkError, match="does not match its sidecar"):
        TensorRTDenoiser(plan, manifest)
    assert gpu.live() == {}


def test_a_plan_tensorrt_cannot_load_is_reported_with_its_reason(tmp_path, gpu):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.sidecar import load_sidecar

    plan, manifest = _plan_file(tmp_path)
    plan.write_bytes(b"garbage")
    sidecar = load_sidecar(plan)
    sidecar.plan_sha256 = hashlib.sha256(b"garbage").hexdigest()
    sidecar.save(plan)
    with pytest.raises(DtkError, match=r"TensorRT could not load this plan \(Serialization assertion"):
        TensorRTDenoiser(plan, manifest)
    assert gpu.live() == {}  # the stream made before the failure is gone too


def test_tensor_names_must_match_the_manifest(tmp_path, gpu):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest = _plan_file(tmp_path)
    manifest.outputs[0].name = "eps"
    with pytest.raises(
        DtkError, match=r"has tensors \['model_output', 'sample', 'timestep'\], the manifest names"
    ):
        TensorRTDenoiser(plan, manifest)
    assert gpu.live() == {}


def test_without_tensorrt_the_error_says_how_to_get_it(tmp_path, gpu, monkeypatch):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest = _plan_file(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DtkError, match=r"TensorRT is not installed .*pip install dtk\[tensorrt\]"):
        TensorRTDenoiser(plan, manifest)


def test_without_nvrtc_run_chain_falls_back_to_the_host_update(tmp_path, monkeypatch):
    fake = fake_gpu.FakeGpu(nvrtc=False)
    _install(monkeypatch, fake)
    plan = _sampler_plan(steps=4)
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8), dtype=np.float32)
    table = _noise_table(plan, x.shape)
    with _denoiser(tmp_path) as denoiser, pytest.warns(RuntimeWarning, match="nvidia-cuda-nvrtc"):
        got = denoiser.run_chain(plan, x, table.__getitem__)
    np.testing.assert_allclose(got, _host_chain(plan, x, table), rtol=1e-6, atol=1e-6)
    assert fake.launches == [] and fake.live() == {}


def test_the_kernel_is_compiled_for_the_gpus_architecture(tmp_path, monkeypatch):
    for compute_capability, option in (
        ((8, 7), b"--gpu-architecture=sm_87"),
        ((12, 0), b"--gpu-architecture=compute_90"),
    ):
        fake = fake_gpu.FakeGpu(compute_capability=compute_capability)
        _install(monkeypatch, fake)
        plan = _sampler_plan(steps=2)
        x = np.zeros((1, 1, 8, 8), dtype=np.float32)
        with _denoiser(tmp_path / option.decode(), cuda_graph=False) as denoiser:
            denoiser.run_chain(plan, x, _noise_table(plan, x.shape).__getitem__)
        assert fake.nvrtc_options == [[option]]


def test_pycuda_can_allocate(tmp_path, gpu, monkeypatch):
    package, driver = fake_gpu.fake_pycuda(gpu)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    denoiser = _denoiser(tmp_path, allocator="pycuda")
    assert len(driver.context_stack) == 1
    x = np.ones((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(denoiser(x, np.zeros(2, np.float32)), fake_gpu.fake_unet(x, np.zeros(2)))
    denoiser.close()
    assert gpu.live() == {} and driver.context_stack == []


def test_unknown_allocator_and_missing_pycuda(tmp_path, gpu, monkeypatch):
    with pytest.raises(DtkError, match="unknown allocator 'cupy'"):
        _denoiser(tmp_path / "a", allocator="cupy")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    with pytest.raises(DtkError, match=r"allocator 'pycuda' needs pycuda \(`pip install pycuda`\)"):
        _denoiser(tmp_path / "b", allocator="pycuda")
    assert gpu.live() == {}


def test_cuda_errors_name_the_call_and_the_error(gpu):
    from dtk.runtime.backends.cuda import Cuda, CudaError, CudaLibraryMissing, gpu_info

    cuda = Cuda()
    with pytest.raises(
        CudaError, match=r"^cudaFree failed: cudaErrorInvalidValue \(fake text for cudaErrorInvalidValue\)$"
    ):
        cuda.rt("cudaFree", 12345)
    assert cuda.rt("cudaGetDeviceCount") == 1
    info = gpu_info(0, cuda)
    assert (info.name, info.compute_capability, info.sm) == ("NVIDIA Fake GPU", (8, 7), "sm_87")
    with pytest.raises(DtkError, match=r"GPU 3 does not exist; this machine has 1"):
        gpu_info(3, cuda)
    gpu.driver_ok = False
    with pytest.raises(CudaLibraryMissing, match="cuInit: .*NVIDIA driver library"):
        cuda.drv("cuInit", 0)
    with pytest.raises(
        DtkError, match=r"no CUDA GPU is usable here \(cudaGetDeviceCount failed: cudaErrorInsufficientDriver"
    ):
        gpu_info(0, cuda)


def test_real_cuda_python_errors_are_readable_too():
    """cuda-python as installed here (no driver): the same call gives a readable DtkError, not a tuple."""
    pytest.importorskip("cuda.bindings.runtime")
    from dtk.runtime.backends.cuda import Cuda, CudaError, gpu_info

    cuda = Cuda()
    try:
        count = cuda.rt("cudaGetDeviceCount")
    except CudaError as e:
        assert str(e).startswith("cudaGetDeviceCount failed: cudaError")
        with pytest.raises(DtkError, match="no CUDA GPU is usable here"):
            gpu_info(0, cuda)
    else:
        assert count >= 0


def test_the_pipeline_samples_through_run_chain(tmp_path, gpu):
    """Pipeline.load(backend="tensorrt") → run_chain with the pipeline's noise and callback: the same latents
    as the host loop on the same function with the same seeded noise."""
    from dtk.runtime.pipeline import Pipeline
    from dtk.runtime.samplers import NoiseSource, make_plan

    plan_path, manifest = _plan_file(tmp_path)
    steps, done = [], []
    with Pipeline.load(plan_path, backend="tensorrt", cuda_graph=True) as pipe:
        assert pipe.backend == "tensorrt"
        got = pipe.sample_latents(3, steps=5, sampler="ddpm", seed=7, callback=lambda d, _: done.append(d))
    assert done == list(range(1, 6))

    plan = make_plan("ddpm", manifest.diffusion, 5)
    source = NoiseSource(7)
    x = source.initial(3, (1, 8, 8))

    def denoise(s, t):
        steps.append(t)
        return fake_gpu.fake_unet(s, np.full(len(s), t))

    want = sample_loop(denoise, x, plan, lambda i: source.step(3, (1, 8, 8)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert steps == plan.timesteps.tolist()
    assert gpu.live() == {}


@pytest.mark.parametrize("transform", ["threshold", "clip"])
def test_run_chain_keeps_two_x0_and_thresholds_per_image(tmp_path, gpu, transform):
    """The d2 history term and dynamic thresholding through the backend's coefficient rows (the fake kernel
    follows the CUDA source's contract), against the host loop."""
    from dtk.runtime.samplers import Threshold

    base = _sampler_plan(steps=5, seed=3, clip=None)
    coeffs = base.coeffs.copy()
    coeffs[:, 7] = np.linspace(0.2, -0.3, base.steps)  # d2 on every step
    threshold = Threshold(0.8, 1.4) if transform == "threshold" else None
    plan = SamplerPlan("d2", base.timesteps, coeffs, None if threshold else 1.0, threshold)
    assert plan.history == 2
    x = np.random.default_rng(4).standard_normal((3, 1, 8, 8), dtype=np.float32) * 2
    table = _noise_table(plan, x.shape)
    want = _host_chain(plan, x, table)
    with _denoiser(tmp_path, cuda_graph=True) as denoiser:
        got = denoiser.run_chain(plan, x, table.__getitem__)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
