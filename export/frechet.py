"""The Fréchet distance (FID's formula) between two feature sets, each summarised as a Gaussian.

The project's quality metric: benchmarks/quality_vs_steps.py applies it to digits-classifier features, the
int8 export check (dtk.export.int8_checks) to pooled pixels.
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the Fréchet (2-Wasserstein) distance of two Gaussians.

    Tr (Σ₁Σ₂)^½ = Σ √λ over the eigenvalues λ of Σ₁^½ Σ₂ Σ₁^½ (symmetric PSD, so eigh is exact and stable)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root1 @ cov2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)
