"""`dtk.json`: the versioned manifest that tells the runtime everything about a bundle, without torch.

A bundle is a directory with `dtk.json`, `unet.onnx` (+ `unet.onnx.data`), and optionally `unet.plan` with its
`unet.plan.json` sidecar. The manifest is validated whenever it is read; docs/bundle.md describes every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtk.runtime.checks import check_diffusion_fields, is_int, is_number, need_file_name, need_int, need_type
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import write_text
from dtk.runtime.guidance import check_classes
from dtk.runtime.schedule import DiffusionConfig

SCHEMA = "dtk.bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "dtk.json"
ONNX_NAME = "unet.onnx"
PLAN_NAME = "unet.plan"
SIDECAR_SUFFIX = ".json"  # unet.plan -> unet.plan.json
DTYPES = ("float32", "float16", "int64", "int32")
PRECISIONS = ("fp32", "fp16", "int8")
CLASS_LABELS = "class_labels"  # the int64 [batch] input of a class-conditional graph
BETAS_RTOL = 1e-6  # explicit betas must be the config's schedule (float32 round trips pass)
MAX_SIDE = 16384  # image side, pixels
MAX_CHANNELS = 64
MAX_BATCH = 65536


@dataclass
class TensorSpec:
    """One named graph input or output. A dimension is an int, or a string for a symbolic one ("batch")."""

    name: str
    dtype: str
    shape: list

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Manifest:
    image_size: tuple[int, int]  # (H, W)
    in_channels: int
    out_channels: int
    inputs: list[TensorSpec]  # sample [B,C,H,W], timestep [B]
    outputs: list[TensorSpec]  # model_output [B,C,H,W]
    batch: dict  # {"min", "opt", "max"}; min == max means a fixed batch
    diffusion: DiffusionConfig
    betas: np.ndarray
    precision: str = "fp32"
    opset: int = 18
    onnx: str = ONNX_NAME
    plan: str | None = None
    scheduler_config: str | None = None  # diffusers' scheduler_config.json for the bundle's default sampler
    parity: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # kind, path, sha256
    model: dict = field(default_factory=dict)  # architecture config and parameter count, informative
    export: dict = field(default_factory=dict)  # exporter settings, informative
    quantization: dict = field(default_factory=dict)  # int8: what was quantized, calibration, checks
    created_by: str = ""
    classes: dict | None = None  # conditional models: num_classes, names, null_class (dtk.runtime.guidance)

    @property
    def prediction_type(self) -> str:
        return self.diffusion.prediction_type

    @property
    def fixed_batch(self) -> int | None:
        return self.batch["min"] if self.batch["min"] == self.batch["max"] else None

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created_by": self.created_by,
            "image": {
                "size": list(self.image_size),
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
            },
            "io": {
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
                "batch": dict(self.batch),
            },
            "diffusion": {**self.diffusion.to_dict(), "betas": [float(b) for b in self.betas]},
            "files": {"onnx": self.onnx, "plan": self.plan, "scheduler_config": self.scheduler_config},
            "precision": self.precision,
            "opset": self.opset,
            "parity": self.parity,
            "source": self.source,
            "model": self.model,
            "export": self.export,
            **({"classes": self.classes} if self.classes is not None else {}),
            **({"quantization": self.quantization} if self.quantization else {}),
        }

    def save(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        return _parse(data, where)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate `dtk.json` (the file itself, or the bundle directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise file_error(path, "no dtk manifest here (export a bundle with `dtk export model.pt`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    return _parse(data, str(path))


def _parse(data, where: str) -> Manifest:
    def need(cond, problem):
        if not cond:
            raise file_error(where, problem)

    need(
        isinstance(data, dict) and data.get("schema") == SCHEMA,
        f'not a dtk manifest (no "schema": "{SCHEMA}")',
    )
    version = data.get("schema_version")
    need(is_int(version), "schema_version is missing or not an integer")
    need(version >= 1, f"schema_version must be at least 1, got {version}")
    need(
        version <= SCHEMA_VERSION,
        f"schema version {version} is newer than this dtk reads ({SCHEMA_VERSION}); upgrade dtk",
    )
    try:
        manifest = _fields(data)
    except DtkError as e:
        raise file_error(where, str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise file_error(where, f"malformed manifest ({type(e).__name__}: {e})") from None
    betas = manifest.betas
    need(len(betas) == manifest.diffusion.num_train_timesteps, "betas do not match num_train_timesteps")
    need(bool(np.all((betas > 0) & (betas < 1))), "betas must lie in (0, 1)")
    expected = manifest.diffusion.betas
    need(
        bool(np.allclose(betas, expected, rtol=BETAS_RTOL, atol=0.0)),
        f"betas disagree with the schedule config ({manifest.diffusion.beta_schedule}, "
        f"T={manifest.diffusion.num_train_timesteps}): largest difference "
        f"{float(np.max(np.abs(betas - expected))):.3g}; the samplers use the config's schedule",
    )
    need(manifest.precision in PRECISIONS, f"unknown precision {manifest.precision!r}")
    need(
        (manifest.precision == "int8") == bool(manifest.quantization),
        "an int8 bundle needs a quantization section, and only an int8 bundle has one",
    )
    need(
        1 <= manifest.batch["min"] <= manifest.batch["opt"] <= manifest.batch["max"],
        "batch needs 1 <= min <= opt <= max",
    )
    names = [s.name for s in manifest.inputs]
    if manifest.classes is None:
        need(
            len(manifest.inputs) == 2 and len(manifest.outputs) == 1,
            f"expected inputs (sample, timestep) and one output, got {names}",
        )
    else:
        labels = manifest.inputs[2] if len(manifest.inputs) == 3 else None
        need(
            labels is not None and labels.name == CLASS_LABELS and labels.dtype == "int64",
            f"a class-conditional bundle needs inputs (sample, timestep, {CLASS_LABELS} int64), got {names}",
        )
        need(len(manifest.outputs) == 1, f"expected one output, got {[s.name for s in manifest.outputs]}")
    for spec in manifest.inputs + manifest.outputs:
        need(spec.dtype in DTYPES, f"tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
    return manifest


def _fields(data: dict) -> Manifest:
    """The manifest's fields, each type-checked (DtkError names the first bad one)."""
    image = need_type(data["image"], "image", dict, "an object")
    io = need_type(data["io"], "io", dict, "an object")
    diff = dict(need_type(data["diffusion"], "diffusion", dict, "an object"))
    files = need_type(data["files"], "files", dict, "an object")
    betas = need_type(diff.pop("betas"), "diffusion.betas", list, "a list of numbers")
    if not all(is_number(b) for b in betas):
        raise DtkError("diffusion.betas must be a list of finite numbers")
    check_diffusion_fields(diff, DiffusionConfig)
    size = need_type(image["size"], "image.size", list, "[height, width]")
    if len(size) != 2:
        raise DtkError(f"image.size must be [height, width], got {size!r}")
    batch = need_type(io["batch"], "io.batch", dict, "an object")
    sections = {}
    for name in ("parity", "source", "model", "export", "quantization"):
        sections[name] = need_type(data.get(name, {}), name, dict, "an object")
    return Manifest(
        image_size=tuple(need_int(v, "image.size", 1, MAX_SIDE) for v in size),
        in_channels=need_int(image["in_channels"], "image.in_channels", 1, MAX_CHANNELS),
        out_channels=need_int(image["out_channels"], "image.out_channels", 1, MAX_CHANNELS),
        inputs=_specs(io["inputs"], "io.inputs"),
        outputs=_specs(io["outputs"], "io.outputs"),
        batch={k: need_int(batch[k], f"io.batch.{k}", 1, MAX_BATCH) for k in ("min", "opt", "max")},
        diffusion=DiffusionConfig.from_dict(diff),
        betas=np.asarray(betas, dtype=np.float64),
        precision=need_type(data["precision"], "precision", str, "a string"),
        opset=need_int(data["opset"], "opset", 1),
        onnx=need_file_name(files["onnx"], "files.onnx"),
        plan=need_file_name(files.get("plan"), "files.plan", optional=True),
        scheduler_config=need_file_name(
            files.get("scheduler_config"), "files.scheduler_config", optional=True
        ),
        **sections,
        created_by=need_type(data.get("created_by", ""), "created_by", str, "a string"),
        classes=check_classes(data["classes"]) if data.get("classes") is not None else None,
    )


def _specs(value, name: str) -> list[TensorSpec]:
    specs = []
    for item in need_type(value, name, list, "a list of tensors"):
        item = need_type(item, name, dict, "a list of {name, dtype, shape}")
        spec = TensorSpec(
            name=need_type(item["name"], f"{name} name", str, "a string"),
            dtype=need_type(item["dtype"], f"{name} dtype", str, "a string"),
            shape=need_type(item["shape"], f"{name} shape", list, "a list"),
        )
        if not all(isinstance(d, str) or (is_int(d) and d >= 0) for d in spec.shape):
            raise DtkError(f"{name} {spec.name!r} shape must hold sizes and names, got {spec.shape!r}")
        specs.append(spec)
    return specs


def owned_files(bundle_dir: str | Path) -> set[str]:
    """The names dtk writes in a bundle: the manifest, its files.* (with their .data and .json companions),
    and the standard names. Read leniently, so a damaged manifest still names what it owned."""
    names = {MANIFEST_NAME, ONNX_NAME, ONNX_NAME + ".data", PLAN_NAME, PLAN_NAME + SIDECAR_SUFFIX}
    try:
        data = json.loads((Path(bundle_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = list(data["files"].values()) + [data.get("export", {}).get("onnx_data")]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return names
    for name in listed:
        if isinstance(name, str) and name and Path(name).name == name:
            names |= {name, name + ".data", name + SIDECAR_SUFFIX}
    return names


def resolve_bundle(path: str | Path) -> tuple[Path, Manifest]:
    """A bundle directory, or an .onnx / .plan with dtk.json beside it → (bundle dir, manifest)."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    bundle = path if path.is_dir() else path.parent
    return bundle, load_manifest(bundle / MANIFEST_NAME)
