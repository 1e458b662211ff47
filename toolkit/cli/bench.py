"""`dtk bench`: per-call denoiser latency and end-to-end sampling time, trtexec style; one backend or several.

Each backend of `--compare` runs in its own process, one after another: ONNX Runtime's and torch's thread
pools slow each other down when they share a process on few cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.samplers import SAMPLERS

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
COMPARABLE = ("torch", "torch-compile", "onnxruntime", "tensorrt")
MID_TIMESTEP = 0.5  # the timestep fed to per-call timing, as a fraction of T (the cost does not depend on it)


@dataclass
class BenchOptions:
    """The flags of `dtk bench`, one to one."""

    source: Path | None = None
    engine: Path | None = None
    onnx: Path | None = None
    checkpoint: Path | None = None
    compile: bool = False
    backend: str = "auto"
    batch: int = 1
    warmup: str = "200"
    iterations: int = 10
    duration: float = 3.0
    cuda_graph: bool = False
    transfers: bool = True
    steps: int | None = None
    sampler: str = "ddim"
    sample_runs: int = 3
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    json_path: Path | None = None
    json_stdout: bool = False
    plot: Path | None = None
    compare: str | None = None
    show_system: bool = True


@dataclass
class Target:
    """A denoiser ready to time, and what the report says about it."""

    backend: str
    denoiser: object
    sample_shape: tuple[int, int, int]  # C, H, W
    timestep_dtype: str
    precision: str
    diffusion: object  # DiffusionConfig, for --steps
    on_host: bool  # runs on host memory: no host-device transfers exist
    chain: bool  # samples with `run_chain` (the sample stays on the device)
    detail: dict = field(default_factory=dict)
    device_call: object = None  # (batch) -> a callable timing one call on resident buffers, where one exists
    owner: object = None  # what to close afterwards (the pipeline); the denoiser itself when None

    def close(self):
        close = getattr(self.owner or self.denoiser, "close", None)
        if close is not None:
            close()


@click.command(context_settings={"show_default": True})
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--engine", type=click.Path(path_type=Path), help="A TensorRT unet.plan (dtk.json beside it).")
@click.option("--onnx", type=click.Path(path_type=Path), help="A unet.onnx (dtk.json beside it).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A model.pt: the PyTorch baseline.")
@click.option(
    "--compile", "compile_", is_flag=True, help="torch.compile the PyTorch model (first call compiles)."
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", help="Backend to time.")
@click.option("--batch", type=click.IntRange(min=1), default=1, help="Images per denoiser call.")
@click.option(
    "--warmup",
    default="200",
    help="Warm-up: milliseconds as in trtexec (500), a time with a unit (2s), or a number of calls (10x).",
)
@click.option("--iterations", type=click.IntRange(min=1), default=10, help="Time at least this many calls.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    callback=lambda ctx, param, value: _finite(param, value),
    default=3.0,
    help="...and for at least this many seconds (0: off).",
)
@click.option(
    "--cuda-graph/--no-cuda-graph", default=False, help="TensorRT: capture the call in a CUDA graph."
)
@click.option(
    "--transfers/--no-transfers",
    default=True,
    help="Time host arrays in and out (default), or only the call on device-resident buffers.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), help="Also time sampling end to end with this many steps."
)
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim", help="Sampler for --steps.")
@click.option("--sample-runs", type=click.IntRange(min=1), default=3, help="End-to-end runs to average.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, help="Seed of the inputs and the sampling noise."
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (ONNX Runtime intra-op, torch).")
@click.option("--device", default="auto", help="PyTorch device: auto, cpu, cuda, cuda:1.")
@click.option(
    "-o", "--out", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON here."
)
@click.option("--json", "json_stdout", is_flag=True, help="Print the results as JSON instead of the text.")
@click.option("--plot", type=click.Path(path_type=Path), help="With --compare: draw the comparison as a PNG.")
@click.option("--compare", help="Backends side by side, each in its own process: torch,onnxruntime,tensorrt.")
@click.option("--system/--no-system", "show_system", default=True, hidden=True)
def command(bundle, compile_, **flags):
    """Time the denoiser of BUNDLE (a bundle dir, unet.onnx or unet.plan) or of a --checkpoint.

    Reports per-call latency (min, mean, p50, p90, p95, p99, max in ms) and throughput after a warm-up; with
    --steps also one whole sample, split into denoiser, sampler update and copies. --compare runs several
    backends on the same shapes and prints the speed-up over PyTorch eager.

    \b
    Examples:
      dtk bench bundle/ --batch 8 --steps 50 -o ort.json
      dtk bench --engine bundle/unet.plan --no-transfers --cuda-graph --warmup 500ms --duration 10
      dtk bench bundle/ --checkpoint model.pt --compare torch,onnxruntime,tensorrt"""
    opts = BenchOptions(source=bundle, compile=compile_, **flags)
    if opts.plot is not None and (not opts.compare or opts.plot.suffix.lower() != ".png"):
        raise file_error(
            opts.plot, "--plot draws the --compare table as PNG: use it with --compare and a .png name"
        )
    if opts.compare:
        run_compare(opts)
    else:
        run_single(opts)


# --- one backend, in this process ---


def run_single(opts: BenchOptions) -> dict:
    from dtk.runtime.bench import TimingConfig, Warmup, format_result
    from dtk.runtime.system import system_info

    config = TimingConfig(Warmup.parse(opts.warmup), opts.iterations, opts.duration)
    target = open_target(opts)
    try:
        load_before = _load_average()
        result = measure(target, opts, config)
        load = max(load_before, _load_average())
    finally:
        target.close()
    result.system = system_info()
    record = result.to_dict()
    record["load_average"] = round(load, 2)
    click.echo(json.dumps(record, indent=2) if opts.json_stdout else format_result(result, opts.show_system))
    cores = os.cpu_count() or 1
    if load > cores:
        click.echo(
            f"warning: the load average was {load:.1f} on {cores} cores while measuring: other work shares "
            "the CPUs, so these figures are noisy (measure ratios side by side, or on a quiet machine)",
            err=True,
        )
    if opts.json_path:
        _write_json(opts.json_path, record, announce=opts.show_system)
    return record


def _finite(param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds", param=param)
    return value


def measure(target: Target, opts: BenchOptions, config):
    import numpy as np

    from dtk.runtime.bench import BenchResult, LatencyStats, TimingConfig, Warmup, time_calls
    from dtk.runtime.samplers import make_plan

    if opts.steps:  # --steps beyond the schedule: say so before the timing run, not after it
        make_plan(opts.sampler, target.diffusion, opts.steps)

    batch, (c, h, w) = opts.batch, target.sample_shape
    rng = np.random.default_rng(opts.seed)
    sample = rng.standard_normal((batch, c, h, w), dtype=np.float32)
    t = int(target.diffusion.num_train_timesteps * MID_TIMESTEP)
    timestep = np.full(batch, t, dtype=target.timestep_dtype)

    def host_call():
        target.denoiser(sample, timestep)

    device_call = None
    if target.device_call is not None:
        host_call()  # sets the shapes the resident buffers hold
        device_call = target.device_call(batch)
    if target.on_host:
        transfers, call = "host", host_call
    elif opts.transfers:
        transfers, call = "included", host_call
    elif device_call is not None:
        transfers, call = "excluded", device_call
    else:
        raise DtkError(f"--no-transfers: the {target.backend} backend cannot time a call without its copies")

    click.echo(f"timing {target.backend}, batch {batch} ...", err=True)
    timing = time_calls(call, config)
    result = BenchResult(
        backend=target.backend,
        batch=batch,
        precision=target.precision,
        inputs={
            "sample": {"shape": [batch, c, h, w], "dtype": "float32"},
            "timestep": {"shape": [batch], "dtype": str(np.dtype(target.timestep_dtype))},
        },
        transfers=transfers,
        timing=timing,
        config=config,
        detail=dict(target.detail),
    )
    if opts.steps:
        device_call_ms = None
        if device_call is not None:
            resident = (
                timing if transfers == "excluded" else time_calls(device_call, TimingConfig(Warmup(2), 20, 0))
            )
            device_call_ms = LatencyStats.from_samples(resident.latencies_ms).p50
        result.end_to_end = profile(target, opts, device_call_ms)
    return result


def profile(target: Target, opts: BenchOptions, device_call_ms: float | None) -> dict:
    """`--sample-runs` whole samples of `--batch` images with `--steps` steps, averaged."""
    from tqdm import tqdm

    from dtk.runtime.bench import mean_split, profile_sampling
    from dtk.runtime.samplers import make_plan

    plan = make_plan(opts.sampler, target.diffusion, opts.steps)
    splits = []
    total = opts.sample_runs * opts.steps
    with tqdm(total=total, desc="end-to-end", unit="step", leave=False, disable=None, file=sys.stderr) as bar:
        for run in range(opts.sample_runs):
            _, split = profile_sampling(
                target.denoiser,
                plan,
                opts.batch,
                target.sample_shape,
                target.timestep_dtype,
                seed=opts.seed + run,
                chain=target.chain,
                on_host=target.on_host,
                device_call_ms=device_call_ms,
                # a device chain would copy the sample back for a per-step callback: count whole runs there
                callback=None if target.chain else lambda i, t, x: bar.update(),
            )
            if target.chain:
                bar.update(opts.steps)
            splits.append(split)
    split = mean_split(splits)
    return {
        "steps": opts.steps,
        "sampler": opts.sampler,
        "batch": opts.batch,
        "runs": opts.sample_runs,
        "path": split.path,
        "split_ms": split.to_dict(),
        "per_step_ms": round(split.total_ms / opts.steps, 4),
        "images_per_s": round(1000.0 * opts.batch / split.total_ms, 4),
    }


# --- opening the thing to time ---


def resolve_inputs(opts: BenchOptions) -> tuple[Path | None, str]:
    """The bundle-side path (bundle dir, .onnx or .plan) and the backend to run; checks the flags agree."""
    path = _given_path(opts)
    backend = opts.backend
    implied = "tensorrt" if opts.engine else "onnxruntime" if opts.onnx else None
    if path is not None and path.suffix == ".plan":
        implied = "tensorrt"
    elif path is not None and path.suffix == ".onnx":
        implied = implied or "onnxruntime"
    if implied and backend not in ("auto", implied):
        raise DtkError(f"{path} runs on {implied}, not --backend {backend}")
    if backend == "auto":
        backend = implied or ("auto" if path is not None else "torch")
    if backend == "torch" and opts.checkpoint is None:
        checkpoint = source_checkpoint(path) if path is not None else None
        if checkpoint is None:
            raise DtkError("the torch backend needs --checkpoint model.pt")
        opts.checkpoint = checkpoint
    if backend != "torch" and path is None:
        raise DtkError(f"the {backend} backend needs a bundle (dtk export model.pt -o bundle/)")
    if opts.compile and backend != "torch":
        raise DtkError("--compile applies to the torch backend (--checkpoint model.pt)")
    return path, backend


def _given_path(opts: BenchOptions) -> Path | None:
    """The one of BUNDLE, --engine and --onnx given, or None. A checkpoint or run folder given as BUNDLE is
    pointed to --checkpoint; a run folder as --checkpoint is its model.pt."""
    from dtk.runs import checkpoint_or_run, run_checkpoint

    if opts.checkpoint is not None:
        opts.checkpoint = checkpoint_or_run(opts.checkpoint)
    source = opts.source
    if source is not None and (run_checkpoint(source) or (source.is_file() and source.suffix == ".pt")):
        raise file_error(
            source,
            f"is a checkpoint, not a bundle: time PyTorch with `dtk bench --checkpoint {source}`, or export "
            f"it first (dtk export {source} -o bundle/)",
        )
    given = [p for p in (source, opts.engine, opts.onnx) if p is not None]
    if len(given) > 1:
        raise DtkError("give one of BUNDLE, --engine and --onnx")
    return given[0] if given else None


def source_checkpoint(path: Path) -> Path | None:
    """The checkpoint a bundle was exported from, when it is still where the manifest says and unchanged."""
    from dtk.runtime.files import sha256
    from dtk.runtime.manifest import resolve_bundle

    _, manifest = resolve_bundle(path)
    source = manifest.source or {}
    if source.get("kind") not in (None, "dtk-checkpoint", "checkpoint") or not source.get("path"):
        return None
    checkpoint = Path(source["path"])
    if not checkpoint.is_file():
        return None
    if source.get("sha256") and sha256(checkpoint) != source["sha256"]:
        return None
    return checkpoint


def open_target(opts: BenchOptions) -> Target:
    path, backend = resolve_inputs(opts)
    if backend == "torch":
        return open_torch(opts)
    return open_bundle(path, backend, opts)


def open_bundle(path: Path, backend: str, opts: BenchOptions) -> Target:
    from dtk.runtime.manifest import resolve_bundle
    from dtk.runtime.pipeline import Pipeline

    bundle_dir, manifest = resolve_bundle(path)
    low, high = manifest.batch["min"], manifest.batch["max"]
    if not low <= opts.batch <= high:
        span = f"exactly {low}" if low == high else f"{low}..{high}"
        raise file_error(
            bundle_dir,
            f"--batch {opts.batch} is outside the bundle's batch range ({span}); re-export with --batch",
        )
    if backend == "auto":
        backend = "tensorrt" if availability("tensorrt", opts, path) is None else "onnxruntime"
    options = {}
    if backend == "onnxruntime":
        if opts.cuda_graph:
            raise DtkError("--cuda-graph applies to the tensorrt backend (and torch with --compile)")
        if opts.threads:
            options["threads"] = opts.threads
    elif opts.cuda_graph:
        options["cuda_graph"] = True
    pipeline = Pipeline.load(path, backend=backend, **options)
    denoiser = pipeline.denoiser
    name = getattr(denoiser, "name", backend)
    on_host = getattr(denoiser, "device_type", "cuda") == "cpu"
    detail = {"source": str(path)}
    if hasattr(denoiser, "providers"):
        detail["providers"] = [p[0] if isinstance(p, tuple | list) else p for p in denoiser.providers]
    if getattr(denoiser, "threads", None) and on_host:
        detail["threads"] = denoiser.threads
    if name == "tensorrt":
        detail["cuda_graph"] = opts.cuda_graph
    return Target(
        backend=name,
        denoiser=denoiser,
        sample_shape=(manifest.in_channels, *manifest.image_size),
        timestep_dtype=manifest.inputs[1].dtype,
        precision=manifest.precision,
        diffusion=manifest.diffusion,
        on_host=on_host,
        chain=hasattr(denoiser, "run_chain") and not on_host,
        detail=detail,
        device_call=getattr(denoiser, "device_call", None),
        owner=pipeline,
    )


def open_torch(opts: BenchOptions) -> Target:
    import time

    import torch

    from dtk.checkpoint import load_checkpoint
    from dtk.reference import TorchDenoiser

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(opts.checkpoint)
    weights = "ema" if ckpt.ema_state is not None else "raw"
    model = ckpt.build_model(weights=weights).to(device)
    detail = {"source": str(opts.checkpoint), "device": device, "weights": weights}
    if device == "cpu":
        detail["threads"] = torch.get_num_threads()
    if opts.compile:
        mode = "reduce-overhead" if opts.cuda_graph else None  # reduce-overhead captures CUDA graphs
        model = torch.compile(model, mode=mode)
        detail["compile"] = mode or "default"
    elif opts.cuda_graph:
        raise DtkError("--cuda-graph with torch needs --compile (torch.compile mode reduce-overhead)")
    denoiser = TorchDenoiser(model, device=device)
    config = ckpt.model_config
    shape = (config.in_channels, config.image_size, config.image_size)
    target = Target(
        backend="torch-compile" if opts.compile else "torch",
        denoiser=denoiser,
        sample_shape=shape,
        timestep_dtype="float32",
        precision="fp32",
        diffusion=ckpt.diffusion,
        on_host=device == "cpu",
        chain=False,
        detail=detail,
    )
    if device != "cpu":
        target.device_call = lambda batch: _torch_device_call(model, batch, shape, device)
    if opts.compile:  # the first call compiles for this batch; its time is reported, not timed as a call
        import numpy as np

        click.echo("torch.compile: compiling (the first call takes a while) ...", err=True)
        start = time.perf_counter()
        denoiser(np.zeros((opts.batch, *shape), np.float32), np.zeros(opts.batch, np.float32))
        detail["compile_s"] = round(time.perf_counter() - start, 2)
    return target


def _torch_device_call(model, batch, shape, device):
    import torch

    sample = torch.randn((batch, *shape), device=device)
    timestep = torch.full((batch,), 500.0, device=device)

    def call():
        with torch.inference_mode():
            model(sample, timestep)
        torch.cuda.synchronize(device)

    return call


# --- several backends, each in its own process ---


def availability(backend: str, opts: BenchOptions, path: Path | None) -> str | None:
    """Why `backend` cannot run here, or None when it can."""
    import importlib.util

    if backend in ("torch", "torch-compile"):
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (pip install 'dtk[train]')"
        if opts.checkpoint is None and (path is None or source_checkpoint(path) is None):
            return "no PyTorch checkpoint (pass --checkpoint model.pt)"
        return None
    if path is None:
        return "no bundle given (dtk export model.pt -o bundle/)"
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'dtk[runtime]')"
        return None
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'dtk[tensorrt]' on x86_64; JetPack on Jetson)"
    from dtk.runtime.manifest import PLAN_NAME, resolve_bundle
    from dtk.runtime.system import gpu_info

    bundle_dir, manifest = resolve_bundle(path)
    plan = path if path.suffix == ".plan" else bundle_dir / (manifest.plan or PLAN_NAME)
    if not plan.is_file():
        return f"no TensorRT engine {plan} (dtk build-engine {bundle_dir})"
    if not gpu_info():
        return "no NVIDIA GPU found"
    return None


def child_args(backend: str, opts: BenchOptions, path: Path | None, json_path: Path) -> list[str]:
    args = [sys.executable, "-m", "dtk", "bench", "--no-system", "-o", str(json_path)]
    if backend.startswith("torch"):
        checkpoint = opts.checkpoint or source_checkpoint(path)
        args += ["--checkpoint", str(checkpoint), "--backend", "torch", "--device", opts.device]
        if backend == "torch-compile":
            args.append("--compile")
    else:
        args += [str(path), "--backend", backend]
    args += ["--batch", str(opts.batch), "--warmup", opts.warmup, "--iterations", str(opts.iterations)]
    args += ["--duration", str(opts.duration), "--seed", str(opts.seed)]
    args.append(
        "--cuda-graph" if opts.cuda_graph and backend in ("tensorrt", "torch-compile") else "--no-cuda-graph"
    )
    args.append("--transfers" if opts.transfers else "--no-transfers")
    if opts.steps:
        args += [
            "--steps",
            str(opts.steps),
            "--sampler",
            opts.sampler,
            "--sample-runs",
            str(opts.sample_runs),
        ]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    return args


def parse_compare(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARABLE]
    if unknown or not names:
        raise DtkError(f"--compare {text!r}: choose from {', '.join(COMPARABLE)}")
    return list(dict.fromkeys(names))


def run_compare(opts: BenchOptions) -> dict:
    from dtk.runtime.bench import comparison_columns, comparison_rows, format_table
    from dtk.runtime.system import format_system, system_info

    if opts.backend != "auto":
        raise DtkError("--compare chooses the backends itself; drop --backend")
    backends = parse_compare(opts.compare)
    path = _given_path(opts)
    if path is not None and not path.exists():
        raise file_error(path, "no such file or directory")

    system = system_info()
    header = "\n".join(f"{label:<10}  {text}" for label, text in format_system(system))
    click.echo(header, err=opts.json_stdout)
    records, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="dtk-bench-") as tmp:
        for backend in backends:
            reason = availability(backend, opts, path)
            if reason is None:
                click.echo(f"\n== {backend} ==", err=True)
                json_path = Path(tmp) / f"{backend}.json"
                reason = _run_child(child_args(backend, opts, path, json_path), opts.json_stdout)
                if reason is None:
                    record = json.loads(json_path.read_text())
                    record["backend"] = backend
                    records.append(record)
                    continue
            skipped.append({"backend": backend, "reason": reason})
    out = {"results": records, "skipped": skipped, "baseline": "torch", "system": system}
    table = format_table(comparison_rows(records, skipped), comparison_columns(records))
    click.echo(json.dumps(out, indent=2) if opts.json_stdout else "\n" + table)
    if opts.json_path:
        _write_json(opts.json_path, out)
    if opts.plot:
        from dtk.runtime.bench_plot import plot_comparison

        click.echo(f"wrote {plot_comparison(out, opts.plot)}", err=True)
    return out


def _run_child(args: list[str], quiet_stdout: bool = False) -> str | None:
    """Run one backend's bench, passing its output through (to stderr when stdout is for JSON); None on
    success, else why it failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stdout = sys.stderr.fileno() if quiet_stdout else None
    proc = subprocess.Popen(args, stdout=stdout, stderr=subprocess.PIPE, env=env)
    captured = bytearray()
    while chunk := proc.stderr.read1(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        captured += chunk
    if proc.wait() == 0:
        return None
    lines = captured.decode(errors="replace").replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return "failed: " + errors[-1].removeprefix("error: ")
    tail = [line for line in lines if line.strip()]
    return f"failed (exit code {proc.returncode})" + (f": {tail[-1].strip()}" if tail else "")


def _load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _write_json(path: Path, data: dict, announce: bool = True) -> None:
    from dtk.runtime.files import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")
    if announce:
        click.echo(f"wrote {path}", err=True)
