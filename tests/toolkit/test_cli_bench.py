"""`dtk bench`: one backend in process, the JSON it writes, `--compare` across processes, and bad flags."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtk.cli import main
from dtk.cli.bench import BenchOptions, availability, child_args, parse_compare, source_checkpoint

QUICK = ["--warmup", "2x", "--iterations", "5", "--duration", "0"]
LATENCY_KEYS = ["min", "mean", "p50", "p90", "p95", "p99", "max"]


def _bench(args, capsys):
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bundle_on_onnxruntime_writes_the_documented_json(tiny_bundle, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    args = [
        str(tiny_bundle),
        "--batch",
        "2",
        *QUICK,
        "--steps",
        "3",
        "--sample-runs",
        "1",
        "-o",
        str(out_json),
    ]
    code, out, err = _bench(args, capsys)
    assert code == 0, err
    record = json.loads(out_json.read_text())
    assert record["backend"] == "onnxruntime"
    assert (record["batch"], record["precision"], record["transfers"]) == (2, "fp32", "host")
    assert record["inputs"]["sample"] == {"shape": [2, 1, 16, 16], "dtype": "float32"}
    assert record["inputs"]["timestep"] == {"shape": [2], "dtype": "float32"}
    latency = [record["latency_ms"][k] for k in LATENCY_KEYS]
    assert list(record["latency_ms"]) == LATENCY_KEYS
    assert latency[0] > 0 and sorted(latency[:1] + latency[2:]) == latency[:1] + latency[2:]
    assert record["iterations"] == 5 and record["warmup"]["runs"] == 2
    throughput = record["throughput"]
    assert throughput["images_per_s"] == pytest.approx(2 * throughput["calls_per_s"], rel=1e-3)
    assert throughput["calls_per_s"] == pytest.approx(1000 / record["latency_ms"]["mean"], rel=1e-3)
    assert record["detail"]["providers"] == ["CPUExecutionProvider"]
    assert record["system"]["versions"]["onnxruntime"]
    e2e = record["end_to_end"]
    assert (e2e["steps"], e2e["sampler"], e2e["path"], e2e["runs"]) == (3, "ddim", "host loop", 1)
    split = e2e["split_ms"]
    assert split["copies_ms"] == 0.0
    parts = split["denoiser_ms"] + split["update_ms"] + split["copies_ms"] + split["noise_ms"]
    assert split["total_ms"] == pytest.approx(parts, abs=0.01)
    assert "latency ms" in out and "p99" in out and "none: the backend runs on host memory" in out
    documented = (Path(__file__).resolve().parents[2] / "benchmarks" / "README.md").read_text()
    for key in [*record, *record["end_to_end"], *split, *record["system"]]:  # the JSON is documented
        assert f"`{key}`" in documented, key


def test_onnx_path_and_engine_flags(tiny_bundle, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, _, err = _bench(["--onnx", str(tiny_bundle / "unet.onnx"), *QUICK, "-o", str(out_json)], capsys)
    assert code == 0, err
    assert json.loads(out_json.read_text())["backend"] == "onnxruntime"
    code, _, err = _bench(["--engine", str(tiny_bundle / "unet.plan"), *QUICK], capsys)
    assert code == 1
    assert "has no TensorRT plan" in err or "no such file" in err


def test_checkpoint_runs_the_pytorch_baseline(tiny_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _bench(["--checkpoint", str(tiny_checkpoint), *QUICK, "-o", str(out_json)], capsys)
    assert code == 0, err
    record = json.loads(out_json.read_text())
    assert record["backend"] == "torch"
    assert record["detail"]["device"] == "cpu" and record["transfers"] == "host"
    assert record["inputs"]["sample"]["shape"] == [1, 1, 16, 16]
    assert "backend     torch: device cpu" in out


def test_compile_reports_its_compile_time(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append(mode) or model)
    out_json = tmp_path / "r.json"
    code, _, err = _bench(
        ["--checkpoint", str(tiny_checkpoint), "--compile", *QUICK, "-o", str(out_json)], capsys
    )
    assert code == 0, err
    record = json.loads(out_json.read_text())
    assert compiled == [None]
    assert record["backend"] == "torch-compile"
    assert record["detail"]["compile"] == "default" and record["detail"]["compile_s"] >= 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{bundle}", "--batch", "8"], "--batch 8 is outside the bundle's batch range (1..4)"),
        (["{bundle}", "--warmup", "abc"], "--warmup 'abc'"),
        (["{bundle}", "--compile"], "--compile applies to the torch backend"),
        (["{bundle}", "--onnx", "{bundle}/unet.onnx"], "give one of BUNDLE, --engine and --onnx"),
        (["{bundle}", "--cuda-graph"], "--cuda-graph applies to the tensorrt backend"),
        (["{bundle}", "--compare", "torch,fast"], "--compare 'torch,fast': choose from torch, torch-compile"),
        (["{bundle}", "--compare", "torch", "--backend", "torch"], "drop --backend"),
        (["{bundle}/unet.onnx", "--backend", "tensorrt"], "runs on onnxruntime, not --backend tensorrt"),
        (["/nonexistent/bundle"], "/nonexistent/bundle: no such file or directory"),
        ([], "the torch backend needs --checkpoint model.pt"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_bundle, capsys, args, message):
    args = [a.replace("{bundle}", str(tiny_bundle)) for a in args]
    code, _, err = _bench([*QUICK, *args], capsys)  # the flags under test come last and win
    assert code == 1
    assert message in err
    assert "Traceback" not in err


def test_source_checkpoint_must_be_unchanged(tiny_bundle, tiny_checkpoint, tmp_path):
    assert source_checkpoint(tiny_bundle) == tiny_checkpoint
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "dtk.json").read_text())
    manifest["source"]["sha256"] = "0" * 64
    (copy / "dtk.json").write_text(json.dumps(manifest))
    assert source_checkpoint(copy) is None
    reason = availability("torch", BenchOptions(), copy)
    assert reason == "no PyTorch checkpoint (pass --checkpoint model.pt)"
    assert (
        availability("tensorrt", BenchOptions(), None) == "no bundle given (dtk export model.pt -o bundle/)"
    )


def test_child_args_repeat_the_shapes_and_timing(tiny_bundle, tiny_checkpoint, tmp_path):
    opts = BenchOptions(
        batch=4, warmup="50ms", iterations=7, duration=0.5, steps=9, sampler="ddpm", threads=1
    )
    args = child_args("torch-compile", opts, tiny_bundle, tmp_path / "x.json")
    joined = " ".join(args[1:])
    assert f"--checkpoint {tiny_checkpoint} --backend torch --device auto --compile" in joined
    assert "--batch 4 --warmup 50ms --iterations 7 --duration 0.5" in joined
    assert "--steps 9 --sampler ddpm --sample-runs 3" in joined and "--threads 1" in joined
    assert "--no-system" in args and str(tiny_bundle) not in args
    args = child_args("onnxruntime", opts, tiny_bundle, tmp_path / "x.json")
    assert args[args.index("--backend") - 1 : args.index("--backend") + 2] == [
        str(tiny_bundle),
        "--backend",
        "onnxruntime",
    ]
    assert parse_compare("torch, onnxruntime,torch") == ["torch", "onnxruntime"]


def test_compare_runs_each_backend_in_its_own_process(tiny_bundle, tmp_path):
    out_json = tmp_path / "compare.json"
    run = subprocess.run(
        [sys.executable, "-m", "dtk", "bench", str(tiny_bundle), "--compare", "torch,onnxruntime,tensorrt"]
        + [
            "--warmup",
            "1x",
            "--iterations",
            "3",
            "--duration",
            "0",
            "--threads",
            "1",
            "-o",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out_json.read_text())
    assert [r["backend"] for r in data["results"]] == ["torch", "onnxruntime"]
    assert all(r["batch"] == 1 and r["iterations"] == 3 for r in data["results"])
    assert all(r["detail"]["threads"] == 1 for r in data["results"])
    assert data["skipped"][0]["backend"] == "tensorrt"
    assert (
        "TensorRT is not installed" in data["skipped"][0]["reason"] or "GPU" in data["skipped"][0]["reason"]
    )
    table = run.stdout.splitlines()
    header = next(
        i for i, line in enumerate(table) if line.startswith("backend") and "vs torch eager" in line
    )
    assert table[header + 1].startswith("torch") and table[header + 1].endswith("1.00x")
    assert table[header + 3].startswith("tensorrt") and "skipped: " in table[header + 3]


def test_compare_lists_a_failing_backend_with_its_error(tiny_bundle, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtk",
            "bench",
            str(tiny_bundle),
            "--compare",
            "onnxruntime",
            "--batch",
            "5",
            *QUICK,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "skipped: failed: " in run.stdout
    assert "--batch 5 is outside the bundle's batch range (1..4)" in run.stdout


class FakeGpuDenoiser:
    """Stands in for a device backend: a host call costs 20 ms (copies + engine), a resident call 1 ms."""

    name = "tensorrt"

    def __init__(self):
        self.device_batches = []

    def __call__(self, sample, timestep):
        time.sleep(0.020)
        return 0.1 * sample

    def device_call(self, batch):
        self.device_batches.append(batch)
        return lambda: time.sleep(0.001)

    def run_chain(self, plan, x, noise, callback=None):
        assert callback is None  # a per-step callback would copy the sample back to the host
        for _ in plan.timesteps:
            time.sleep(0.0015)
        return x


def _gpu_target(chain=False):
    from dtk.cli.bench import Target
    from dtk.runtime.schedule import DiffusionConfig

    denoiser = FakeGpuDenoiser()
    return Target(
        backend="tensorrt",
        denoiser=denoiser,
        sample_shape=(1, 4, 4),
        timestep_dtype="float32",
        precision="fp16",
        diffusion=DiffusionConfig(),
        on_host=False,
        chain=chain,
        device_call=denoiser.device_call,
    )


def test_device_backend_timing_with_and_without_transfers():
    from dtk.cli.bench import measure
    from dtk.runtime.bench import TimingConfig, Warmup

    config = TimingConfig(Warmup(1), iterations=5, duration_s=0)
    target = _gpu_target()
    excluded = measure(target, BenchOptions(batch=2, transfers=False, steps=4, sample_runs=1), config)
    assert excluded.transfers == "excluded" and target.denoiser.device_batches == [2]
    assert 0.9 <= excluded.latency.p50 < 19.9  # the 1 ms resident call, not the 20 ms host call
    split = excluded.end_to_end["split_ms"]
    assert excluded.end_to_end["path"] == "host loop"
    assert split["copies_ms"] > 0
    assert split["denoiser_ms"] == pytest.approx(4 * excluded.latency.p50, abs=1e-3)
    included = measure(_gpu_target(), BenchOptions(batch=2, transfers=True), config)
    assert included.transfers == "included" and included.latency.p50 >= 19.9
    assert included.to_dict()["transfers_included"] is True


def test_device_chain_profile_and_a_backend_without_resident_calls():
    from dtk.cli.bench import measure
    from dtk.runtime.bench import TimingConfig, Warmup
    from dtk.runtime.errors import DtkError

    config = TimingConfig(Warmup(0), iterations=3, duration_s=0)
    result = measure(_gpu_target(chain=True), BenchOptions(batch=1, steps=5, sample_runs=2), config)
    e2e = result.end_to_end
    assert (e2e["path"], e2e["runs"], e2e["split_ms"]["copies_ms"]) == ("device chain", 2, None)
    assert e2e["split_ms"]["total_ms"] >= 5 * 1.5
    target = _gpu_target()
    target.device_call = None
    with pytest.raises(DtkError, match="cannot time a call without its copies"):
        measure(target, BenchOptions(transfers=False), config)


def test_bench_of_a_bundle_runs_without_torch(tiny_bundle):
    """What the runtime-only image (docker/Dockerfile.cpu) does: no torch, no onnx installed."""
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ImportError(name + ' is not installed here')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from dtk.cli import main\n"
        f"sys.exit(main(['bench', {str(tiny_bundle)!r}, '--steps', '2', '--sample-runs', '1', *{QUICK!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "onnxruntime: providers CPUExecutionProvider" in run.stdout
    assert (
        "torch -" in run.stdout or "torch 2." in run.stdout
    )  # the version comes from metadata, not an import
