"""The runtime's footprint on ONNX Runtime CPU: import time, peak RSS, loop overhead, and a 2,000-sample soak.

Each measurement runs in a process of its own (this script started again with `--child`), so nothing one of
them loads or allocates leaks into another. Targets (issue 4): `import dtk.runtime` < 0.5 s, peak RSS of
sampling the tiny bundle without torch < 150 MB, loop overhead < 3 % for every sampler (issue 12; issue 4
asked < 5 %), RSS flat after warm-up over the soak.

    python benchmarks/footprint.py                      # builds the tiny 1x16x16 bundle, measures, writes
    python benchmarks/footprint.py --bundle demo/bundle --soak-samples 500

Writes benchmarks/results/footprint-<machine>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"import_s": 0.5, "peak_rss_mb": 150.0, "overhead_pct": 3.0, "soak_growth_mb": 1.0}  # issue 12: 3 %
SAMPLERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m", "unipc", "euler", "euler-ancestral")

# Children that must prove "without torch" install this finder first.
REFUSE_TORCH = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx") or name.startswith("dtk.export"):
            raise ImportError(name + " is refused in this measurement")
sys.meta_path.insert(0, _Refuse())
"""
IMPORT_TIMER = """
import time
start = time.perf_counter()
{statement}
print(time.perf_counter() - start)
"""
IMPORTS = {
    "dtk.runtime": "import dtk.runtime",
    "dtk.runtime + Pipeline + ONNX Runtime backend": (
        "import dtk.runtime, dtk.runtime.pipeline, dtk.runtime.samplers, dtk.runtime.backends.onnxruntime"
    ),
    "onnxruntime (for scale)": "import onnxruntime",
}


def child(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"footprint: the {args[0]} measurement failed:\n{done.stderr}")
    return done.stdout


# --- what runs in the children ---


def rss_mb() -> float:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_peak_rss(bundle: str, threads: int) -> dict:
    exec(REFUSE_TORCH, {})
    import resource

    start_mb = rss_mb()
    from dtk.runtime import Pipeline

    with Pipeline.load(bundle, backend="onnxruntime", threads=threads) as pipe:
        pipe.sample(num=16, steps=50, sampler="ddim", seed=0)
    return {
        "start_mb": start_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "torch_loaded": any(m.split(".")[0] == "torch" for m in sys.modules),
        "workload": "load + sample 16 images, 50 ddim steps",
    }


class FreeDenoiser:
    """A denoiser that costs nothing (returns zeros): sampling with it times the runtime's loop alone."""

    name = "free"

    def __init__(self, batch_range):
        self.batch_range = batch_range

    def __call__(self, sample, timestep):
        import numpy as np

        return np.zeros_like(sample)

    def run_chain(self, plan, x, noise, callback=None):
        return host_chain(self, plan, x, noise, callback)

    def close(self):
        pass


class BusyDenoiser(FreeDenoiser):
    """Returns zeros after a busy wait as long as a real call: sampling with it times the loop as it runs
    between network calls, when the caches and branch predictors hold the other work, not the loop's."""

    def __init__(self, batch_range, seconds: float):
        super().__init__(batch_range)
        self.wait, self.seconds = seconds, 0.0

    def __call__(self, sample, timestep):
        start = time.perf_counter()
        while time.perf_counter() - start < self.wait:
            pass
        out = super().__call__(sample, timestep)
        self.seconds += time.perf_counter() - start
        return out


def timed_denoiser(denoiser):
    """The bundle's denoiser behind a `dtk.runtime.bench.Stopwatch`, which sums the seconds inside its calls:
    sampling through it splits one run's time into the denoiser's and the loop's, side by side, so a machine
    whose speed drifts between two timed blocks does not move the overhead."""
    from dtk.runtime.bench import Stopwatch

    class TimedDenoiser(Stopwatch):
        def run_chain(self, plan, x, noise, callback=None):
            return host_chain(self, plan, x, noise, callback)

        def __getattr__(self, name):  # batch_range, chain_guidance, ...: the denoiser's
            return getattr(self.fn, name)

    return TimedDenoiser(denoiser)


def host_chain(denoiser, plan, x, noise, callback=None):
    """What the ONNX Runtime backend's chain does on the CPU: the host loop, calling `denoiser` (a timer or a
    stand-in) with an integer t."""
    from dtk.runtime.samplers import sample_loop

    return sample_loop(denoiser, x, plan, noise, callback)


def child_overhead(bundle: str, threads: int, rounds: int) -> dict:
    """Per round, interleaved: 50 bare denoiser calls, then a 50-step `Pipeline.sample` of the same batch with
    the in-place host loop, then the same with the generic loop (before). Each sample runs through a
    `timed_denoiser`, so its own time splits into the denoiser's and the rest. Also the loop's own cost per
    step, hot, with a denoiser that costs nothing, both ways."""
    import numpy as np

    from dtk.runtime import Pipeline
    from dtk.runtime.samplers import host
    from dtk.runtime.samplers.loop import generic_loop  # the loop before the in-place path: every product new

    in_place = host.host_loop
    ways = (("", in_place), ("_before", generic_loop))

    def timed(pipeline, sampler, seed, loop):
        host.host_loop = loop
        start = time.perf_counter()
        pipeline.sample(num=1, steps=steps, sampler=sampler, seed=seed)
        return time.perf_counter() - start

    steps, results = 50, {}
    with Pipeline.load(bundle, backend="onnxruntime", threads=threads) as pipe:
        free = Pipeline(pipe.manifest, FreeDenoiser(pipe.denoiser.batch_range))
        denoiser = timed_denoiser(pipe.denoiser)
        measured = Pipeline(pipe.manifest, denoiser)
        x = np.random.default_rng(0).standard_normal((1, *pipe.sample_shape), dtype=np.float32)
        t = np.full(1, 500, dtype=np.float32)
        for sampler in SAMPLERS:
            pipe.sample(num=1, steps=steps, sampler=sampler, seed=0)  # warm-up
            times = {
                k: []
                for k in ("bare", "sample", "sample_before", "inside", "inside_before", "loop", "loop_before")
            }
            for r in range(rounds):
                start = time.perf_counter()
                for _ in range(steps):
                    pipe.denoiser(x, t)
                times["bare"].append(time.perf_counter() - start)
                for suffix, loop in ways if r % 2 == 0 else ways[::-1]:  # each goes first in turn
                    denoiser.seconds = 0.0
                    times["sample" + suffix].append(timed(measured, sampler, r, loop))
                    times["inside" + suffix].append(denoiser.seconds)
                    times["loop" + suffix].append(timed(free, sampler, r, loop))
            host.host_loop = in_place
            busy = BusyDenoiser(pipe.denoiser.batch_range, statistics.median(times["bare"]) / steps)
            waiting = Pipeline(pipe.manifest, busy)
            after_wait = []
            for r in range(rounds):
                busy.seconds = 0.0
                after_wait.append(timed(waiting, sampler, r, in_place) - busy.seconds)
            results[sampler] = {
                "bare_ms": statistics.median(times["bare"]) * 1000,
                "loop_after_wait_us_per_step": statistics.median(after_wait) / steps * 1e6,
                **summarise_overhead(times, steps, ""),
                **summarise_overhead(times, steps, "_before"),
            }
    return {"steps": steps, "batch": 1, "rounds": rounds, "samplers": results}


def summarise_overhead(times: dict, steps: int, suffix: str) -> dict:
    """One way of sampling (suffix "": in place, "_before": generic). The overhead: the median over rounds of
    a sample's time against the time inside its own denoiser calls. Against bare: the median of a sample
    against the 50 bare calls just before it, and the fastest of each (two timed blocks, so drift shows)."""
    sampled, inside, bare = times["sample" + suffix], times["inside" + suffix], times["bare"]

    def median_over(base):
        return statistics.median(s / b - 1 for s, b in zip(sampled, base, strict=True)) * 100

    return {
        "sample_ms" + suffix: statistics.median(sampled) * 1000,
        "denoiser_ms" + suffix: statistics.median(inside) * 1000,
        "overhead_pct" + suffix: median_over(inside),
        "overhead_vs_bare_pct" + suffix: median_over(bare),
        "overhead_of_minima_pct" + suffix: (min(sampled) / min(bare) - 1) * 100,
        "loop_us_per_step" + suffix: min(times["loop" + suffix]) / steps * 1e6,
    }


def child_soak(bundle: str, threads: int, samples: int, steps: int, every: int) -> dict:
    from dtk.runtime import Pipeline

    series = []
    start = time.perf_counter()
    with Pipeline.load(bundle, backend="onnxruntime", threads=threads) as pipe:
        for i in range(samples):
            pipe.sample(num=1, steps=steps, sampler=SAMPLERS[i % len(SAMPLERS)], seed=i)
            if i % every == 0 or i == samples - 1:
                series.append((i + 1, time.perf_counter() - start, rss_mb()))
    return {"samples": samples, "steps": steps, "series": series}


# --- the parent: build, measure, summarise, write ---


def build_tiny_bundle(out: Path) -> Path:
    """The test suite's tiny model: a random `tiny` U-Net on 1x16x16, exported with batch range 1..4."""
    code = f"""
import torch
from dtk.checkpoint import Checkpoint, save_checkpoint
from dtk.export.bundle import ExportOptions, export_bundle
from dtk.runtime.schedule import DiffusionConfig
from dtk.unet import UNet, UNetConfig
torch.manual_seed(0)
config = UNetConfig.preset("tiny", image_size=16, in_channels=1, out_channels=1)
model = UNet(config)
with torch.no_grad():
    for p in model.parameters():
        if not p.any():
            p.normal_(0.0, 0.02)
state = model.state_dict()
ckpt = Checkpoint(model_config=config, diffusion=DiffusionConfig(), model_state=state, ema_state=state,
                  step=0, train_state=None)
save_checkpoint({str(out / "model.pt")!r}, ckpt)
export_bundle({str(out / "model.pt")!r}, {str(out / "bundle")!r}, ExportOptions(batch=(1, 2, 4)))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out / "bundle"


def measure_imports(repeats: int) -> dict:
    results = {}
    for label, statement in IMPORTS.items():
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", IMPORT_TIMER.format(statement=statement)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(repeats)
        ]
        results[label] = {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}
    return results


def summarise_soak(soak: dict, warmup_fraction: float = 0.25) -> dict:
    """RSS growth after warm-up (the first quarter: allocators settle in steps): last value against the first
    recorded after warm-up, the least-squares slope over that stretch, and the largest single step."""
    import numpy as np

    series = np.asarray(soak["series"], dtype=np.float64)
    after = series[series[:, 0] >= warmup_fraction * soak["samples"]]
    slope = np.polyfit(after[:, 0], after[:, 2], 1)[0] * 1000 if len(after) > 1 else 0.0
    steps = np.diff(series[:, 2])
    largest = int(np.argmax(steps)) if len(steps) else 0
    return {
        "warmup_samples": int(after[0, 0]),
        "rss_start_mb": float(series[0, 2]),
        "rss_after_warmup_mb": float(after[0, 2]),
        "rss_end_mb": float(series[-1, 2]),
        "rss_max_mb": float(series[:, 2].max()),
        "growth_after_warmup_mb": float(series[-1, 2] - after[0, 2]),
        "slope_mb_per_1000": float(slope),
        "largest_step_mb": float(steps[largest]) if len(steps) else 0.0,
        "largest_step_at_sample": int(series[largest + 1, 0]) if len(steps) else 0,
        "seconds": float(series[-1, 1]),
        "ms_per_sample": float(series[-1, 1] / soak["samples"] * 1000),
    }


def report(record: dict) -> str:
    m, imports, rss, over, soak = (record[k] for k in ("machine", "imports", "peak_rss", "overhead", "soak"))
    load = record["load_average_1min"]
    worst = max(over["samplers"].items(), key=lambda kv: kv[1]["overhead_pct"])
    rows = [
        (
            "`import dtk.runtime`",
            f"{imports['dtk.runtime']['median_s'] * 1000:.0f} ms (median of "
            f"{imports['dtk.runtime']['runs']})",
            "< 0.5 s",
            record["met"]["import"],
        ),
        (
            "peak RSS, sampling without torch",
            f"{rss['peak_mb']:.1f} MB ({rss['workload']})",
            "< 150 MB",
            record["met"]["peak_rss"],
        ),
        (
            "loop overhead, worst sampler",
            f"{worst[1]['overhead_pct']:+.1f} % ({worst[0]})",
            "< 3 %",
            record["met"]["overhead"],
        ),
        (
            "soak RSS growth after warm-up",
            f"{soak['growth_after_warmup_mb']:+.2f} MB over "
            f"{record['soak_raw']['samples'] - soak['warmup_samples']} samples",
            "< 1 MB (flat)",
            record["met"]["soak"],
        ),
    ]
    lines = [
        f"# Runtime footprint — {record['name']}",
        "",
        f"Machine: {m['cpu']['model']}, {m['cpu']['usable_cores']} usable cores, Python {m['python']}, "
        f"onnxruntime {m['versions']['onnxruntime']}, numpy {m['versions']['numpy']} ({record['date']}).",
        f"Bundle: {record['bundle']}; ONNX Runtime CPU provider, {record['threads']} intra-op threads.",
        f"1-minute load average (a shared machine): {load['before']:.1f} before, {load['after']:.1f} after.",
        "",
        "| measure | result | target | met |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {'yes' if d else 'NO'} |" for a, b, c, d in rows),
        "",
        f"Loop overhead: median over {over['rounds']} rounds of a 50-step `Pipeline.sample` (batch 1) "
        "against the time inside its own 50 denoiser calls, − 1. Both are timed in the same run, so a "
        "machine whose speed drifts does not move it. It includes the plan, the host noise, the updates and "
        "the uint8 conversion.",
        "",
        "Against bare: the same sample against 50 bare denoiser calls timed just before it (median of the "
        "rounds, and fastest against fastest). These are two timed blocks, so they carry the drift of a "
        "shared machine. Loop alone: the same sampling with a denoiser that costs nothing, hot, per step. "
        "After a wait: with a denoiser that busy-waits as long as a real call and returns zeros, the loop's "
        "time outside it per step (what the same Python costs once other work has filled the caches and "
        "branch predictors, as in the real loop). "
        "Before: the same rounds with the generic loop (every product and sum a new array) in place of "
        "the in-place host loop, interleaved in the same process.",
        "",
        "| sampler | 50 bare calls | 50-step sample | inside the denoiser | overhead (before) "
        "| against bare (before) | fastest against fastest (before) | loop alone (before) "
        "| loop after a wait |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {s} | {v['bare_ms']:.1f} ms | {v['sample_ms']:.1f} ms | {v['denoiser_ms']:.1f} ms "
            f"| {v['overhead_pct']:+.1f} % ({v['overhead_pct_before']:+.1f} %) "
            f"| {v['overhead_vs_bare_pct']:+.1f} % ({v['overhead_vs_bare_pct_before']:+.1f} %) "
            f"| {v['overhead_of_minima_pct']:+.1f} % ({v['overhead_of_minima_pct_before']:+.1f} %) "
            f"| {v['loop_us_per_step']:.1f} µs/step ({v['loop_us_per_step_before']:.1f}) "
            f"| {v['loop_after_wait_us_per_step']:.1f} µs/step |"
            for s, v in over["samplers"].items()
        ),
        "",
        "Imports (fresh interpreter each, time of the import statement only):",
        "",
        *(
            f"- {label}: {v['median_s'] * 1000:.0f} ms median, {v['min_s'] * 1000:.0f} ms min"
            for label, v in imports.items()
        ),
        "",
        f"Soak: {record['soak_raw']['samples']} samples of {record['soak_raw']['steps']} steps in one "
        f"process (samplers in turn), {soak['ms_per_sample']:.1f} ms each; RSS {soak['rss_start_mb']:.1f} MB "
        f"after the first sample, {soak['rss_after_warmup_mb']:.1f} MB after "
        f"{soak['warmup_samples']} samples, {soak['rss_end_mb']:.1f} MB at the end, slope "
        f"{soak['slope_mb_per_1000']:+.3f} MB per 1,000 samples after warm-up; largest single step "
        f"{soak['largest_step_mb']:+.2f} MB (by sample {soak['largest_step_at_sample']}). "
        f"Plot: `{record['plot']}`.",
        "",
    ]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = record["soak_raw"]["series"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot([s[0] for s in series], [s[2] for s in series], lw=1.2)
    ax.axvline(record["soak"]["warmup_samples"], color="grey", ls="--", lw=0.8, label="end of warm-up")
    ax.set_xlabel("samples")
    ax.set_ylabel("RSS (MB)")
    low = min(s[2] for s in series)
    ax.set_ylim(low - 5, max(s[2] for s in series) + 5)
    m = record["machine"]
    ax.set_title(
        f"dtk.runtime soak, ONNX Runtime CPU — {m['cpu']['model']}, {m['cpu']['usable_cores']} cores, "
        f"Python {m['python']}, onnxruntime {m['versions']['onnxruntime']}",
        fontsize=7,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    from dtk.runtime.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to measure (default: build the tiny one)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--import-repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved overhead rounds per sampler")
    parser.add_argument("--soak-samples", type=int, default=2000)
    parser.add_argument("--soak-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from dtk.runtime.files import write_text
    from dtk.runtime.system import machine_name, system_info

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_tiny_bundle(Path(tmp))
        load_before = os.getloadavg()
        print("imports ...", file=sys.stderr)
        imports = measure_imports(args.import_repeats)
        print("peak RSS ...", file=sys.stderr)
        peak = json.loads(child(["peak_rss", bundle, args.threads]))
        print("loop overhead ...", file=sys.stderr)
        overhead = json.loads(child(["overhead", bundle, args.threads, args.rounds]))
        print(f"soak ({args.soak_samples} samples) ...", file=sys.stderr)
        soak_raw = json.loads(child(["soak", bundle, args.threads, args.soak_samples, args.soak_steps, 10]))
        load_after = os.getloadavg()

    machine = system_info()
    name = machine_name(machine)
    soak = summarise_soak(soak_raw)
    worst = max(v["overhead_pct"] for v in overhead["samplers"].values())
    record = {
        "name": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "bundle": "tiny 1x16x16 U-Net, batch 1..4, fp32" if args.bundle is None else str(args.bundle),
        "threads": args.threads,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "targets": TARGETS,
        "imports": imports,
        "peak_rss": peak,
        "overhead": overhead,
        "soak": soak,
        "soak_raw": soak_raw,
        "plot": f"footprint-{name}.png",
        "met": {
            "import": imports["dtk.runtime"]["median_s"] < TARGETS["import_s"],
            "peak_rss": peak["peak_mb"] < TARGETS["peak_rss_mb"] and not peak["torch_loaded"],
            "overhead": worst < TARGETS["overhead_pct"],
            "soak": soak["growth_after_warmup_mb"] < TARGETS["soak_growth_mb"],
        },
    }
    out = args.out
    write_text(out / f"footprint-{name}.json", json.dumps(record, indent=1) + "\n")
    write_text(out / f"footprint-{name}.md", report(record))
    plot(record, out / f"footprint-{name}.png")
    print(report(record))


CHILDREN = {"peak_rss": child_peak_rss, "overhead": child_overhead, "soak": child_soak}

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        name, values = sys.argv[2], [int(v) if v.isdigit() else v for v in sys.argv[3:]]
        print(json.dumps(CHILDREN[name](*values)))
    else:
        main()
