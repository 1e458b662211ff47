"""Recorded backend comparisons: the `tiny` and `ddpm-cifar10` U-Nets at batch 1 and 8, per denoiser call.

For each preset the script makes a checkpoint with random weights (speed does not depend on what was learned),
exports it to a bundle (batch 1..8), and runs `dtk bench BUNDLE --compare ...` at each batch: every backend in
its own process, one after another. Baselines are PyTorch eager (the speed-up reference) and, with
`--compile`, torch.compile; ONNX Runtime, and TensorRT where a GPU and TensorRT are present. Each preset is
also exported as an int8 bundle (calibrated on `shapes` or `digits`; speed only, so without the export's
checks) and run on ONNX Runtime, beside the naive int8 graph of `quantize_static` (every Conv/MatMul/Gemm
quantized: the speed reference for the layers dtk keeps in float). Where OpenVINO is installed it runs the
fp32 graph with the fp32 and bf16 precision hints and the int8 graph on its own int8 kernels, as the peer a
CPU user would pick (benchmarks/cpu_peers.py). Every CPU figure is also given as a fraction of this machine's
GEMM peaks (fp32, int8, and bf16 where the CPU has bf16 instructions), measured in the same run. The
machine's name carries its CPU's int8 tier (`cpu-amd-epyc-2c-avx2`): int8 speed-ups depend on VNNI or AMX.

    python benchmarks/compare_backends.py                         # this machine, defaults below
    python benchmarks/compare_backends.py --compile --duration 10
    python benchmarks/compare_backends.py --compile --cuda-graph         # on a GPU: the CUDA-graph variants
    python benchmarks/compare_backends.py --presets tiny --batches 1 --duration 1    # a quick look

Writes benchmarks/results/backends-<machine>.json, .md and .png (the machine named in each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("tiny", "ddpm-cifar10")
BATCHES = (1, 8)


def make_checkpoint(preset: str, path: Path, seed: int = 0) -> Path:
    """A checkpoint of `preset` at its own image size and channels, with random weights."""
    import torch

    from dtk.checkpoint import Checkpoint, save_checkpoint
    from dtk.runtime.schedule import DiffusionConfig
    from dtk.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    config = UNetConfig.preset(preset)
    model = UNet(config)
    with torch.no_grad():  # DDPM zero-initialises output layers; give every weight a value
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, Checkpoint(config, DiffusionConfig(), state, None, 0, None))
    return path


def export(checkpoint: Path, bundle: Path, max_batch: int) -> Path:
    from dtk.export.bundle import ExportOptions, export_bundle

    # the parity check is the export's business (tests/export); here only the speed matters
    export_bundle(checkpoint, bundle, ExportOptions(batch=(1, 1, max_batch), verify=False), progress=False)
    return bundle


def export_int8(checkpoint: Path, bundle: Path, max_batch: int, channels: int) -> Path:
    from dtk.export.bundle import ExportOptions, export_bundle

    options = ExportOptions(
        precision="int8",
        batch=(1, 1, max_batch),
        verify=False,  # random weights: the image checks are the export's business on trained models
        calibration_data="shapes" if channels == 3 else "digits",
        calibration_size=64,
    )
    export_bundle(checkpoint, bundle, options, progress=False)
    return bundle


def flops_per_image(checkpoint: Path) -> float:
    """FLOPs of one denoiser call on one image (torch's FlopCounterMode: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dtk.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model, config = ckpt.build_model(weights="raw"), ckpt.model_config
    x = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1))
    return float(counter.get_total_flops())


def peer(args_list: list[str]) -> dict | None:
    """One benchmarks/cpu_peers.py measurement in its own process; None (and a note) if it fails."""
    command = [sys.executable, str(Path(__file__).with_name("cpu_peers.py")), *args_list]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        print(f"== {' '.join(args_list)} failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout)


def has_bf16(system: dict) -> bool:
    """Whether the CPU has bf16 instructions (x86 avx512_bf16 or amx_bf16, Arm bf16)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(system["cpu"].get("features") or ()))


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def build_engine(bundle: Path) -> None:
    """Build unet.plan on this GPU where TensorRT and a GPU are present (else `dtk bench` skips TensorRT)."""
    import importlib.util

    from dtk.runtime.manifest import PLAN_NAME
    from dtk.runtime.system import gpu_info

    if (bundle / PLAN_NAME).exists() or importlib.util.find_spec("tensorrt") is None or not gpu_info():
        return
    print(f"== building the TensorRT engine for {bundle}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "dtk", "build-engine", str(bundle)], check=False)


def bench(bundle: Path, checkpoint: Path, batch: int, args, backends=None) -> dict:
    backends = backends or ["torch", *(["torch-compile"] if args.compile else []), "onnxruntime", "tensorrt"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compare.json"
        command = [sys.executable, "-m", "dtk", "bench", str(bundle), "--checkpoint", str(checkpoint)]
        command += ["--compare", ",".join(backends), "--batch", str(batch), "--warmup", args.warmup]
        command += [
            "--iterations",
            str(args.iterations),
            "--duration",
            str(args.duration),
            "-o",
            str(out),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.cuda_graph:
            command.append("--cuda-graph")
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def _peer_timing(args) -> list[str]:
    warmup = (
        float(str(args.warmup).rstrip("s"))
        if str(args.warmup).rstrip("s").replace(".", "").isdigit()
        else 1.0
    )
    return ["--warmup", str(warmup), "--duration", str(args.duration), "--iterations", str(args.iterations)]


def markdown(data: dict) -> str:
    from dtk.runtime.bench import comparison_rows, format_table
    from dtk.runtime.system import format_system

    lines = [f"# Backends on {data['machine']}", ""]
    lines += [f"- **{label}**: {text}" for label, text in format_system(data["system"])]
    settings = data["settings"]
    lines += [
        f"- **timing**: warm-up {settings['warmup']}, at least {settings['iterations']} calls and "
        f"{settings['duration']} s per backend; each backend in its own process; "
        "speed-up = PyTorch eager p50 / backend p50 at the same batch",
        "",
    ]
    for preset, runs in data["presets"].items():
        lines += [f"## {preset} ({runs['parameters']:,} parameters, {runs['shape']})", ""]
        records = [r for run in runs["batches"] for r in run["results"]]
        skipped = {(s["backend"], s["reason"]) for run in runs["batches"] for s in run["skipped"]}
        rows = comparison_rows(records, [{"backend": b, "reason": r} for b, r in sorted(skipped)])
        lines += [format_table(rows, markdown=True), ""]
        if data.get("peaks") and runs.get("flops_per_image"):
            lines += [_roof_table(records, runs["flops_per_image"], data["peaks"]), ""]
    return "\n".join(lines)


def _roof_table(records: list[dict], flops: float, peaks: dict) -> str:
    """Each CPU record's arithmetic rate against the GEMM peak of its precision, measured in the same run."""
    rows = []
    for r in records:
        peak = peaks.get(r["precision"].removesuffix("-naive"))
        if peak is None or r["transfers"] != "host":
            continue
        rate = flops * r["batch"] / (r["latency_ms"]["p50"] / 1000) / 1e9
        rows.append(
            f"| {r['backend']} | {r['batch']} | {r['precision']} | {rate:.1f} | {peak['gops']:.1f} | "
            f"{rate / peak['gops']:.2f} |"
        )
    head = [
        f"{flops / 1e9:.3g} GFLOP per image; peak = a {GEMM_PEAK_NOTE}",
        "",
        "| backend | batch | precision | GFLOP/s (p50) | peak GOP/s | fraction of peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(head + rows)


GEMM_PEAK_NOTE = (
    "2048² GEMM of the same precision (fp32, bf16: torch, bf16 only on CPUs with bf16 instructions; "
    "int8: ONNX Runtime MatMulInteger)"
)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.bench import speedups
    from dtk.runtime.files import atomic_path

    groups = [
        (p, run["batch"], run["results"]) for p, runs in data["presets"].items() for run in runs["batches"]
    ]
    backends = list(dict.fromkeys(r["backend"] for _, _, records in groups for r in records))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 4.2), squeeze=False)
    for ax, (preset, batch, records) in zip(axes[0], groups, strict=True):
        ups = speedups(records)
        by_backend = {r["backend"]: (i, r) for i, r in enumerate(records)}
        for k, backend in enumerate(backends):
            if backend not in by_backend:
                continue
            i, record = by_backend[backend]
            lat = record["latency_ms"]
            ax.bar(k, lat["p50"], color=f"C{k}", label=backend)
            ax.errorbar(k, lat["p50"], yerr=[[lat["p50"] - lat["min"]], [lat["p99"] - lat["p50"]]], color="k")
            if ups[i] is not None:
                ax.annotate(f"{ups[i]:.2f}x", (k, lat["p99"]), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{preset}, batch {batch}", fontsize=9)
        ax.set_xticks([])
        ax.set_ylabel("ms per denoiser call (p50; bars: min..p99)", fontsize=8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(backends), fontsize=8)
    fig.suptitle(f"dtk bench on {data['machine']} (speed-up over PyTorch eager above the bars)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile (a long first call per batch)"
    )
    parser.add_argument("--warmup", default="1s")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="CPU threads for every backend (default: each one's own)")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="GPU: TensorRT in CUDA graphs, torch.compile reduce-overhead",
    )
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="leave out the int8 bundles")
    parser.add_argument(
        "--no-openvino", dest="openvino", action="store_false", help="leave out OpenVINO (fp32, bf16)"
    )
    parser.add_argument("--work", type=Path, help="keep checkpoints and bundles here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.openvino = args.openvino and openvino_available()

    from dtk.runtime.files import write_text
    from dtk.runtime.system import machine_name, system_info

    system = system_info()
    machine = machine_name(system)
    settings = {
        k: getattr(args, k) for k in ("warmup", "iterations", "duration", "threads", "compile", "cuda_graph")
    }
    data = {"machine": machine, "system": system, "settings": settings, "presets": {}}
    threads = str(args.threads or 2)
    kinds = ("fp32", "int8", *(["bf16"] if has_bf16(system) else []))  # emulated bf16 runs for minutes
    peaks = {k: peer(["gemm", k, "--threads", threads, *_peer_timing(args)]) for k in kinds}
    data["peaks"] = {k: v for k, v in peaks.items() if v}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for preset in args.presets:
            checkpoint = work / f"{preset}.pt"
            bundle = work / f"{preset}-bundle"
            if not checkpoint.exists():
                print(f"== {preset}: random-weight checkpoint", file=sys.stderr)
                make_checkpoint(preset, checkpoint)
            if not bundle.exists():
                print(f"== {preset}: exporting", file=sys.stderr)
                export(checkpoint, bundle, max(args.batches))
            build_engine(bundle)
            manifest = json.loads((bundle / "dtk.json").read_text())
            channels = manifest["image"]["in_channels"]
            shape = f"{channels}x{'x'.join(map(str, manifest['image']['size']))}"
            int8_bundle = work / f"{preset}-int8-bundle"
            if args.int8 and not int8_bundle.exists():
                print(f"== {preset}: exporting int8", file=sys.stderr)
                export_int8(checkpoint, int8_bundle, max(args.batches), channels)
            runs = []
            for batch in args.batches:
                print(f"== {preset}, batch {batch}", file=sys.stderr)
                result = bench(bundle, checkpoint, batch, args)
                if args.int8:
                    int8 = bench(int8_bundle, checkpoint, batch, args, backends=["onnxruntime"])
                    result["results"] += int8["results"]
                    naive = peer(["naive-int8", str(bundle), "--batch", str(batch), *_peer_timing(args)])
                    result["results"] += [naive] if naive else []
                if args.openvino:
                    graphs = [(bundle, "fp32"), (bundle, "bf16")]
                    graphs += [(int8_bundle, "fp32")] if args.int8 else []  # OpenVINO's own int8 kernels
                    for graph, precision in graphs:
                        record = peer(
                            ["openvino", str(graph), "--batch", str(batch), "--precision", precision]
                            + _peer_timing(args)
                        )
                        result["results"] += [record] if record else []
                runs.append({"batch": batch, "results": result["results"], "skipped": result["skipped"]})
            data["presets"][preset] = {
                "parameters": manifest["model"]["parameters"],
                "shape": shape,
                "flops_per_image": flops_per_image(checkpoint),
                "batches": runs,
            }

    stem = args.out / (f"backends-{machine}" + ("-cuda-graph" if args.cuda_graph else ""))
    write_text(stem.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), markdown(data) + "\n")
    plot(data, stem.with_suffix(".png"))
    print(markdown(data))
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
