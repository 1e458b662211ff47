"""dtk.runtime.bench: warm-up, the timing loop, statistics, the end-to-end split, the system header."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dtk.runtime import bench
from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop
from dtk.runtime.schedule import DiffusionConfig
from dtk.runtime.system import (
    cpu_info,
    format_system,
    gpu_info,
    jetson_info,
    machine_name,
    parse_nvidia_smi,
    parse_nvpmodel,
    system_info,
)


class FakeClock:
    """A clock that moves only when told to (and `tick` seconds on every read, when set)."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        value = self.now
        self.now += self.tick
        return value

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- warm-up and timing ---


@pytest.mark.parametrize(
    ("text", "runs", "seconds", "shown"),
    [
        ("10x", 10, 0.0, "10 runs"),
        (5, 5, 0.0, "5 runs"),
        ("200ms", 0, 0.2, "200 ms"),
        ("2s", 0, 2.0, "2000 ms"),
        (" 1.5 s ", 0, 1.5, "1500 ms"),
        ("3 runs", 3, 0.0, "3 runs"),
        ("0", 0, 0.0, "none"),
        ("500", 0, 0.5, "500 ms"),  # trtexec: a bare number is milliseconds
        ("1.5", 0, 0.0015, "1.5 ms"),
        ("10x", 10, 0.0, "10 runs"),
    ],
)
def test_warmup_parses_runs_and_times(text, runs, seconds, shown):
    warmup = bench.Warmup.parse(text)
    assert (warmup.runs, warmup.seconds) == (runs, pytest.approx(seconds))
    assert str(warmup) == shown


@pytest.mark.parametrize("text", ["abc", "1.5x", "-3", "10 minutes", ""])
def test_warmup_rejects_nonsense(text):
    with pytest.raises(DtkError, match="--warmup"):
        bench.Warmup.parse(text)


def test_timing_config_rejects_bad_counts():
    with pytest.raises(DtkError, match="--iterations"):
        bench.TimingConfig(iterations=0)
    with pytest.raises(DtkError, match="--duration"):
        bench.TimingConfig(duration_s=-1)


def test_time_calls_counts_warmup_runs_then_iterations():
    clock, calls = FakeClock(), []

    def call():
        calls.append(clock.now)
        clock.advance(0.004)  # every call takes 4 ms

    config = bench.TimingConfig(bench.Warmup(runs=3), iterations=5, duration_s=0.0)
    timing = bench.time_calls(call, config, clock=clock)
    assert timing.warmup_runs == 3
    assert timing.warmup_s == pytest.approx(0.012)
    np.testing.assert_allclose(timing.latencies_ms, [4.0] * 5)
    assert timing.wall_s == pytest.approx(0.020)
    assert len(calls) == 8


def test_time_calls_runs_until_both_iterations_and_duration():
    clock = FakeClock()
    timing = bench.time_calls(
        lambda: clock.advance(0.1),
        bench.TimingConfig(bench.Warmup(), iterations=2, duration_s=0.55),
        clock=clock,
    )
    assert timing.warmup_runs == 0
    assert len(timing.latencies_ms) == 6  # 0.6 s is the first total >= 0.55 s
    timing = bench.time_calls(
        lambda: clock.advance(0.1),
        bench.TimingConfig(bench.Warmup(), iterations=9, duration_s=0.1),
        clock=clock,
    )
    assert len(timing.latencies_ms) == 9


def test_time_calls_warms_up_for_a_time_with_at_least_one_call():
    clock = FakeClock()
    slow = bench.time_calls(
        lambda: clock.advance(1.0), bench.TimingConfig(bench.Warmup(seconds=0.2), 1, 0.0), clock=clock
    )
    assert slow.warmup_runs == 1  # one call already outlasts the warm-up time
    fast = bench.time_calls(
        lambda: clock.advance(0.03), bench.TimingConfig(bench.Warmup(seconds=0.2), 1, 0.0), clock=clock
    )
    assert fast.warmup_runs == 7  # 7 × 30 ms is the first total >= 200 ms


# --- statistics ---


def test_latency_stats_pin_percentiles():
    stats = bench.LatencyStats.from_samples(np.arange(1, 101, dtype=float)[::-1])
    assert stats.to_dict() == {
        "min": 1.0,
        "mean": 50.5,
        "p50": 50.5,
        "p90": 90.1,
        "p95": 95.05,
        "p99": 99.01,
        "max": 100.0,
    }
    assert stats.count == 100


def test_latency_stats_of_nothing_is_an_error():
    with pytest.raises(DtkError, match="no latencies"):
        bench.LatencyStats.from_samples([])


def test_throughput_from_mean_latency_and_batch():
    stats = bench.LatencyStats.from_samples([4.0, 6.0])
    throughput = bench.Throughput.from_stats(stats, batch=8)
    assert throughput.to_dict() == {"calls_per_s": 200.0, "images_per_s": 1600.0}


# --- end-to-end split ---


class SlowDenoiser:
    """Output = 0.1·x; each call moves the fake clock by `seconds`."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds, self.calls = clock, seconds, []

    def __call__(self, sample, timestep):
        self.calls.append(timestep.copy())
        self.clock.advance(self.seconds)
        return 0.1 * sample


def test_profile_sampling_host_loop_matches_sample_loop_and_splits_time():
    clock = FakeClock(tick=0.001)
    denoiser = SlowDenoiser(clock, 0.010)
    plan = make_plan("ddpm", DiffusionConfig(num_train_timesteps=50), 5)
    x, split = bench.profile_sampling(denoiser, plan, 2, (1, 4, 4), "float32", seed=3, clock=clock)

    source = NoiseSource(3)
    expected = sample_loop(
        lambda s, t: 0.1 * s, source.initial(2, (1, 4, 4)), plan, lambda i: source.step(2, (1, 4, 4))
    )
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    assert [c.dtype for c in denoiser.calls] == [np.float32] * 5
    np.testing.assert_array_equal([c[0] for c in denoiser.calls], plan.timesteps)

    assert split.path == "host loop"
    assert split.denoiser_ms == pytest.approx(5 * 11.0)  # 10 ms of work + one clock tick per call
    assert split.copies_ms == 0.0
    # DDPM draws noise on every step but the last: the host loop takes those four draws in one block
    assert split.noise_ms == pytest.approx(1.0)
    parts = split.denoiser_ms + split.update_ms + split.copies_ms + split.noise_ms
    assert split.total_ms == pytest.approx(parts)


def test_profile_sampling_estimates_copies_from_a_device_call():
    clock = FakeClock()
    plan = make_plan("ddim", DiffusionConfig(num_train_timesteps=50), 4)
    _, split = bench.profile_sampling(
        SlowDenoiser(clock, 0.010),
        plan,
        1,
        (1, 2, 2),
        "int64",
        on_host=False,
        device_call_ms=7.5,
        clock=clock,
    )
    assert split.denoiser_ms == pytest.approx(4 * 7.5)
    assert split.copies_ms == pytest.approx(4 * 2.5)
    _, unknown = bench.profile_sampling(
        SlowDenoiser(clock, 0.010), plan, 1, (1, 2, 2), "int64", on_host=False, clock=clock
    )
    assert unknown.copies_ms is None
    assert unknown.denoiser_ms == pytest.approx(40.0)


def test_profile_sampling_device_chain():
    clock = FakeClock()

    class ChainDenoiser:
        def run_chain(self, plan, x, noise, callback=None):
            for i, t in enumerate(plan.timesteps):
                clock.advance(0.003)
                if plan.needs_noise[i]:
                    noise(i)
                callback(i, int(t), x)
            return x + 1

    plan = make_plan("ddim", DiffusionConfig(num_train_timesteps=50), 6)
    steps = []
    x, split = bench.profile_sampling(
        ChainDenoiser(),
        plan,
        1,
        (1, 2, 2),
        "float32",
        chain=True,
        device_call_ms=2.0,
        callback=lambda i, t, x: steps.append(t),
        clock=clock,
    )
    assert steps == plan.timesteps.tolist()
    assert x.shape == (1, 1, 2, 2)
    assert split.path == "device chain"
    assert (split.total_ms, split.denoiser_ms, split.copies_ms) == (
        pytest.approx(18.0),
        pytest.approx(12.0),
        None,
    )
    assert split.update_ms == pytest.approx(6.0)


def test_mean_split_averages_and_keeps_unknowns():
    a = bench.SamplingSplit(10.0, 8.0, 1.0, None, 1.0, "host loop")
    b = bench.SamplingSplit(20.0, 16.0, 3.0, None, 1.0, "host loop")
    mean = bench.mean_split([a, b])
    assert (mean.total_ms, mean.denoiser_ms, mean.update_ms, mean.copies_ms) == (15.0, 12.0, 2.0, None)


# --- the machine ---

CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: fpu\n\nprocessor\t: 1\n"
MEMINFO = "MemTotal:       24684084 kB\nMemFree:        23767896 kB\n"


def test_cpu_info_reads_model_and_memory(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(CPUINFO)
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    info = cpu_info(tmp_path)
    assert info["model"] == "AMD EPYC 9654 96-Core Processor"
    assert info["memory_gib"] == 23.5
    assert info["usable_cores"] >= 1
    assert info["features"] == []  # "fpu" only: no matrix-math instructions named


@pytest.mark.parametrize(
    ("flags", "features", "name"),
    [
        ("flags\t\t: fpu sse2 avx2 fma", ["avx2", "fma"], "cpu-amd-epyc-2c-avx2"),
        (
            "flags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16",
            ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
            "cpu-amd-epyc-2c-avx512vnni",
        ),
        ("Features\t: fp asimd asimddp i8mm", ["asimd", "asimddp", "i8mm"], "cpu-amd-epyc-2c-i8mm"),
    ],
)
def test_the_cpu_s_int8_instructions_are_read_and_name_the_machine(tmp_path, flags, features, name):
    """One model name covers hosts with and without VNNI (int8 speeds differ): the tier tells them apart."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\n{flags}\n")
    info = cpu_info(tmp_path)
    assert info["features"] == features
    info["usable_cores"] = 2
    assert machine_name({"gpus": [], "jetson": None, "cpu": info}) == name
    system = {"cpu": {**info, "cores": 2}, "platform": "Linux", "python": "3.11"}
    assert f"({' '.join(features)})" in format_system(system)[0][1]


def test_parse_nvidia_smi():
    csv = "NVIDIA H100 80GB HBM3, 550.54.15, 81559, 9.0\nNVIDIA L4, 550.54.15, 23034, 8.9\n"
    banner = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
    gpus = parse_nvidia_smi(csv, banner)
    assert gpus[0] == {
        "name": "NVIDIA H100 80GB HBM3",
        "driver": "550.54.15",
        "cuda": "12.4",
        "memory_mib": 81559,
        "compute_capability": "9.0",
    }
    assert gpus[1]["name"] == "NVIDIA L4" and len(gpus) == 2


def test_gpu_info_falls_back_when_compute_cap_is_unknown():
    asked = []

    def run(cmd):
        asked.append(cmd)
        if any("compute_cap" in c for c in cmd):
            return None  # an old driver refuses the field
        return "Tesla T4, 470.82.01, 15109\n" if len(cmd) > 1 else "CUDA Version: 11.4"

    gpus = gpu_info(run)
    assert gpus == [{"name": "Tesla T4", "driver": "470.82.01", "cuda": "11.4", "memory_mib": 15109}]
    assert len(asked) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n", {"name": "MAXN", "id": 0}),
        ("NV Power Mode: 15W\n1", {"name": "15W", "id": 1}),
        ("NV Power Mode: MODE_30W_ALL", {"name": "MODE_30W_ALL", "id": None}),
        ("nvpmodel: not supported", {}),
    ],
)
def test_parse_nvpmodel(text, expected):
    assert parse_nvpmodel(text) == expected


def _fake_jetson(root):
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13\n"
    )
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    for cpu, khz in enumerate((2201600, 1497600)):
        freq = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        freq.mkdir(parents=True)
        (freq / "scaling_cur_freq").write_text(f"{khz}\n")
    gpu = root / "sys/class/devfreq/17000000.gpu"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("1300500000\n")
    (gpu / "max_freq").write_text("1300500000\n")
    (gpu / "min_freq").write_text("306000000\n")


def test_jetson_info_reads_power_mode_and_clocks(tmp_path):
    _fake_jetson(tmp_path)

    def run(cmd):
        return "NV Power Mode: MAXN\n0\n" if cmd == ["nvpmodel", "-q"] else None

    info = jetson_info(tmp_path, run)
    assert info == {
        "model": "NVIDIA Jetson AGX Orin Developer Kit",
        "l4t": "R36.4.0",
        "power_mode": {"name": "MAXN", "id": 0},
        "cpu_mhz": [2201, 1497],
        "gpu_clock": {"cur_mhz": 1300, "min_mhz": 306, "max_mhz": 1300},
        "emc_mhz": None,
    }
    system = {
        "cpu": {"model": "ARMv8 Processor rev 1 (v8l)", "cores": 12, "usable_cores": 12, "memory_gib": 61.4},
        "platform": "Linux-5.15.148-tegra-aarch64-with-glibc2.35",
        "python": "3.10.12",
        "gpus": [],
        "jetson": info,
        "versions": {"tensorrt": "10.3.0"},
    }
    rows = dict(format_system(system))
    assert rows["jetson"] == "NVIDIA Jetson AGX Orin Developer Kit, L4T R36.4.0, power mode MAXN (0)"
    assert rows["clocks"] == "CPU 2201 MHz ×2, GPU 1300 MHz (max 1300)"
    assert machine_name(system) == "jetson-nvidia-jetson-agx-orin-developer-kit"


def test_jetson_info_is_none_elsewhere(tmp_path):
    assert jetson_info(tmp_path, lambda cmd: None) is None


def test_system_info_reads_versions_without_importing_torch():
    code = (
        "import json, sys; from dtk.runtime.system import system_info; info = system_info(); "
        "loaded = {m: m in sys.modules for m in ('torch', 'onnxruntime')}; "
        "print(json.dumps({'info': info, **loaded}))"
    )
    out = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert out["torch"] is False and out["onnxruntime"] is False
    versions = out["info"]["versions"]
    assert versions["numpy"] == np.__version__
    assert versions["dtk"] == "0.1.0"
    assert set(versions) == {"numpy", "onnxruntime", "tensorrt", "torch", "cuda-python", "dtk"}


@pytest.mark.parametrize(
    ("system", "name"),
    [
        ({"gpus": [{"name": "NVIDIA H100 80GB HBM3"}], "jetson": None}, "gpu-nvidia-h100-80gb-hbm3"),
        ({"gpus": [], "jetson": None, "cpu": {"model": "AMD EPYC", "usable_cores": 2}}, "cpu-amd-epyc-2c"),
        (
            {"gpus": [], "jetson": None, "cpu": {"model": "Intel(R) Xeon(R) Gold 6248", "usable_cores": 8}},
            "cpu-intel-xeon-gold-6248-8c",
        ),
    ],
)
def test_machine_name(system, name):
    assert machine_name(system) == name


# --- reports ---


def _record(backend, batch, p50, mean=None):
    mean = mean or p50
    return {
        "backend": backend,
        "batch": batch,
        "precision": "fp32",
        "transfers": "host",
        "latency_ms": {
            "min": p50,
            "mean": mean,
            "p50": p50,
            "p90": p50,
            "p95": p50,
            "p99": p50 * 1.5,
            "max": p50,
        },
        "throughput": {"calls_per_s": 1000 / mean, "images_per_s": batch * 1000 / mean},
    }


def test_comparison_shows_speedup_over_torch_eager_and_skipped_reasons():
    records = [_record("torch", 1, 12.0), _record("onnxruntime", 1, 5.0), _record("onnxruntime", 8, 30.0)]
    skipped = [{"backend": "tensorrt", "reason": "TensorRT is not installed"}]
    rows = bench.comparison_rows(records, skipped)
    assert rows[0][-1] == "1.00x"
    assert rows[1][-1] == "2.40x"
    assert rows[2][-1] == "n/a"  # no torch record at batch 8
    assert rows[3] == ["tensorrt", "skipped: TensorRT is not installed"]
    text = bench.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["backend", "batch", "precision"]
    assert lines[2].split() == [
        "onnxruntime",
        "1",
        "fp32",
        "host",
        "5.000",
        "5.000",
        "7.500",
        "200.0",
        "200.0",
        "2.40x",
    ]
    assert lines[4].startswith("tensorrt") and lines[4].endswith("skipped: TensorRT is not installed")
    markdown = bench.format_table(rows, markdown=True).splitlines()
    assert markdown[1].count("---") == len(bench.COMPARISON_COLUMNS)
    assert markdown[5].startswith("| tensorrt | skipped: TensorRT is not installed |")


def test_bench_result_record_and_report():
    clock = FakeClock()
    config = bench.TimingConfig(bench.Warmup(runs=1), iterations=4, duration_s=0)
    timing = bench.time_calls(lambda: clock.advance(0.005), config, clock=clock)
    result = bench.BenchResult(
        backend="onnxruntime",
        batch=4,
        precision="fp32",
        inputs={
            "sample": {"shape": [4, 1, 16, 16], "dtype": "float32"},
            "timestep": {"shape": [4], "dtype": "float32"},
        },
        transfers="host",
        timing=timing,
        config=config,
        detail={"source": "bundle", "threads": 2},
        end_to_end={
            "steps": 10,
            "sampler": "ddim",
            "batch": 4,
            "runs": 1,
            "path": "host loop",
            "split_ms": {
                "total_ms": 60.0,
                "denoiser_ms": 50.0,
                "update_ms": 9.0,
                "copies_ms": 0.0,
                "noise_ms": 1.0,
            },
            "per_step_ms": 6.0,
            "images_per_s": 66.7,
        },
        system=system_info(),
    )
    record = json.loads(json.dumps(result.to_dict()))
    assert record["latency_ms"] == {
        "min": 5.0,
        "mean": 5.0,
        "p50": 5.0,
        "p90": 5.0,
        "p95": 5.0,
        "p99": 5.0,
        "max": 5.0,
    }
    assert record["throughput"] == {"calls_per_s": 200.0, "images_per_s": 800.0}
    assert record["transfers_included"] is False
    assert record["warmup"] == {"setting": "1 runs", "runs": 1, "seconds": 0.005}
    assert {"backend", "batch", "precision", "system"} <= set(record)
    report = bench.format_result(result)
    assert "throughput  200.0 calls/s, 800.0 images/s" in report
    assert "none: the backend runs on host memory" in report
    assert "denoiser 50.000 (83.3%) | sampler update 9.000 (15.0%) | copies 0.000 (0.0%)" in report
    assert "10 ddim steps × batch 4 (host loop, mean of 1 run): 60.000 ms, 66.70 images/s" in report
    assert "timing      warm-up 1 runs in 0.01 s; 4 calls in 0.02 s" in report
    assert report.splitlines()[0].startswith("system")
