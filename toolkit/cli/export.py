"""`dtk export SOURCE -o BUNDLE`: checkpoint or diffusers model → verified ONNX bundle, TensorRT, Triton."""

from __future__ import annotations

import time

import click

from dtk.cli.engine_options import engine_options, engine_options_from_flags
from dtk.cli.serve_options import serve_options


def parse_batch(value: str):
    """ "N" (fixed), "MIN:MAX" or "MIN:OPT:MAX" → int or tuple."""
    try:
        parts = [int(p) for p in str(value).split(":")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not N, MIN:MAX or MIN:OPT:MAX") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) in (2, 3):
        return tuple(parts)
    raise click.BadParameter(f"{value!r} is not N, MIN:MAX or MIN:OPT:MAX")


@click.command("export")
@click.argument("source", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=str),
    metavar="DIR",
    default="bundle",
    show_default=True,
    help="Bundle directory to write (an earlier bundle there is replaced; a directory holding anything else "
    "is refused).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an earlier bundle even when it holds a TensorRT plan (unet.plan) built for it.",
)
@click.option(
    "--weights",
    type=click.Choice(["ema", "raw"]),
    default="ema",
    show_default=True,
    help="Checkpoint weights to export.",
)
@click.option(
    "--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset (17 or newer)."
)
@click.option(
    "--batch",
    "batch",
    default="1:8:16",
    show_default=True,
    metavar="N|MIN:OPT:MAX",
    help="Dynamic batch range MIN:OPT:MAX (or MIN:MAX), or N for a fixed batch (static shapes for edge "
    "devices and CUDA graphs).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="fp16 computes in half precision but keeps GroupNorm, softmax/attention and the timestep "
    "embedding in fp32; int8 is a calibrated Q/DQ graph (convolutions and linear layers in int8) whose "
    "images are checked against fp32's; inputs and outputs stay float32.",
)
@click.option(
    "--calibration-data",
    metavar="DIR|digits|shapes",
    help="int8: images to calibrate on, noised across the schedule [default: the checkpoint's dataset].",
)
@click.option(
    "--calibration-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="int8: calibration images (each at its own timestep).",
)
@click.option(
    "--int8-outputs",
    type=click.Choice(["int8", "float"]),
    default="int8",
    show_default=True,
    help="int8: convolution outputs in int8 (what ONNX Runtime's CPU int8 kernels need) or in float "
    "(closer to fp32; TensorRT fuses either; no CPU speed-up).",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip the parity check against PyTorch (a warning is printed)."
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Parity: absolute tolerance per output element [fp32 1e-4, fp16 2e-2].",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Parity: relative tolerance per output element [fp32 1e-4, fp16 2e-2].",
)
@click.option(
    "--chain-atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Parity: bound on the DDIM chain's final |Δ|, times max(1, |sample|) [fp32 1e-3, fp16 1e-1].",
)
@click.option(
    "--chain-steps",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Parity: DDIM steps of the end-to-end chain (0 skips the chain).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Parity: seed of the inputs and the chain's noise.",
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim constant folding and simplification.")
@click.option(
    "--external-data",
    is_flag=True,
    help="Store the weights in unet.onnx.data (automatic when they exceed 2 GB).",
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter (torchscript is the legacy one, for models dynamo cannot trace).",
)
@click.option(
    "--engine",
    is_flag=True,
    help="Also build unet.plan with TensorRT on this machine's GPU (as `dtk build-engine`).",
)
@engine_options(prefix="Engine: ")
@click.option(
    "--triton",
    "triton_dir",
    type=click.Path(file_okay=False, path_type=str),
    metavar="DIR",
    help="Also write a Triton Inference Server model repository: DIR/dtk_sampler (whole-image requests) "
    "and DIR/<name>/config.pbtxt, DIR/<name>/1/model.onnx (or model.plan), the denoiser alone.",
)
@click.option("--triton-name", default="dtk_unet", show_default=True, help="Triton: denoiser model name.")
@click.option(
    "--triton-model",
    type=click.Choice(["auto", "onnx", "plan"]),
    default="auto",
    show_default=True,
    help="Triton: serve the ONNX model or the TensorRT plan (auto: the plan when one was built).",
)
@click.option(
    "--triton-kind",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="Triton: instance_group kind (both models).",
)
@click.option(
    "--triton-instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Triton: instance_group count (both models).",
)
@click.option("--no-triton-warmup", is_flag=True, help="Triton: leave out the model_warmup request.")
@serve_options
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def command(
    source,
    out,
    force,
    weights,
    opset,
    batch,
    precision,
    calibration_data,
    calibration_size,
    int8_outputs,
    no_verify,
    atol,
    rtol,
    chain_atol,
    chain_steps,
    seed,
    no_simplify,
    external_data,
    exporter,
    engine,
    triton_dir,
    triton_name,
    triton_model,
    triton_kind,
    triton_instances,
    no_triton_warmup,
    serve_steps,
    serve_sampler,
    progress,
    **engine_flags,
):
    """Export SOURCE — a dtk checkpoint (model.pt) or a diffusers UNet2DModel folder — to a bundle: unet.onnx
    and dtk.json.

    The graph takes `sample` float32 [batch, C, H, W] and `timestep` float32 [batch] (the training timestep t
    as a float) and returns `model_output` float32 [batch, C, H, W]. Unless --no-verify, ONNX Runtime is
    compared with PyTorch at timesteps near 0, T/2 and T-1 at the smallest and largest batch, and over a short
    DDIM chain; a difference out of tolerance fails the export and writes no bundle."""
    from dtk.export.bundle import ExportOptions, export_bundle
    from dtk.export.int8_checks import Int8CheckError, format_checks
    from dtk.export.parity import ParityError, format_table, report_from_dict

    options = ExportOptions(
        opset=opset,
        batch=parse_batch(batch),
        precision=precision,
        verify=not no_verify,
        simplify=not no_simplify,
        atol=atol,
        rtol=rtol,
        chain_atol=chain_atol,
        chain_steps=chain_steps,
        seed=seed,
        weights=weights,
        external_data=True if external_data else None,
        exporter=exporter,
        calibration_data=calibration_data,
        calibration_size=calibration_size,
        int8_outputs=int8_outputs,
    )
    start = time.perf_counter()
    try:
        manifest = export_bundle(source, out, options, progress=progress, force=force)
    except ParityError as e:
        click.echo(format_table(e.report))
        raise
    except Int8CheckError as e:
        click.echo(format_checks(e.checks.to_dict()))
        raise
    if manifest.parity.get("verified"):
        click.echo(format_table(report_from_dict(manifest.parity)))
    if manifest.quantization.get("checks", {}).get("verified"):
        click.echo(format_checks(manifest.quantization["checks"]))
    batch_range = manifest.batch
    batch_text = (
        f"fixed batch {batch_range['min']}"
        if manifest.fixed_batch
        else f"batch {batch_range['min']}..{batch_range['max']} (opt {batch_range['opt']})"
    )
    size = manifest.export.get("onnx_bytes", 0) + manifest.export.get("onnx_data_bytes", 0)
    click.echo(
        f"wrote {out}: {manifest.onnx} ({size / 2**20:.1f} MiB), {manifest.precision}, "
        f"opset {manifest.opset}, {batch_text}, in {time.perf_counter() - start:.1f} s"
    )

    if engine:
        _build_engine(out, precision, engine_flags, progress)
    if triton_dir:
        from dtk.export.triton import SamplerOptions, TritonOptions, write_serving_repository

        sampler_dir, model_dir = write_serving_repository(
            out,
            triton_dir,
            SamplerOptions(
                steps=serve_steps, sampler=serve_sampler, kind=triton_kind, instances=triton_instances
            ),
            TritonOptions(
                name=triton_name,
                model=triton_model,
                kind=triton_kind,
                instances=triton_instances,
                warmup=not no_triton_warmup,
            ),
        )
        click.echo(f"wrote Triton model {sampler_dir} (config.pbtxt, 1/model.py, 1/bundle)")
        click.echo(f"wrote Triton model {model_dir} (config.pbtxt, {next((model_dir / '1').iterdir()).name})")


def _build_engine(out, precision, engine_flags: dict, progress) -> None:
    from dtk.runtime.errors import DtkError

    try:
        from dtk.export.tensorrt import build_engine

        options = engine_options_from_flags(precision=precision, **engine_flags)
        plan = build_engine(out, options, progress=progress)
    except DtkError as e:
        if hasattr(e, "report"):  # the engine check failed: its table says where
            from dtk.export.parity import format_table

            click.echo(format_table(e.report), err=True)
        raise DtkError(
            f"{e}\n(the ONNX bundle {out} was written; build the engine later with `dtk build-engine {out}`)"
        ) from e
    click.echo(f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB)")
