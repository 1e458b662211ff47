"""Sample quality against the classifier-free guidance scale for a class-conditional digits model.

For each guidance scale s, the same seed and an equal number of samples per digit are drawn through the
runtime (ONNX Runtime on the exported bundle); the digits classifier of `quality_vs_steps.py` (imported, the
same recipe and seed) says which digit each sample shows. Reported per s: the share classified as the digit
asked for, and the Fréchet distance on the classifier's features against the real digits. s = 0 is the
model's unconditional (null-class) prediction, s = 1 the conditional model alone.

    dtk train --preset tiny --dataset digits --image-size 16 --steps 1500 --class-conditional --out runs/cond
    python benchmarks/quality_vs_guidance.py --checkpoint runs/cond/model.pt

Writes benchmarks/results/quality_vs_guidance.json, quality_vs_guidance.png and
quality_vs_guidance_samples.png (a row per digit at each scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
GOAL_SHARE = 0.95


def _quality_vs_steps():
    """The sibling script as a module (its classifier, embedding and Fréchet distance)."""
    path = Path(__file__).resolve().parent / "quality_vs_steps.py"
    spec = importlib.util.spec_from_file_location("benchmarks_quality_vs_steps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _quality_vs_steps()


def requested_share(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The share of samples the classifier assigns to the class they were asked for."""
    return float((np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)).mean())


def recommended_scale(results: list[dict], unconditional_fd: float) -> dict:
    """The smallest s that meets the goal (share ≥ 95%, FD no worse than the unconditional model's); when
    none does, the lowest-FD s among those reaching the share, else the s with the highest share."""
    meeting = [
        r for r in results if r["requested_share"] >= GOAL_SHARE and r["frechet_distance"] <= unconditional_fd
    ]
    if meeting:
        best = min(meeting, key=lambda r: r["guidance_scale"])
        return {"guidance_scale": best["guidance_scale"], "goal_met": True}
    sharp = [r for r in results if r["requested_share"] >= GOAL_SHARE]
    if sharp:
        best = min(sharp, key=lambda r: r["frechet_distance"])
    else:
        best = max(results, key=lambda r: (r["requested_share"], -r["frechet_distance"]))
    return {"guidance_scale": best["guidance_scale"], "goal_met": False}


def parse_scales(text: str) -> tuple:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,1,3") from None
    if not scales or min(scales) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: guidance scales are numbers ≥ 0")
    return scales


def sample_scales(bundle: Path, scales, per_class: int, sampler: str, steps: int, seed: int, batch: int):
    from dtk.runtime.pipeline import Pipeline

    runs = []
    with Pipeline.load(bundle, backend="onnxruntime") as pipeline:
        num = per_class * pipeline.manifest.classes["num_classes"]
        for scale in scales:
            print(f"sampling {num} at guidance scale {scale:g}", file=sys.stderr)
            start = time.perf_counter()
            latents = pipeline.sample_latents(
                num, steps, sampler, seed, max_batch=batch, progress=True, labels="all", guidance_scale=scale
            )
            seconds = time.perf_counter() - start
            labels = np.repeat(np.arange(num // per_class), per_class)
            runs.append(
                {
                    "scale": scale,
                    "images": quality.as_displayed(latents),
                    "labels": labels,
                    "seconds": seconds,
                }
            )
    return runs


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.files import atomic_path

    rows = data["results"]
    scales = [r["guidance_scale"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    left.plot(scales, [100 * r["requested_share"] for r in rows], marker="o", color="C0")
    left.axhline(100 * GOAL_SHARE, color="gray", linestyle="--", label=f"goal {100 * GOAL_SHARE:.0f}%")
    left.set_xlabel("guidance scale s")
    left.set_ylabel("classified as the digit asked for (%)")
    left.set_ylim(0, 100)
    left.legend(fontsize=8)
    right.plot(scales, [r["frechet_distance"] for r in rows], marker="o", color="C1", label="this model")
    for name, value, style in (
        ("unconditional model (recorded)", data["unconditional"].get("frechet_distance"), ":"),
        (f"real vs real ({data['num']} images)", data["real_floor"]["mean"], "--"),
    ):
        if value is not None:
            right.axhline(value, color="gray", linestyle=style, label=f"{name}: {value:.2f}")
    right.set_xlabel("guidance scale s")
    right.set_ylabel("Fréchet distance on digits-classifier features")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(scales, [f"{s:g}" for s in scales], fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{data['checkpoint']['name']}: classifier-free guidance, {data['sampler']} {data['steps']} steps, "
        f"{data['num']} samples per scale",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def sample_sheet(runs: list[dict], path: Path, per_class: int = 3) -> None:
    """Per scale a grid row of `per_class` samples of each digit, 0 to 9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.files import atomic_path
    from dtk.runtime.images import make_grid, to_uint8

    fig, axes = plt.subplots(len(runs), 1, figsize=(30 * 0.42, len(runs) * 0.75 + 0.3), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        picks = np.concatenate([np.flatnonzero(run["labels"] == k)[:per_class] for k in range(10)])
        grid = make_grid(to_uint8(run["images"][picks]), nrow=len(picks))
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(f"s = {run['scale']:g} (digits 0..9, {per_class} each)", fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def recorded_unconditional(path: Path, sampler: str, steps: int) -> dict:
    """The unconditional model's Fréchet distance for this sampler from quality_vs_steps.json, if recorded."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    for row in data.get("results", []):
        if row["sampler"] == sampler and row["steps"] == steps:
            return {
                "source": str(path.name),
                "checkpoint_step": data["checkpoint"]["step"],
                "frechet_distance": row["frechet_distance"],
            }
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a class-conditional digits model.pt")
    parser.add_argument("--per-class", type=int, default=100, help="samples of each digit per scale")
    parser.add_argument("--scales", type=parse_scales, default=SCALES, help="e.g. 0,1,2,3,5")
    parser.add_argument("--sampler", default="dpmpp-2m")
    parser.add_argument("--steps", type=int, default=10, help="the recommended sampler: DPM-Solver++(2M) 10")
    parser.add_argument("--batch-size", type=int, default=125, help="images per chunk (2B per guided call)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from dtk.checkpoint import load_checkpoint
    from dtk.export.bundle import ExportOptions, export_bundle
    from dtk.runtime.files import sha256, write_text
    from dtk.runtime.system import machine_name, system_info

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.classes is None or ckpt.classes["num_classes"] != 10:
        sys.exit(
            f"error: {args.checkpoint}: not a class-conditional digits model (train with --class-conditional)"
        )
    config = ckpt.model_config
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(args.checkpoint, bundle, ExportOptions(batch=(1, args.batch_size, 2 * args.batch_size)))
        runs = sample_scales(
            bundle, args.scales, args.per_class, args.sampler, args.steps, args.seed, args.batch_size
        )

    print("training the digits classifier", file=sys.stderr)
    real, labels = quality.real_digits(config.image_size, config.in_channels)
    classifier, accuracy = quality.train_classifier(real, labels, args.classifier_epochs, args.seed)
    real_features, _ = quality.embed(classifier, real)
    mu_real, cov_real = quality.feature_stats(real_features)
    num = len(runs[0]["labels"])
    rng = np.random.default_rng(args.seed)
    floor = [
        quality.frechet_distance(
            *quality.feature_stats(real_features[rng.choice(len(real), num, replace=num > len(real))]),
            mu_real,
            cov_real,
        )
        for _ in range(5)
    ]
    results = []
    for run in runs:
        features, probabilities = quality.embed(classifier, run["images"])
        results.append(
            {
                "guidance_scale": run["scale"],
                "requested_share": round(requested_share(probabilities, run["labels"]), 4),
                "frechet_distance": round(
                    quality.frechet_distance(*quality.feature_stats(features), mu_real, cov_real), 4
                ),
                "class_coverage": round(quality.class_coverage(probabilities), 4),
                "confident": round(float((probabilities.max(1) > 0.9).mean()), 4),
                "nfe_per_image": args.steps * (1 if run["scale"] in (0.0, 1.0) else 2),
                "seconds": round(run["seconds"], 2),
            }
        )
    unconditional = recorded_unconditional(args.out / "quality_vs_steps.json", args.sampler, args.steps)
    s0 = next((r for r in results if r["guidance_scale"] == 0.0), None)
    baseline_fd = unconditional.get("frechet_distance", s0["frechet_distance"] if s0 else float("inf"))
    system = system_info()
    data = {
        "checkpoint": {
            "name": args.checkpoint.parent.name
            if args.checkpoint.name == "model.pt"
            else args.checkpoint.name,
            "path": str(args.checkpoint),
            "sha256": sha256(args.checkpoint),
            "step": ckpt.step,
            "model": config.to_dict(),
            "classes": ckpt.classes,
            "cond_dropout": (ckpt.train_state or {}).get("config", {}).get("cond_dropout"),
        },
        "sampler": args.sampler,
        "steps": args.steps,
        "num": num,
        "per_class": args.per_class,
        "seed": args.seed,
        "classifier": {"test_accuracy": round(accuracy, 4), "features": 64, "epochs": args.classifier_epochs},
        "real_floor": {"mean": round(float(np.mean(floor)), 4), "runs": [round(f, 4) for f in floor]},
        "unconditional": unconditional,
        "goal": {"requested_share": GOAL_SHARE, "frechet_distance_at_most": baseline_fd},
        "recommended": recommended_scale(results, baseline_fd),
        "results": results,
        "machine": machine_name(system),
        "system": system,
    }
    stem = args.out / "quality_vs_guidance"
    write_text(stem.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    plot(data, stem.with_suffix(".png"))
    sample_sheet(runs, args.out / "quality_vs_guidance_samples.png")
    print(f"classifier test accuracy {accuracy:.3f}; real-vs-real floor {np.mean(floor):.3f}")
    for r in results:
        print(
            f"s {r['guidance_scale']:>4g}: requested {100 * r['requested_share']:5.1f}%  "
            f"FD {r['frechet_distance']:8.3f}  {r['seconds']:.1f} s"
        )
    print(f"recommended: {data['recommended']}; wrote {stem}.json, {stem}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
