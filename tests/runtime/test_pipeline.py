"""Pipeline: loading bundles/.onnx/.plan, backend choice, chunking that never changes an image, padding for
fixed-batch models, progress, and the errors a user can fix."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import types

import numpy as np
import pytest

from dtk.runtime import Pipeline, pipeline
from dtk.runtime.errors import DtkError
from dtk.runtime.manifest import load_manifest
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop


class FakeDenoiser:
    """out = 0.1·x + t/1000, recording the batch of every call."""

    name = "fake"

    def __init__(self, batch_range):
        self.batch_range = batch_range
        self.batches = []
        self.closed = False

    def __call__(self, sample, timestep):
        assert timestep.shape == (len(sample),) and timestep.dtype == np.float32
        self.batches.append(len(sample))
        return 0.1 * sample + timestep.reshape(-1, 1, 1, 1) / 1000

    def close(self):
        self.closed = True


def fake_pipeline(manifest, low, high):
    manifest = dataclasses.replace(manifest, batch={"min": low, "opt": low, "max": high})
    return Pipeline(manifest, FakeDenoiser((low, high)))


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_manifest(tiny_bundle)


def reference_latents(manifest, num, steps, sampler, seed):
    """All images in one batch through the plain loop: what every chunking must reproduce."""
    source = NoiseSource(seed)
    chw = (manifest.in_channels, *manifest.image_size)
    denoiser = FakeDenoiser((1, num))
    plan = make_plan(sampler, manifest.diffusion, steps)
    x = source.initial(num, chw)
    return sample_loop(
        lambda x, t: denoiser(x, np.full(len(x), t, np.float32)), x, plan, lambda i: source.step(num, chw)
    )


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_chunking_does_not_change_the_images(manifest, batch_size):
    pipe = fake_pipeline(manifest, 1, 8)
    latents = pipe.sample_latents(num=5, steps=6, sampler="ddpm", seed=7, max_batch=batch_size)
    assert latents.shape == (5, 1, 16, 16) and latents.dtype == np.float32
    np.testing.assert_allclose(latents, reference_latents(manifest, 5, 6, "ddpm", 7), atol=1e-6)
    expected_batches = [min(batch_size, 5 - k) for k in range(0, 5, batch_size)]
    assert pipe.denoiser.batches == [b for b in expected_batches for _ in range(6)]


def test_default_chunk_is_the_models_max_batch(manifest):
    pipe = fake_pipeline(manifest, 1, 4)
    assert pipe.chunks(9) == [(0, 4, 4), (4, 4, 4), (8, 1, 1)]


def test_fixed_batch_pads_the_last_chunk(manifest):
    pipe = fake_pipeline(manifest, 4, 4)
    assert pipe.chunks(5) == [(0, 4, 4), (4, 1, 4)]
    latents = pipe.sample_latents(num=5, steps=4, sampler="ddim", seed=3)
    assert set(pipe.denoiser.batches) == {4}
    np.testing.assert_allclose(latents, reference_latents(manifest, 5, 4, "ddim", 3), atol=1e-6)


def test_minimum_batch_pads_a_small_chunk(manifest):
    pipe = fake_pipeline(manifest, 2, 8)
    assert pipe.chunks(3, max_batch=2) == [(0, 2, 2), (2, 1, 2)]
    latents = pipe.sample_latents(num=1, steps=3, sampler="dpmpp-2m", seed=0)
    assert latents.shape == (1, 1, 16, 16) and pipe.denoiser.batches == [2, 2, 2]
    np.testing.assert_allclose(latents, reference_latents(manifest, 2, 3, "dpmpp-2m", 0)[:1], atol=1e-6)


def test_callback_counts_steps_over_all_chunks(manifest):
    pipe = fake_pipeline(manifest, 1, 2)
    calls = []
    pipe.sample(
        num=5, steps=3, sampler="ddim", seed=0, callback=lambda done, total: calls.append((done, total))
    )
    assert calls == [(i, 9) for i in range(1, 10)]


def test_run_chain_is_used_when_the_denoiser_has_one(manifest):
    class ChainDenoiser(FakeDenoiser):
        def run_chain(self, plan, x, noise, callback=None):
            self.chains.append((plan.name, x.shape, callback is not None))
            for i, t in enumerate(plan.timesteps):
                if callback is not None:
                    callback(i, int(t), None)
            return np.zeros_like(x)

    denoiser = ChainDenoiser((1, 4))
    denoiser.chains = []
    pipe = Pipeline(dataclasses.replace(manifest, batch={"min": 1, "opt": 1, "max": 4}), denoiser)
    images = pipe.sample(num=6, steps=2, sampler="ddim", seed=0)
    # no listener, no step callback: a device chain need not copy x back after each step
    assert denoiser.chains == [("ddim", (4, 1, 16, 16), False), ("ddim", (2, 1, 16, 16), False)]
    assert denoiser.batches == []  # the chain ran every step
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8
    assert np.all(images == 128)  # zeros map to mid-grey
    progress = []
    pipe.sample(num=2, steps=2, sampler="ddim", seed=0, callback=lambda done, total: progress.append(done))
    assert denoiser.chains[-1][2] and progress == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num": 0}, "num must be at least 1"),
        ({"max_batch": 9}, r"batch size 9 is outside the model's batch range \(1..8\)"),
        ({"sampler": "euler-a"}, "unknown sampler 'euler-a'"),
        ({"steps": 0}, "steps must be between 1"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_arguments_are_clear_errors(manifest, kwargs, message):
    with pytest.raises(DtkError, match=message):
        fake_pipeline(manifest, 1, 8).sample(**{"num": 2, "steps": 3, **kwargs})


def test_per_image_seeds_give_each_seeds_own_image(manifest):
    """A server's batch: one run over requests with their own seeds, each image what `num=1, seed=s` makes."""
    seeds = [9, 2, 9, 0, 31]
    pipe = fake_pipeline(manifest, 1, 4)
    latents = pipe.sample_latents(steps=5, sampler="ddpm", seeds=seeds)
    assert pipe.denoiser.batches == [4] * 5 + [1] * 5  # chunked at the model's max batch
    for k, seed in enumerate(seeds):
        np.testing.assert_array_equal(
            latents[k], pipe.sample_latents(num=1, steps=5, sampler="ddpm", seed=seed)[0]
        )
    padded = fake_pipeline(manifest, 4, 4)  # a fixed-batch model pads the run: the padding is dropped
    images = padded.sample(steps=3, sampler="ddim", seeds=[5, 6])
    assert images.shape == (2, 16, 16, 1) and padded.denoiser.batches == [4, 4, 4]
    np.testing.assert_array_equal(images[1], padded.sample(num=1, steps=3, sampler="ddim", seed=6)[0])
    with pytest.raises(DtkError, match="seed must be a non-negative integer, got -1"):
        pipe.sample(seeds=[1, -1])
    with pytest.raises(DtkError, match="num must be at least 1"):
        pipe.sample(seeds=[])


def test_close_and_context_manager(manifest):
    with fake_pipeline(manifest, 1, 2) as pipe:
        assert pipe.backend == "fake"
    assert pipe.denoiser.closed


# --- on the real exported bundle ---


def test_load_bundle_onnx_and_same_images(tiny_bundle):
    with Pipeline.load(tiny_bundle, threads=1) as pipe:
        assert pipe.backend == "onnxruntime" and pipe.denoiser.batch_range == (1, 4)
        images = pipe.sample(num=3, steps=5, sampler="ddpm", seed=11)
        latents = pipe.sample_latents(num=3, steps=5, sampler="ddpm", seed=11, max_batch=1)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    assert images.std() > 10  # not a blank image
    with Pipeline.load(tiny_bundle / "unet.onnx", backend="onnxruntime", threads=1) as pipe:
        again = pipe.sample_latents(num=3, steps=5, sampler="ddpm", seed=11)
    np.testing.assert_allclose(again, latents, atol=1e-4)  # batch 3 at once vs three batches of 1
    assert not np.allclose(latents[0], latents[1])  # every image has its own noise


def test_per_image_seeds_on_onnxruntime_are_the_single_images_byte_for_byte(tiny_bundle):
    """What dtk_sampler serves: a batched run over request seeds equals one `num=1` call per seed, exactly."""
    seeds = [3, 0, 8, 3]
    with Pipeline.load(tiny_bundle, threads=1) as pipe:
        for sampler, steps in (("ddim", 4), ("ddpm", 5)):
            batched = pipe.sample(steps=steps, sampler=sampler, seeds=seeds)
            alone = [pipe.sample(num=1, steps=steps, sampler=sampler, seed=s)[0] for s in seeds]
            assert all(np.array_equal(batched[k], alone[k]) for k in range(len(seeds))), sampler
    assert not np.array_equal(batched[0], batched[1])


def test_load_errors(tiny_bundle, tmp_path):
    with pytest.raises(DtkError, match="unknown backend 'torch'"):
        Pipeline.load(tiny_bundle, backend="torch")
    with pytest.raises(DtkError, match="has no TensorRT plan; build one with `dtk build-engine"):
        Pipeline.load(tiny_bundle, backend="tensorrt")
    with pytest.raises(DtkError, match="no such file or directory"):
        Pipeline.load(tmp_path / "nowhere")
    with pytest.raises(DtkError, match="no dtk manifest here"):
        Pipeline.load(tmp_path)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"x")
    with pytest.raises(DtkError, match="model.pt: not a bundle directory, .onnx or .plan"):
        Pipeline.load(checkpoint)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    (copy / "unet.plan").write_bytes(b"engine")
    with pytest.raises(DtkError, match="unet.plan: is a TensorRT plan; the onnxruntime backend needs"):
        Pipeline.load(copy / "unet.plan", backend="onnxruntime")


def test_auto_prefers_a_usable_tensorrt_plan(tiny_bundle, tmp_path, monkeypatch):
    """Which backend `auto` takes; TensorRT itself is replaced by a recording stand-in."""
    opened = []

    class StandIn(FakeDenoiser):
        name = "tensorrt"

        def __init__(self, plan_path, manifest, **opts):
            super().__init__((1, 4))
            opened.append((plan_path.name, opts))

    module = types.ModuleType("dtk.runtime.backends.tensorrt")
    module.TensorRTDenoiser = StandIn
    monkeypatch.setitem(sys.modules, "dtk.runtime.backends.tensorrt", module)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "unet.plan").write_bytes(b"engine")
    manifest = load_manifest(bundle)
    manifest.plan = "unet.plan"
    manifest.save(bundle)

    monkeypatch.setattr(pipeline, "tensorrt_usable", lambda: False)
    assert Pipeline.load(bundle, threads=1).backend == "onnxruntime"
    assert Pipeline.load(bundle / "unet.plan").backend == "tensorrt"  # a .plan path means TensorRT
    monkeypatch.setattr(pipeline, "tensorrt_usable", lambda: True)
    assert Pipeline.load(bundle, cuda_graph=True).backend == "tensorrt"
    assert Pipeline.load(bundle, backend="onnxruntime", threads=1).backend == "onnxruntime"
    assert opened == [("unet.plan", {}), ("unet.plan", {"cuda_graph": True})]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_is_not_usable_without_it():
    assert pipeline.tensorrt_usable() is False
