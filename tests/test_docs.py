"""docs/ matches the code: the error messages troubleshooting.md quotes are the ones dtk prints, and bundle.md
names every manifest field the code writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dtk.runtime.errors import DtkError

DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_messages() -> list[re.Pattern]:
    """Each `error: ...` line in troubleshooting.md's code blocks as a pattern: `<...>` and `...` match
    anything, and so does the directory of a leading file name."""
    text = (DOCS / "troubleshooting.md").read_text()
    patterns = []
    for block in re.findall(r"```\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            if not line.startswith("error: "):
                continue
            line = re.sub(r"\s{2,}\([\w -]+\)$", "", line.removeprefix("error: "))  # "(who says it)" notes
            head, _, rest = line.partition(": ")
            prefix = ""
            if re.fullmatch(r"[\w./<>-]+", head) and re.search(r"[./<]", head):  # a file: in any directory
                name = re.sub(r"^.*[/>]", "", head)
                prefix, line = ("(.*/)?" + re.escape(name) if name else ".+?") + ": ", rest
            parts = re.split(r"<[^<>]+>|\.\.\.", line)
            patterns.append(re.compile(prefix + ".+?".join(re.escape(p) for p in parts) + "$", re.DOTALL))
    return patterns


def assert_documented(message: str) -> None:
    patterns = documented_messages()
    assert any(p.match(message) for p in patterns), f"not in docs/troubleshooting.md: {message}"


def message_of(call, *args, **kwargs) -> str:
    with pytest.raises(DtkError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_nan_images_message():
    from dtk.runtime.images import to_uint8

    assert_documented(message_of(to_uint8, np.full((1, 1, 2, 2), np.nan)))


def _sidecar(tensorrt="10.3.0", gpu="NVIDIA A100-SXM4-80GB", cc=(8, 0)):
    from dtk.runtime.sidecar import PlanSidecar

    return PlanSidecar(tensorrt, gpu, cc, "fp16", [], "0" * 64, "1" * 64)


@pytest.mark.parametrize(
    ("sidecar", "target"),
    [
        (dict(), ("10.8.0", "NVIDIA A100-SXM4-80GB", (8, 0))),
        (dict(), ("10.3.0", "Orin", (8, 7))),
        (dict(gpu="NVIDIA GeForce RTX 4090", cc=(8, 9)), ("10.3.0", "NVIDIA L40S", (8, 9))),
    ],
)
def test_engine_from_another_machine_messages(sidecar, target):
    from dtk.runtime.sidecar import Target, check_sidecar

    message = message_of(check_sidecar, _sidecar(**sidecar), Target(*target), "bundle/unet.plan")
    assert_documented(message)
    assert message in (DOCS / "troubleshooting.md").read_text()  # these are quoted verbatim


def test_plan_sidecar_messages(tmp_path):
    from dtk.runtime.sidecar import check_plan_bytes, load_sidecar

    plan = tmp_path / "bundle" / "unet.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    assert_documented(message_of(load_sidecar, plan))
    assert_documented(message_of(check_plan_bytes, _sidecar(), b"plan", plan))


def test_missing_tensorrt_and_gpu_messages():
    pytest.importorskip("cuda.bindings")
    from dtk.export.tensorrt import _require_tensorrt_and_gpu

    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert_documented(message_of(_require_tensorrt_and_gpu, 0))


def _manifest(tmp_path):
    from toy_manifest import toy_manifest

    manifest = toy_manifest(chw=(1, 8, 8))
    manifest.save(tmp_path)
    return manifest


def test_batch_range_messages(tmp_path):
    from dtk.cli.bench import BenchOptions, open_bundle
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.pipeline import Pipeline

    manifest = _manifest(tmp_path)
    assert_documented(message_of(open_bundle, tmp_path, "onnxruntime", BenchOptions(batch=8)))

    class Plan:  # just what _set_batch reads before it touches TensorRT
        _batch, batch_range = None, (1, 4)

    assert_documented(message_of(TensorRTDenoiser._set_batch, Plan(), 8))

    class Denoiser:
        batch_range = (1, 4)

    assert_documented(message_of(Pipeline(manifest, Denoiser()).chunks, 16, 8))


def test_manifest_messages(tmp_path):
    from dtk.runtime.manifest import load_manifest

    assert_documented(message_of(load_manifest, tmp_path / "bundle"))
    _manifest(tmp_path)
    data = json.loads((tmp_path / "dtk.json").read_text())
    (tmp_path / "dtk.json").write_text(json.dumps({**data, "schema_version": 2}))
    assert_documented(message_of(load_manifest, tmp_path))
    (tmp_path / "dtk.json").write_text(json.dumps({**data, "schema": "other"}))
    assert_documented(message_of(load_manifest, tmp_path))


def test_onnxruntime_provider_message(tmp_path):
    import onnxruntime as ort

    from dtk.runtime.backends.onnxruntime import _provider_list

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert_documented(message_of(_provider_list, ort, ["cuda"], 0, None, tmp_path / "unet.onnx"))


def test_checkpoint_messages(tmp_path):
    import torch

    from dtk.checkpoint import load_checkpoint

    bare, truncated = tmp_path / "bare" / "model.pt", tmp_path / "truncated" / "model.pt"
    bare.parent.mkdir()
    truncated.parent.mkdir()
    torch.save({"weight": torch.zeros(2)}, bare)
    assert_documented(message_of(load_checkpoint, bare))
    truncated.write_bytes(bare.read_bytes()[:200])
    assert_documented(message_of(load_checkpoint, truncated))


def test_parity_failure_message():
    from dtk.export.parity import ParityCase, ParityError, ParityReport, Tolerance

    report = ParityReport("fp16", Tolerance(2e-2, 2e-2, 1e-1), "CPUExecutionProvider", 0)
    report.cases.append(
        ParityCase(
            1,
            [0],
            float("nan"),
            float("nan"),
            float("inf"),
            False,
            "NaN/Inf in the ONNX output (3 of 256 values)",
        )
    )
    assert_documented(str(ParityError(report)))
    report.cases[0] = ParityCase(4, [500, 501, 502, 503], 0.5, 1.0, 12.0, False)
    assert_documented(str(ParityError(report)))


def test_bundle_doc_names_every_manifest_field(tmp_path):
    _manifest(tmp_path)
    data = json.loads((tmp_path / "dtk.json").read_text())
    text = (DOCS / "bundle.md").read_text()

    def keys(prefix, value):
        if isinstance(value, dict) and prefix not in ("parity", "source", "model", "export"):
            for k, v in value.items():
                yield from keys(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield prefix

    for key in keys("", data):
        assert f"`{key}`" in text or f"`{key.split('.')[-1]}`" in text, key


def test_troubleshooting_covers_the_issue_topics():
    text = (DOCS / "troubleshooting.md").read_text().lower()
    for topic in (
        "fp16",
        "black",
        "shape profile",
        "another gpu",
        "tensorrt",
        "pycuda",
        "out of memory",
        "jetson",
    ):
        assert topic in text, topic


def test_serving_messages(tmp_path, monkeypatch):
    from dtk.export import triton_server

    monkeypatch.setattr(triton_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(triton_server.importlib.util, "find_spec", lambda name: None)
    assert_documented(message_of(triton_server.find_tritonserver))
    assert_documented(message_of(triton_server.TritonServer(tmp_path).start))


def test_training_run_messages(tmp_path):
    import torch

    from dtk.runs import prepare_run_folder
    from dtk.train import TrainConfig, train

    run = tmp_path / "run"
    settings = dict(
        image_size=8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), batch_size=2
    )
    settings.update(sample_every=0, save_every=0, device="cpu", progress=False, steps=1)
    train(TrainConfig(out=str(run), **settings))
    assert_documented(message_of(prepare_run_folder, run, resume=False, overwrite=False))
    assert_documented(message_of(train, TrainConfig(out=str(run), resume=True, lr=1e-3, steps=3)))
    assert_documented(message_of(train, TrainConfig(out=str(run), resume=True)))
    data = torch.load(run / "model.pt", weights_only=True)
    data["train_state"]["optimizer"] = "adam"
    torch.save(data, run / "model.pt")
    assert_documented(message_of(train, TrainConfig(out=str(run), resume=True, steps=3)))
    (tmp_path / "file").write_text("")
    assert_documented(
        message_of(prepare_run_folder, tmp_path / "file" / "run", resume=False, overwrite=False)
    )
