"""Class-conditional models in the toolkit: the U-Net's class embedding, labels for every dataset kind,
conditional training with label dropout and its exact resume, and guided reference sampling."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_training import TINY_TRAINING_FLAGS, tiny_train_config

from dtk.checkpoint import load_checkpoint
from dtk.cli import main
from dtk.data import BatchStream, load_dataset, shapes_with_kinds
from dtk.labels import digit_labels, folder_labels, with_labels
from dtk.reference import sample_checkpoint
from dtk.runtime.errors import DtkError
from dtk.train import train
from dtk.unet import UNet, UNetConfig, count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

# the tests' tiny training runs, class-conditional unless a test says otherwise
_config = functools.partial(tiny_train_config, class_conditional=True)


def test_class_embedding_adds_one_row_per_class_to_the_timestep_embedding():
    plain = UNetConfig.preset("tiny", in_channels=1, out_channels=1)
    conditional = UNetConfig.preset("tiny", in_channels=1, out_channels=1, num_class_embeds=11)
    assert count_parameters(UNet(plain)) == 686_769  # unconditional: unchanged
    assert count_parameters(UNet(conditional)) == 686_769 + 11 * 64  # temb width 4·16
    assert "num_class_embeds" not in plain.to_dict()
    assert UNetConfig.from_dict(conditional.to_dict()) == conditional

    torch.manual_seed(0)
    model = UNet(conditional).eval()
    with torch.no_grad():  # DDPM zero-initialises residual branches: give them weights so labels matter
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        null = model(x, t, torch.tensor([10, 10]))
        assert torch.equal(model(x, t), null)  # no labels: the null class
        assert torch.equal(model(x, t, torch.tensor(10)), null)  # a scalar label applies to the batch
        assert not torch.allclose(model(x, t, torch.tensor([3, 3])), null)
    with pytest.raises(DtkError, match="class_labels given to an unconditional U-Net"):
        UNet(plain)(x, t, torch.tensor([1, 2]))
    with pytest.raises(DtkError, match="num_class_embeds must be at least 2"):
        UNetConfig.preset("tiny", num_class_embeds=1)


def test_labels_for_digits_shapes_and_folders(tmp_path):
    digits = with_labels(load_dataset("digits", 8), "digits")
    assert len(digits.labels) == 1797 and digits.labels[:6].tolist() == [0, 1, 2, 3, 4, 5]
    assert digits.class_names == tuple("0123456789")
    images, kinds = shapes_with_kinds(8, count=64)
    assert torch.equal(images, load_dataset("shapes", 8).images[:64])  # the same images as before
    assert kinds[:10].tolist() == [0, 2, 1, 0, 0, 1, 1, 2, 2, 0]
    assert torch.bincount(kinds, minlength=3).tolist() == [14, 21, 29]

    for name, count in (("cats", 2), ("dogs", 3)):
        (tmp_path / "pets" / name / "deep").mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", (12, 12), (40 * k, 0, 0)).save(tmp_path / "pets" / name / "deep" / f"{k}.png")
    labels, names = folder_labels(tmp_path / "pets")
    assert names == ("cats", "dogs") and labels.tolist() == [0, 0, 1, 1, 1]
    pets = with_labels(load_dataset(str(tmp_path / "pets"), 8), str(tmp_path / "pets"))
    stream = BatchStream(pets, batch_size=4, seed=1)
    chosen, _ = stream.indices(3)
    assert torch.equal(stream.labels(3), labels[chosen])

    Image.new("RGB", (12, 12)).save(tmp_path / "pets" / "loose.png")
    with pytest.raises(DtkError, match="loose.png: is not in a class subfolder"):
        folder_labels(tmp_path / "pets")
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (12, 12)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(DtkError, match="needs at least 2 class subfolders, found 1"):
        folder_labels(tmp_path / "one")
    assert torch.equal(digit_labels(), digits.labels)


def test_conditional_run_records_classes_and_draws_a_row_per_class(tmp_path):
    path = train(_config(tmp_path / "run", steps=2, sample_every=2, sample_num=20, sample_steps=2))
    ckpt = load_checkpoint(path)
    assert ckpt.classes == {"num_classes": 10, "names": list("0123456789"), "null_class": 10}
    assert ckpt.model_config.num_class_embeds == 11
    assert ckpt.model_state["class_embedding.weight"].shape == (11, 32)
    with Image.open(path.parent / "samples_000002.png") as grid:  # 10 rows of 2 images of 8 px, padding 2
        assert grid.size == (2 + 2 * 10, 2 + 10 * 10)


def test_resumed_conditional_run_equals_an_uninterrupted_one(tmp_path):
    extra = dict(dropout=0.1, grad_accum=2, cond_dropout=0.5)
    straight = load_checkpoint(train(_config(tmp_path / "straight", steps=4, **extra)))
    train(_config(tmp_path / "split", steps=2, **extra))
    resumed = load_checkpoint(train(_config(tmp_path / "split", steps=4, resume=True, **extra)))
    assert resumed.step == 4 and resumed.classes == straight.classes
    for name, tensor in straight.model_state.items():
        assert torch.equal(resumed.model_state[name], tensor), name
        assert torch.equal(resumed.ema_state[name], straight.ema_state[name]), name
    other = load_checkpoint(train(_config(tmp_path / "other", steps=4, **{**extra, "cond_dropout": 0.0})))
    assert not torch.equal(
        other.model_state["class_embedding.weight"], straight.model_state["class_embedding.weight"]
    )


def test_resume_refuses_a_run_with_other_conditioning(tmp_path):
    train(_config(tmp_path / "run", steps=2, class_conditional=False))
    with pytest.raises(DtkError, match=r"cannot resume with different settings: --class-conditional True"):
        train(_config(tmp_path / "run", steps=4, resume=True))
    with pytest.raises(DtkError, match=r"cond-dropout must be in \[0, 1\)"):
        train(_config(tmp_path / "bad", steps=1, cond_dropout=1.0))


def test_unconditional_training_is_unchanged_by_the_new_options(tmp_path):
    """cond_dropout is ignored without --class-conditional: the same weights, no classes recorded."""
    a = load_checkpoint(train(_config(tmp_path / "a", steps=2, class_conditional=False)))
    b = load_checkpoint(train(_config(tmp_path / "b", steps=2, class_conditional=False, cond_dropout=0.7)))
    assert a.classes is None and "class_embedding.weight" not in a.model_state
    assert all(torch.equal(a.model_state[k], v) for k, v in b.model_state.items())
    assert "classes" not in a.to_dict()


def test_guided_reference_sampling_is_the_combination_of_two_calls(tmp_path):
    path = train(_config(tmp_path / "run", steps=2))
    kwargs = dict(num=3, steps=4, sampler="ddim", seed=5, device="cpu", progress=False)
    guided = sample_checkpoint(path, labels=[7, "2", 0], guidance_scale=3.0, **kwargs)
    one_by_one = sample_checkpoint(path, labels=[7, "2", 0], guidance_scale=3.0, batch_size=1, **kwargs)
    np.testing.assert_allclose(guided, one_by_one, atol=1e-5)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()

    def by_hand(x, t):
        ts = torch.full((3,), float(t))
        eps_c, eps_u = model(x, ts, torch.tensor([7, 2, 0])), model(x, ts, torch.tensor([10, 10, 10]))
        return eps_u + 3.0 * (eps_c - eps_u)

    from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

    source = NoiseSource(5)
    x = torch.from_numpy(source.initial(3, (1, 8, 8)))
    with torch.no_grad():
        expected = sample_loop(by_hand, x, make_plan("ddim", ckpt.diffusion, 4), None).numpy()
    np.testing.assert_allclose(guided, expected, atol=1e-5)
    with pytest.raises(DtkError, match="class 10 is out of range"):
        sample_checkpoint(path, labels=10, **kwargs)


def test_cli_trains_conditionally_and_samples_a_class(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", *TINY_TRAINING_FLAGS]
    args += ["--batch-size", "4", "--steps", "1", "--sample-every", "0", "--class-conditional"]
    assert main([*args, "--cond-dropout", "0.2", "--out", str(out), "--no-progress"]) == 0
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.classes["null_class"] == 10 and ckpt.train_state["config"]["cond_dropout"] == 0.2
