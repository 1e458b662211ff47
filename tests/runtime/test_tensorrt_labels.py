"""A class-conditional plan on TensorRTDenoiser, with the fake TensorRT and GPU (tests/runtime/fake_gpu.py):
class_labels is bound as the engine's third input with its own profile, None feeds the null class, and guided
sampling gives the images ONNX Runtime gives on the same bundle. Nothing here ran on a real GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dtk.runtime.errors import DtkError

CLASSES = {"num_classes": 3, "names": ["a", "b", "c"], "null_class": 3}


def _fakes():
    name = "dtk_tests_fake_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "fake_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def conditional_plan(tmp_path, monkeypatch):
    fakes = _fakes()
    trt = fakes.install(monkeypatch, fakes.FakeGpu())
    plan, manifest = fakes.plan_file(tmp_path, (1, 2, 8), bundle_options={"classes": CLASSES})
    return plan, manifest, trt


def test_labels_are_an_engine_input_with_a_profile(conditional_plan):
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    plan, manifest, trt = conditional_plan
    assert trt._builds[-1]["profile"]["class_labels"] == ((1,), (2,), (8,))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    t = np.array([1.0, 500.0, 999.0], np.float32)
    with TensorRTDenoiser(plan, manifest) as denoiser:
        out = denoiser(x, t, np.array([0, 2, 1]))
        expected = _fakes().fake_unet(x, t, class_labels=np.array([0, 2, 1]))
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
