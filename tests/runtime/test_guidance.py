"""Classifier-free guidance and class labels in the runtime: the combination against a hand computation of
the two calls, the 2B batching against two separate calls, images without a class mixed into a guided run,
label resolution and its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from toy_manifest import toy_manifest

from dtk.runtime import Pipeline
from dtk.runtime.errors import DtkError
from dtk.runtime.guidance import check_classes, guided, resolve_labels, sampling_labels
from dtk.runtime.manifest import Manifest, TensorSpec, load_manifest
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

CLASSES = {"num_classes": 3, "names": ["circle", "square", "triangle"], "null_class": 3}


class LabelDenoiser:
    """out = 0.1·x + t/1000 + 0.05·(label + 1): every class, the null class included, predicts differently."""

    name = "fake-conditional"

    def __init__(self, batch_range):
        self.batch_range = batch_range
        self.calls = []  # (batch, labels) of every call

    def __call__(self, sample, timestep, class_labels):
        assert timestep.shape == (len(sample),) and class_labels.dtype == np.int64
        self.calls.append((len(sample), class_labels.tolist()))
        return (
            0.1 * sample
            + timestep.reshape(-1, 1, 1, 1) / 1000
            + 0.05 * (class_labels + 1)[:, None, None, None]
        )

    def close(self):
        pass


def conditional_manifest(manifest: Manifest, low: int, high: int) -> Manifest:
    inputs = [*manifest.inputs, TensorSpec("class_labels", "int64", ["batch"])]
    return dataclasses.replace(
        manifest, inputs=inputs, classes=dict(CLASSES), batch={"min": low, "opt": low, "max": high}
    )


@pytest.fixture(scope="module")
def manifest():
    """An unconditional 1×8×8 manifest, as export writes one (no bundle needed: the denoisers are fakes)."""
    return toy_manifest(batch=(1, 4, 4), chw=(1, 8, 8))


def pipeline(manifest, low=1, high=8) -> Pipeline:
    return Pipeline(conditional_manifest(manifest, low, high), LabelDenoiser((low, high)))


def hand_guided(manifest, labels, scale, steps=4, seed=2):
    """The guided chain written out: two calls per step, ε_u + s(ε_c − ε_u), then the plan's update."""
    denoiser, num = LabelDenoiser((1, 64)), len(labels)
    chw = (manifest.in_channels, *manifest.image_size)
    null = np.full(num, CLASSES["null_class"], dtype=np.int64)

    def denoise(x, t):
        ts = np.full(num, t, np.float32)
        eps_c, eps_u = denoiser(x, ts, np.asarray(labels)), denoiser(x, ts, null)
        return eps_u + scale * (eps_c - eps_u)

    source = NoiseSource(seed)
    x = source.initial(num, chw)
    return sample_loop(
        denoise, x, make_plan("ddpm", manifest.diffusion, steps), lambda i: source.step(num, chw)
    )


def test_guidance_matches_the_two_calls_by_hand(manifest):
    pipe = pipeline(manifest)
    got = pipe.sample_latents(num=3, steps=4, sampler="ddpm", seed=2, labels=[0, 2, 1], guidance_scale=3.0)
    np.testing.assert_allclose(got, hand_guided(manifest, [0, 2, 1], 3.0), rtol=1e-6, atol=1e-6)
    # one call of 2B per step: the requested labels, then the null class
    assert pipe.denoiser.calls == [(6, [0, 2, 1, 3, 3, 3])] * 4


def test_batching_2b_and_two_calls_give_the_same_images(manifest):
    together = pipeline(manifest, 1, 8)  # 2B = 8 fits: one call per step
    apart = pipeline(manifest, 1, 4)  # 2B = 8 does not: two calls per step
    kwargs = dict(num=4, steps=5, sampler="ddim", seed=9, labels="triangle", guidance_scale=2.5)
    a, b = together.sample_latents(**kwargs), apart.sample_latents(**kwargs)
    np.testing.assert_array_equal(a, b)
    assert {n for n, _ in together.denoiser.calls} == {8}
    assert apart.denoiser.calls[:2] == [(4, [2, 2, 2, 2]), (4, [3, 3, 3, 3])]


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(manifest):
    pipe = pipeline(manifest)
    conditional = pipe.sample_latents(num=2, steps=3, seed=1, labels=1)
    assert pipe.denoiser.calls == [(2, [1, 1])] * 3
    pipe.denoiser.calls.clear()
    unconditional = pipe.sample_latents(num=2, steps=3, seed=1, labels=1, guidance_scale=0.0)
    assert pipe.denoiser.calls == [(2, [3, 3])] * 3
    np.testing.assert_array_equal(unconditional, pipe.sample_latents(num=2, steps=3, seed=1))  # null class
    assert not np.allclose(conditional, unconditional)


@pytest.mark.parametrize("high", [8, 4], ids=["one call on 2B", "two calls"])
def test_one_run_mixes_images_with_and_without_a_class(manifest, high):
    """A None label is the null class: under guidance out_u + s·(out_u − out_u) = out_u, the unconditional
    sample, byte for byte what a separate run without labels makes for the same seed."""
    mixed = pipeline(manifest, 1, high)
    kwargs = dict(steps=4, sampler="ddpm", guidance_scale=3.0)
    together = mixed.sample_latents(seeds=[5, 6, 7], labels=[1, None, "triangle"], **kwargs)
    if high == 8:  # one call per step: the requested labels (the null class for None), then the null class
        assert mixed.denoiser.calls == [(6, [1, 3, 2, 3, 3, 3])] * 4
    else:
        assert mixed.denoiser.calls[:2] == [(3, [1, 3, 2]), (3, [3, 3, 3])]
    labelled = pipeline(manifest, 1, high).sample_latents(seeds=[5, 7], labels=[1, 2], **kwargs)
    unlabelled = pipeline(manifest, 1, high).sample_latents(seeds=[6], **kwargs)
    assert together[[0, 2]].tobytes() == labelled.tobytes()
    assert together[1].tobytes() == unlabelled[0].tobytes()
    with_a_class = pipeline(manifest, 1, high).sample_latents(seeds=[6], labels=[0], **kwargs)
    assert not np.allclose(together[1], with_a_class[0])  # None is not some class: it is "no class"


def test_chunks_keep_each_images_label(manifest):
    whole = pipeline(manifest, 1, 8).sample_latents(
        num=5, steps=3, seed=4, labels=[0, 1, 2, 0, 1], guidance_scale=2
    )
    chunked = pipeline(manifest, 1, 8).sample_latents(
        num=5, steps=3, seed=4, labels=[0, 1, 2, 0, 1], guidance_scale=2, max_batch=2
    )
    np.testing.assert_allclose(whole, chunked, rtol=1e-6, atol=1e-6)


def test_guided_works_on_any_array_type_through_concat():
    calls = []

    def denoise(x, t, labels):
        calls.append(list(labels))
        return x + labels[:, None]

    step = guided(denoise, np.array([1, 2]), 5, 2.0, max_batch=4, concat=np.concatenate)
    out = step(np.zeros((2, 3)), 10)
    # ε_u = 5, ε_c = label: 5 + 2·(label − 5)
    np.testing.assert_array_equal(out, [[-3.0] * 3, [-1.0] * 3])
    assert calls == [[1, 2, 5, 5]]


def test_labels_resolve_from_indices_texts_names_and_all():
    assert resolve_labels(2, CLASSES, 2).tolist() == [2, 2]
    assert resolve_labels("1", CLASSES, 1).tolist() == [1]
    assert resolve_labels(["square", 0, "2"], CLASSES, 3).tolist() == [1, 0, 2]
    assert resolve_labels("all", CLASSES, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert resolve_labels("all", CLASSES, 6).dtype == np.int64
    assert sampling_labels(CLASSES, None, 1.0, 2, "b").tolist() == [3, 3]
    # None: no class for that image, the null class (its index itself is not a class label)
    assert resolve_labels([0, None, "triangle"], CLASSES, 3).tolist() == [0, 3, 2]
    assert sampling_labels(CLASSES, [None, "1"], 2.0, 2, "b").tolist() == [3, 1]
    assert resolve_labels(np.array([None, 2], dtype=object), CLASSES, 2).tolist() == [3, 2]


@pytest.mark.parametrize(
    "labels, num, message",
    [
        (7, 1, r"class 7 is out of range: this model has classes 0\.\.2"),
        ("-1", 1, r"class -1 is out of range"),
        ("hexagon", 1, r"unknown class 'hexagon'; this model's classes are circle, square, triangle"),
        ([0, 1], 3, r"2 labels for 3 images"),
        ("all", 4, r'class "all" needs a multiple of 3 images'),
        (1.5, 1, r"a class label is an integer or a class name"),
        ([3], 1, r"class 3 is out of range: this model has classes 0\.\.2"),  # the null class's index
    ],
)
def test_bad_labels_get_one_line(labels, num, message):
    with pytest.raises(DtkError, match=message) as error:
        resolve_labels(labels, CLASSES, num)
    assert "\n" not in str(error.value)


def test_guidance_needs_a_conditional_model_with_a_null_class(manifest):
    unconditional = Pipeline(manifest, LabelDenoiser((1, 4)))
    with pytest.raises(DtkError, match="this model is unconditional: it takes no class labels"):
        unconditional.sample_latents(num=1, steps=2, labels=3)
    with pytest.raises(DtkError, match="guidance scale 3 needs a model trained with a null class"):
        unconditional.sample_latents(num=1, steps=2, guidance_scale=3)
    no_null = {**CLASSES, "null_class": None}
    with pytest.raises(DtkError, match="has no null class"):
        sampling_labels(no_null, 1, 2.0, 1, "bundle")
    with pytest.raises(DtkError, match="this model has no null class; pass class labels"):
        sampling_labels(no_null, None, 1.0, 1, "bundle")
    no_null_pipe = Pipeline(
        dataclasses.replace(conditional_manifest(manifest, 1, 4), classes=no_null), LabelDenoiser((1, 4))
    )
    with pytest.raises(DtkError) as error:  # one image without a class, on a model that has no "no class"
        no_null_pipe.sample_latents(seeds=[1, 2], steps=2, labels=[1, None])
    assert str(error.value) == "this model has no null class, so every image needs a class label (got None)"
    assert no_null_pipe.denoiser.calls == []  # refused before any network call
    with pytest.raises(DtkError, match="guidance scale must be a finite number ≥ 0"):
        sampling_labels(CLASSES, 1, -1.0, 1, "bundle")


def test_manifest_records_classes_and_refuses_bad_ones(manifest, tmp_path):
    conditional = conditional_manifest(manifest, 1, 4)
    conditional.save(tmp_path)
    back = load_manifest(tmp_path)
    assert back.classes == CLASSES and back.inputs[2].name == "class_labels"
    assert "classes" not in manifest.to_dict()  # an unconditional manifest reads as it always did
    with pytest.raises(DtkError, match="null_class 1 is one of the 3 classes"):
        check_classes({**CLASSES, "null_class": 1})
    with pytest.raises(DtkError, match="names must be 3 strings"):
        check_classes({**CLASSES, "names": ["a"]})
    data = conditional.to_dict()
    data["io"]["inputs"] = data["io"]["inputs"][:2]
    with pytest.raises(DtkError, match="a class-conditional bundle needs inputs"):
        Manifest.from_dict(data)
