"""One command on a GPU machine: everything of dtk's GPU path that can run there, measured and recorded.

    python benchmarks/gpu_check.py             # on a GPU: writes benchmarks/results/gpu-<machine>.{json,md}
    python benchmarks/gpu_check.py --dry-run   # anywhere: prints the steps and exits 0

Steps, each under its own time limit (all of them under 8 minutes on an H200):
  tests      pytest -m "gpu or tensorrt": the NVRTC update kernel against numpy, graph replay, freeing on
             close, the TensorRT stand-in (tests/runtime/gpu_standin.py), real engines where TensorRT is
  chain      the stand-in device chain (cuda-python buffers, NVRTC kernel, CUDA graphs) against the host loop:
             same seed, images within one level (1/255)
  backends   benchmarks/compare_backends.py --compile --cuda-graph on the tiny U-Net: PyTorch eager,
             torch.compile reduce-overhead, ONNX Runtime, TensorRT where installed
  training   dtk train on CUDA with bf16 and fp16 autocast, and 20 + 20 steps resumed against 40 straight
  footprint  device memory before, while and after a TensorRTDenoiser (stand-in) is open
Every step records what ran and what was skipped and why; nothing is reported as run that did not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 7.5 * 60
LIMITS_S = {"tests": 150, "chain": 45, "backends": 150, "training": 75, "footprint": 30}  # 7.5 min
STEPS = {
    "tests": 'pytest -m "gpu or tensorrt" tests (per-test outcomes from its JUnit XML)',
    "chain": "stand-in run_chain vs sample_loop: ddpm, 20 steps, batch 4, with and without CUDA graphs",
    "backends": "compare_backends.py --presets tiny --batches 1 8 --compile --cuda-graph --duration 2",
    "training": "dtk train tiny/digits 40 steps, --precision bf16 and fp16; 20 + --resume 20 vs 40 (bf16)",
    "footprint": "free device memory before, while and after a stand-in TensorRTDenoiser (captured chain)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = args.only or list(STEPS)
    gpu = _gpu_name()
    if args.dry_run:
        print(f"gpu_check: GPU here: {gpu or 'none'}; TensorRT: {_tensorrt_version() or 'not installed'}")
        for name in steps:
            print(f"  {name:<10} (limit {LIMITS_S[name]} s) {STEPS[name]}")
        print(f"would write {args.out}/gpu-<machine>.json and .md")
        return 0
    if gpu is None:
        print(
            "error: gpu_check: no CUDA GPU visible to PyTorch here; --dry-run shows the steps",
            file=sys.stderr,
        )
        return 2
    _ensure_dtk()
    from dtk.runtime.system import machine_name, system_info

    started = time.monotonic()
    results = {"system": system_info(), "tensorrt": _tensorrt_version(), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="dtk-gpu-check-") as work:
        work = Path(work)
        for name in steps:
            left = BUDGET_S - (time.monotonic() - started)
            if left < LIMITS_S[name] / 3:
                results["steps"][name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
                continue
            print(f"== {name}: {STEPS[name]}", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                result = RUNNERS[name](work, min(LIMITS_S[name], left))
            except Exception as e:  # a broken step is a result too
                result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            result["seconds"] = round(time.monotonic() - start, 1)
            results["steps"][name] = result
            print(f"   {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    stem = args.out / f"gpu-{machine_name(results['system'])}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(format_markdown(results))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0 if all(s["status"] in ("passed", "skipped") for s in results["steps"].values()) else 1


# -- steps ---------------------------------------------------------------------------------------------------


def run_tests(work: Path, limit: float) -> dict:
    junit = work / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or tensorrt",
               "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]  # fmt: skip
    done = _run(command, limit)
    outcomes = _junit_outcomes(junit) if junit.is_file() else {}
    failed = [name for name, outcome in outcomes.items() if outcome in ("failed", "error")]
    return {
        "status": "passed" if done["returncode"] == 0 and not failed else "failed",
        "command": " ".join(command),
        "returncode": done["returncode"],
        "counts": {
            k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")
        },
        "outcomes": outcomes,
        "tail": done["tail"],
    }


def run_chain(work: Path, limit: float) -> dict:
    checkpoint, bundle = _tiny_bundle(work)
    standin = _load("gpu_standin", ROOT / "tests" / "runtime" / "gpu_standin.py")
    runs = []
    for cuda_graph in (False, True):
        denoiser, _, _ = standin.open_standin(bundle, checkpoint, cuda_graph=cuda_graph)
        with denoiser:
            runs.append(standin.chain_against_host(denoiser, batch=4, steps=20, sampler="ddpm"))
    sys.modules.pop("tensorrt", None)
    ok = all(r["images_within_1_level"] for r in runs)
    return {"status": "passed" if ok else "failed", "runs": runs}


def run_backends(work: Path, limit: float) -> dict:
    script = str(ROOT / "benchmarks" / "compare_backends.py")
    command = [sys.executable, script, "--presets", "tiny", "--batches", "1", "8", "--compile",
               "--cuda-graph", "--duration", "2", "--warmup", "500ms"]  # fmt: skip
    done = _run(command, limit)
    written = sorted(str(p.relative_to(ROOT)) for p in RESULTS.glob("backends-gpu-*"))
    return {
        "status": "passed" if done["returncode"] == 0 else "failed",
        "command": " ".join(command),
        "returncode": done["returncode"],
        "written": written,
        "tail": done["tail"],
    }


def run_training(work: Path, limit: float) -> dict:
    base = ["--preset", "tiny", "--dataset", "digits", "--image-size", "16", "--batch-size", "32",
            "--sample-every", "0", "--seed", "0"]  # fmt: skip
    runs, status = {}, "passed"
    deadline = time.monotonic() + limit

    def train(name, *extra):
        done = _run([sys.executable, "-m", "dtk", "train", *extra], deadline - time.monotonic())
        runs[name] = {"returncode": done["returncode"], "tail": done["tail"][-600:]}
        return done["returncode"] == 0

    for precision in ("bf16", "fp16"):
        if not train(
            precision, *base, "--steps", "40", "--precision", precision, "--out", str(work / precision)
        ):
            status = "failed"
    resumed = work / "resumed"
    if train("bf16-20", *base, "--steps", "20", "--precision", "bf16", "--out", str(resumed)) and train(
        "bf16-resume", "--out", str(resumed), "--steps", "40", "--resume"
    ):
        runs["resume"] = _compare_checkpoints(work / "bf16" / "model.pt", resumed / "model.pt")
        if not runs["resume"]["exact"]:
            status = "failed"
    else:
        status = "failed"
    return {"status": status, "runs": runs}


def run_footprint(work: Path, limit: float) -> dict:
    import numpy as np
    import torch

    from dtk.runtime.backends.cuda import Cuda

    checkpoint, bundle = _tiny_bundle(work)
    standin = _load("gpu_standin", ROOT / "tests" / "runtime" / "gpu_standin.py")
    cuda = Cuda()
    torch.cuda.synchronize()
    before, total = cuda.rt("cudaMemGetInfo")
    denoiser, _, _ = standin.open_standin(bundle, checkpoint, cuda_graph=True)
    from dtk.runtime.samplers import make_plan

    x = np.zeros((4, 1, 16, 16), np.float32)
    denoiser.run_chain(make_plan("ddpm", denoiser.manifest.diffusion, 10), x, lambda i: np.ones_like(x))
    owned = sum(b.nbytes for b in denoiser._session._device_buffers)
    during, _ = cuda.rt("cudaMemGetInfo")
    reserved = torch.cuda.memory_reserved()
    denoiser.close()
    after, _ = cuda.rt("cudaMemGetInfo")
    sys.modules.pop("tensorrt", None)
    mib = 2**20
    return {
        "status": "passed" if after >= during else "failed",  # small frees may stay in the driver's pages
        "free_mib": {"before": before // mib, "open": during // mib, "after_close": after // mib},
        "total_mib": total // mib,
        "denoiser_buffers_mib": round(owned / mib, 3),
        "torch_reserved_mib": round(reserved / mib, 1),
        "note": "the stand-in's U-Net lives in PyTorch's cache, which close() does not own",
    }


RUNNERS = {
    "tests": run_tests,
    "chain": run_chain,
    "backends": run_backends,
    "training": run_training,
    "footprint": run_footprint,
}


# -- helpers -------------------------------------------------------------------------------------------------


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _tensorrt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return getattr(tensorrt, "__version__", None)


def _ensure_dtk() -> None:
    """dtk from this checkout: an editable install without dependencies (a GPU image has them, no network)."""
    if importlib.util.find_spec("dtk") is not None:
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                    str(ROOT)], check=True)  # fmt: skip
    os.execv(sys.executable, [sys.executable, *sys.argv])  # the editable install's .pth is read at start-up


def _run(command: list[str], limit: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit, 1), env=env
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": "timeout", "tail": out[-3000:]}
    return {"returncode": done.returncode, "tail": (done.stdout + done.stderr)[-3000:]}


def _junit_outcomes(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case]
        outcomes[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed").replace(
            "failure", "failed"
        )
    return outcomes


def _tiny_bundle(work: Path) -> tuple[Path, Path]:
    checkpoint, bundle = work / "tiny.pt", work / "tiny-bundle"
    if not bundle.is_dir():
        compare = _load("compare_backends", ROOT / "benchmarks" / "compare_backends.py")
        compare.make_checkpoint("tiny", checkpoint)
        from dtk.export.bundle import ExportOptions, export_bundle

        export_bundle(checkpoint, bundle, ExportOptions(batch=(1, 4, 8), verify=False), progress=False)
    return checkpoint, bundle


def _compare_checkpoints(a: Path, b: Path) -> dict:
    import torch

    from dtk.checkpoint import load_checkpoint

    left, right = load_checkpoint(a), load_checkpoint(b)
    worst = max(
        float((left.model_state[k].float() - right.model_state[k].float()).abs().max())
        for k in left.model_state
    )
    exact = all(torch.equal(left.model_state[k], right.model_state[k]) for k in left.model_state)
    return {"exact": exact, "max_abs_weight_diff": worst, "steps": (left.step, right.step)}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"dtk_gpu_check_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def format_markdown(results: dict) -> str:
    from dtk.runtime.system import format_system

    lines = ["# GPU check", ""]
    lines += [f"- {label}: {text}" for label, text in format_system(results["system"])]
    lines += [f"- TensorRT: {results['tensorrt'] or 'not installed (TensorRT paths did not run)'}", ""]
    lines += ["| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for name, step in results["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '-')} | {_detail(name, step)} |")
    lines.append("")
    return "\n".join(lines)


def _detail(name: str, step: dict) -> str:
    if step["status"] == "skipped":
        return step.get("reason", "")
    if "error" in step:
        return step["error"]
    if name == "tests":
        return ", ".join(f"{k} {v}" for k, v in step["counts"].items())
    if name == "chain":
        return "; ".join(
            f"graph {r['cuda_graph']}: max Δx {r['max_abs_latent']:.2e}, {r['max_levels']} levels"
            for r in step["runs"]
        )
    if name == "training":
        resume = step["runs"].get("resume") or {}
        return f"resume exact: {resume.get('exact')}, max Δw {resume.get('max_abs_weight_diff')}"
    if name == "footprint":
        return f"free MiB {step['free_mib']}, denoiser buffers {step['denoiser_buffers_mib']} MiB"
    return ", ".join(step.get("written", [])) or str(step.get("returncode"))


if __name__ == "__main__":
    sys.exit(main())
