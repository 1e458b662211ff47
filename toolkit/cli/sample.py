"""`dtk sample`: images from a checkpoint (PyTorch reference) or a bundle, .onnx or .plan (dtk.runtime)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from dtk.runs import checkpoint_or_run
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.samplers import SAMPLERS
from dtk.runtime.schedule import DEFAULT_SAMPLER

BACKENDS = ("auto", "onnxruntime", "tensorrt")
RUNTIME_SUFFIXES = (".onnx", ".plan")
BYTES_PER_VALUE = 4 + 1 + 1  # float32 sample, uint8 image, its copy in the grid


@dataclass
class SampleOptions:
    """The flags of `dtk sample`, one to one."""

    path: Path
    num: int = 16
    steps: int = 50
    sampler: str | None = None  # None: the bundle's or checkpoint's default sampler
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
    npy: Path | None = None
    trajectory: Path | None = None


@dataclass
class SampleResult:
    images: object  # uint8 [N, H, W, C]
    backend: str
    seconds: float  # sampling only, not loading
    latents: object = None  # float32 [N, C, H, W] in the model's range
    trajectory: object = None  # a TrajectoryRecorder when --trajectory was asked for
    sampler: str = ""


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
    config = ckpt.model_config
    check_memory(options.num, (config.in_channels, config.image_size, config.image_size))
    recorder = _recorder(options, (config.in_channels, config.image_size, config.image_size))
    sampler = options.sampler or ckpt.diffusion.sampler or DEFAULT_SAMPLER
    start = time.perf_counter()
    latents = sample_checkpoint(
        ckpt,
        num=options.num,
        steps=options.steps,
        sampler=sampler,
        seed=options.seed,
        eta=options.eta,
        device=options.device,
        batch_size=options.batch_size,
        progress=options.progress,
        weights=options.weights or "ema",
        step_callback=recorder,
    )
    return SampleResult(to_uint8(latents), "pytorch", time.perf_counter() - start, latents, recorder, sampler)


def _sample_runtime(path: Path, options: SampleOptions) -> SampleResult:
    if options.weights is not None:
        raise DtkError(f"--weights is for checkpoints; {path} holds the weights it was exported with")
    from dtk.runtime.pipeline import Pipeline

    backend, opts = _backend_options(path, options.backend, options.device)
    with Pipeline.load(path, backend=backend, **opts) as pipeline:
        check_memory(options.num, pipeline.sample_shape)
        from dtk.runtime.images import to_uint8

        recorder = _recorder(options, pipeline.sample_shape)
        start = time.perf_counter()
        latents = pipeline.sample_latents(
            num=options.num,
            steps=options.steps,
            sampler=options.sampler,
            seed=options.seed,
            eta=options.eta,
            max_batch=options.batch_size,
            progress=options.progress,
            step_callback=recorder,
        )
        seconds = time.perf_counter() - start
        return SampleResult(
            to_uint8(latents),
            pipeline.backend,
            seconds,
            latents,
            recorder,
            options.sampler or pipeline.default_sampler,
        )


def _recorder(options: SampleOptions, shape_chw):
    if options.trajectory is None:
        return None
    from dtk.runtime.trajectory import TrajectoryRecorder

    return TrajectoryRecorder(options.seed, options.num, options.steps, shape_chw)


def check_memory(num: int, shape: tuple[int, int, int]) -> None:
    """Refuse --num when the images would not fit in memory (float32 samples, uint8 images and the grid)."""
    need = num * math.prod(shape) * BYTES_PER_VALUE
    have = available_memory()
    if need > have:
        c, h, w = shape
        raise DtkError(
            f"--num {num}: {num} images of {c}x{h}x{w} would need {_size(need)} of memory and "
            f"{_size(have)} is available; sample fewer per run (several runs with other --seed values)"
        )


def available_memory() -> int:
    """MemAvailable from /proc/meminfo; elsewhere physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
    if options.npy is not None:
        write_npy(options.npy, result.latents)
        written.append(options.npy)
    if options.trajectory is not None:
        written.append(result.trajectory.save(options.trajectory))
    return written


def write_npy(path: Path, array) -> Path:
    """The raw samples as .npy, written to a temporary name and renamed into place."""
    import numpy as np

    from dtk.runtime.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array, dtype=np.float32))
    return path


@click.command("sample")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--num", "-n", type=click.IntRange(min=1), default=16, show_default=True, help="Images to sample."
)
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Sampler steps.")
@click.option(
    "--sampler",
    type=click.Choice(SAMPLERS),
    help=f"[default: the bundle's, which a diffusers scheduler class sets; else {DEFAULT_SAMPLER}]",
)
@click.option("--eta", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True, help="DDIM's η.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Same seed, same images."
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=Path("samples.png"),
    show_default=True,
    help="Grid PNG.",
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
    "--batch",
    "--batch-size",
    "batch_size",
    type=click.IntRange(min=1),
    help="Most images per network call [default: all at once / the bundle's max].",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (mps: checkpoints)."
)
@click.option("--weights", type=click.Choice(["ema", "raw"]), help="Checkpoint weights [default: ema].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option(
    "--npy",
    type=click.Path(path_type=Path),
    help="Also write the raw float32 samples [N, C, H, W] in the model's range [-1, 1] as .npy.",
)
@click.option(
    "--trajectory",
    type=click.Path(path_type=Path),
    help="Also draw the reverse chain x_T → x_0 of the first 4 images at 7 steps as a PNG.",
)
def command(**flags):
    """Sample images from PATH: a checkpoint (model.pt, with PyTorch) or the run folder it is in, a bundle
    directory, .onnx or .plan."""
    options = SampleOptions(**flags)
    if options.out.is_dir():
        raise file_error(options.out, "is a directory; give a .png file name")
    for path, suffix, what in (
        (options.out, ".png", "the grid is written as PNG"),
        (options.trajectory, ".png", "the trajectory is written as PNG"),
        (options.npy, ".npy", "the samples are written as NumPy .npy"),
    ):
        if path is not None and path.suffix.lower() != suffix:
            raise file_error(path, f"{what}: use a {suffix} name")
    result = sample(options)
    written = write_outputs(result, options)
    click.echo(
        f"wrote {written[0]}: {len(result.images)} images, {options.steps} {result.sampler} steps "
        f"on {result.backend} in {result.seconds:.2f} s"
    )
    if options.images_dir is not None:
        click.echo(
            f"wrote {len(list(options.images_dir.glob('sample_*.png')))} images to {options.images_dir}"
        )
    if options.npy is not None:
        click.echo(f"wrote {options.npy}: float32 {list(result.latents.shape)}")
    if options.trajectory is not None:
        click.echo(f"wrote {options.trajectory}: {result.trajectory.caption()}")
