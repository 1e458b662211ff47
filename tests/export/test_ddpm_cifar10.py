"""The full-size check: the 35.7M-parameter ddpm-cifar10 U-Net (random weights) exports and passes parity.

About half a minute on 2 CPU cores; `pytest -m "not slow"` leaves it out. The time is printed, not asserted:
speed is recorded by benchmarks, never checked by tests."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def test_ddpm_cifar10_export(tmp_path):
    import torch

    from dtk.checkpoint import Checkpoint, save_checkpoint
    from dtk.export.bundle import ExportOptions, export_bundle
    from dtk.export.parity import format_table, report_from_dict
    from dtk.runtime.schedule import DiffusionConfig
    from dtk.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.preset("ddpm-cifar10")
    model = UNet(config)
    with torch.no_grad():  # zero-initialised output layers get weights, so the outputs carry signal
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    state = model.state_dict()
    ckpt = Checkpoint(config, DiffusionConfig(), state, state, step=0, train_state=None)
    save_checkpoint(tmp_path / "model.pt", ckpt)

    start = time.perf_counter()
    manifest = export_bundle(tmp_path / "model.pt", tmp_path / "bundle", ExportOptions(), progress=False)
    seconds = time.perf_counter() - start
    print(format_table(report_from_dict(manifest.parity)))
    print(f"ddpm-cifar10 export with verification: {seconds:.1f} s")
    assert manifest.model["parameters"] == 35_746_307
    assert manifest.parity["passed"] and manifest.batch == {"min": 1, "opt": 8, "max": 16}
    assert max(c["max_abs"] for c in manifest.parity["cases"]) < 1e-4
