"""Pieces of benchmarks/quality_vs_guidance.py: the requested-class share, the recommended scale, --scales."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vs_guidance.py"
spec = importlib.util.spec_from_file_location("benchmarks_quality_vs_guidance", SCRIPT)
guidance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guidance)


def test_requested_share_counts_samples_classified_as_asked():
    probabilities = np.eye(10)[[3, 3, 7, 1]]
    assert guidance.requested_share(probabilities, np.array([3, 4, 7, 1])) == 0.75
    assert guidance.quality.frechet_distance is not None  # the metric is quality_vs_steps.py's own


def test_recommended_scale_is_the_smallest_that_meets_the_goal():
    rows = [
        {"guidance_scale": 0.0, "requested_share": 0.10, "frechet_distance": 6.0},
        {"guidance_scale": 1.0, "requested_share": 0.93, "frechet_distance": 5.0},
        {"guidance_scale": 2.0, "requested_share": 0.97, "frechet_distance": 5.5},
        {"guidance_scale": 3.0, "requested_share": 0.99, "frechet_distance": 7.0},
    ]
    assert guidance.recommended_scale(rows, 6.0) == {"guidance_scale": 2.0, "goal_met": True}
    assert guidance.recommended_scale(rows, 5.2) == {"guidance_scale": 2.0, "goal_met": False}
    assert guidance.recommended_scale(rows[:2], 5.2) == {"guidance_scale": 1.0, "goal_met": False}


def test_scales_parse_and_refuse_bad_values():
    assert guidance.parse_scales("0, 1,2.5") == (0.0, 1.0, 2.5)
    for text in ("x", "-1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            guidance.parse_scales(text)
