"""Parity fails loudly: a perturbed graph, NaN in the graph, and a zero tolerance are each a failure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dtk.export.parity import (
    ParityError,
    Tolerance,
    check_parity,
    format_table,
    parity_timesteps,
    report_from_dict,
    verify,
)
from dtk.export.source import load_source
from dtk.runtime.manifest import load_manifest

BATCH = {"min": 1, "opt": 1, "max": 2}


@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    return load_source(tiny_checkpoint)


def edited_graph(bundle, tmp_path, edit):
    """A copy of the bundle's graph with `edit(array)` applied to the output convolution's bias."""
    model = onnx.load(str(bundle / "unet.onnx"))
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    bias = next(t for t in model.graph.initializer if t.name == last_conv.input[2])
    bias.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(bias).copy()), bias.name))
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def parity(path, source, **kwargs):
    kwargs.setdefault("chain_steps", 5)
    return check_parity(
        path, source.module, source.diffusion, source.sample_shape, BATCH, progress=False, **kwargs
    )


def test_timesteps_cover_start_middle_and_end():
    assert [t.tolist() for t in parity_timesteps(1, 1000)] == [[0], [500], [999]]
    assert [t.tolist() for t in parity_timesteps(2, 1000)] == [[0, 1], [500, 501], [999, 998]]
    assert [t.tolist() for t in parity_timesteps(7, 1000)] == [[0, 1, 2, 500, 501, 999, 998]]
    assert [t.tolist() for t in parity_timesteps(3, 10)] == [[0, 5, 9]]


def test_exported_graph_passes(tiny_bundle, source):
    report = parity(tiny_bundle / "unet.onnx", source)
    assert report.passed and len(report.cases) == 6 and report.chain.steps == 5
    assert max(c.max_abs for c in report.cases) < 1e-5
    table = format_table(report)
    assert "single call" in table and "5-step ddim chain" in table and "parity passed" in table
    # the manifest's copy prints the same table
    manifest = load_manifest(tiny_bundle)
    assert "parity passed" in format_table(report_from_dict(manifest.parity))


def test_perturbed_graph_fails(tiny_bundle, source, tmp_path):
    path = edited_graph(tiny_bundle, tmp_path, lambda b: b + 1e-3)
    with pytest.raises(ParityError, match="parity check failed") as error:
        verify(
            path, source.module, source.diffusion, source.sample_shape, BATCH, chain_steps=5, progress=False
        )
    report = error.value.report
    assert not report.passed and all(not c.passed for c in report.cases)
    assert all(abs(c.max_abs - 1e-3) < 1e-4 for c in report.cases)  # exactly the bias we added
    assert "FAIL" in format_table(report) and "parity FAILED" in format_table(report)
    assert "No bundle was written" in str(error.value)


def test_nan_in_the_graph_is_named(tiny_bundle, source, tmp_path):
    def poison(bias):
        bias[0] = np.nan
        return bias

    report = parity(edited_graph(tiny_bundle, tmp_path, poison), source)
    assert not report.passed
    assert all("NaN/Inf in the ONNX output" in c.problem for c in report.cases)
    assert "NaN/Inf in the ONNX output" in report.chain.problem


def test_zero_tolerance_fails_a_good_graph(tiny_bundle, source):
    report = parity(tiny_bundle / "unet.onnx", source, tolerance=Tolerance(0.0, 0.0, 0.0))
    assert not report.passed
    assert any(c.worst_ratio == float("inf") for c in report.cases)
