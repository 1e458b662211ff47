"""`dtk build-engine BUNDLE`: build the bundle's TensorRT plan on this GPU (flags map to EngineOptions)."""

from __future__ import annotations

import click


@click.command("build-engine")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="Engine precision (default: the ONNX graph's). TensorRT 11 only builds the ONNX's own precision.",
)
@click.option("--workspace", type=click.IntRange(min=1), metavar="MiB", help="Cap TensorRT's scratch memory.")
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=str),
    help="Reuse this timing cache and write it back (faster rebuilds on the same GPU).",
)
@click.option(
    "--opt-level", type=click.IntRange(0, 5), help="Builder optimization level (TensorRT default 3)."
)
@click.option("--hardware-compat", is_flag=True, help="One plan for every Ampere-or-newer GPU (sm_80+).")
@click.option("--version-compat", is_flag=True, help="Let later TensorRT versions load the plan.")
@click.option("--strongly-typed", is_flag=True, help="TensorRT 10: build strongly typed, as 11 always does.")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True, help="GPU to build on.")
@click.option("--verbose", is_flag=True, help="Show TensorRT's whole log.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(
    bundle,
    precision,
    workspace,
    timing_cache,
    opt_level,
    hardware_compat,
    version_compat,
    strongly_typed,
    device,
    verbose,
    no_progress,
):
    """Build unet.plan (and its unet.plan.json sidecar) for BUNDLE with the installed TensorRT.

    Build on the machine that will run the engine: a plan only runs with the TensorRT version and on the GPU
    model it was built for, unless built --version-compat / --hardware-compat."""
    from dtk.export.tensorrt import EngineOptions, build_engine
    from dtk.runtime.sidecar import load_sidecar

    options = EngineOptions(
        precision=precision,
        workspace=workspace,
        timing_cache=timing_cache,
        opt_level=opt_level,
        hardware_compat="ampere+" if hardware_compat else "none",
        version_compat=version_compat,
        strongly_typed=strongly_typed,
        device=device,
        verbose=verbose,
    )
    plan = build_engine(bundle, options, progress=not no_progress)
    sidecar = load_sidecar(plan)
    batch = next(iter(sidecar.profiles[0].values()))
    click.echo(
        f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB): TensorRT {sidecar.tensorrt_version}, "
        f"{sidecar.gpu_name} ({sidecar.sm}), {sidecar.precision}"
        f"{', strongly typed' if sidecar.strongly_typed else ''}, "
        f"batch {batch['min'][0]}..{batch['max'][0]}, built in {sidecar.build.get('seconds', 0):.1f} s"
    )
