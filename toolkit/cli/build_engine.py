"""`dtk build-engine BUNDLE`: build the bundle's TensorRT plan on this GPU (flags map to EngineOptions)."""

from __future__ import annotations

import click

from dtk.cli.engine_options import engine_options, engine_options_from_flags


@click.command("build-engine")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Engine precision (default: the ONNX graph's). TensorRT 11 only builds the ONNX's own precision; "
    "int8 only from an int8 bundle.",
)
@engine_options()
@click.option(
    "--no-verify", is_flag=True, help="Skip comparing the engine with ONNX Runtime (not recommended)."
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Engine check: absolute tolerance per output element [fp32 2e-4, fp16 2e-2].",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Engine check: relative tolerance per output element [fp32 1e-3, fp16 2e-2].",
)
@click.option(
    "--chain-atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Engine check: bound on the 20-step chain's final |Δ| per max(1, |sample|) [fp32 1e-3, fp16 1e-1].",
)
@click.option("--verbose", is_flag=True, help="Show TensorRT's whole log.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def command(bundle, precision, no_verify, atol, rtol, chain_atol, verbose, progress, **engine_flags):
    """Build unet.plan (and its unet.plan.json sidecar) for BUNDLE with the installed TensorRT.

    Build on the machine that will run the engine: a plan only runs with the TensorRT version and on the GPU
    model it was built for, unless built --version-compat / --hardware-compat."""
    from dtk.export.engine_check import EngineParityError
    from dtk.export.parity import format_table, report_from_dict
    from dtk.export.tensorrt import build_engine
    from dtk.runtime.sidecar import load_sidecar

    options = engine_options_from_flags(
        precision=precision, verbose=verbose, verify=not no_verify, atol=atol, rtol=rtol,
        chain_atol=chain_atol, **engine_flags,
    )  # fmt: skip
    try:
        plan = build_engine(bundle, options, progress=progress)
    except EngineParityError as e:
        click.echo(format_table(e.report), err=True)
        raise
    sidecar = load_sidecar(plan)
    batch = next(iter(sidecar.profiles[0].values()))
    click.echo(
        f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB): TensorRT {sidecar.tensorrt_version}, "
        f"{sidecar.gpu_name} ({sidecar.sm}), {sidecar.precision}"
        f"{', strongly typed' if sidecar.strongly_typed else ''}, "
        f"batch {batch['min'][0]}..{batch['max'][0]}, built in {sidecar.build.get('seconds', 0):.1f} s"
    )
    if sidecar.parity:
        click.echo(format_table(report_from_dict(sidecar.parity)))
    else:
        click.echo("warning: the engine was not compared with ONNX Runtime (--no-verify)", err=True)
