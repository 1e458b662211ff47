"""What a CPU user would compare dtk against, each measured in its own process: OpenVINO on a bundle's ONNX
graph (fp32, or with the bf16 inference hint; on an int8 bundle OpenVINO runs its Q/DQ graph with its own
int8 kernels), the naive int8 graph a user gets from `onnxruntime.quantization.quantize_static` on the fp32
bundle (every Conv/MatMul/Gemm quantized, random calibration: the speed reference for dtk's int8, which keeps
some layers in float), and this machine's GEMM peaks (fp32 and bf16 in torch, int8 in ONNX Runtime's
MatMulInteger), which benchmarks/compare_backends.py uses to express latencies as fractions (bf16 only where
the CPU has bf16 instructions: emulated, torch's bf16 GEMM ran for minutes).

    python benchmarks/cpu_peers.py openvino BUNDLE --batch 8 --precision bf16 --duration 5
    python benchmarks/cpu_peers.py naive-int8 FP32_BUNDLE --batch 8
    python benchmarks/cpu_peers.py gemm int8

Each prints one JSON record on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

GEMM_SIZE = 2048


def timed(call, warmup_s: float, duration_s: float, iterations: int) -> list[float]:
    """Latencies (ms) of `call` after `warmup_s` of warm-up: at least `iterations` calls and `duration_s`."""
    end = time.perf_counter() + warmup_s
    call()
    while time.perf_counter() < end:
        call()
    latencies = []
    end = time.perf_counter() + duration_s
    while len(latencies) < iterations or time.perf_counter() < end:
        start = time.perf_counter()
        call()
        latencies.append(1000 * (time.perf_counter() - start))
    return latencies


def openvino_record(bundle: str, batch: int, precision: str, threads: int | None, args) -> dict:
    """OpenVINO on unet.onnx, as `dtk bench` records a backend (latency per denoiser call)."""
    import openvino as ov

    from dtk.runtime.bench import LatencyStats, Throughput
    from dtk.runtime.manifest import resolve_bundle

    bundle_dir, manifest = resolve_bundle(bundle)
    core = ov.Core()
    model = core.read_model(str(bundle_dir / manifest.onnx))
    shape = (batch, manifest.in_channels, *manifest.image_size)
    model.reshape({manifest.inputs[0].name: shape, manifest.inputs[1].name: (batch,)})
    config = {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    graph = manifest.precision  # an int8 bundle's Q/DQ graph runs on OpenVINO's int8 kernels
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feed = {
        manifest.inputs[0].name: rng.standard_normal(shape, dtype=np.float32),
        manifest.inputs[1].name: np.linspace(0, 999, batch, dtype=np.float32),
    }
    latencies = timed(lambda: request.infer(feed), args.warmup, args.duration, args.iterations)
    stats = LatencyStats.from_samples(latencies)
    return {
        "backend": "openvino",
        "batch": batch,
        "precision": "int8" if graph == "int8" else precision,
        "transfers": "host",
        "latency_ms": stats.to_dict(),
        "throughput": Throughput.from_stats(stats, batch).to_dict(),
        "iterations": stats.count,
        "detail": {"openvino": ov.__version__, "hint": config["INFERENCE_PRECISION_HINT"]},
    }


def naive_int8_record(bundle: str, batch: int, threads: int | None, args) -> dict:
    """ONNX Runtime on `quantize_static` of the fp32 bundle's graph: QDQ, per-channel int8 weights, int8
    activations, Conv/MatMul/Gemm, calibrated on random inputs (speed does not depend on the calibration)."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from dtk.runtime.bench import LatencyStats, Throughput
    from dtk.runtime.manifest import resolve_bundle

    bundle_dir, manifest = resolve_bundle(bundle)
    if manifest.precision != "fp32":
        raise SystemExit(f"{bundle}: naive-int8 quantizes an fp32 bundle, this one is {manifest.precision}")
    shape = (batch, manifest.in_channels, *manifest.image_size)
    rng = np.random.default_rng(0)
    names = [manifest.inputs[0].name, manifest.inputs[1].name]

    def feed():
        t = rng.integers(0, 1000, batch).astype(manifest.inputs[1].dtype)
        return {names[0]: rng.standard_normal(shape, dtype=np.float32), names[1]: t}

    class Random(CalibrationDataReader):
        def __init__(self):
            self.left = 4

        def get_next(self):
            self.left -= 1
            return feed() if self.left >= 0 else None

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/naive-int8.onnx"
        quantize_static(
            str(bundle_dir / manifest.onnx),
            path,
            Random(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = feed()
    latencies = timed(lambda: session.run(None, inputs), args.warmup, args.duration, args.iterations)
    stats = LatencyStats.from_samples(latencies)
    return {
        "backend": "onnxruntime",
        "batch": batch,
        "precision": "int8-naive",
        "transfers": "host",
        "latency_ms": stats.to_dict(),
        "throughput": Throughput.from_stats(stats, batch).to_dict(),
        "iterations": stats.count,
        "detail": {"graph": "quantize_static: QDQ, per-channel, Conv/MatMul/Gemm, random calibration"},
    }


def gemm_record(kind: str, threads: int, args) -> dict:
    """The best rate of one GEMM_SIZE² GEMM: torch fp32/bf16, or ONNX Runtime MatMulInteger (int8)."""
    n = GEMM_SIZE
    if kind == "int8":
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
            "gemm",
            [
                helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                helper.make_tensor_value_info("b", TensorProto.INT8, [n, n]),
            ],
            [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {
            "a": rng.integers(0, 256, (n, n), dtype=np.uint8),
            "b": rng.integers(-128, 128, (n, n), dtype=np.int8),
        }
        latencies = timed(lambda: session.run(None, feed), args.warmup, args.duration, args.iterations)
        library = f"onnxruntime {ort.__version__} MatMulInteger"
    else:
        import torch

        torch.set_num_threads(threads)
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        latencies = timed(lambda: a @ b, args.warmup, args.duration, args.iterations)
        library = f"torch {torch.__version__} matmul"
    best = min(latencies)
    return {
        "kind": kind,
        "size": n,
        "threads": threads,
        "library": library,
        "best_ms": round(best, 3),
        "gops": round(2 * n**3 / best / 1e6, 1),  # 2 operations per multiply-add
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["openvino", "naive-int8", "gemm"])
    parser.add_argument("target", help="openvino, naive-int8: a bundle; gemm: fp32, bf16 or int8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    if args.what == "openvino":
        record = openvino_record(args.target, args.batch, args.precision, args.threads, args)
    elif args.what == "naive-int8":
        record = naive_int8_record(args.target, args.batch, args.threads, args)
    else:
        record = gemm_record(args.target, args.threads, args)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
