"""`dtk serve BUNDLE`: the bundle on a local Triton Inference Server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import click

from dtk.cli.serve_options import serve_options


class _Stop(Exception):
    """SIGTERM, turned into an exception so the server is stopped on the way out."""


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: all).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: free.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: free.")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0: free."
)
@click.option(
    "--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Model instances."
)
@click.option(
    "--kind",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="instance_group kind (gpu: one set of instances per GPU, CUDA or TensorRT).",
)
@serve_options
def command(bundle, host, http_port, grpc_port, metrics_port, instances, kind, serve_steps, serve_sampler):
    """Serve BUNDLE as the Triton model `dtk_sampler` (whole-image requests; docs/serving.md has the
    contract): write a temporary repository, start `tritonserver` (from PATH, or the one in the
    nvidia-pytriton wheel), wait until it is ready and print the endpoints. Ctrl-C or SIGTERM stops it and
    removes what it made."""
    from dtk.export.triton import SamplerOptions, write_sampler_model
    from dtk.export.triton_server import ServerOptions, TritonServer
    from dtk.runtime.errors import DtkError

    def on_sigterm(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    repo = Path(tempfile.mkdtemp(prefix="dtk-serve-repo-"))
    server = None
    try:
        options = SamplerOptions(steps=serve_steps, sampler=serve_sampler, kind=kind, instances=instances)
        write_sampler_model(bundle, repo, options)
        server = TritonServer(repo, ServerOptions(host, http_port, grpc_port, metrics_port))
        click.echo(f"starting tritonserver for {bundle} ({instances} {kind} instance(s)) ...")
        server.start()
        click.echo(_banner(server, serve_steps, serve_sampler))
        while server.process.poll() is None:
            time.sleep(0.5)
        raise DtkError(f"tritonserver exited with status {server.process.returncode}:\n{server.log_tail()}")
    except (KeyboardInterrupt, _Stop):
        click.echo("stopping tritonserver ...")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(repo, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    click.echo("stopped")


def _banner(server, steps: int, sampler: str) -> str:
    http, grpc = server.http_url, server.grpc_url
    body = '{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [0]}]}'
    return "\n".join(
        [
            f"ready: model dtk_sampler (default {steps} {sampler} steps)",
            f"  HTTP     http://{http}   (readiness: /v2/health/ready)",
            f"  gRPC     {grpc}",
            f"  metrics  {server.metrics_url}",
            "a client (16 concurrent requests, a grid of the images):",
            f"  python examples/triton_client.py --url {grpc} --num 16 --out grid.png",
            "or one image as JSON:",
            f"  curl -s http://{http}/v2/models/dtk_sampler/infer -d '{body}'",
            "Ctrl-C stops the server.",
        ]
    )
