"""Sample quality against network evaluations for a digits-trained model: how few steps can an edge user take?

Quality is a Fréchet distance (FID's formula) on the features of a small digits classifier this script trains
itself, between generated samples and the real digits the model learned from (benchmarks/README.md explains
why not Inception features). Samplers: DDPM 1000 steps, and every other sampler at 5, 10 and 20 steps (DDIM
also 50), with sampling options as `sampler+option` (karras, trailing, threshold, noclip, sigma_min, heun),
each sampled through the runtime (ONNX Runtime on the exported bundle) with the same seed.

    dtk train --preset tiny --dataset digits --image-size 16 --steps 4000 --out runs/digits
    python benchmarks/quality_vs_steps.py --checkpoint runs/digits/model.pt

Writes benchmarks/results/quality_vs_steps.json, quality_vs_steps.png (Fréchet distance against network
evaluations) and quality_vs_steps_samples.png (the first samples of every setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "dpmpp-2m": "DPM-Solver++(2M)",
    "dpmpp-2m-sde": "DPM-Solver++(2M) SDE",
    "dpmpp-3m": "DPM-Solver++(3M)",
    "unipc": "UniPC-2 (bh2)",
    "euler": "Euler",
    "euler-ancestral": "Euler ancestral",
}
# a setting's options: diffusers scheduler fields set on the bundle's config for that setting
OPTIONS = {
    "karras": {"use_karras_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},
    "threshold": {"thresholding": True},
    "noclip": {"clip_sample": False},
    "sigma_min": {"final_sigmas_type": "sigma_min"},
    "heun": {"solver_type": "heun"},
}
SETTINGS = (
    ("ddim", 50),
    *((sampler, steps) for sampler in list(SAMPLER_NAMES)[1:] for steps in (5, 10, 20)),
    *((f"{sampler}+karras", steps) for sampler in ("dpmpp-2m", "dpmpp-3m", "unipc") for steps in (5, 10)),
    *((f"{sampler}+trailing", 10) for sampler in ("ddim", "dpmpp-2m", "unipc")),
    ("dpmpp-2m+noclip", 10),
    ("unipc+karras+threshold", 10),
    ("ddpm", 1000),  # last: the longest, and the reference
)


# --- the metric ---


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


def class_coverage(probabilities: np.ndarray) -> float:
    """Entropy of the predicted-class histogram over log(10): 1.0 when all ten digits are equally frequent."""
    counts = np.bincount(np.asarray(probabilities).argmax(axis=1), minlength=10).astype(np.float64)
    p = counts / counts.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / np.log(10))


# --- the feature extractor: a small digits classifier ---


def digits_classifier(channels: int, image_size: int, features: int = 64):
    """Two conv blocks and a `features`-wide hidden layer; `forward` returns (logits, hidden features)."""
    import torch
    from torch import nn

    class DigitsClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(64 * 16, features),
                nn.ReLU(),
            )
            self.head = nn.Linear(features, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.body(x)  # (B, features)
            return self.head(hidden), hidden

    del image_size  # any size: the adaptive pooling fixes the hidden width
    return DigitsClassifier()


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 30, seed: int = 0):
    """Train on 80% of the digits (stratified, seeded); accuracy on the other 20% → (model, accuracy)."""
    import torch
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed
    )
    x = torch.from_numpy(np.asarray(images, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    model = digits_classifier(x.shape[1], x.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    train = torch.from_numpy(train_idx)
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()  # ±1 px jitter: robust features
            inputs = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(inputs)[0], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(x[torch.from_numpy(test_idx)])[0].argmax(1)
    accuracy = float((predicted == y[torch.from_numpy(test_idx)]).float().mean())
    return model, accuracy


def embed(model, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(hidden features [N, D], class probabilities [N, 10]) of images in [-1, 1]."""
    import torch

    features, probabilities = [], []
    with torch.no_grad():
        for chunk in torch.from_numpy(np.asarray(images, np.float32)).split(batch):
            logits, hidden = model(chunk)
            features.append(hidden.numpy())
            probabilities.append(torch.softmax(logits, 1).numpy())
    return np.concatenate(features), np.concatenate(probabilities)


# --- data and samples ---


def real_digits(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The training set the model saw (dtk's `digits`), as float [-1, 1] NCHW, and the digit labels."""
    from sklearn.datasets import load_digits

    from dtk.data import load_dataset

    images = load_dataset("digits", image_size, channels).images.numpy()
    return images.astype(np.float32) / 127.5 - 1.0, load_digits().target


def as_displayed(latents: np.ndarray) -> np.ndarray:
    """Generated latents as a user gets them: quantised to uint8 (like the real images), back to [-1, 1]."""
    from dtk.runtime.images import to_uint8

    return to_uint8(latents).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def split_setting(name: str) -> tuple[str, dict]:
    """ "unipc+karras+noclip" → ("unipc", {"use_karras_sigmas": True, "clip_sample": False})."""
    sampler, *options = name.split("+")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown option {unknown[0]!r}; choose from {', '.join(OPTIONS)}")
    return sampler, {k: v for option in options for k, v in OPTIONS[option].items()}


def bundle_with(bundle: Path, options: dict, folder: Path) -> Path:
    """A view of `bundle` whose manifest sets `options` on the diffusion config (the files are links)."""
    if not options:
        return bundle
    view = folder / "+".join(f"{k}={v}" for k, v in sorted(options.items()))
    view.mkdir(parents=True, exist_ok=True)
    for item in bundle.iterdir():
        if item.name != "dtk.json" and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    manifest = json.loads((bundle / "dtk.json").read_text())
    manifest["diffusion"].update(options)
    (view / "dtk.json").write_text(json.dumps(manifest))
    return view


def sample_settings(
    bundle: Path, settings, num: int, seed: int, batch_size: int, folder: Path, score
) -> list:
    """Sample every setting; `score(run)` as each one is done (so a long run reports as it goes)."""
    from dtk.runtime.pipeline import Pipeline

    out = []
    for name, steps in settings:
        sampler, options = split_setting(name)
        print(f"sampling {num} with {name}, {steps} steps", file=sys.stderr)
        with Pipeline.load(bundle_with(bundle, options, folder), backend="onnxruntime") as pipeline:
            start = time.perf_counter()
            latents = pipeline.sample_latents(num, steps, sampler, seed, max_batch=batch_size, progress=True)
            seconds = time.perf_counter() - start
        run = {"sampler": name, "steps": steps, "images": as_displayed(latents), "seconds": seconds}
        run["score"] = score(run)
        out.append(run)
    return out


def export(checkpoint: Path, bundle: Path, batch_size: int) -> Path:
    from dtk.export.bundle import ExportOptions, export_bundle

    export_bundle(checkpoint, bundle, ExportOptions(batch=(1, batch_size, batch_size)))
    return bundle


def display_name(setting: str) -> str:
    sampler, *options = setting.split("+")
    return " + ".join([SAMPLER_NAMES.get(sampler, sampler), *options])


def parse_settings(text: str) -> tuple:
    """ "ddpm:1000,ddim:10" → (("ddpm", 1000), ("ddim", 10))."""
    pairs = []
    for item in text.split(","):
        sampler, _, steps = item.strip().partition(":")
        if not steps.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected sampler:steps, e.g. ddim:20")
        split_setting(sampler)
        pairs.append((sampler, int(steps)))
    return tuple(pairs)


# --- report ---


def goal(results: list[dict], max_nfe: int = 10, margin: float = 0.10) -> dict | None:
    """The issue's goal: a setting at <= max_nfe network evaluations within `margin` of DDPM-1000."""
    chains = [r for r in results if r["sampler"] == "ddpm" and r["nfe"] == 1000]
    few = [r for r in results if r["nfe"] <= max_nfe]
    if not chains or not few:
        return None
    reference = chains[0]["frechet_distance"]
    best = min(few, key=lambda r: r["frechet_distance"])
    target = (1.0 + margin) * reference
    return {
        "ddpm_1000": reference,
        "target": round(target, 4),
        "best": {
            "sampler": best["sampler"],
            "steps": best["steps"],
            "frechet_distance": best["frechet_distance"],
        },
        "ratio": round(best["frechet_distance"] / reference, 4),
        "met": best["frechet_distance"] <= target,
    }


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.files import atomic_path

    fig, ax = plt.subplots(figsize=(9.0, 6.0))
    for k, sampler in enumerate(dict.fromkeys(r["sampler"] for r in data["results"])):
        rows = sorted((r for r in data["results"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rows]
        fd = [r["frechet_distance"] for r in rows]
        style = "-" if "+" not in sampler else "--"
        ax.plot(nfe, fd, style, marker="o", color=f"C{k % 10}", label=display_name(sampler), markersize=4)
        if len(rows) == 1 or sampler == "ddpm":
            for x, y in zip(nfe, fd, strict=True):
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if data.get("goal"):
        target = data["goal"]["target"]
        ax.axhline(target, color="C3", linestyle=":", label=f"DDPM-1000 + 10%: {target:.2f}")
    floor = data["real_floor"]["mean"]
    ax.axhline(floor, color="gray", linestyle="--", label=f"real vs real ({data['num']} images): {floor:.2f}")
    ax.set_xscale("log")
    ticks = sorted({r["nfe"] for r in data["results"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("Fréchet distance on digits-classifier features")
    ax.set_ylim(0, min(40.0, max(r["frechet_distance"] for r in data["results"]) * 1.05))
    ax.set_title(
        f"{data['checkpoint']['name']}: quality against steps ({data['num']} samples each)", fontsize=10
    )
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def sample_sheet(runs: list[dict], path: Path, per_row: int = 24) -> None:
    """One row of samples per setting, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.files import atomic_path
    from dtk.runtime.images import make_grid, to_uint8

    fig, axes = plt.subplots(len(runs), 1, figsize=(per_row * 0.42, len(runs) * 0.75 + 0.3), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        grid = make_grid(to_uint8(run["images"][:per_row]), nrow=per_row)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        name = display_name(run["sampler"])
        ax.set_title(f"{name}, {run['steps']} steps", fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a digits-trained model.pt")
    parser.add_argument("--bundle", type=Path, help="its exported bundle (default: export one to a temp dir)")
    parser.add_argument("--num", type=int, default=1000, help="samples per setting")
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--settings", type=parse_settings, default=SETTINGS, help="e.g. ddpm:1000,ddim:10")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from dtk.checkpoint import load_checkpoint
    from dtk.runtime.files import sha256, write_text
    from dtk.runtime.system import machine_name, system_info

    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.model_config
    print("training the digits classifier", file=sys.stderr)
    real, labels = real_digits(config.image_size, config.in_channels)
    classifier, accuracy = train_classifier(real, labels, args.classifier_epochs, args.seed)
    real_features, _ = embed(classifier, real)
    mu_real, cov_real = feature_stats(real_features)
    rng = np.random.default_rng(args.seed)
    replace = args.num > len(real)
    floor = [  # the distance a perfect model would still show with this many samples
        frechet_distance(
            *feature_stats(real_features[rng.choice(len(real), args.num, replace=replace)]), mu_real, cov_real
        )
        for _ in range(5)
    ]
    print(
        f"classifier test accuracy {accuracy:.3f}; real-vs-real floor {np.mean(floor):.3f}", file=sys.stderr
    )

    def score(run: dict) -> dict:
        features, probabilities = embed(classifier, run["images"])
        row = {
            "sampler": run["sampler"],
            "steps": run["steps"],
            "nfe": run["steps"],  # every sampler here calls the network once per step
            "frechet_distance": round(frechet_distance(*feature_stats(features), mu_real, cov_real), 4),
            "class_coverage": round(class_coverage(probabilities), 4),
            "confident": round(float((probabilities.max(1) > 0.9).mean()), 4),
            "seconds": round(run["seconds"], 2),
            "ms_per_image": round(1000 * run["seconds"] / args.num, 3),
        }
        print(f"  {row['sampler']} {row['steps']}: FD {row['frechet_distance']}", file=sys.stderr, flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or export(args.checkpoint, Path(tmp) / "bundle", args.batch_size)
        runs = sample_settings(bundle, args.settings, args.num, args.seed, args.batch_size, Path(tmp), score)
    results = [run.pop("score") for run in runs]
    system = system_info()
    data = {
        "checkpoint": {
            "name": args.checkpoint.name
            if args.checkpoint.name != "model.pt"
            else args.checkpoint.parent.name,
            "path": str(args.checkpoint),
            "sha256": sha256(args.checkpoint),
            "step": ckpt.step,
            "model": config.to_dict(),
            "diffusion": ckpt.diffusion.to_dict(),
        },
        "num": args.num,
        "seed": args.seed,
        "classifier": {"test_accuracy": round(accuracy, 4), "features": 64, "epochs": args.classifier_epochs},
        "real_floor": {"mean": round(float(np.mean(floor)), 4), "runs": [round(f, 4) for f in floor]},
        "results": results,
        "goal": goal(results),
        "machine": machine_name(system),
        "system": system,
    }
    stem = args.out / "quality_vs_steps"
    write_text(stem.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    plot(data, stem.with_suffix(".png"))
    sample_sheet(
        [r for r in runs if r["steps"] == 10 or r["sampler"] == "ddpm"],
        args.out / "quality_vs_steps_samples.png",
    )
    print(f"classifier test accuracy {accuracy:.3f}; real-vs-real floor {np.mean(floor):.3f}")
    for r in results:
        print(
            f"{r['sampler']:>9} {r['steps']:>5} steps: FD {r['frechet_distance']:8.3f}  "
            f"coverage {r['class_coverage']:.3f}  confident {r['confident']:.3f}  "
            f"{r['ms_per_image']:.1f} ms/image"
        )
    print(f"wrote {stem}.json, {stem}.png, {args.out / 'quality_vs_steps_samples.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
