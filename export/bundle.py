"""`export_bundle`: checkpoint or diffusers folder → verified bundle (unet.onnx + dtk.json), atomically.

The bundle is assembled in a temporary directory beside `out_dir` and renamed into place only after the graph
passed onnx.checker and the parity check, so a failed or interrupted export leaves nothing that looks valid.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import atomic_dir, sha256
from dtk.runtime.manifest import (
    MANIFEST_NAME,
    ONNX_NAME,
    PRECISIONS,
    SIDECAR_SUFFIX,
    Manifest,
    TensorSpec,
    load_manifest,
    owned_files,
)

PLAN_SUFFIX = ".plan"
ENGINE_FILE = re.compile(r"unet(-[a-z0-9][a-z0-9._-]*)?\.plan(\.json)?")  # dtk build-engine [--engine-name]
LEFTOVER_PREFIXES = (".engine-check-",)  # build-engine's scratch folder
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}


@dataclass
class ExportOptions:
    """Every `dtk export` setting; CLI flags map to these fields one to one."""

    opset: int = 18
    batch: tuple | int = (1, 8, 16)  # (min, opt, max) for a dynamic batch, or N for a fixed one
    precision: str = "fp32"  # "fp32", "fp16" (fp16 compute, fp32 I/O; see dtk.export.fp16) or "int8" (Q/DQ)
    verify: bool = True  # parity check against PyTorch; a failure fails the export
    simplify: bool = True  # onnxslim constant folding and simplification
    atol: float | None = None  # None: the precision's default in dtk.export.parity.TOLERANCES
    rtol: float | None = None
    chain_atol: float | None = None
    chain_steps: int = 20  # DDIM steps of the end-to-end parity chain; 0 skips the chain
    seed: int = 0  # parity inputs and chain noise
    weights: str = "ema"  # checkpoint weights: "ema" or "raw"
    external_data: bool | None = None  # weights in unet.onnx.data; None: only when they exceed 2 GB
    exporter: str = "dynamo"  # torch.onnx exporter: "dynamo" or "torchscript"
    calibration_data: str | None = (
        None  # int8: "digits", "shapes" or a folder; None: the checkpoint's dataset
    )
    calibration_size: int = 256  # int8: noised calibration images (one timestep each)
    calibration_method: str = "minmax"  # int8: how activation ranges are set (dtk.export.quantize.METHODS)
    check_samples: int = 256  # int8: images sampled by fp32 and int8 for the checks (with verify)
    int8_outputs: str = "int8"  # int8: "int8" or "float" Conv/MatMul outputs (dtk.export.quantize.OUTPUTS)

    def check(self) -> None:
        """Refuse bad settings before any work is done."""
        from dtk.export.onnx_export import EXPORTERS, MIN_OPSET, max_opset, normalize_batch
        from dtk.export.source import WEIGHTS

        if self.precision not in PRECISIONS:
            raise DtkError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.opset < MIN_OPSET:
            raise DtkError(f"opset {self.opset} is too old; dtk exports opset {MIN_OPSET} or newer")
        if self.exporter not in EXPORTERS:
            raise DtkError(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        if self.opset > max_opset(self.exporter):
            raise DtkError(
                f"opset {self.opset} is newer than the {self.exporter} exporter writes here "
                f"(at most {max_opset(self.exporter)})"
            )
        if self.weights not in WEIGHTS:
            raise DtkError(f"unknown weights {self.weights!r}; choose one of {', '.join(WEIGHTS)}")
        normalize_batch(self.batch)
        if self.precision == "int8":
            from dtk.export.quantize import METHODS, OUTPUTS

            if self.calibration_method not in METHODS:
                raise DtkError(
                    f"unknown calibration method {self.calibration_method!r}; "
                    f"choose one of {', '.join(METHODS)}"
                )
            if self.int8_outputs not in OUTPUTS:
                raise DtkError(
                    f"unknown int8 outputs {self.int8_outputs!r}; choose one of {', '.join(OUTPUTS)}"
                )
            if self.calibration_size < 1:
                raise DtkError(f"calibration_size must be at least 1, got {self.calibration_size}")
            if self.check_samples < 2:
                raise DtkError(f"check_samples must be at least 2, got {self.check_samples}")
        if self.chain_steps < 0:
            raise DtkError(f"chain_steps must be 0 or more, got {self.chain_steps}")
        for name in ("atol", "rtol", "chain_atol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DtkError(f"{name} must be non-negative, got {value}")

    @property
    def graph_precision(self) -> str:
        """The precision of the graph the parity check sees (int8 quantizes the fp32 graph after it)."""
        return "fp32" if self.precision == "int8" else self.precision

    def tolerance(self):
        from dtk.export.parity import TOLERANCES, Tolerance

        default = TOLERANCES[self.graph_precision]
        return Tolerance(
            atol=default.atol if self.atol is None else self.atol,
            rtol=default.rtol if self.rtol is None else self.rtol,
            chain_atol=default.chain_atol if self.chain_atol is None else self.chain_atol,
        )


def export_bundle(
    source_path,
    out_dir,
    options: ExportOptions | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    force: bool = False,
) -> Manifest:
    """Export `source_path` (a dtk checkpoint or a diffusers UNet2DModel folder) to the bundle `out_dir`.

    Warnings go to `log` (default: stderr), also when `progress` is off. An earlier bundle at `out_dir` is
    replaced only if it holds nothing but what dtk wrote, and one with a TensorRT plan only when `force`.

    Raises DtkError for bad input, ParityError (a DtkError with `.report`) when verification fails."""
    from dtk.export.onnx_export import TIMESTEP_DOC, export_onnx, normalize_batch
    from dtk.export.parity import skipped, verify
    from dtk.export.source import load_source

    options = options or ExportOptions()
    options.check()
    log = log or _stderr
    out_dir = bundle_target(out_dir)
    check_replaceable(out_dir, force)
    batch = normalize_batch(options.batch)
    start = time.perf_counter()

    with _Stages(progress, 5 if options.precision == "int8" else 4) as stages:
        stages.next("loading the model")
        source = load_source(source_path, options.weights)
        for warning in source.warnings:
            log(f"warning: {warning}")
        fp16_report, convert = _converter(options.precision)
        calibration = None
        if options.precision == "int8":  # bad calibration data fails before any export work
            from dtk.export.calibration import calibration_set

            calibration = calibration_set(
                source, options.calibration_data, options.calibration_size, options.seed
            )

        with atomic_dir(
            out_dir,
            check=lambda path: check_replaceable(path, force),
            on_wait=lambda: log(f"waiting for another dtk writing {out_dir}"),
        ) as tmp:
            onnx_path = tmp / ONNX_NAME
            stages.next(f"exporting ONNX (opset {options.opset}, {options.precision})")
            result = export_onnx(
                source.module,
                source.sample_shape,
                onnx_path,
                opset=options.opset,
                batch=batch,
                simplify=options.simplify,
                external_data=options.external_data,
                exporter=options.exporter,
                convert=convert,
                num_class_embeds=source.num_class_embeds,
            )
            for note in result.notes:
                log(f"warning: {note}")

            if options.verify:
                stages.next("checking parity with PyTorch")
                parity = verify(
                    onnx_path,
                    source.module,
                    source.diffusion,
                    source.sample_shape,
                    batch,
                    options.graph_precision,
                    tolerance=options.tolerance(),
                    chain_steps=options.chain_steps,
                    seed=options.seed,
                    progress=progress,
                    classes=source.classes,
                ).to_dict()
            else:
                log("warning: parity check skipped (--no-verify): this bundle was not compared with PyTorch")
                parity = skipped("--no-verify")

            quantization = None
            if options.precision == "int8":
                stages.next("calibrating and quantizing to int8")
                quantization = _quantize(onnx_path, source, calibration, batch, result.opset, options)

            stages.next("writing the manifest")
            export_info = {
                **_versions(options.exporter),
                **result.to_dict(),
                "timestep": TIMESTEP_DOC,
                "options": _jsonable(asdict(options)),
                **_file_hashes(onnx_path),
                "warnings": source.warnings + result.notes,
                "seconds": round(time.perf_counter() - start, 2),
            }
            if fp16_report is not None:
                export_info["fp16"] = fp16_report.to_dict()
            manifest = _manifest(
                onnx_path, source, batch, result.opset, options.precision, parity, export_info
            )
            manifest.quantization = quantization or {}
            manifest.scheduler_config = _scheduler_config(tmp, source.diffusion, log)
            manifest.save(tmp)
            load_manifest(tmp / MANIFEST_NAME)  # what we wrote must read back
    return manifest


def _quantize(onnx_path: Path, source, calibration, batch, opset, options: ExportOptions) -> dict:
    """Replace the bundle's fp32 graph by its calibrated int8 Q/DQ graph; with `verify`, check its images
    against fp32's (raising Int8CheckError). → the manifest's `quantization` section."""
    import shutil
    import tempfile

    from dtk.export.int8_checks import Int8CheckError, check_int8
    from dtk.export.quantize import quantize

    with tempfile.TemporaryDirectory(prefix="dtk-int8-") as work:
        fp32_path = Path(work) / ONNX_NAME
        shutil.move(onnx_path, fp32_path)
        result = quantize(
            fp32_path, onnx_path, calibration, method=options.calibration_method, outputs=options.int8_outputs
        )
        section = result.to_dict()
        if not options.verify:
            section["checks"] = {"verified": False, "reason": "--no-verify"}
            return section
        manifest = _manifest(onnx_path, source, batch, opset, "int8", {}, {})
        checks = check_int8(
            manifest, fp32_path, onnx_path, calibration.images, options.check_samples, options.seed
        )
    if not checks.passed:
        raise Int8CheckError(checks)
    section["checks"] = {"verified": True, **checks.to_dict()}
    return section


def graph_io(onnx_path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as manifest TensorSpecs (names, dtypes, shapes read from the model)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise file_error(
                onnx_path, f"tensor {value.name!r} has unsupported element type {tensor.elem_type}"
            )
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        return TensorSpec(value.name, dtype, shape)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def _manifest(onnx_path, source, batch, opset, precision, parity, export_info) -> Manifest:
    from dtk import __version__

    inputs, outputs = graph_io(onnx_path)
    return Manifest(
        image_size=tuple(source.image_size),
        in_channels=source.in_channels,
        out_channels=source.out_channels,
        inputs=inputs,
        outputs=outputs,
        batch=dict(batch),
        diffusion=source.diffusion,
        betas=source.diffusion.betas,
        precision=precision,
        opset=opset,
        onnx=ONNX_NAME,
        plan=None,
        parity=parity,
        source=source.info,
        model=source.model_info,
        export=export_info,
        created_by=f"dtk {__version__}",
        classes=source.classes,
    )


def bundle_target(out_dir) -> Path:
    """Where a bundle at `out_dir` goes: a symbolic link is followed (the link itself stays); the current
    directory is refused, since a bundle folder is replaced as a whole."""
    given = Path(out_dir)
    if given.is_symlink() and not given.exists():
        raise file_error(given, "is a broken symbolic link; give a folder for the bundle")
    target = Path(os.path.realpath(given))
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise file_error(
            given, "is the current directory (or holds it); give a bundle folder by name, e.g. -o bundle"
        )
    return target


def check_replaceable(out_dir: Path, force: bool = False) -> None:
    """Replace an earlier bundle only: refuse a folder holding anything dtk did not write there, and one
    holding a TensorRT plan (built on its target, not rebuilt by export) unless `force`."""
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise file_error(out_dir, "is a file; give a directory for the bundle")
    if os.path.ismount(out_dir):  # a container volume: it cannot be swapped for the new bundle
        raise file_error(out_dir, "is a mount point; write the bundle to a folder inside it")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if MANIFEST_NAME not in entries:
        raise file_error(
            out_dir, "exists and is not a dtk bundle; refusing to replace it (choose another -o)"
        )
    owned = owned_files(out_dir)
    foreign = [n for n in entries if not _owned(n, owned, out_dir)]
    if foreign:
        raise file_error(
            out_dir,
            f"holds files dtk did not write there ({_listing(foreign)}); refusing to replace the bundle "
            "(move them out or choose another -o)",
        )
    plans = [n for n in entries if n.endswith(PLAN_SUFFIX) or n.endswith(PLAN_SUFFIX + SIDECAR_SUFFIX)]
    if plans and not force:
        raise file_error(
            out_dir,
            f"holds a TensorRT engine that this export would delete ({_listing(plans)}); "
            "pass --force to replace it, or choose another -o",
        )


def _owned(name: str, owned: set[str], out_dir: Path) -> bool:
    """A file dtk writes in a bundle (the manifest's, or an engine `unet[-NAME].plan[.json]`), or what a
    killed dtk writer left there (`.unet.plan.lock`, `.dtk.json.x.partial`, `.engine-check-x/`)."""
    if name.startswith(LEFTOVER_PREFIXES) or any(
        name == f".{base}.lock" or (name.startswith(f".{base}.") and name.endswith(".partial"))
        for base in owned
    ):
        return True
    return (name in owned or ENGINE_FILE.fullmatch(name) is not None) and not _is_real_dir(out_dir / name)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def _converter(precision: str):
    if precision != "fp16":
        return None, None
    from dtk.export.fp16 import Fp16Report, convert_to_fp16

    report = Fp16Report()
    return report, lambda model: convert_to_fp16(model, report)


def _scheduler_config(bundle: Path, diffusion, log) -> str:
    from dtk.export.scheduler_config import write_scheduler_config

    path, gaps = write_scheduler_config(bundle, diffusion)
    for gap in gaps:
        log(f"warning: {gap}")
    return path.name


def _file_hashes(onnx_path: Path) -> dict:
    out = {"onnx_sha256": sha256(onnx_path), "onnx_bytes": onnx_path.stat().st_size}
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.is_file():
        out.update(onnx_data=data.name, onnx_data_sha256=sha256(data), onnx_data_bytes=data.stat().st_size)
    return out


def _versions(exporter: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "exporter": f"torch.onnx ({exporter})",
        "versions": {name: ver(name) for name in ("torch", "onnx", "onnxslim", "onnxruntime", "diffusers")},
    }


def _jsonable(data: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class _Stages:
    """A tqdm bar over the export's stages on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar, self.done = enabled, total, None, 0

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="export", unit="stage", file=sys.stderr, leave=False)
        return self

    def next(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(1 if self.done else 0)
            self.bar.set_description(f"export: {what}")
        self.done += 1

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
