"""Torch module → checked ONNX graph: named I/O, dynamic or fixed batch, simplified, external data over 2 GB.

The graph has inputs `sample` float32 [batch, C, H, W] and `timestep` float32 [batch] (the training timestep
index t in [0, T-1] as a float, which TensorRT handles better than int64), and the output `model_output`
float32 [batch, C, H, W].
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dtk.runtime.errors import DtkError
from dtk.runtime.files import umask

INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "model_output"
BATCH_DIM = "batch"
MIN_OPSET = 17
EXPORTERS = ("dynamo", "torchscript")
# protobuf cannot serialize a message over 2 GiB; above this the weights go to unet.onnx.data
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
TIMESTEP_DOC = "float32 [batch]: the training timestep index t in [0, num_train_timesteps - 1], as a float"


@dataclass
class OnnxResult:
    """What the export did, for the manifest's `export` section."""

    path: Path
    opset: int
    external_data: bool
    nodes_exported: int
    nodes: int
    simplified: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "opset": self.opset,
            "external_data": self.external_data,
            "nodes_exported": self.nodes_exported,
            "nodes": self.nodes,
            "simplified": self.simplified,
            "onnx_seconds": round(self.seconds, 2),
        }


def normalize_batch(batch) -> dict:
    """An int (fixed batch), (min, max) or (min, opt, max) → {"min", "opt", "max"}, checked."""
    if isinstance(batch, dict):
        values = (batch["min"], batch["opt"], batch["max"])
    elif isinstance(batch, int):
        values = (batch, batch, batch)
    else:
        values = tuple(int(b) for b in batch)
        if len(values) == 2:
            values = (values[0], values[0], values[1])
        if len(values) != 3:
            raise DtkError(f"batch must be N, (min, max) or (min, opt, max), got {batch!r}")
    lo, opt, hi = (int(v) for v in values)
    if not 1 <= lo <= opt <= hi:
        raise DtkError(f"batch needs 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}")
    return {"min": lo, "opt": opt, "max": hi}


def example_batch(batch: dict) -> int:
    """The batch to trace with: torch.export specialises a dynamic dimension traced at size 1, so use ≥ 2."""
    if batch["min"] == batch["max"]:
        return batch["min"]
    return min(max(batch["opt"], 2), batch["max"])


def export_onnx(
    module,
    sample_shape: tuple[int, int, int],
    path: str | Path,
    *,
    opset: int = 18,
    batch=(1, 8, 16),
    simplify: bool = True,
    external_data: bool | None = None,
    exporter: str = "dynamo",
    convert=None,
) -> OnnxResult:
    """Export `module` to `path` (plus `path.data` for external weights) and check it.

    `convert`, when given, maps the simplified ModelProto to the one saved (the fp16 conversion)."""
    import onnx

    if opset < MIN_OPSET:
        raise DtkError(f"opset {opset} is too old; dtk exports opset {MIN_OPSET} or newer")
    if exporter not in EXPORTERS:
        raise DtkError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    batch = normalize_batch(batch)
    path = Path(path)
    start = time.perf_counter()
    notes = []
    if external_data is None:
        external_data = _weight_bytes(module) > EXTERNAL_DATA_BYTES

    # beside the output (inside the bundle's temporary folder), so a killed export leaves nothing elsewhere
    with tempfile.TemporaryDirectory(prefix=".dtk-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(module, sample_shape, raw, opset, batch, exporter)
        model = onnx.load(str(raw))
    nodes_exported = len(model.graph.node)
    _check_io(model, batch)
    _name_batch_dims(model, batch)

    simplified = False
    if simplify:
        model, problem = _simplify(model)
        simplified = problem is None
        if problem:
            notes.append(f"simplification skipped: {problem}")
    if convert is not None:
        model = convert(model)
    _annotate(model)
    save_model(model, path, external_data)
    check_model(path)
    return OnnxResult(
        path=path,
        opset=_opset(onnx.load(str(path), load_external_data=False)),
        external_data=external_data,
        nodes_exported=nodes_exported,
        nodes=len(model.graph.node),
        simplified=simplified,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def save_model(model, path: Path, external_data: bool) -> None:
    """Write the model, its weights in `<name>.data` beside it when `external_data`."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
        os.chmod(
            data, 0o666 & ~umask()
        )  # onnx writes the weights file 0600; it follows the umask like the rest
    else:
        onnx.save_model(model, str(path))


def check_model(path: Path) -> None:
    """onnx.checker (full check, which includes strict shape inference), then store the inferred shapes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise DtkError(f"the exported ONNX graph failed onnx.checker: {e}") from None


def max_opset(exporter: str) -> int:
    """The newest opset both onnx and the torch exporter write (torchscript stops earlier than dynamo)."""
    import onnx
    from torch.onnx import _constants

    newest = getattr(_constants, "ONNX_MAX_OPSET", onnx.defs.onnx_opset_version())
    if exporter == "torchscript":
        newest = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", newest)
    return min(newest, onnx.defs.onnx_opset_version())


def _weight_bytes(module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_export(module, sample_shape, raw: Path, opset: int, batch: dict, exporter: str) -> None:
    import torch

    n = example_batch(batch)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((n, *sample_shape), generator=generator)
    timestep = torch.linspace(1.0, 999.0, n)
    fixed = batch["min"] == batch["max"]
    kwargs = dict(input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, verbose=False)
        if not fixed:
            dim = torch.export.Dim(BATCH_DIM, min=batch["min"], max=batch["max"])
            kwargs["dynamic_shapes"] = {"sample": {0: dim}, "timestep": {0: dim}}
    else:
        kwargs.update(dynamo=False)
        if not fixed:
            kwargs["dynamic_axes"] = {name: {0: BATCH_DIM} for name in (*INPUT_NAMES, OUTPUT_NAME)}

    captured = io.StringIO()
    with _quiet(), contextlib.redirect_stdout(captured), torch.no_grad():
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(module, (sample, timestep), **kwargs)
                program.save(str(raw), external_data=True)
            else:
                torch.onnx.export(module, (sample, timestep), str(raw), **kwargs)
        except Exception as e:  # the exporters raise many types; name the step and the cause
            if _interrupted(e):  # torch.export wraps a Ctrl-C (or SIGTERM) in its own error
                raise KeyboardInterrupt from None
            tail = "\n".join(captured.getvalue().strip().splitlines()[-5:])
            raise DtkError(
                f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {_first_line(e)}"
                + (f"\n{tail}" if tail else "")
                + ("\n(try --exporter torchscript)" if exporter == "dynamo" else "")
            ) from e


def _interrupted(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints and warnings (deprecations, torchvision notices)."""
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_io(model, batch: dict) -> None:
    graph = model.graph
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    outputs = [o.name for o in graph.output]
    if inputs != list(INPUT_NAMES) or outputs != [OUTPUT_NAME]:
        missing = [n for n in INPUT_NAMES if n not in inputs]
        hint = f" (the network ignores its {', '.join(missing)} input)" if missing else ""
        raise DtkError(
            f"exported graph has inputs {inputs} and outputs {outputs}; expected "
            f"{list(INPUT_NAMES)} -> [{OUTPUT_NAME!r}]{hint}"
        )
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type != 1:  # TensorProto.FLOAT
            raise DtkError(f"exported graph tensor {value.name!r} is not float32")


def _name_batch_dims(model, batch: dict) -> None:
    """Name the leading dimension of every graph input and output "batch", or set the fixed size."""
    fixed = batch["min"] == batch["max"]
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if fixed:
            dim.dim_value = batch["min"]
        else:
            dim.dim_param = BATCH_DIM


def _simplify(model):
    """onnxslim: constant folding, dead-code and redundant-op elimination. → (model, problem or None)."""
    try:
        import onnxslim
    except ImportError:
        return model, "onnxslim is not installed (pip install onnxslim)"
    captured = io.StringIO()
    try:
        with _quiet(), contextlib.redirect_stdout(captured):
            slim = onnxslim.slim(model)
    except Exception as e:  # onnxslim failing must not lose a valid export
        return model, f"onnxslim failed ({type(e).__name__}: {_first_line(e)})"
    if slim is None:
        return model, "onnxslim returned no model"
    return slim, None


def _annotate(model) -> None:
    import onnx

    props = {"dtk.timestep": TIMESTEP_DOC, "dtk.inputs": "sample, timestep", "dtk.outputs": OUTPUT_NAME}
    existing = {p.key for p in model.metadata_props}
    for key, value in props.items():
        if key not in existing:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
