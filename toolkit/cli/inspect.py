"""`dtk inspect PATH`: describe a checkpoint (model.pt), a bundle directory, an .onnx or a .plan."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of the text.")
def command(path: Path, as_json: bool):
    """Describe PATH: a dtk checkpoint or run folder (config, parameters, step, schedule), a bundle directory
    (I/O, batch, precision, opset, parity results, schedule, source, file sizes and hashes), an .onnx (I/O,
    opset, nodes, files) or a .plan with its unet.plan.json sidecar (TensorRT version, GPU, profiles). Exits
    non-zero when a bundle's files do not match the hashes recorded at export."""
    from dtk.export.inspect import describe, format_description, mismatches
    from dtk.runs import checkpoint_or_run
    from dtk.runtime.errors import file_error

    path = checkpoint_or_run(path)
    if path.is_file() and path.suffix not in (".onnx", ".plan", ".json"):
        from dtk.checkpoint import describe_checkpoint, load_checkpoint

        info = describe_checkpoint(load_checkpoint(path))
    else:
        info = describe(path)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_description(info))
    problems = mismatches(info)
    if problems:
        raise file_error(path, "; ".join(problems))
