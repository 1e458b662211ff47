"""`pipe(num_images=..., num_inference_steps=..., generator=..., output_type=..., latents=...)`, the call a
diffusers user reaches for, gives the explicit API's images; the step callback; `batch_size` → `max_batch`."""

from __future__ import annotations

import numpy as np
import pytest

from dtk.runtime import Pipeline
from dtk.runtime.errors import DtkError
from dtk.runtime.pipeline_output import PipelineOutput
from dtk.runtime.samplers import NoiseSource


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    with Pipeline.load(tiny_bundle, backend="onnxruntime", providers=["cpu"], threads=1) as pipe:
        yield pipe


def test_the_call_gives_the_explicit_apis_images(pipe):
    out = pipe(num_images=3, num_inference_steps=4, generator=7, output_type="uint8", max_batch=2)
    assert isinstance(out, PipelineOutput)
    np.testing.assert_array_equal(out.images, pipe.sample(num=3, steps=4, seed=7))
    latent = pipe(3, 4, generator=7, output_type="latent").images
    np.testing.assert_array_equal(latent, pipe.sample_latents(num=3, steps=4, seed=7))
    (images,) = pipe(3, 4, generator=7, output_type="uint8", return_dict=False)
    np.testing.assert_array_equal(images, out.images)


def test_a_generator_is_drawn_once_for_the_seed(pipe):
    expected_seed = int(np.random.default_rng(5).integers(2**63))
    rng = np.random.default_rng(5)
    first = pipe(num_images=2, num_inference_steps=3, generator=rng, output_type="latent").images
    np.testing.assert_array_equal(first, pipe.sample_latents(num=2, steps=3, seed=expected_seed))
    second = pipe(num_images=2, num_inference_steps=3, generator=rng, output_type="latent").images
    assert not np.array_equal(first, second)  # the generator moved on, as in diffusers
    # one generator (or seed) per image: image k is what sample(num=1, seed=entry) gives
    per_image = pipe(num_images=2, num_inference_steps=3, generator=[3, 9], output_type="latent").images
    np.testing.assert_array_equal(per_image[1:], pipe.sample_latents(num=1, steps=3, seed=9))
    np.testing.assert_array_equal(per_image[:1], pipe.sample_latents(num=1, steps=3, seed=3))
    fresh = [pipe(1, 2, output_type="latent").images for _ in range(2)]  # None: fresh entropy
    assert not np.array_equal(*fresh)


def test_output_types(pipe):
    latent = pipe(2, 3, generator=1, output_type="latent").images
    as_np = pipe(2, 3, generator=1).images  # "np" is the default, as in diffusers
    assert as_np.dtype == np.float32 and as_np.shape == (2, 16, 16, 1)
    assert as_np.min() >= 0.0 and as_np.max() <= 1.0
    np.testing.assert_allclose(as_np, (latent.clip(-1, 1).transpose(0, 2, 3, 1) + 1) / 2, atol=1e-7)
    pixels = pipe(2, 3, generator=1, output_type="uint8").images
    assert np.abs(np.rint(as_np * 255).astype(int) - pixels).max() <= 1
    pil = pipe(2, 3, generator=1, output_type="pil").images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(pil[1]), pixels[1, ..., 0])


def test_latents_replace_the_initial_noise(pipe):
    chw = pipe.sample_shape
    drawn = NoiseSource(4).initial(3, chw)
    same = pipe(3, 4, generator=4, latents=drawn, output_type="latent", max_batch=2).images
    np.testing.assert_array_equal(same, pipe.sample_latents(num=3, steps=4, seed=4))
    zeros = pipe(3, 4, generator=4, latents=np.zeros((3, *chw), np.float32), output_type="latent").images
    assert not np.array_equal(zeros, same)
    with pytest.raises(
        DtkError, match=r"latents must be float32 \[3, 1, 16, 16\], got shape \[2, 1, 16, 16\]"
    ):
        pipe(3, 4, latents=drawn[:2])


def test_the_step_callback_sees_index_timestep_and_latents(pipe):
    seen = []
    final = pipe(
        2, 4, generator=3, output_type="latent", callback=lambda i, t, x: seen.append((i, t, x.copy()))
    ).images
    plan = pipe.plan("ddim", 4)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(plan.timesteps.tolist()))
    assert all(x.shape == (2, 1, 16, 16) and x.dtype == np.float32 for _, _, x in seen)
    np.testing.assert_array_equal(seen[-1][2], final)
    every_other = []
    pipe(
        3,
        4,
        generator=3,
        callback=lambda i, t, x: every_other.append((i, len(x))),
        callback_steps=2,
        max_batch=2,
    )
    assert every_other == [(0, 2), (2, 2), (0, 1), (2, 1)]  # per chunk: images 0-1, then image 2


def test_batch_size_is_now_max_batch(pipe):
    with pytest.warns(DeprecationWarning, match="batch_size is renamed max_batch"):
        old = pipe.sample_latents(num=3, steps=2, seed=0, batch_size=1)
    np.testing.assert_array_equal(old, pipe.sample_latents(num=3, steps=2, seed=0, max_batch=1))
    with pytest.warns(DeprecationWarning):
        assert pipe.chunks(3, batch_size=2) == pipe.chunks(3, max_batch=2) == [(0, 2, 2), (2, 1, 1)]
    with pytest.warns(DeprecationWarning), pytest.raises(DtkError, match="pass max_batch only"):
        pipe.sample(num=2, steps=2, max_batch=2, batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(output_type="tensor"), "unknown output_type 'tensor'; choose one of np, uint8, pil, latent"),
        (dict(generator="7"), "generator must be a non-negative int seed or an np.random.Generator, got '7'"),
        (dict(generator=-1), "generator must be a non-negative int seed"),
        (dict(generator=[1]), "got 1 generators for 2 images: pass one per image"),
        (dict(callback=print, callback_steps=0), "callback_steps must be a positive integer, got 0"),
    ],
)
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(DtkError, match=message):
        pipe(2, 2, **kwargs)
