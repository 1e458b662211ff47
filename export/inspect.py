"""Describe a bundle, an `.onnx` or a `.plan` (and sidecar): I/O, opset, precision, parity, schedule, files.

`describe(path) -> dict` is what `dtk inspect --json` prints; `format_description` renders it for people.
Checkpoints (`.pt`) are described by dtk.checkpoint.describe_checkpoint.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dtk.runtime.errors import DtkError, file_error, one_line
from dtk.runtime.files import sha256
from dtk.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest

ORT_TYPES = {"float": "float32", "double": "float64"}  # ONNX Runtime's names that differ from numpy's
ONNX_TYPES = {
    1: "float32",
    10: "float16",
    11: "float64",
    7: "int64",
    6: "int32",
    3: "int8",
    9: "bool",
    16: "bfloat16",
}


def describe(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    if path.is_dir():
        return describe_bundle(path)
    if path.suffix == ".onnx":
        return describe_onnx(path)
    if path.suffix == ".plan":
        return describe_plan(path)
    if path.name == MANIFEST_NAME:
        return describe_bundle(path.parent)
    raise file_error(
        path, "unknown kind of file; dtk inspect takes model.pt, a bundle directory, .onnx or .plan"
    )


def describe_bundle(bundle: Path) -> dict:
    manifest = load_manifest(bundle)
    info = {
        "kind": "dtk bundle",
        "path": str(bundle),
        "created_by": manifest.created_by,
        "image": {"channels": manifest.in_channels, "size": list(manifest.image_size)},
        "io": _manifest_io(manifest),
        "batch": dict(manifest.batch),
        "precision": manifest.precision,
        "opset": manifest.opset,
        "schedule": schedule_summary(manifest),
        "parity": parity_summary(manifest.parity),
        **({"quantization": quantization_summary(manifest.quantization)} if manifest.quantization else {}),
        "source": dict(manifest.source),
        "model": {k: v for k, v in manifest.model.items() if k != "config"},
        "files": _bundle_files(bundle, manifest),
    }
    if manifest.classes is not None:
        info["classes"] = dict(manifest.classes)
    if manifest.plan and (bundle / manifest.plan).is_file():
        info["plan"] = _sidecar_summary(bundle / manifest.plan)
    engines = _engines(bundle, manifest)
    if len(engines) > 1:
        info["engines"] = engines
    return info


def _engines(bundle: Path, manifest: Manifest) -> list[dict]:
    """Every plan of the bundle with its sidecar (one per GPU model or precision)."""
    from dtk.runtime.sidecar import bundle_plans, load_sidecar

    out = []
    for plan in bundle_plans(bundle, manifest.plan):
        sidecar = load_sidecar(plan)
        check = sidecar.parity.get("passed") if sidecar.parity else None
        out.append(
            {
                "name": plan.name,
                "gpu": f"{sidecar.gpu_name} ({sidecar.sm})",
                "precision": sidecar.precision,
                "tensorrt": sidecar.tensorrt_version,
                "checked": {True: "passed", False: "FAILED", None: "not checked"}[check],
            }
        )
    return out


def schedule_summary(manifest: Manifest) -> dict:
    diffusion = manifest.diffusion
    alphas_cumprod = diffusion.alphas_cumprod
    return {
        "beta_schedule": diffusion.beta_schedule,
        "num_train_timesteps": diffusion.num_train_timesteps,
        "beta_first": float(manifest.betas[0]),
        "beta_last": float(manifest.betas[-1]),
        "alphas_cumprod_last": float(alphas_cumprod[-1]),
        "prediction_type": diffusion.prediction_type,
        "timestep_spacing": diffusion.timestep_spacing,
        "clip_sample": diffusion.clip_sample,
    }


def parity_summary(parity: dict) -> dict:
    if not parity.get("verified"):
        return {"verified": False, "reason": parity.get("reason", "not recorded")}
    cases = parity.get("cases", [])
    chain = parity.get("chain") or {}
    out = {
        "verified": True,
        "passed": parity.get("passed"),
        "tolerance": {k: parity.get(k) for k in ("atol", "rtol", "chain_atol")},
        "provider": parity.get("provider"),
        "cases": len(cases),
        "max_abs": max((c["max_abs"] for c in cases), default=None),
        "worst_ratio": max((c["worst_ratio"] for c in cases), default=None),
    }
    if chain:
        out["chain"] = (
            f"{chain['steps']}-step {chain['sampler']}: max |Δ| {chain['max_abs']:.3g} ≤ {chain['bound']:.3g}"
        )
    return out


def quantization_summary(quantization: dict) -> dict:
    """An int8 bundle's calibration, what stayed in float, and the checks against fp32."""
    calibration = quantization.get("calibration", {})
    checks = quantization.get("checks", {})
    out = {
        "format": f"{quantization.get('format')} ({quantization.get('tool')})",
        "weights": quantization.get("weights"),
        "activations": quantization.get("activations"),
        "calibration": {k: calibration.get(k) for k in ("data", "size", "method", "timesteps", "seed")},
        "quantized_ops": quantization.get("quantized_ops", {}),
        "kept_float": {group: len(names) for group, names in quantization.get("kept_float", {}).items()},
    }
    if not checks.get("verified"):
        out["checks"] = {"verified": False, "reason": checks.get("reason", "not recorded")}
        return out
    chain, quality = checks["chain"], checks["quality"]
    out["checks"] = {
        "passed": checks["passed"],
        "against": f"fp32 graph, {checks['samples']} samples, {checks['sampler']}, seed {checks['seed']}",
        "images": f"mean |Δ| {chain['mean_abs_255']:.2f}/255 ≤ {chain['bound_255']:.0f}/255",
        "quality": f"Fréchet distance int8 {quality['int8']:.4g} ≤ {quality['bound']:.4g} "
        f"(fp32 {quality['fp32']:.4g}, floor {quality['floor']:.4g})",
    }
    return out


def describe_onnx(path: Path) -> dict:
    try:
        import onnx  # noqa: F401
    except ModuleNotFoundError:  # a runtime-only install: ONNX Runtime still reads the I/O and metadata
        return describe_onnx_with_onnxruntime(path)
    model = _load_onnx(path)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    float_types = Counter(ONNX_TYPES.get(t.data_type, str(t.data_type)) for t in graph.initializer)
    info = {
        "kind": "onnx",
        "path": str(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value(v) for v in graph.input if v.name not in initializers],
        "outputs": [_value(v) for v in graph.output],
        "nodes": len(graph.node),
        "op_types": dict(Counter(n.op_type for n in graph.node).most_common(12)),
        "initializers": dict(float_types),
        "precision": "int8"
        if any(n.op_type == "DequantizeLinear" for n in graph.node)
        else "fp16"
        if float_types.get("float16")
        else "fp32",
        "metadata": {p.key: p.value for p in model.metadata_props},
        "files": [_file_entry(path)],
    }
    data_files = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})
    for name in data_files:
        data = path.parent / name
        if not data.is_file():
            raise file_error(path, f"its weights file {name} is missing")
        info["files"].append(_file_entry(data))
    if (path.parent / MANIFEST_NAME).is_file():
        info["bundle"] = str(path.parent)
    return info


def describe_onnx_with_onnxruntime(path: Path) -> dict:
    """What ONNX Runtime tells about an .onnx, for installs without the onnx package."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # its own log lines would repeat the error below
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise file_error(path, f"not a valid ONNX model ({one_line(str(e))[:300]})") from None
    meta = session.get_modelmeta()

    def value(v) -> dict:
        dtype = v.type.removeprefix("tensor(").removesuffix(")")
        return {"name": v.name, "dtype": ORT_TYPES.get(dtype, dtype), "shape": list(v.shape)}

    info = {
        "kind": "onnx",
        "path": str(path),
        "producer": meta.producer_name,
        "inputs": [value(v) for v in session.get_inputs()],
        "outputs": [value(v) for v in session.get_outputs()],
        "metadata": dict(meta.custom_metadata_map),
        "files": [_file_entry(path)],
        "not_shown": "opset, nodes and initializers need the onnx package: pip install 'dtk[export]'",
    }
    if (path.parent / MANIFEST_NAME).is_file():
        info["bundle"] = str(path.parent)
    return info


def describe_plan(path: Path) -> dict:
    from dtk.runtime.sidecar import load_sidecar, sidecar_path

    sidecar = load_sidecar(path)
    info = {
        "kind": "tensorrt plan",
        "path": str(path),
        **_sidecar_summary(path, sidecar),
        "files": [_file_entry(path), _file_entry(sidecar_path(path))],
    }
    actual = info["files"][0]["sha256"]
    info["plan_matches_sidecar"] = actual == sidecar.plan_sha256
    info["runs_here"] = _runs_here(sidecar)
    if (path.parent / MANIFEST_NAME).is_file():
        info["bundle"] = str(path.parent)
    return info


def _runs_here(sidecar) -> str:
    """Whether this machine's TensorRT and GPU may load the plan, as the runtime would judge it."""
    from dtk.runtime.sidecar import compatibility_problems, current_target

    try:
        problems = compatibility_problems(sidecar, current_target())
    except DtkError as e:  # no TensorRT or no GPU here
        return f"cannot tell: {e}"
    return "yes" if not problems else "no: " + "; ".join(problems)


def _sidecar_summary(plan: Path, sidecar=None) -> dict:
    from dtk.runtime.sidecar import load_sidecar

    sidecar = sidecar or load_sidecar(plan)
    gpu = f"{sidecar.gpu_name} ({sidecar.sm}"
    if sidecar.sm_count:
        gpu += f", {sidecar.sm_count} SMs"
    if sidecar.integrated:
        gpu += ", integrated"
    return {
        "tensorrt_version": sidecar.tensorrt_version,
        "gpu": gpu + ")",
        "platform": sidecar.platform or "not recorded",
        "precision": sidecar.precision,
        "strongly_typed": sidecar.strongly_typed,
        "hardware_compat": sidecar.hardware_compat,
        "version_compat": sidecar.version_compat,
        "profiles": sidecar.profiles,
        "onnx_sha256": sidecar.onnx_sha256,
        "engine_check": (
            parity_summary(sidecar.parity)
            if sidecar.parity
            else {
                "verified": False,
                "reason": "not checked against ONNX Runtime (--no-verify, or an older dtk)",
            }
        ),
    }


def _load_onnx(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise file_error(
            path, f"not a valid ONNX model: truncated or corrupt ({type(e).__name__}); re-export it"
        ) from None


def _value(value) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
    return {
        "name": value.name,
        "dtype": ONNX_TYPES.get(tensor.elem_type, str(tensor.elem_type)),
        "shape": shape,
    }


def _manifest_io(manifest: Manifest) -> dict:
    def fmt(spec):
        return f"{spec.dtype} [{', '.join(str(d) for d in spec.shape)}]"

    return {spec.name: fmt(spec) for spec in manifest.inputs + manifest.outputs}


def _file_entry(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def _bundle_files(bundle: Path, manifest: Manifest) -> list[dict]:
    """Every file of the bundle with size and hash; ONNX hashes checked against the export's."""
    if not (bundle / manifest.onnx).is_file():
        raise file_error(bundle, f"the manifest names {manifest.onnx}, which is missing")
    recorded_hashes = {
        manifest.onnx: manifest.export.get("onnx_sha256"),
        manifest.export.get("onnx_data"): manifest.export.get("onnx_data_sha256"),
    }
    files = []
    for name in sorted(p.name for p in bundle.iterdir() if p.is_file()):
        entry = _file_entry(bundle / name)
        recorded = recorded_hashes.get(name)
        if recorded:
            entry["matches_export"] = recorded == entry["sha256"]
        files.append(entry)
    return files


def mismatches(info: dict) -> list[str]:
    """What `describe` found that is not what was exported: ONNX files whose hash differs from the export's,
    a plan whose hash differs from its sidecar's."""
    problems = [
        f"{entry['name']} does not match the sha256 the export recorded (not the exported model)"
        for entry in info.get("files", [])
        if entry.get("matches_export") is False
    ]
    if info.get("plan_matches_sidecar") is False:
        problems.append("the plan does not match the sha256 in its sidecar")
    return problems


def format_description(info: dict) -> str:
    """Indented `key: value` lines; nested dicts and lists of dicts become blocks."""
    lines: list[str] = []
    _format(info, 0, lines)
    return "\n".join(lines)


def _format(value, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            _format(item, depth + 1, lines)
        elif isinstance(item, list) and item and all(isinstance(v, dict) for v in item):
            lines.append(f"{pad}{key}:")
            for entry in item:
                lines.append(f"{pad}  - " + ", ".join(f"{k}={_short(v)}" for k, v in entry.items()))
        else:
            lines.append(f"{pad}{key}: {_short(item)}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
