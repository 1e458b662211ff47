"""`export_onnx`: batch specs, both torch exporters, and graphs that cannot be the denoiser dtk expects."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dtk.export.onnx_export import example_batch, export_onnx, normalize_batch
from dtk.export.source import denoiser_module
from dtk.runtime.errors import DtkError


@pytest.mark.parametrize(
    "spec, expected, traced",
    [
        (4, {"min": 4, "opt": 4, "max": 4}, 4),
        ((1, 16), {"min": 1, "opt": 1, "max": 16}, 2),
        ((1, 8, 16), {"min": 1, "opt": 8, "max": 16}, 8),
        ((1, 1, 1), {"min": 1, "opt": 1, "max": 1}, 1),
        ({"min": 2, "opt": 3, "max": 5}, {"min": 2, "opt": 3, "max": 5}, 3),
    ],
)
def test_batch_specs(spec, expected, traced):
    assert normalize_batch(spec) == expected
    assert example_batch(expected) == traced


@pytest.mark.parametrize("spec", [0, (2, 1), (1, 9, 8), (1, 2, 3, 4)])
def test_bad_batch_specs(spec):
    with pytest.raises(DtkError, match="batch"):
        normalize_batch(spec)


def test_torchscript_exporter_matches_torch(tmp_path, small_unet2d):
    unet = small_unet2d()
    module = denoiser_module(unet, unwrap_sample=True)
    result = export_onnx(module, (1, 8, 8), tmp_path / "unet.onnx", batch=2, exporter="torchscript")
    assert result.opset == 18 and result.simplified and not result.external_data
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    t = np.array([0.0, 999.0], dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(session.run(None, {"sample": x, "timestep": t})[0], expected, atol=1e-5)


class IgnoresTimestep(torch.nn.Module):
    """The TorchScript exporter drops an unused input; dtk must not write a graph the runtime cannot feed."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample)


def test_a_graph_that_lost_its_timestep_input_is_refused(tmp_path):
    with pytest.raises(DtkError, match="the network ignores its timestep input"):
        export_onnx(
            IgnoresTimestep().eval(), (1, 8, 8), tmp_path / "unet.onnx", batch=2, exporter="torchscript"
        )
