"""NoiseSource: per-image seeded generators, so batching and backends never change an image's noise."""

from __future__ import annotations

import numpy as np
import pytest

from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop
from dtk.runtime.schedule import DiffusionConfig

SHAPE = (1, 3, 3)


def test_initial_noise_pinned():
    """The noise contract every backend shares: PCG64([seed, image index]), float32 standard normals."""
    x = NoiseSource(0).initial(1, (1, 1, 4))
    assert x.dtype == np.float32 and x.shape == (1, 1, 1, 4)
    np.testing.assert_array_equal(
        x.ravel(), np.array([1.117622, -1.3871249, -0.4265716, -0.80358726], np.float32)
    )
    expected = np.random.Generator(np.random.PCG64([0, 0])).standard_normal((1, 1, 4), dtype=np.float32)
    np.testing.assert_array_equal(x[0], expected)


def test_step_noise_pinned():
    source = NoiseSource(7, first_index=3)
    source.initial(2, (1, 1, 2))
    step = source.step(2, (1, 1, 2))
    np.testing.assert_array_equal(
        step.ravel(), np.array([0.4491565, -1.5189441, 0.74472445, 0.4036753], np.float32)
    )


def test_image_noise_does_not_depend_on_the_batch():
    whole = NoiseSource(3)
    first = [whole.initial(5, SHAPE)] + [whole.step(5, SHAPE) for _ in range(3)]
    halves = [NoiseSource(3, 0), NoiseSource(3, 2)]
    parts = [
        [h.initial(n, SHAPE)] + [h.step(n, SHAPE) for _ in range(3)]
        for h, n in zip(halves, (2, 3), strict=True)
    ]
    for k in range(4):
        np.testing.assert_array_equal(first[k], np.concatenate([parts[0][k], parts[1][k]]))


def test_batch_split_gives_the_same_images():
    """A full noisy (DDPM) sampling run: 4 images at once equal 1 + 3 images sampled separately."""
    config = DiffusionConfig()
    plan = make_plan("ddpm", config, 20)
    abar = config.alphas_cumprod

    def denoise(x, t):
        return (x - float(np.sqrt(abar[t])) * np.tanh(x)) / float(np.sqrt(1 - abar[t]))

    def sample(first, num):
        source = NoiseSource(11, first)
        return sample_loop(denoise, source.initial(num, SHAPE), plan, lambda i: source.step(num, SHAPE))

    together = sample(0, 4)
    np.testing.assert_array_equal(together, np.concatenate([sample(0, 1), sample(1, 3)]))
    assert not np.allclose(together[0], together[1])


def test_seeds_differ():
    a, b = NoiseSource(0).initial(2, SHAPE), NoiseSource(1).initial(2, SHAPE)
    assert not np.allclose(a, b) and not np.allclose(a[0], a[1])
    np.testing.assert_array_equal(a, NoiseSource(0).initial(2, SHAPE))


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        NoiseSource(-1)
    with pytest.raises(ValueError, match="at least 1"):
        NoiseSource(0).initial(0, SHAPE)
    source = NoiseSource(0)
    with pytest.raises(RuntimeError, match="same images"):
        source.step(2, SHAPE)
    source.initial(2, SHAPE)
    with pytest.raises(RuntimeError, match="same images"):
        source.step(3, SHAPE)
    with pytest.raises(RuntimeError, match="already called"):
        source.initial(2, SHAPE)


def test_step_noise_drawn_ahead_equals_one_draw_per_step(monkeypatch):
    """Blocks of steps are drawn at once; the numbers must be those of one [C, H, W] draw per step."""
    from dtk.runtime.samplers import noise as noise_module

    monkeypatch.setattr(noise_module, "MAX_BLOCK_STEPS", 3)  # cross several block boundaries
    shape = (2, 5, 3)
    source = noise_module.NoiseSource(seed=7, first_index=4)
    source.initial(2, shape)
    drawn = [source.step(2, shape) for _ in range(8)]
    for k in range(2):
        generator = np.random.Generator(np.random.PCG64([7, 4 + k]))
        generator.standard_normal(shape, dtype=np.float32)  # the initial latent
        for step in drawn:
            np.testing.assert_array_equal(step[k], generator.standard_normal(shape, dtype=np.float32))
    assert all(step.flags.c_contiguous and step.shape == (2, *shape) for step in drawn)


def test_per_image_seeds_draw_what_each_seed_gives_alone():
    seeds = [4, 0, 4, 11]
    batch = NoiseSource.per_image(seeds)
    x = batch.initial(4, SHAPE)
    steps = [batch.step(4, SHAPE) for _ in range(3)]
    for k, seed in enumerate(seeds):
        alone = NoiseSource(seed)
        np.testing.assert_array_equal(x[k], alone.initial(1, SHAPE)[0])
        for step in steps:
            np.testing.assert_array_equal(step[k], alone.step(1, SHAPE)[0])
    with pytest.raises(ValueError, match="for 4 per-image seeds"):
        NoiseSource.per_image(seeds).initial(3, SHAPE)
    with pytest.raises(ValueError, match="non-negative"):
        NoiseSource.per_image([1, -2])


def test_a_stepper_told_the_count_draws_exactly_that_and_the_same_numbers(monkeypatch):
    from dtk.runtime.samplers import noise as noise_module

    shape = (1, 4, 4)
    told, per_step = noise_module.NoiseSource(seed=3), noise_module.NoiseSource(seed=3)
    assert np.array_equal(told.initial(2, shape), per_step.initial(2, shape))
    noise = told.stepper(2, shape, steps=5)
    drawn = [noise(i).copy() for i in range(5)]
    assert told._block.shape == (5, 2, *shape) and noise.remaining == 0  # one block, nothing past the five
    drawn.append(noise(5))  # one more than told: drawn then, still the stream's next numbers
    for got in drawn:
        np.testing.assert_array_equal(got, per_step.step(2, shape))
    monkeypatch.setattr(noise_module, "BLOCK_BYTES", 2 * 4 * 16 * 2)  # two steps of two images fit
    small = noise_module.NoiseSource(seed=3)
    small.initial(2, shape)
    noise = small.stepper(2, shape, steps=5)
    for want in drawn:
        np.testing.assert_array_equal(noise(None), want)
        assert len(small._block) <= 2
    with pytest.raises(RuntimeError, match="same images only"):
        small.stepper(3, shape)
    with pytest.raises(RuntimeError, match="shape"):
        small.stepper(2, (1, 2, 8))


@pytest.mark.parametrize("num", [1, 3])
def test_latents_drawn_with_the_first_steps_are_the_same_numbers(monkeypatch, num):
    """initial(..., steps) draws each image's latent and its first block of step noise in one call; the
    stepper hands those out first and draws the rest: the numbers of initial() then one draw per step."""
    from dtk.runtime.samplers import noise as noise_module

    monkeypatch.setattr(noise_module, "BLOCK_BYTES", 3 * num * 4 * 6)  # three steps a block
    shape = (1, 2, 3)
    ahead, plain = NoiseSource(6, first_index=2), NoiseSource(6, first_index=2)
    x = ahead.initial(num, shape, steps=7)
    np.testing.assert_array_equal(x, plain.initial(num, shape))
    assert x.flags.c_contiguous and len(ahead._block) == 3
    stepper = ahead.stepper(num, shape, 7)
    assert stepper.remaining == 4  # three held, four still to draw
    got = [stepper(0), *stepper.take(), *stepper.take(), stepper(6)]
    for step in got:
        np.testing.assert_array_equal(step, plain.step(num, shape))
    assert len(got) == 7 and stepper.remaining == 0
