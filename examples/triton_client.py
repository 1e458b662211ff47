"""Ask a Triton server running `dtk_sampler` for images, many requests at once, and write them as a PNG grid.

Each request is one seed; the server batches concurrent requests into one sampling run. Needs
tritonclient[grpc] and dtk's core install (numpy, pillow) for the grid: no torch, no onnxruntime.

    dtk serve bundle/ &
    python triton_client.py --url 127.0.0.1:8001 --num 16 --concurrency 16 --out grid.png
    python triton_client.py --sampler ddpm --steps 100 --seed 1000 --out ddpm.png
    python triton_client.py --class 7 --guidance-scale 3 --out sevens.png    # a class-conditional bundle
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODEL = "dtk_sampler"


def request_image(
    client,
    seed: int,
    steps: int | None = None,
    sampler: str | None = None,
    eta=None,
    label: str | None = None,
    guidance_scale=None,
):
    """One image, uint8 [H, W, C], for `seed`; settings left as None take the model's defaults. `label`, a
    class name or index (class-conditional bundles), travels as the request parameter `class`."""
    import tritonclient.grpc as grpcclient

    inputs = [_input(grpcclient, "seed", [seed], np.int64)]
    if steps is not None:
        inputs.append(_input(grpcclient, "steps", [steps], np.int32))
    if eta is not None:
        inputs.append(_input(grpcclient, "eta", [eta], np.float32))
    if guidance_scale is not None:
        inputs.append(_input(grpcclient, "guidance_scale", [guidance_scale], np.float32))
    parameters = {"sampler": sampler} if sampler is not None else {}  # string parameters, never tensors
    if label is not None:
        parameters["class"] = str(label)
    outputs = [grpcclient.InferRequestedOutput("image")]
    result = client.infer(MODEL, inputs, outputs=outputs, parameters=parameters or None)
    return result.as_numpy("image")[0]


def _input(grpcclient, name: str, values, dtype):
    from tritonclient.utils import np_to_triton_dtype

    array = np.asarray(values, dtype=dtype).reshape(-1, 1)  # [batch, 1]
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def request_images(url: str, seeds, concurrency: int, **settings) -> tuple[np.ndarray, list[float]]:
    """Images for `seeds` from `concurrency` threads, one gRPC client each.

    → (uint8 [N, H, W, C], each request's latency in seconds)."""
    import tritonclient.grpc as grpcclient

    local = threading.local()

    def one(seed):
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
        start = time.perf_counter()
        image = request_image(local.client, seed, **settings)
        return image, time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, seeds))
    return np.stack([image for image, _ in results]), [latency for _, latency in results]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Request images from dtk_sampler and write a PNG grid.")
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC endpoint")
    parser.add_argument("--num", type=int, default=16, help="images (one request each)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; the others count up")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="ddpm, ddim or dpmpp-2m (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument(
        "--class", dest="label", default=None, help="class name or index (conditional bundles)"
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--out", default="grid.png", help="PNG grid to write")
    args = parser.parse_args(argv)

    from tritonclient.utils import InferenceServerException

    from dtk.runtime.images import save_grid

    seeds = range(args.seed, args.seed + args.num)
    start = time.perf_counter()
    try:
        images, latencies = request_images(
            args.url,
            seeds,
            args.concurrency,
            steps=args.steps,
            sampler=args.sampler,
            eta=args.eta,
            label=args.label,
            guidance_scale=args.guidance_scale,
        )
    except InferenceServerException as e:
        print(f"error: {args.url}: {e.message()}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    save_grid(images, args.out)
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
    rate = args.num / elapsed
    print(f"{args.num} images in {elapsed:.2f} s ({rate:.1f} images/s) from {args.concurrency} clients")
    print(f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
