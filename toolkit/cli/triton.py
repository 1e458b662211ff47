"""`dtk triton BUNDLE REPO` (or `-o REPO`): a Triton Inference Server repository for an existing bundle."""

from __future__ import annotations

import click

from dtk.cli.serve_options import serve_options


@click.command("triton")
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("repo", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=str),
    help="The repository (or give REPO).",
)
@serve_options
@click.option(
    "--kind",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="instance_group kind of both models.",
)
@click.option(
    "--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Instances of each model."
)
def command(bundle, repo, out, serve_steps, serve_sampler, kind, instances):
    """Write REPO/dtk_sampler (whole-image requests: seed in, image out; the sampling loop runs in the server,
    on dtk.runtime in Triton's Python backend) and REPO/dtk_unet (the denoiser alone, for the ONNX Runtime or
    TensorRT backend). Other models in REPO are left as they are."""
    from dtk.export.triton import SamplerOptions, TritonOptions, write_serving_repository

    if (repo is None) == (out is None):
        raise click.UsageError("give the repository once: as REPO or as -o/--out")
    repo = repo or out

    for model_dir in write_serving_repository(
        bundle,
        repo,
        SamplerOptions(steps=serve_steps, sampler=serve_sampler, kind=kind, instances=instances),
        TritonOptions(kind=kind, instances=instances),
    ):
        click.echo(f"wrote Triton model {model_dir}")
