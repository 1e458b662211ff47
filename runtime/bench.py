"""Benchmarking, trtexec style: warm-up, timed calls, latency percentiles, end-to-end split, system header.

Torch-free. The timing functions take a plain callable, so every backend (ONNX Runtime, TensorRT, the PyTorch
reference in `dtk.cli.bench`) is measured by the same code. `dtk.runtime.system` names the machine behind a
figure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from dtk.runtime.errors import DtkError
from dtk.runtime.system import format_system

PERCENTILES = (50, 90, 95, 99)


# --- warm-up and timing ---


@dataclass(frozen=True)
class Warmup:
    """Warm-up before measuring: a time, or a number of calls (at least one call when it is non-zero).

    As in trtexec a bare number is milliseconds (`--warmup 500`); calls are counted with an `x` (`10x`)."""

    runs: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> Warmup:
        """`"500"` or `"500ms"` → 0.5 s, `"2s"` → 2 s, `"10x"` (or `"10 runs"`) → 10 calls, `"0"` → none."""
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(runs=text)  # a count given in code, not a flag
        value = str(text).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|x|runs?)?", value)
        if not match:
            raise DtkError(
                f"--warmup {text!r}: give a time in ms (500, as trtexec) or with a unit (200ms, 2s), "
                "or a number of calls (10x)"
            )
        number, unit = float(match.group(1)), match.group(2)
        if unit in (None, "ms"):
            return cls(seconds=number / 1000.0)
        if unit == "s":
            return cls(seconds=number)
        if number != int(number):
            raise DtkError(f"--warmup {text!r}: a number of calls must be whole")
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


class Stopwatch:
    """Wraps a callable and adds up the time spent inside it."""

    def __init__(self, fn, clock=time.perf_counter):
        self.fn, self.clock, self.seconds = fn, clock, 0.0

    def __call__(self, *args):
        return self.timed(self.fn, *args)

    def timed(self, fn, *args):
        """fn(*args), its time added to this stopwatch."""
        start = self.clock()
        try:
            return fn(*args)
        finally:
            self.seconds += self.clock() - start


class NoiseStopwatch(Stopwatch):
    """A Stopwatch on a step-noise source that also times its `take()`, so the host loop still takes the
    noise a block at a time, as in `Pipeline.sample`."""

    def take(self):
        return self.timed(self.fn.take)


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
    noise = NoiseStopwatch(source.stepper(batch, sample_shape, plan.noisy_steps), clock)
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

    timed = Stopwatch(denoise, clock)
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
END_TO_END_COLUMNS = ("sample ms", "sample images/s")  # one whole sample, --steps steps


def comparison_columns(records: list[dict]) -> tuple[str, ...]:
    """The table's columns: the end-to-end ones too when any backend measured a whole sample."""
    with_e2e = any(r.get("end_to_end") for r in records)
    return COMPARISON_COLUMNS + (END_TO_END_COLUMNS if with_e2e else ())


def comparison_rows(records: list[dict], skipped: list[dict] = ()) -> list[list[str]]:
    """Side-by-side rows, speed-up over PyTorch eager by median latency, and the end-to-end sample where one
    was measured (`comparison_columns`); skipped backends say why."""
    ups = speedups(records)
    with_e2e = any(r.get("end_to_end") for r in records)
    rows = []
    for i, r in enumerate(records):
        e2e = r.get("end_to_end")
        e2e_cells = (
            [_fmt_ms(e2e["split_ms"]["total_ms"]), f"{e2e['images_per_s']:.2f}"] if e2e else ["n/a"] * 2
        )
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
            + (e2e_cells if with_e2e else [])
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
