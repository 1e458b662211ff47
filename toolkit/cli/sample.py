"""`dtk sample`: images from a checkpoint (PyTorch reference) or a bundle, .onnx or .plan (dtk.runtime)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click

from dtk.runs import checkpoint_or_run
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.samplers import SAMPLERS

BACKENDS = ("auto", "onnxruntime", "tensorrt")
RUNTIME_SUFFIXES = (".onnx", ".plan")


@dataclass
class SampleOptions:
    """The flags of `dtk sample`, one to one."""

    path: Path
    num: int = 16
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    out: Path = Path("samples.png")
    images_dir: Path | None = None
    nrow: int | None = None
    backend: str = "auto"
    batch_size: int | None = None
    device: str = "auto"
    weights: str | None = None
    progress: bool = True


@dataclass
class SampleResult:
    images: object  # uint8 [N, H, W, C]
    backend: str
    seconds: float  # sampling only, not loading


def sample(options: SampleOptions) -> SampleResult:
    """Sample as `dtk sample` does, without writing anything."""
    path = Path(options.path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    path = checkpoint_or_run(path)
    if path.is_dir() or path.suffix in RUNTIME_SUFFIXES:
        return _sample_runtime(path, options)
    return _sample_checkpoint(path, options)


def _sample_checkpoint(path: Path, options: SampleOptions) -> SampleResult:
    if options.backend != "auto":
        raise DtkError(
            f"--backend {options.backend} is for bundles, .onnx and .plan; {path} samples with PyTorch"
        )
    from dtk.checkpoint import load_checkpoint
    from dtk.reference import sample_checkpoint
    from dtk.runtime.images import to_uint8

    ckpt = load_checkpoint(path)
    start = time.perf_counter()
    latents = sample_checkpoint(
        ckpt,
        num=options.num,
        steps=options.steps,
        sampler=options.sampler,
        seed=options.seed,
        eta=options.eta,
        device=options.device,
        batch_size=options.batch_size,
        progress=options.progress,
        weights=options.weights or "ema",
    )
    return SampleResult(to_uint8(latents), "pytorch", time.perf_counter() - start)


def _sample_runtime(path: Path, options: SampleOptions) -> SampleResult:
    if options.weights is not None:
        raise DtkError(f"--weights is for checkpoints; {path} holds the weights it was exported with")
    from dtk.runtime.pipeline import Pipeline

    backend, opts = _backend_options(path, options.backend, options.device)
    with Pipeline.load(path, backend=backend, **opts) as pipeline:
        start = time.perf_counter()
        images = pipeline.sample(
            num=options.num,
            steps=options.steps,
            sampler=options.sampler,
            seed=options.seed,
            eta=options.eta,
            max_batch=options.batch_size,
            progress=options.progress,
        )
        return SampleResult(images, pipeline.backend, time.perf_counter() - start)


def _backend_options(path: Path, backend: str, device: str) -> tuple[str, dict]:
    """--backend and --device → (backend, options for its denoiser)."""
    if device == "auto":
        return backend, {}
    if device == "cpu":
        if backend == "tensorrt":
            raise DtkError("--device cpu: TensorRT runs on a GPU; use --backend onnxruntime")
        return "onnxruntime", {"providers": ["cpu"]}
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise DtkError(f"unknown device {device!r} for a bundle; use auto, cpu, cuda or cuda:N")
    index = int(index or 0)
    if backend == "auto":
        from dtk.runtime.pipeline import choose_backend

        backend = choose_backend(path)[0]
    if backend == "tensorrt":
        return backend, {"device": index}
    return backend, {"providers": ["cuda"], "device_id": index}


def write_outputs(result: SampleResult, options: SampleOptions) -> list[Path]:
    from dtk.runtime.images import save_grid, save_images

    written = [save_grid(result.images, options.out, nrow=options.nrow)]
    if options.images_dir is not None:
        written += save_images(result.images, options.images_dir)
    return written


@click.command("sample")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--num", "-n", type=click.IntRange(min=1), default=16, show_default=True, help="Images to sample."
)
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Sampler steps.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim", show_default=True)
@click.option("--eta", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True, help="DDIM's η.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Same seed, same images."
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True, help="Grid PNG."
)
@click.option("--images-dir", type=click.Path(path_type=Path), help="Also write each image as a PNG here.")
@click.option("--nrow", type=click.IntRange(min=1), help="Images per grid row [default: √num].")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="For bundles, .onnx and .plan (auto: TensorRT if a plan and a GPU are usable, else ONNX Runtime).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Images per network call [default: all / max]."
)
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (mps: checkpoints)."
)
@click.option("--weights", type=click.Choice(["ema", "raw"]), help="Checkpoint weights [default: ema].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(**flags):
    """Sample images from PATH: a checkpoint (model.pt, with PyTorch) or the run folder it is in, a bundle
    directory, .onnx or .plan."""
    options = SampleOptions(**flags)
    if options.out.is_dir():
        raise file_error(options.out, "is a directory; give a .png file name")
    if options.out.suffix.lower() != ".png":
        raise file_error(options.out, "the grid is written as PNG: use a .png name")
    result = sample(options)
    written = write_outputs(result, options)
    click.echo(
        f"wrote {written[0]}: {len(result.images)} images, {options.steps} {options.sampler} steps "
        f"on {result.backend} in {result.seconds:.2f} s"
    )
    if options.images_dir is not None:
        click.echo(f"wrote {len(written) - 1} images to {options.images_dir}")
