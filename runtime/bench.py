"""Benchmarking, trtexec style: warm-up, timed calls, latency percentiles, end-to-end split, system header.

Torch-free. The timing functions take a plain callable, so every backend (ONNX Runtime, TensorRT, the PyTorch
reference in `dtk.cli.bench`) is measured by the same code. `system_info` names the machine behind a figure.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dtk.runtime.errors import DtkError

PERCENTILES = (50, 90, 95, 99)

# distributions that provide each library, first match wins (versions are read without importing the library)
DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean"),
    "torch": ("torch",),
    "cuda-python": ("cuda-python", "cuda-bindings"),
    "dtk": ("dtk",),
}


# --- warm-up and timing ---


@dataclass(frozen=True)
class Warmup:
    """Warm-up before measuring: a number of calls, or a time (at least one call when it is non-zero)."""

    runs: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> Warmup:
        """`"10"` → 10 runs, `"200ms"` → 0.2 s, `"2s"` → 2 s, `"0"` → none."""
        value = str(text).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|runs?)?", value)
        if not match:
            raise DtkError(f"--warmup {text!r}: give a number of runs (10) or a time (200ms, 2s)")
        number, unit = float(match.group(1)), match.group(2)
        if unit == "ms":
            return cls(seconds=number / 1000.0)
        if unit == "s":
            return cls(seconds=number)
        if number != int(number):
            raise DtkError(f"--warmup {text!r}: a number of runs must be whole (or add a unit: ms, s)")
        return cls(runs=int(number))

    def __str__(self) -> str:
        if self.runs:
            return f"{self.runs} runs"
        return f"{self.seconds * 1000:g} ms" if self.seconds else "none"


@dataclass(frozen=True)
class TimingConfig:
    """Like trtexec: measure until at least `iterations` calls AND at least `duration_s` seconds passed."""

    warmup: Warmup = field(default_factory=lambda: Warmup(seconds=0.2))
    iterations: int = 10
    duration_s: float = 3.0

    def __post_init__(self):
        if self.iterations < 1:
            raise DtkError(f"--iterations must be at least 1, got {self.iterations}")
        if self.duration_s < 0:
            raise DtkError(f"--duration must not be negative, got {self.duration_s}")


@dataclass
class Timing:
    """The raw result of `time_calls`: every measured call's latency, and what the warm-up took."""

    latencies_ms: np.ndarray
    wall_s: float
    warmup_runs: int
    warmup_s: float


def time_calls(call: Callable[[], object], config: TimingConfig, clock=time.perf_counter) -> Timing:
    """Warm up, then time `call()` one call at a time. `call` must return only when its work is done."""
    warmup_runs, start = 0, clock()
    while warmup_runs < config.warmup.runs or (
        config.warmup.seconds > 0 and (warmup_runs == 0 or clock() - start < config.warmup.seconds)
    ):
        call()
        warmup_runs += 1
    warmup_s = clock() - start

    latencies, start = [], clock()
    now = start
    while len(latencies) < config.iterations or now - start < config.duration_s:
        before = clock()
        call()
        now = clock()
        latencies.append((now - before) * 1000.0)
    return Timing(np.asarray(latencies), now - start, warmup_runs, warmup_s)


# --- statistics ---


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds. Percentiles interpolate linearly between ranks (numpy's default)."""

    min: float
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    count: int

    @classmethod
    def from_samples(cls, latencies_ms) -> LatencyStats:
        samples = np.asarray(latencies_ms, dtype=np.float64)
        if samples.size == 0:
            raise DtkError("no latencies were measured")
        p50, p90, p95, p99 = np.percentile(samples, PERCENTILES)
        return cls(
            min=float(samples.min()),
            mean=float(samples.mean()),
            p50=float(p50),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            max=float(samples.max()),
            count=int(samples.size),
        )

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items() if k != "count"}


@dataclass(frozen=True)
class Throughput:
    """One call in flight at a time: calls/s = 1000 / mean latency; images/s = calls/s × batch."""

    calls_per_s: float
    images_per_s: float

    @classmethod
    def from_stats(cls, stats: LatencyStats, batch: int) -> Throughput:
        calls = 1000.0 / stats.mean if stats.mean > 0 else float("inf")
        return cls(calls_per_s=calls, images_per_s=calls * batch)

    def to_dict(self) -> dict:
        return {"calls_per_s": round(self.calls_per_s, 3), "images_per_s": round(self.images_per_s, 3)}


# --- end-to-end sampling, split into its parts ---


@dataclass
class SamplingSplit:
    """One end-to-end sample of `batch` images, in milliseconds, split by where the time went.

    `copies_ms` is host↔device transfer time: 0 for backends on host memory, estimated where the backend can
    time one call on resident buffers (`device_call`), None where nothing separates it. On a device chain
    (`run_chain`: the sample stays on the device) the update includes the copies, and the denoiser's share
    is known only from `device_call`."""

    total_ms: float
    denoiser_ms: float | None
    update_ms: float | None
    copies_ms: float | None
    noise_ms: float
    path: str  # "host loop" or "device chain"

    def to_dict(self) -> dict:
        out = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


class _Stopwatch:
    """Wraps a callable and adds up the time spent inside it."""

    def __init__(self, fn, clock):
        self.fn, self.clock, self.seconds = fn, clock, 0.0

    def __call__(self, *args):
        start = self.clock()
        try:
            return self.fn(*args)
        finally:
            self.seconds += self.clock() - start


def profile_sampling(
    denoiser,
    plan,
    batch: int,
    sample_shape: tuple[int, int, int],
    timestep_dtype,
    seed: int = 0,
    *,
    chain: bool = False,
    on_host: bool = True,
    device_call_ms: float | None = None,
    callback=None,
    clock=time.perf_counter,
) -> tuple[np.ndarray, SamplingSplit]:
    """Sample `batch` images through `plan` with stopwatches around the denoiser and the noise draws.

    Host loop (`sample_loop`): update = total − denoiser − noise; copies are 0 on host memory, else the
    denoiser time − steps × `device_call_ms` when that is known (one call on resident buffers).
    Device chain (`chain=True`, `run_chain`): denoiser = steps × `device_call_ms`, update = the rest."""
    from dtk.runtime.samplers import NoiseSource, sample_loop

    source = NoiseSource(seed)
    x = source.initial(batch, sample_shape)
    noise = _Stopwatch(lambda i: source.step(batch, sample_shape), clock)
    steps = len(plan.timesteps)
    device_s = None if device_call_ms is None else steps * device_call_ms / 1000.0

    def ms(seconds):
        return None if seconds is None else max(seconds, 0.0) * 1000.0

    if chain:
        start = clock()
        x = denoiser.run_chain(plan, x, noise, callback=callback)
        total = clock() - start
        update = None if device_s is None else total - device_s - noise.seconds
        return x, SamplingSplit(ms(total), ms(device_s), ms(update), None, ms(noise.seconds), "device chain")

    timestep_dtype = np.dtype(timestep_dtype)

    def denoise(sample, t):
        return denoiser(sample, np.full(sample.shape[0], t, dtype=timestep_dtype))

    timed = _Stopwatch(denoise, clock)
    start = clock()
    x = sample_loop(timed, x, plan, noise, callback=callback)
    total = clock() - start
    if on_host:
        denoise_s, copies = timed.seconds, 0.0
    elif device_s is not None:
        denoise_s, copies = min(device_s, timed.seconds), max(timed.seconds - device_s, 0.0)
    else:
        denoise_s, copies = timed.seconds, None
    update = total - timed.seconds - noise.seconds
    return x, SamplingSplit(ms(total), ms(denoise_s), ms(update), ms(copies), ms(noise.seconds), "host loop")


def mean_split(splits: list[SamplingSplit]) -> SamplingSplit:
    """The average of several runs of the same sampling."""

    def avg(name):
        values = [getattr(s, name) for s in splits]
        return None if any(v is None for v in values) else float(np.mean(values))

    return SamplingSplit(
        total_ms=avg("total_ms"),
        denoiser_ms=avg("denoiser_ms"),
        update_ms=avg("update_ms"),
        copies_ms=avg("copies_ms"),
        noise_ms=avg("noise_ms"),
        path=splits[0].path,
    )


# --- the machine ---


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def cpu_info(root: str | Path = "/") -> dict:
    """CPU model (x86 `model name`, Arm `Hardware`/device-tree model as a fallback), core counts, memory."""
    root = Path(root)
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    model = None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            model = match.group(1).strip()
            break
    if model is None:
        model = platform.processor() or platform.machine()
    meminfo = _read(root / "proc/meminfo") or ""
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
    }


def parse_nvidia_smi(query_csv: str, banner: str | None = None) -> list[dict]:
    """`nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader,nounits`,
    plus the CUDA version from the plain `nvidia-smi` banner ("CUDA Version: 12.4")."""
    cuda = None
    if banner:
        match = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        cuda = match.group(1) if match else None
    gpus = []
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        gpu = {"name": parts[0], "driver": parts[1], "cuda": cuda}
        if len(parts) > 2 and parts[2].replace(".", "", 1).isdigit():
            gpu["memory_mib"] = int(float(parts[2]))
        if len(parts) > 3 and re.fullmatch(r"\d+\.\d+", parts[3]):
            gpu["compute_capability"] = parts[3]
        gpus.append(gpu)
    return gpus


def gpu_info(run=_run) -> list[dict]:
    """GPUs through nvidia-smi, else through cuda-python where it is installed; [] when there is none."""
    fields = "name,driver_version,memory.total,compute_cap"
    query = run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if query is None:  # older drivers do not know compute_cap
        query = run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
        )
    if query is not None:
        return parse_nvidia_smi(query, run(["nvidia-smi"]))
    return _gpu_info_cuda_python()


def _gpu_info_cuda_python() -> list[dict]:
    import importlib.util

    try:
        if importlib.util.find_spec("cuda.bindings") is None:
            return []
        from cuda.bindings import runtime as cudart
    except (ImportError, ValueError):
        return []
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return []
    err, driver = cudart.cudaDriverGetVersion()
    gpus = []
    for device in range(count):
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            continue
        name = (
            props.name.decode(errors="replace").rstrip("\x00")
            if isinstance(props.name, bytes)
            else props.name
        )
        gpus.append(
            {
                "name": str(name),
                "driver": None,
                "cuda": f"{driver // 1000}.{driver % 1000 // 10}",
                "memory_mib": int(props.totalGlobalMem) // 2**20,
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q` prints "NV Power Mode: MAXN" and the mode's number on the next line."""
    match = re.search(r"NV Power Mode:\s*(\S.*?)\s*\n\s*(\d+)", text + "\n")
    if match:
        return {"name": match.group(1), "id": int(match.group(2))}
    match = re.search(r"NV Power Mode:\s*(\S.*)", text)
    return {"name": match.group(1).strip(), "id": None} if match else {}


def jetson_info(root: str | Path = "/", run=_run) -> dict | None:
    """On a Jetson: board, L4T release, power mode (nvpmodel -q) and current clocks from sysfs; else None."""
    root = Path(root)
    release = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model")
    if release is None and not (model and "jetson" in model.lower()):
        return None
    info: dict = {"model": model}
    if release:
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        info["l4t"] = f"R{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0]
    query = run(["nvpmodel", "-q"])
    info["power_mode"] = parse_nvpmodel(query) if query else None
    cpu_mhz = []
    for path in sorted(glob.glob(str(root / "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))):
        value = _read(Path(path))
        if value and value.isdigit():
            cpu_mhz.append(int(value) // 1000)
    info["cpu_mhz"] = cpu_mhz
    gpu = {}
    for device in sorted(glob.glob(str(root / "sys/class/devfreq/*"))):
        name = os.path.basename(device)
        if not any(tag in name for tag in ("gpu", "ga10b", "gv11b", "gp10b")):
            continue
        for key in ("cur_freq", "min_freq", "max_freq"):
            value = _read(Path(device) / key)
            if value and value.isdigit():
                gpu[key.replace("_freq", "_mhz")] = int(value) // 1_000_000
        break
    info["gpu_clock"] = gpu or None
    emc = _read(root / "sys/kernel/debug/bpmp/debug/clk/emc/rate")  # readable as root only
    info["emc_mhz"] = int(emc) // 1_000_000 if emc and emc.isdigit() else None
    return info


def package_versions() -> dict:
    """Versions of the libraries a figure depends on, from package metadata: nothing is imported here.

    A library that is already imported reports its own `__version__` (the one that actually ran)."""
    versions = {}
    for name, dists in DISTRIBUTIONS.items():
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        for dist in dists:
            if version:
                break
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
        versions[name] = version
    return versions


def system_info(root: str | Path = "/", run=_run) -> dict:
    """Everything the header of a benchmark names: host, CPU, GPUs, Jetson power state, library versions."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_info(root),
        "load_average": _load_average(),
        "gpus": gpu_info(run),
        "jetson": jetson_info(root, run),
        "versions": package_versions(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load: on a shared machine, what else competed for the cores while measuring."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_name(system: dict) -> str:
    """A short, file-name-safe name of the machine behind a result: `cpu-amd-epyc-2c`, `gpu-nvidia-h100`."""
    if system.get("gpus"):
        prefix, name = "gpu", system["gpus"][0]["name"]
    elif system.get("jetson"):
        prefix, name = "jetson", system["jetson"].get("model") or ""
    else:
        prefix, name = "cpu", f"{system['cpu']['model']}-{system['cpu']['usable_cores']}c"
    slug = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return f"{prefix}-{slug}" if slug else prefix


# --- results and reports ---

TRANSFERS = {
    "included": "included: host arrays in, host arrays out (what an application sees)",
    "excluded": "excluded: buffers stay on the device (one synchronised call on resident buffers)",
    "host": "none: the backend runs on host memory",
}


@dataclass
class BenchResult:
    """One backend measured on one shape; `to_dict()` is the documented JSON record."""

    backend: str
    batch: int
    precision: str
    inputs: dict  # name -> {"shape": [...], "dtype": str}
    transfers: str  # a key of TRANSFERS
    timing: Timing
    config: TimingConfig
    detail: dict = field(default_factory=dict)  # providers, threads, cuda_graph, compile_s, source, ...
    end_to_end: dict | None = None
    system: dict = field(default_factory=dict)

    @property
    def latency(self) -> LatencyStats:
        return LatencyStats.from_samples(self.timing.latencies_ms)

    def to_dict(self) -> dict:
        stats = self.latency
        return {
            "backend": self.backend,
            "batch": self.batch,
            "precision": self.precision,
            "inputs": self.inputs,
            "transfers": self.transfers,
            "transfers_included": self.transfers == "included",
            "latency_ms": stats.to_dict(),
            "throughput": Throughput.from_stats(stats, self.batch).to_dict(),
            "iterations": stats.count,
            "measured_s": round(self.timing.wall_s, 4),
            "warmup": {
                "setting": str(self.config.warmup),
                "runs": self.timing.warmup_runs,
                "seconds": round(self.timing.warmup_s, 4),
            },
            "detail": self.detail,
            "end_to_end": self.end_to_end,
            "system": self.system,
        }


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def format_system(system: dict) -> list[tuple[str, str]]:
    """The machine part of the header as (label, text) rows."""
    cpu = system["cpu"]
    memory = f", {cpu['memory_gib']} GiB" if cpu.get("memory_gib") else ""
    rows = [
        (
            "system",
            f"{cpu['model']}, {cpu['usable_cores']}/{cpu['cores']} cores{memory} | "
            f"{system['platform']} | Python {system['python']}",
        )
    ]
    load = system.get("load_average")
    if load:
        rows[0] = (rows[0][0], rows[0][1] + f" | load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    gpus = system.get("gpus") or []
    for gpu in gpus:
        parts = [gpu["name"]]
        if gpu.get("compute_capability"):
            parts.append(f"sm {gpu['compute_capability']}")
        if gpu.get("memory_mib"):
            parts.append(f"{gpu['memory_mib'] / 1024:.0f} GiB")
        parts.append(f"driver {gpu.get('driver') or '?'}")
        parts.append(f"CUDA {gpu.get('cuda') or '?'}")
        rows.append(("gpu", ", ".join(parts)))
    if not gpus:
        rows.append(("gpu", "none found (nvidia-smi / cuda-python)"))
    jetson = system.get("jetson")
    if jetson:
        mode = jetson.get("power_mode") or {}
        mode_text = f"{mode.get('name')} ({mode.get('id')})" if mode else "unknown (nvpmodel -q failed)"
        cpu_mhz = jetson.get("cpu_mhz") or []
        clocks = f"CPU {max(cpu_mhz)} MHz ×{len(cpu_mhz)}" if cpu_mhz else "CPU clock unknown"
        gpu_clock = jetson.get("gpu_clock") or {}
        if gpu_clock.get("cur_mhz") is not None:
            clocks += f", GPU {gpu_clock['cur_mhz']} MHz (max {gpu_clock.get('max_mhz', '?')})"
        if jetson.get("emc_mhz"):
            clocks += f", EMC {jetson['emc_mhz']} MHz"
        rows.append(
            ("jetson", f"{jetson.get('model')}, L4T {jetson.get('l4t', '?')}, power mode {mode_text}")
        )
        rows.append(("clocks", clocks))
    versions = system.get("versions", {})
    rows.append(("versions", " | ".join(f"{k} {v or '-'}" for k, v in versions.items())))
    return rows


def format_result(result: BenchResult, with_system: bool = True) -> str:
    """The trtexec-like report of one run: header, latency, throughput, end-to-end split."""
    rows = format_system(result.system) if with_system and result.system else []
    shapes = ", ".join(f"{name} {spec['shape']} {spec['dtype']}" for name, spec in result.inputs.items())
    detail = ", ".join(
        f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in result.detail.items()
        if v is not None and k != "source"
    )
    rows += [
        ("model", f"{result.detail.get('source', '?')}, precision {result.precision}"),
        ("inputs", shapes),
        ("backend", f"{result.backend}" + (f": {detail}" if detail else "")),
        ("transfers", TRANSFERS[result.transfers]),
    ]
    stats = result.latency
    warmup = f"warm-up {result.timing.warmup_runs} runs in {result.timing.warmup_s:.2f} s"
    if result.config.warmup.seconds:
        warmup += f" (asked {result.config.warmup})"
    rows.append(("timing", f"{warmup}; {stats.count} calls in {result.timing.wall_s:.2f} s"))
    rows.append(
        (
            "latency ms",
            "  ".join(
                f"{k} {_fmt_ms(getattr(stats, k))}"
                for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")
            ),
        )
    )
    throughput = Throughput.from_stats(stats, result.batch)
    rows.append(
        ("throughput", f"{throughput.calls_per_s:.1f} calls/s, {throughput.images_per_s:.1f} images/s"),
    )
    if result.end_to_end:
        rows += format_end_to_end(result.end_to_end)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


def format_end_to_end(e2e: dict) -> list[tuple[str, str]]:
    split = e2e["split_ms"]
    total = split["total_ms"]

    def part(name, key):
        value = split[key]
        if value is None:
            return f"{name} n/a"
        share = f" ({100 * value / total:.1f}%)" if total > 0 else ""
        return f"{name} {_fmt_ms(value)}{share}"

    runs = f"mean of {e2e['runs']} run" + ("s" if e2e["runs"] != 1 else "")
    return [
        (
            "end-to-end",
            f"{e2e['steps']} {e2e['sampler']} steps × batch {e2e['batch']} ({e2e['path']}, {runs}): "
            f"{_fmt_ms(total)} ms, {e2e['images_per_s']:.2f} images/s",
        ),
        (
            "split ms",
            " | ".join(
                part(name, key)
                for name, key in (
                    ("denoiser", "denoiser_ms"),
                    ("sampler update", "update_ms"),
                    ("copies", "copies_ms"),
                    ("noise", "noise_ms"),
                )
            ),
        ),
    ]


def speedups(records: list[dict], baseline: str = "torch") -> dict[int, float | None]:
    """p50 speed-up of each record over the baseline backend's record at the same batch (None without one)."""
    base = {r["batch"]: r["latency_ms"]["p50"] for r in records if r["backend"] == baseline}
    out = {}
    for i, r in enumerate(records):
        reference = base.get(r["batch"])
        out[i] = reference / r["latency_ms"]["p50"] if reference and r["latency_ms"]["p50"] > 0 else None
    return out


COMPARISON_COLUMNS = (
    "backend",
    "batch",
    "precision",
    "transfers",
    "p50 ms",
    "mean ms",
    "p99 ms",
    "calls/s",
    "images/s",
    "vs torch eager",
)


def comparison_rows(records: list[dict], skipped: list[dict] = ()) -> list[list[str]]:
    """Side-by-side rows, speed-up over PyTorch eager by median latency; skipped backends say why."""
    ups = speedups(records)
    rows = []
    for i, r in enumerate(records):
        lat, thr = r["latency_ms"], r["throughput"]
        rows.append(
            [
                r["backend"],
                str(r["batch"]),
                r["precision"],
                r["transfers"],
                _fmt_ms(lat["p50"]),
                _fmt_ms(lat["mean"]),
                _fmt_ms(lat["p99"]),
                f"{thr['calls_per_s']:.1f}",
                f"{thr['images_per_s']:.1f}",
                f"{ups[i]:.2f}x" if ups[i] is not None else "n/a",
            ]
        )
    for s in skipped:
        rows.append([s["backend"], "skipped: " + s["reason"]])
    return rows


def format_table(rows: list[list[str]], columns=COMPARISON_COLUMNS, markdown: bool = False) -> str:
    """Aligned text (or a markdown table); a short row (a skipped backend) spans the remaining columns."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
        for row in rows:
            cells = row + [""] * (len(columns) - len(row))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    full = [row for row in rows if len(row) == len(columns)]
    widths = [max([len(c)] + [len(row[i]) for row in full]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in rows:
        if len(row) == len(columns):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        else:
            lines.append("  ".join([row[0].ljust(widths[0])] + row[1:]))
    return "\n".join(lines)
