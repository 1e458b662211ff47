"""Exporting class-conditional models: the graph takes class_labels, parity covers conditional and null-class
calls, the manifest records the classes, and the runtime's guided samples match PyTorch's; diffusers models
with num_class_embeds export too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dtk.runtime.errors import DtkError


def test_the_graph_takes_class_labels_and_parity_covers_both_halves(conditional_bundle):
    data = json.loads((conditional_bundle / "dtk.json").read_text())
    assert data["classes"] == {"num_classes": 3, "names": ["circle", "square", "triangle"], "null_class": 3}
    assert data["io"]["inputs"][2] == {"name": "class_labels", "dtype": "int64", "shape": ["batch"]}
    labels = [case["labels"] for case in data["parity"]["cases"]]
    assert labels == ["classes 0", "null class 3"] * 3 + ["classes 0..2 cycled", "null class 3"]
    assert data["parity"]["passed"] is True
    from dtk.export.inspect import describe_bundle

    assert describe_bundle(conditional_bundle)["classes"] == data["classes"]  # dtk inspect shows them


def test_onnxruntime_takes_labels_and_refuses_calls_without(conditional_bundle, conditional_checkpoint):
    import torch

    from dtk.checkpoint import load_checkpoint
    from dtk.runtime.backends.onnxruntime import OnnxRuntimeDenoiser

    model = load_checkpoint(conditional_checkpoint).build_model()
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    t = np.array([5.0, 400.0, 990.0], dtype=np.float32)
    with OnnxRuntimeDenoiser(conditional_bundle / "unet.onnx", providers=["cpu"], threads=1) as denoiser:
        for labels in ([0, 1, 2], [3, 3, 3]):
            out = denoiser(x, t, np.array(labels))
            with torch.no_grad():
                ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.tensor(labels)).numpy()
            np.testing.assert_allclose(out, ref, atol=1e-5)
        with pytest.raises(DtkError, match="the model needs class_labels"):
            denoiser(x, t)
        with pytest.raises(DtkError, match="class_labels must be integers"):
            denoiser(x, t, np.array([0.5, 1.0, 2.0]))


def test_guided_runtime_samples_match_pytorch(conditional_bundle, conditional_checkpoint):
    from dtk.reference import sample_checkpoint
    from dtk.runtime import Pipeline

    kwargs = dict(num=6, steps=6, sampler="ddim", seed=3, labels=["triangle", 0, 1, 2, "1", "circle"])
    with Pipeline.load(conditional_bundle, providers=["cpu"], threads=1) as pipeline:
        runtime = pipeline.sample_latents(guidance_scale=2.0, **kwargs)
        null = pipeline.sample_latents(num=2, steps=6, seed=3)
        with pytest.raises(DtkError, match="unknown class 'hexagon'"):
            pipeline.sample_latents(num=1, steps=2, labels="hexagon")
    reference = sample_checkpoint(
        conditional_checkpoint, guidance_scale=2.0, device="cpu", progress=False, **kwargs
    )
    np.testing.assert_allclose(runtime, reference, atol=1e-4)
    unconditional = sample_checkpoint(
        conditional_checkpoint, num=2, steps=6, sampler="ddim", seed=3, progress=False
    )
    np.testing.assert_allclose(null, unconditional, atol=1e-4)


def test_one_guided_run_mixes_images_without_a_class(conditional_bundle, conditional_checkpoint):
    """labels=[0, None, 2, None] in one run (8 images per network call) gives, byte for byte, the images of a
    labelled run and of an unlabelled one (4 per call) for the same seeds; PyTorch's reference agrees."""
    from dtk.reference import sample_checkpoint
    from dtk.runtime import Pipeline

    kwargs = dict(steps=4, sampler="ddim", guidance_scale=3.0)
    with Pipeline.load(conditional_bundle, providers=["cpu"], threads=1) as pipeline:
        mixed = pipeline.sample(seeds=[10, 11, 12, 13], labels=[0, None, "triangle", None], **kwargs)
        labelled = pipeline.sample(seeds=[10, 12], labels=[0, 2], **kwargs)
        unlabelled = pipeline.sample(seeds=[11, 13], **kwargs)
        latents = pipeline.sample_latents(num=2, seed=4, labels=[None, 1], **kwargs)
    assert mixed[[0, 2]].tobytes() == labelled.tobytes()
    assert mixed[[1, 3]].tobytes() == unlabelled.tobytes()
    reference = sample_checkpoint(
        conditional_checkpoint, num=2, seed=4, labels=[None, 1], device="cpu", progress=False, **kwargs
    )
    np.testing.assert_allclose(latents, reference, atol=1e-4)


def test_a_diffusers_unet_with_num_class_embeds_exports(tmp_path, small_unet2d):
    import torch

    from dtk.export.bundle import ExportOptions, export_bundle
    from dtk.runtime import Pipeline

    net = small_unet2d(num_class_embeds=5)
    net.save_pretrained(tmp_path / "unet")
    warnings = []
    manifest = export_bundle(
        tmp_path / "unet",
        tmp_path / "bundle",
        ExportOptions(batch=(1, 2, 4), chain_steps=3),
        progress=False,
        log=warnings.append,
    )
    assert manifest.classes == {"num_classes": 5, "names": None, "null_class": None}
    assert [c["labels"] for c in manifest.parity["cases"]][:2] == ["classes 0", "classes 0"]
    assert any("no recorded null class" in w for w in warnings)
    with Pipeline.load(tmp_path / "bundle", providers=["cpu"], threads=1) as pipeline:
        x = np.random.default_rng(1).standard_normal((2, 1, 8, 8), dtype=np.float32)
        out = pipeline.denoiser(x, np.array([3.0, 700.0], np.float32), np.array([4, 1]))
        with torch.no_grad():
            ref = net(
                torch.from_numpy(x), torch.tensor([3.0, 700.0]), class_labels=torch.tensor([4, 1])
            ).sample
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
        pipeline.sample_latents(num=1, steps=2, labels=4)
        with pytest.raises(DtkError, match="this model has no null class; pass class labels"):
            pipeline.sample_latents(num=1, steps=2)
        with pytest.raises(DtkError, match="needs a model trained with a null class"):
            pipeline.sample_latents(num=1, steps=2, labels=4, guidance_scale=3)


def test_an_unconditional_bundle_records_no_classes(tiny_bundle):
    data = json.loads((tiny_bundle / "dtk.json").read_text())
    assert "classes" not in data and [i["name"] for i in data["io"]["inputs"]] == ["sample", "timestep"]
    assert all("labels" not in case for case in data["parity"]["cases"])


def test_cli_samples_a_class_a_row_per_class_and_refuses_bad_labels(conditional_bundle, tmp_path, capsys):
    from PIL import Image

    from dtk.cli import main

    grid = tmp_path / "grid.png"
    argv = ["sample", str(conditional_bundle), "--steps", "3", "--out", str(grid), "--no-progress"]
    assert main([*argv, "--class", "all", "--num", "6", "--guidance-scale", "3"]) == 0
    with Image.open(grid) as image:  # 3 rows (one per class) of 2 images of 8 px, 2 px padding
        assert image.size == (2 + 2 * 10, 2 + 3 * 10)
    assert main([*argv, "--class", "square,2", "--num", "2"]) == 0
    capsys.readouterr()
    for label, message in (
        ("7", "class 7 is out of range: this model has classes 0..2"),
        ("hexagon", "unknown class"),
    ):
        assert main([*argv, "--class", label]) == 1
        err = capsys.readouterr().err
        assert (
            err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
        )
