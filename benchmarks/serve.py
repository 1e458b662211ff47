"""Serving against sampling in process: images/s and latency of `dtk_sampler` on a local tritonserver at 1, 4,
16 and 64 concurrent clients, next to `Pipeline.sample` at batch 1 and at the bundle's largest batch.

The model is the `tiny` U-Net with random weights (speed does not depend on what was learned), exported with
batch 1..16; every run uses the same sampler, steps and ONNX Runtime threads. The server runs one
instance; each client is a thread with its own gRPC connection sending one-image requests back to back.
Goals (issue 10): at 16 clients at least 0.8x the in-process batched throughput, at 1 client a p50 latency
within 10% of the in-process batch-1 call.

    python benchmarks/serve.py                            # this machine, defaults below
    python benchmarks/serve.py --duration 2 --clients 1 16   # a quick look

Writes benchmarks/results/serve-<machine>.json, .md and .png (the machine and its load average in each).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLIENTS = (1, 4, 16, 64)
MAX_BATCH = 16


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarize(latencies_s, elapsed_s: float, images: int) -> dict:
    """images/s over the wall time, and latency percentiles in ms (linear interpolation between ranks)."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    return {
        "images": images,
        "seconds": round(elapsed_s, 3),
        "images_per_s": round(images / elapsed_s, 2),
        "latency_ms": {k: round(float(np.percentile(ms, q)), 3) for k, q in (("p50", 50), ("p99", 99))},
    }


def in_process(pipe, batch: int, settings: dict, duration: float) -> dict:
    """`Pipeline.sample(num=batch)` back to back for `duration` seconds (after one warm-up run)."""
    pipe.sample(num=batch, seed=0, **settings)
    latencies, start, seed = [], time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        pipe.sample(num=batch, seed=seed, **settings)
        latencies.append(time.perf_counter() - t)
        seed += batch
    return summarize(latencies, time.perf_counter() - start, batch * len(latencies))


def served(url: str, clients: int, duration: float, request_image, counts) -> dict:
    """`clients` threads, each with its own gRPC client, sending requests back to back for `duration` s.

    `counts()` → the model's (requests, sampling runs) so far: their ratio over the row is the batching."""
    import tritonclient.grpc as grpcclient

    latencies, lock, counter = [], threading.Lock(), iter(range(10**9))
    connections = [grpcclient.InferenceServerClient(url) for _ in range(clients)]
    for connection in connections[:1]:
        request_image(connection, 0)  # warm-up
    requests_before, runs_before = counts()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(connection):
        barrier.wait()
        mine = []
        while time.perf_counter() < stop_at[0]:
            with lock:
                seed = next(counter)
            t = time.perf_counter()
            request_image(connection, seed)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + duration
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for connection in connections:
        connection.close()
    requests, runs = counts()
    row = summarize(latencies, elapsed, len(latencies))
    row["requests_per_run"] = round((requests - requests_before) / max(1, runs - runs_before), 2)
    return row


def goals(data: dict) -> dict:
    """The issue's two ratios from the measured numbers (None where a run is missing)."""
    local, server = data["in_process"], {r["clients"]: r for r in data["server"]}
    batched, single = local.get("batched"), local.get("batch_1")
    at16, at1 = server.get(16), server.get(1)
    throughput = at16["images_per_s"] / batched["images_per_s"] if at16 and batched else None
    latency = at1["latency_ms"]["p50"] / single["latency_ms"]["p50"] if at1 and single else None
    return {
        "throughput_16_clients_vs_batched": None if throughput is None else round(throughput, 3),
        "latency_1_client_vs_batch_1": None if latency is None else round(latency, 3),
    }


def markdown(data: dict) -> str:
    from dtk.runtime.system import format_system

    s = data["settings"]
    lines = [f"# dtk_sampler on Triton against the in-process Pipeline, {data['machine']}", ""]
    lines += [f"- **{label}**: {text}" for label, text in format_system(data["system"])]
    lines += [
        f"- **load average** before / after: {data['load_before']} / {data['load_after']}",
        f"- **model**: tiny U-Net, {data['shape']}, batch 1..{s['max_batch']}; {s['steps']} {s['sampler']} "
        f"steps; ONNX Runtime threads {s['threads'] or 'default'}; {s['duration']} s per row",
        f"- **server**: tritonserver {data['server_version']}, 1 instance, max queue delay "
        f"{s['queue_delay_us']} µs; one gRPC client per thread, one image per request",
        "",
        "| run | images/s | p50 ms | p99 ms | images per sampling run |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    local = data["in_process"]
    rows = [
        ("in process, batch 1", local["batch_1"]),
        (f"in process, batch {s['max_batch']}", local["batched"]),
    ]
    rows += [(f"server, {r['clients']} client(s)", r) for r in data["server"]]
    for label, r in rows:
        lat, per_run = r["latency_ms"], r.get("requests_per_run", label.split()[-1])
        lines.append(
            f"| {label} | {r['images_per_s']:.1f} | {lat['p50']:.1f} | {lat['p99']:.1f} | {per_run} |"
        )
    g = data["goals"]
    lines += [
        "",
        f"- 16 clients / in-process batched throughput: **{g['throughput_16_clients_vs_batched']}** "
        "(goal ≥ 0.8)",
        f"- 1 client / in-process batch-1 p50 latency: **{g['latency_1_client_vs_batch_1']}** (goal ≤ 1.1)",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtk.runtime.files import atomic_path

    server, local = data["server"], data["in_process"]
    clients = [r["clients"] for r in server]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(clients, [r["images_per_s"] for r in server], "o-", label="server")
    left.axhline(local["batch_1"]["images_per_s"], color="C1", ls="--", label="in process, batch 1")
    batched = f"in process, batch {data['settings']['max_batch']}"
    left.axhline(local["batched"]["images_per_s"], color="C2", ls="--", label=batched)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", ylim=(0, None))
    left.set_xticks(clients, [str(c) for c in clients])
    right.plot(clients, [r["latency_ms"]["p50"] for r in server], "o-", label="server p50")
    right.plot(clients, [r["latency_ms"]["p99"] for r in server], "s:", color="C0", label="server p99")
    right.axhline(local["batch_1"]["latency_ms"]["p50"], color="C1", ls="--", label="in process, batch 1 p50")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency per request, ms")
    right.set_xticks(clients, [str(c) for c in clients])
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.suptitle(f"dtk_sampler on Triton, {data['machine']} (load {data['load_before']})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per row")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import os

    import tritonclient.http as httpclient

    from dtk.export.triton import SamplerOptions, write_sampler_model
    from dtk.export.triton_server import TritonServer
    from dtk.runtime import Pipeline
    from dtk.runtime.files import write_text
    from dtk.runtime.system import machine_name, system_info

    backends = _module(HERE / "compare_backends.py", "benchmarks_compare_backends")
    client = _module(HERE.parent / "examples" / "triton_client.py", "examples_triton_client")
    settings = {"steps": args.steps, "sampler": args.sampler}
    load_before = [round(v, 2) for v in os.getloadavg()]
    system = system_info()
    data = {
        "machine": machine_name(system),
        "system": system,
        "load_before": load_before,
        "settings": {
            **settings,
            "max_batch": MAX_BATCH,
            "duration": args.duration,
            "threads": args.threads,
            "queue_delay_us": args.queue_delay_us,
        },
        "in_process": {},
        "server": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("== tiny: random-weight checkpoint, export", file=sys.stderr)
        checkpoint = backends.make_checkpoint("tiny", work / "tiny.pt")
        bundle = backends.export(checkpoint, work / "bundle", MAX_BATCH)
        with Pipeline.load(bundle, threads=args.threads or None) as pipe:
            data["shape"] = "x".join(map(str, pipe.sample_shape))
            for name, batch in (("batch_1", 1), ("batched", MAX_BATCH)):
                print(f"== in process, batch {batch}", file=sys.stderr)
                data["in_process"][name] = in_process(pipe, batch, settings, args.duration)
        options = SamplerOptions(
            steps=args.steps,
            sampler=args.sampler,
            threads=args.threads,
            max_queue_delay_us=args.queue_delay_us,
        )
        write_sampler_model(bundle, work / "repo", options)
        with TritonServer(work / "repo") as server:
            http = httpclient.InferenceServerClient(server.http_url)
            data["server_version"] = http.get_server_metadata()["version"]

            def counts():
                stats = http.get_inference_statistics("dtk_sampler")["model_stats"][0]
                return stats["inference_count"], stats["execution_count"]

            for clients in args.clients:
                print(f"== server, {clients} client(s)", file=sys.stderr)
                row = served(server.grpc_url, clients, args.duration, client.request_image, counts)
                data["server"].append({"clients": clients, **row})
    data["load_after"] = [round(v, 2) for v in os.getloadavg()]
    data["goals"] = goals(data)

    import json

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{data['machine']}"
    write_text(stem.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), markdown(data))
    plot(data, stem.with_suffix(".png"))
    print(markdown(data))


if __name__ == "__main__":
    main()
