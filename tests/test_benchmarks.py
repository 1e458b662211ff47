"""Pieces of the benchmark scripts: the Fréchet distance, class coverage, settings, the results table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _script("quality_vs_steps")
backends = _script("compare_backends")


def test_frechet_distance_of_known_gaussians():
    fd = quality.frechet_distance
    assert fd([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)  # (0-3)² + (2-1)²
    assert fd([0, 0], np.diag([1.0, 4.0]), [1, 1], np.diag([9.0, 16.0])) == pytest.approx(10.0)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert fd([1, 2], cov, [1, 2], cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_matrix_square_root_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 6)), rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
    (mu1, cov1), (mu2, cov2) = quality.feature_stats(a), quality.feature_stats(b)
    root = linalg.sqrtm(cov1 @ cov2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root)
    assert quality.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
    assert quality.frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-8)


def test_class_coverage():
    uniform = np.eye(10)[np.arange(100) % 10]
    assert quality.class_coverage(uniform) == pytest.approx(1.0)
    assert quality.class_coverage(np.eye(10)[np.zeros(50, int)]) == 0.0
    two = np.eye(10)[np.arange(40) % 2]
    assert quality.class_coverage(two) == pytest.approx(np.log(2) / np.log(10))


def test_settings_parse_and_cover_the_issue():
    from dtk.runtime.samplers import SAMPLERS

    assert quality.parse_settings("ddpm:1000, unipc+karras:10") == (("ddpm", 1000), ("unipc+karras", 10))
    with pytest.raises(Exception, match="expected sampler:steps"):
        quality.parse_settings("ddim")
    with pytest.raises(Exception, match="unknown option 'fast'"):
        quality.parse_settings("ddim+fast:10")
    assert ("ddpm", 1000) in quality.SETTINGS
    for sampler in SAMPLERS[1:]:  # the curve of every sampler
        assert {(sampler, 5), (sampler, 10), (sampler, 20)} <= set(quality.SETTINGS)
    assert quality.split_setting("dpmpp-2m+karras+noclip") == (
        "dpmpp-2m",
        {"use_karras_sigmas": True, "clip_sample": False},
    )


def test_goal_is_the_best_setting_within_ten_evaluations():
    rows = [
        {"sampler": "ddpm", "steps": 1000, "nfe": 1000, "frechet_distance": 4.0},
        {"sampler": "ddim", "steps": 10, "nfe": 10, "frechet_distance": 6.0},
        {"sampler": "unipc", "steps": 10, "nfe": 10, "frechet_distance": 4.3},
        {"sampler": "unipc", "steps": 20, "nfe": 20, "frechet_distance": 3.9},
    ]
    goal = quality.goal(rows)
    assert goal["best"] == {"sampler": "unipc", "steps": 10, "frechet_distance": 4.3}
    assert goal["target"] == pytest.approx(4.4) and goal["ratio"] == pytest.approx(1.075) and goal["met"]
    assert quality.goal(rows[1:]) is None  # no DDPM-1000 reference


def test_bundle_views_set_options_on_the_manifest(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "dtk.json").write_text('{"diffusion": {"clip_sample": true}}')
    (bundle / "unet.onnx").write_bytes(b"onnx")
    view = quality.bundle_with(bundle, {"clip_sample": False}, tmp_path / "views")
    assert (view / "unet.onnx").read_bytes() == b"onnx" and (view / "unet.onnx").is_symlink()
    assert '"clip_sample": false' in (view / "dtk.json").read_text()
    assert (bundle / "dtk.json").read_text() == '{"diffusion": {"clip_sample": true}}'  # untouched
    assert quality.bundle_with(bundle, {}, tmp_path / "views") == bundle


def test_digits_classifier_shapes():
    import torch

    model = quality.digits_classifier(channels=1, image_size=16)
    logits, hidden = model(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10) and hidden.shape == (3, 64)


def test_backends_markdown_names_the_machine_and_the_speedup():
    record = {
        "backend": "torch",
        "batch": 1,
        "precision": "fp32",
        "transfers": "host",
        "latency_ms": {
            "min": 9.0,
            "mean": 10.0,
            "p50": 10.0,
            "p90": 11.0,
            "p95": 11.0,
            "p99": 12.0,
            "max": 13.0,
        },
        "throughput": {"calls_per_s": 100.0, "images_per_s": 100.0},
    }
    faster = {**record, "backend": "onnxruntime", "latency_ms": {**record["latency_ms"], "p50": 4.0}}
    data = {
        "machine": "cpu-test-2c",
        "system": {
            "platform": "Linux",
            "python": "3.11",
            "cpu": {"model": "Test CPU", "cores": 2, "usable_cores": 2, "memory_gib": 4.0},
            "gpus": [],
            "jetson": None,
            "versions": {"onnxruntime": "1.0"},
        },
        "settings": {"warmup": "1s", "iterations": 20, "duration": 5.0, "threads": None, "compile": False},
        "presets": {
            "tiny": {
                "parameters": 687347,
                "shape": "3x16x16",
                "batches": [
                    {
                        "batch": 1,
                        "results": [record, faster],
                        "skipped": [{"backend": "tensorrt", "reason": "x"}],
                    }
                ],
            }
        },
    }
    text = backends.markdown(data)
    assert text.startswith("# Backends on cpu-test-2c")
    assert "- **system**: Test CPU, 2/2 cores, 4.0 GiB" in text
    assert "## tiny (687,347 parameters, 3x16x16)" in text
    assert "| onnxruntime | 1 | fp32 | host | 4.000 | 10.000 | 12.000 | 100.0 | 100.0 | 2.50x |" in text
    assert "| tensorrt | skipped: x |" in text
    assert "fraction of peak" not in text  # no peaks measured: no roof table

    int8 = {**record, "backend": "onnxruntime", "precision": "int8", "latency_ms": {**record["latency_ms"]}}
    data["peaks"] = {"fp32": {"gops": 200.0}, "int8": {"gops": 400.0}}
    data["presets"]["tiny"]["flops_per_image"] = 1e9
    data["presets"]["tiny"]["batches"][0]["results"].append(int8)
    text = backends.markdown(data)
    assert "| onnxruntime | 1 | fp32 | 250.0 | 200.0 | 1.25 |" in text  # 1 GFLOP in 4 ms against 200 GOP/s
    assert "| onnxruntime | 1 | int8 | 100.0 | 400.0 | 0.25 |" in text  # int8 against the int8 GEMM peak
    naive = {**int8, "precision": "int8-naive", "latency_ms": {**record["latency_ms"], "p50": 5.0}}
    data["presets"]["tiny"]["batches"][0]["results"].append(naive)
    assert "| onnxruntime | 1 | int8-naive | 200.0 | 400.0 | 0.50 |" in backends.markdown(data)
    assert backends.has_bf16({"cpu": {"features": ["avx2", "avx512_bf16"]}})
    assert not backends.has_bf16({"cpu": {"features": ["avx2", "fma"]}})
    assert not backends.has_bf16({"cpu": {}})


def test_serve_summary_goals_and_table():
    serve = _script("serve")
    row = serve.summarize([0.1, 0.2, 0.3, 0.4], elapsed_s=2.0, images=4)
    assert row == {
        "images": 4,
        "seconds": 2.0,
        "images_per_s": 2.0,
        "latency_ms": {"p50": 250.0, "p99": 397.0},
    }
    lat = {"p50": 100.0, "p99": 120.0}
    data = {
        "machine": "cpu-test-2c",
        "system": {
            "cpu": {"model": "Test CPU", "usable_cores": 2, "cores": 2},
            "platform": "Linux",
            "python": "3.11",
            "gpus": [],
            "jetson": None,
            "versions": {},
        },
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [2.0, 1.5, 1.0],
        "shape": "1x16x16",
        "server_version": "2.51.0",
        "settings": {
            "steps": 20,
            "sampler": "ddim",
            "max_batch": 16,
            "duration": 8.0,
            "threads": 0,
            "queue_delay_us": 2000,
        },
        "in_process": {
            "batch_1": {"images_per_s": 10.0, "latency_ms": lat},
            "batched": {"images_per_s": 50.0, "latency_ms": {"p50": 320.0, "p99": 330.0}},
        },
        "server": [
            {
                "clients": 1,
                "images_per_s": 9.5,
                "latency_ms": {"p50": 105.0, "p99": 130.0},
                "requests_per_run": 1.0,
            },
            {
                "clients": 16,
                "images_per_s": 45.0,
                "latency_ms": {"p50": 350.0, "p99": 400.0},
                "requests_per_run": 15.5,
            },
        ],
    }
    data["goals"] = serve.goals(data)
    assert data["goals"] == {"throughput_16_clients_vs_batched": 0.9, "latency_1_client_vs_batch_1": 1.05}
    table = serve.markdown(data)
    assert "| server, 16 client(s) | 45.0 | 350.0 | 400.0 | 15.5 |" in table
    assert "| in process, batch 16 | 50.0 | 320.0 | 330.0 | 16 |" in table
    assert "**0.9** (goal ≥ 0.8)" in table and "before / after: [1.0, 1.0, 1.0] / [2.0, 1.5, 1.0]" in table
    assert serve.goals({**data, "server": []})["throughput_16_clients_vs_batched"] is None


def test_gpu_check_dry_run_lists_every_step_and_exits_0():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check: GPU here: ")
    assert [line.split()[0] for line in lines[1:6]] == ["tests", "chain", "backends", "training", "footprint"]
    assert 'pytest -m "gpu or tensorrt"' in done.stdout and "--cuda-graph" in done.stdout
    limits = [int(line.split("(limit ")[1].split(" s)")[0]) for line in lines[1:6]]
    assert sum(limits) <= 8 * 60


def test_gpu_check_reads_junit_and_writes_its_table(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dtk_gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="b" name="gone"><skipped message="no gpu"/></testcase></testsuite></testsuites>'
    )
    assert check._junit_outcomes(junit) == {"a::ok": "passed", "a::bad": "failed", "b::gone": "skipped"}
    from dtk.runtime.system import system_info

    results = {
        "system": system_info(),
        "tensorrt": None,
        "steps": {
            "tests": {"status": "failed", "seconds": 9.5,
                      "counts": {"passed": 1, "failed": 1, "error": 0, "skipped": 1}},
            "chain": {"status": "passed", "seconds": 3.0, "runs": [
                {"cuda_graph": True, "max_abs_latent": 2e-6, "max_levels": 0}]},
            "training": {"status": "skipped", "reason": "20 s of the budget left"},
        },
    }  # fmt: skip
    table = check.format_markdown(results)
    assert "- TensorRT: not installed (TensorRT paths did not run)" in table
    assert "| tests | failed | 9.5 | passed 1, failed 1, error 0, skipped 1 |" in table
    assert "| chain | passed | 3.0 | graph True: max Δx 2.00e-06, 0 levels |" in table
    assert "| training | skipped | - | 20 s of the budget left |" in table


def test_footprint_times_the_generic_update_as_the_loop_ran_before(monkeypatch):
    from dtk.runtime.samplers import NoiseSource, host, make_plan, sample_loop, update
    from dtk.runtime.samplers.loop import generic_loop
    from dtk.runtime.schedule import DiffusionConfig

    footprint = _script("footprint")
    plan = make_plan("ddim", DiffusionConfig(), 8)
    start = NoiseSource(1).initial(2, (1, 3, 3))

    def denoise(x, t):
        return np.tanh(x) * 0.5

    x, x0_prev = start, np.zeros_like(start)
    for t, row in zip(plan.timesteps.tolist(), plan.coeffs.tolist(), strict=True):
        x, x0_prev = update(row, x, denoise(x, t), x0_prev, None, None)
    in_place = sample_loop(denoise, start, plan, None)
    monkeypatch.setattr(host, "host_loop", generic_loop)
    before = sample_loop(denoise, start, plan, None)
    np.testing.assert_array_equal(before, x)  # "before" is the generic update, bit for bit
    np.testing.assert_allclose(in_place, x, rtol=1e-6, atol=1e-6)  # ddim fuses: float32 rounding only
    times = {"bare": [1.0, 2.0], "sample": [1.02, 2.02], "inside": [1.0, 1.98], "loop": [0.5, 0.4]}
    summary = footprint.summarise_overhead(times, 50, "")
    assert summary["overhead_pct"] == pytest.approx((0.02 + 2.02 / 1.98 - 1) / 2 * 100)  # split
    assert summary["denoiser_ms"] == pytest.approx(1490.0)
    assert summary["overhead_vs_bare_pct"] == pytest.approx(1.5)  # median of +2 % and +1 %
    assert summary["overhead_of_minima_pct"] == pytest.approx(2.0)
    assert summary["loop_us_per_step"] == pytest.approx(0.4 / 50 * 1e6)


def test_footprint_splits_a_sample_into_the_denoiser_s_time_and_the_loop_s():
    """timed_denoiser sums the time inside the calls; its chain is the host loop calling the timer, as the
    ONNX Runtime backend's chain is on the CPU, never the backend's own. BusyDenoiser waits about as long as
    asked and returns zeros."""
    import time

    from toy_manifest import toy_manifest

    from dtk.runtime import Pipeline

    footprint = _script("footprint")
    manifest = toy_manifest(batch=(1, 1, 2), chw=(1, 2, 2))

    class Chained(footprint.FreeDenoiser):
        def run_chain(self, *args, **kwargs):
            raise AssertionError("the timer must keep the host loop")

        def __call__(self, sample, timestep):
            self.timesteps.append(timestep)
            time.sleep(0.002)
            return super().__call__(sample, timestep)

    chained = Chained((1, 2))
    chained.timesteps = []
    timed = footprint.timed_denoiser(chained)
    assert timed.batch_range == (1, 2)
    pipeline = Pipeline(manifest, timed)
    start = time.perf_counter()
    pipeline.sample(num=1, steps=4, sampler="ddim", seed=0)
    total = time.perf_counter() - start
    assert 4 * 0.002 <= timed.seconds < total  # four calls inside, the loop's own time outside
    assert chained.timesteps == pipeline.plan("ddim", 4).timesteps.tolist()  # int t, as the backend's chain
    busy = footprint.BusyDenoiser((1, 2), 0.001)
    start = time.perf_counter()
    out = busy(np.ones((1, 1, 2, 2), np.float32), np.zeros(1))
    assert not out.any() and 0.001 <= busy.seconds <= time.perf_counter() - start
