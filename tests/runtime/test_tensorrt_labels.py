"""A class-conditional plan on TensorRTDenoiser, with the fake TensorRT and GPU (tests/runtime/fake_gpu.py):
class_labels is bound as the engine's third input with its own profile, None feeds the null class, and guided
sampling gives the images ONNX Runtime gives on the same bundle. Nothing here ran on a real GPU."""

from __future__ import annotations

import fake_gpu
import numpy as np
import pytest

from dtk.runtime.errors import DtkError

CLASSES = {"num_classes": 3, "names": ["a", "b", "c"], "null_class": 3}


@pytest.fixture
def gpu(monkeypatch):
    fake = fake_gpu.FakeGpu()
    monkeypatch.setattr(fake, "trt", fake_gpu.install(monkeypatch, fake), raising=False)
    return fake


@pytest.fixture
def conditional_plan(tmp_path, gpu):
    plan, manifest = fake_gpu.plan_file(tmp_path, (1, 2, 8), bundle_options={"classes": CLASSES})
    return plan, manifest, gpu.trt


def test_labels_are_an_engine_input_with_a_profile(conditional_plan):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest, trt = conditional_plan
    assert trt._builds[-1]["profile"]["class_labels"] == ((1,), (2,), (8,))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    t = np.array([1.0, 500.0, 999.0], np.float32)
    with TensorRTDenoiser(plan, manifest) as denoiser:
        out = denoiser(x, t, np.array([0, 2, 1]))
        expected = fake_gpu.fake_unet(x, t, class_labels=np.array([0, 2, 1]))
        np.testing.assert_allclose(out, expected, atol=1e-6)
        np.testing.assert_array_equal(denoiser(x, t), denoiser(x, t, np.array([3, 3, 3])))  # the null class
        with pytest.raises(DtkError, match="class_labels must be integers"):
            denoiser(x, t, np.array([0.5, 1.0, 2.0]))


def test_guided_samples_match_onnxruntime_on_the_same_bundle(conditional_plan):
    from dtk.runtime import Pipeline
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.samplers import sample_loop

    plan, manifest, _ = conditional_plan
    kwargs = dict(num=4, steps=5, sampler="ddim", seed=2, labels=["c", 0, 1, 2], guidance_scale=3.0)
    with Pipeline.load(plan.parent, backend="tensorrt") as gpu_pipe:
        on_tensorrt = gpu_pipe.sample_latents(**kwargs)
        null = gpu_pipe.sample_latents(num=2, steps=5, seed=2)  # no labels: the null class
    with Pipeline.load(plan.parent, backend="onnxruntime", providers=["cpu"], threads=1) as cpu_pipe:
        on_onnxruntime = cpu_pipe.sample_latents(**kwargs)
        null_cpu = cpu_pipe.sample_latents(num=2, steps=5, seed=2)
    np.testing.assert_allclose(on_tensorrt, on_onnxruntime, atol=1e-5)
    np.testing.assert_allclose(null, null_cpu, atol=1e-5)
    with TensorRTDenoiser(plan, manifest) as denoiser:  # the device chain of a conditional plan: null class
        x = np.zeros((2, 1, 8, 8), np.float32)
        chained = denoiser.run_chain(gpu_pipe.plan("ddim", 5), x.copy(), None)
        np.testing.assert_allclose(
            chained, sample_loop(denoiser._denoise, x, gpu_pipe.plan("ddim", 5), None), atol=1e-5
        )


def _guided_host_chain(plan, x, labels, scale, max_batch, table):
    """runtime.guidance around the fake engine's function, then the host sampler loop."""
    from dtk.runtime.guidance import guided
    from dtk.runtime.samplers import sample_loop

    def denoise(s, t, class_labels):
        return fake_gpu.fake_unet(s, np.full(len(s), t), class_labels=class_labels)

    return sample_loop(guided(denoise, labels, CLASSES["null_class"], scale, max_batch), x, plan, table.get)


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize(("batch", "engine_calls"), [(4, 1), (5, 2)])  # max batch 8: 2B fits, or two calls
def test_the_device_chain_folds_guidance_into_its_update_kernel(
    conditional_plan, gpu, cuda_graph, batch, engine_calls
):
    """One kernel launch per step over the B images; the engine on 2B (x twice, [labels, null]) or twice on B;
    the same latents as host guidance and the host loop."""
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.samplers import make_plan

    plan_path, manifest, _ = conditional_plan
    plan = make_plan("ddpm", manifest.diffusion, 6)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((batch, 1, 8, 8), dtype=np.float32)
    table = {i: rng.standard_normal(x.shape, dtype=np.float32) for i in range(plan.steps)}
    labels = np.arange(batch) % 3
    want = _guided_host_chain(plan, x, labels, 3.0, 8, table)
    with TensorRTDenoiser(plan_path, manifest, cuda_graph=cuda_graph) as denoiser:
        launches, executions = len(gpu.launches), denoiser._context._executions
        got = denoiser.run_chain(plan, x, table.get, labels=labels, guidance_scale=3.0)
        chain_launches = gpu.launches[launches:]
        if not cuda_graph:  # (a graph's replays run outside execute_async_v3)
            assert denoiser._context._executions - executions == engine_calls * plan.steps
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # guidance moved the samples: the conditional model alone gives others
        alone = denoiser.run_chain(plan, x, table.get, labels=labels, guidance_scale=1.0)
        assert np.abs(alone - got).max() > 1e-3
        np.testing.assert_allclose(
            alone, _guided_host_chain(plan, x, labels, 1.0, 8, table), rtol=1e-5, atol=1e-5
        )
        if engine_calls == 2:  # the tensors are bound back to their own buffers after each step
            assert denoiser._context._addresses["model_output"] == denoiser._device["model_output"].ptr
    recorded = [launch for launch in chain_launches if launch["n"]]  # (a graph's warm-up launch is empty)
    assert [launch["n"] for launch in recorded] == [batch * 64] * (1 if cuda_graph else plan.steps)
    assert gpu.live() == {}


def test_guided_pipeline_on_the_device_chain_matches_onnxruntime(conditional_plan):
    """Pipeline → run_chain with labels and s (5 images: two engine calls a step) under a CUDA graph."""
    from dtk.runtime import Pipeline

    plan, _, _ = conditional_plan
    kwargs = dict(num=5, steps=5, sampler="ddpm", seed=3, labels=["a", "b", "c", 0, 1], guidance_scale=2.5)
    with Pipeline.load(plan.parent, backend="tensorrt", cuda_graph=True) as gpu_pipe:
        on_tensorrt = gpu_pipe.sample_latents(**kwargs)
        unguided = gpu_pipe.sample_latents(**{**kwargs, "guidance_scale": 0.0})
    with Pipeline.load(plan.parent, backend="onnxruntime", providers=["cpu"], threads=1) as cpu_pipe:
        on_onnxruntime = cpu_pipe.sample_latents(**kwargs)
        unguided_cpu = cpu_pipe.sample_latents(**{**kwargs, "guidance_scale": 0.0})
    np.testing.assert_allclose(on_tensorrt, on_onnxruntime, atol=1e-5)
    np.testing.assert_allclose(unguided, unguided_cpu, atol=1e-5)
    assert np.abs(on_tensorrt - unguided).max() > 1e-3


def test_chain_guidance_is_refused_where_it_cannot_run(conditional_plan):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.samplers import make_plan

    plan_path, manifest, _ = conditional_plan
    plan = make_plan("ddim", manifest.diffusion, 3)
    x = np.zeros((2, 1, 8, 8), np.float32)
    with TensorRTDenoiser(plan_path, manifest) as denoiser:
        with pytest.raises(DtkError, match="guidance scale must be a finite number"):
            denoiser.run_chain(plan, x, None, labels=[0, 1], guidance_scale=-1.0)
        with pytest.raises(DtkError, match="class_labels must be integers"):
            denoiser.run_chain(plan, x, None, labels=[0, 1, 2], guidance_scale=2.0)


def test_without_nvrtc_the_guided_chain_guides_on_the_host(tmp_path, monkeypatch):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.samplers import make_plan

    fake = fake_gpu.FakeGpu(nvrtc=False)
    fake_gpu.install(monkeypatch, fake)
    plan_path, manifest = fake_gpu.plan_file(tmp_path, (1, 2, 8), bundle_options={"classes": CLASSES})
    plan = make_plan("ddpm", manifest.diffusion, 4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 1, 8, 8), dtype=np.float32)
    table = {i: rng.standard_normal(x.shape, dtype=np.float32) for i in range(plan.steps)}
    labels = np.array([2, 1, 0, 0, 1])
    with TensorRTDenoiser(plan_path, manifest) as denoiser, pytest.warns(RuntimeWarning, match="on the host"):
        got = denoiser.run_chain(plan, x, table.get, labels=labels, guidance_scale=2.0)
    np.testing.assert_allclose(got, _guided_host_chain(plan, x, labels, 2.0, 8, table), rtol=1e-5, atol=1e-5)
    assert fake.launches == [] and fake.live() == {}
