"""Sample images from a dtk bundle on an edge device, write them as a PNG grid, and print where time went.

Copy this file into your application. It needs numpy, pillow, and onnxruntime or TensorRT: no torch.

    python edge_app.py bundle/ --num 16 --steps 50 --sampler ddim --out samples.png
    python edge_app.py bundle/unet.plan --backend tensorrt        # a Jetson with an engine built on it
"""

from __future__ import annotations

import argparse
import sys
import time

from dtk.runtime import DtkError, Pipeline
from dtk.runtime.images import save_grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Sample a dtk bundle and write a PNG grid.")
    parser.add_argument("bundle", help="bundle directory, or its unet.onnx / unet.plan")
    parser.add_argument("--num", type=int, default=16, help="images to sample")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim", "dpmpp-2m"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    args = parser.parse_args(argv)

    denoiser_steps = 0

    def count_steps(done, total):  # called after every denoising step; a progress bar would go here
        nonlocal denoiser_steps
        denoiser_steps = done

    try:
        start = time.perf_counter()
        with Pipeline.load(args.bundle, backend=args.backend) as pipe:
            loaded = time.perf_counter()
            pipe.sample(num=1, steps=2, sampler=args.sampler, seed=args.seed)  # warm-up: first runs allocate
            warmed = time.perf_counter()
            images = pipe.sample(
                num=args.num, steps=args.steps, sampler=args.sampler, seed=args.seed, callback=count_steps
            )
            sampled = time.perf_counter()
            backend = pipe.backend
        path = save_grid(images, args.out)
    except DtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    written = time.perf_counter()

    sample_ms = (sampled - warmed) * 1000
    print(f"backend  {backend}")
    print(f"load     {(loaded - start) * 1000:8.1f} ms")
    print(f"warm-up  {(warmed - loaded) * 1000:8.1f} ms")
    print(
        f"sample   {sample_ms:8.1f} ms  {args.num} images x {args.steps} steps ({args.sampler}): "
        f"{sample_ms / args.num:.1f} ms/image, {sample_ms / denoiser_steps:.2f} ms per batched step"
    )
    print(f"write    {(written - sampled) * 1000:8.1f} ms  {path} ({images.shape[2]}x{images.shape[1]} each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
