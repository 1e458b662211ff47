"""The int8 export's checks, judged by the images: the int8 graph against the fp32 graph it came from.

Both graphs sample the same seeds with a 20-step DDIM chain (η = 0) through the runtime (ONNX Runtime, CPU);
the images are compared as a user gets them (uint8). Two checks, either failing fails the export:

- chain: mean |Δ| over every pixel ≤ 4/255. Measured on the digits model: 1–2/255 for the calibrated graph,
  far above for a broken calibration; 4/255 is also the goal the int8 export is held to.
- quality: the Fréchet distance to the training images, FD(int8) ≤ 1.10 · max(FD(fp32), FD floor). The
  features are the images average-pooled to at most 8×8 (at most 64 values per image: a stable covariance
  from a few hundred samples, no network to train); the floor is the distance a perfect model would still
  show with this many samples (real images against all of them), so a near-perfect fp32 model does not make
  the 10% band vanish. 10% is the goal from the issue; the same seeds make the two distances differ only by
  what quantization changed, not by sampling noise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from dtk.runtime.errors import DtkError

CHECK_SAMPLER, CHECK_STEPS = "ddim", 20
CHAIN_MEAN_ABS = 4 / 255  # mean |Δ| of the uint8 images, in units of the full range
QUALITY_RATIO = 1.10
FEATURE_GRID = 8  # images are pooled to at most this many cells per side


@dataclass
class Int8Checks:
    samples: int
    seed: int
    chain_mean_abs: float  # mean |Δ| of the images in [0, 1] units
    chain_max_image: float  # the largest per-image mean |Δ|
    fd_fp32: float
    fd_int8: float
    fd_floor: float
    seconds: float

    @property
    def chain_passed(self) -> bool:
        return bool(np.isfinite(self.chain_mean_abs)) and self.chain_mean_abs <= CHAIN_MEAN_ABS

    @property
    def quality_bound(self) -> float:
        return QUALITY_RATIO * max(self.fd_fp32, self.fd_floor)

    @property
    def quality_passed(self) -> bool:
        return bool(np.isfinite(self.fd_int8)) and self.fd_int8 <= self.quality_bound

    @property
    def passed(self) -> bool:
        return self.chain_passed and self.quality_passed

    def failures(self) -> list[str]:
        out = []
        if not self.chain_passed:
            out.append(
                f"images differ from fp32's by {255 * self.chain_mean_abs:.2f}/255 on average "
                f"(bound {255 * CHAIN_MEAN_ABS:.0f}/255)"
            )
        if not self.quality_passed:
            out.append(f"Fréchet distance {self.fd_int8:.4g} > bound {self.quality_bound:.4g}")
        return out

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "sampler": f"{CHECK_STEPS}-step {CHECK_SAMPLER}, eta 0, ONNX Runtime CPU",
            **{k: _round(v) for k, v in asdict(self).items()},
            "chain": {
                "passed": self.chain_passed,
                "mean_abs_255": _round(255 * self.chain_mean_abs),
                "max_image_mean_abs_255": _round(255 * self.chain_max_image),
                "bound_255": round(255 * CHAIN_MEAN_ABS, 4),
            },
            "quality": {
                "passed": self.quality_passed,
                "metric": "Fréchet distance to the training images on "
                f"{FEATURE_GRID}x{FEATURE_GRID}-pooled pixels",
                "fp32": _round(self.fd_fp32),
                "int8": _round(self.fd_int8),
                "floor": _round(self.fd_floor),
                "bound": _round(self.quality_bound),
            },
        }


class Int8CheckError(DtkError):
    """The int8 graph's images are too far from fp32's; carries the result for the CLI."""

    def __init__(self, checks: Int8Checks):
        self.checks = checks
        super().__init__(
            "int8 check failed: "
            + "; ".join(checks.failures())
            + ". No bundle was written. Calibrate on the model's training images (--calibration-data), "
            "with more of them (--calibration-size), or export fp32/fp16"
        )


def pooled_features(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] → [N, C·g·g]: mean over blocks, g = the largest divisor of H (and W) ≤ FEATURE_GRID,
    per channel for grayscale and over channels for colour (at most 64 values per image either way)."""
    images = np.asarray(images, dtype=np.float64)
    if images.shape[1] > 1:
        images = images.mean(axis=1, keepdims=True)
    n, c, h, w = images.shape
    gh = max(d for d in range(1, FEATURE_GRID + 1) if h % d == 0)
    gw = max(d for d in range(1, FEATURE_GRID + 1) if w % d == 0)
    return images.reshape(n, c, gh, h // gh, gw, w // gw).mean(axis=(3, 5)).reshape(n, -1)


def displayed(latents: np.ndarray) -> np.ndarray:
    """Samples as a user gets them (uint8), as float [0, 1] NCHW."""
    from dtk.runtime.images import to_uint8

    return to_uint8(latents).transpose(0, 3, 1, 2).astype(np.float64) / 255.0


def frechet_to(reference: np.ndarray, images: np.ndarray) -> float:
    from dtk.export.frechet import feature_stats, frechet_distance

    return frechet_distance(
        *feature_stats(pooled_features(images)), *feature_stats(pooled_features(reference))
    )


def sample(manifest, onnx_path, num: int, seed: int, batch: int) -> np.ndarray:
    """`num` latents of a 20-step DDIM chain on the graph at `onnx_path`, seeded per image as dtk samples."""
    from dtk.runtime.backends.onnxruntime import OnnxRuntimeDenoiser
    from dtk.runtime.pipeline import Pipeline

    with Pipeline(manifest, OnnxRuntimeDenoiser(onnx_path, manifest)) as pipeline:
        return pipeline.sample_latents(num, CHECK_STEPS, CHECK_SAMPLER, seed, max_batch=batch)


def check_int8(
    manifest, fp32_path, int8_path, real_images: np.ndarray, num: int, seed: int = 0
) -> Int8Checks:
    """Sample both graphs with the same seeds and compare (see the module docstring)."""
    start = time.perf_counter()
    if num < 2:
        raise DtkError(f"the int8 checks need at least 2 samples, got {num}")
    batch = min(manifest.batch["max"], max(manifest.batch["min"], num))
    fp32_latents = sample(manifest, fp32_path, num, seed, batch)
    int8_latents = sample(manifest, int8_path, num, seed, batch)
    finite = bool(np.all(np.isfinite(int8_latents)))  # to_uint8 refuses NaN/Inf: they fail the checks
    fp32, int8 = displayed(fp32_latents), displayed(np.nan_to_num(int8_latents))
    real = (np.asarray(real_images, dtype=np.float64) + 1.0) / 2.0  # [-1, 1] → [0, 1], like `displayed`
    per_image = np.abs(int8 - fp32).reshape(num, -1).mean(axis=1)
    if not finite:
        per_image[:] = np.nan
    rng = np.random.default_rng(seed)
    floor = frechet_to(real, real[rng.choice(len(real), num, replace=num > len(real))])
    return Int8Checks(
        samples=num,
        seed=seed,
        chain_mean_abs=float(per_image.mean()),
        chain_max_image=float(per_image.max()),
        fd_fp32=frechet_to(real, fp32),
        fd_int8=frechet_to(real, int8) if finite else float("nan"),
        fd_floor=floor,
        seconds=time.perf_counter() - start,
    )


def format_checks(checks: dict) -> str:
    """The checks (as the manifest records them) for people."""
    chain, quality = checks["chain"], checks["quality"]
    return "\n".join(
        [
            f"int8 checks ({checks['samples']} samples, seed {checks['seed']}, {checks['sampler']}, "
            "against the fp32 graph):",
            f"  images   mean |Δ| {chain['mean_abs_255']:.2f}/255 (worst image "
            f"{chain['max_image_mean_abs_255']:.2f}/255), bound {chain['bound_255']:.0f}/255: "
            + ("ok" if chain["passed"] else "FAIL"),
            f"  quality  Fréchet distance int8 {quality['int8']:.4g}, fp32 {quality['fp32']:.4g}, "
            f"floor {quality['floor']:.4g}, bound {quality['bound']:.4g}: "
            + ("ok" if quality["passed"] else "FAIL"),
            f"int8 checks {'passed' if checks['passed'] else 'FAILED'} in {checks['seconds']:.1f} s",
        ]
    )


def _round(value):
    return round(value, 6) if isinstance(value, float) and np.isfinite(value) else value
