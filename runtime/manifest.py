"""`dtk.json`: the versioned manifest that tells the runtime everything about a bundle, without torch.

A bundle is a directory with `dtk.json`, `unet.onnx` (+ `unet.onnx.data`), and optionally `unet.plan` with its
`unet.plan.json` sidecar. The manifest is validated whenever it is read; docs/bundle.md describes every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import write_text
from dtk.runtime.schedule import DiffusionConfig

SCHEMA = "dtk.bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "dtk.json"
ONNX_NAME = "unet.onnx"
PLAN_NAME = "unet.plan"
SIDECAR_SUFFIX = ".json"  # unet.plan -> unet.plan.json
DTYPES = ("float32", "float16", "int64", "int32")
PRECISIONS = ("fp32", "fp16", "int8")


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
    parity: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # kind, path, sha256
    model: dict = field(default_factory=dict)  # architecture config and parameter count, informative
    export: dict = field(default_factory=dict)  # exporter settings, informative
    quantization: dict = field(default_factory=dict)  # int8: what was quantized, calibration, checks
    created_by: str = ""

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
            "files": {"onnx": self.onnx, "plan": self.plan},
            "precision": self.precision,
            "opset": self.opset,
            "parity": self.parity,
            "source": self.source,
            "model": self.model,
            "export": self.export,
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
    need(isinstance(version, int), "schema_version is missing")
    need(
        version <= SCHEMA_VERSION,
        f"schema version {version} is newer than this dtk reads ({SCHEMA_VERSION}); upgrade dtk",
    )
    try:
        image, io, diff, files = data["image"], data["io"], dict(data["diffusion"]), data["files"]
        betas = np.asarray(diff.pop("betas"), dtype=np.float64)
        inputs = [TensorSpec(**s) for s in io["inputs"]]
        outputs = [TensorSpec(**s) for s in io["outputs"]]
        manifest = Manifest(
            image_size=tuple(int(v) for v in image["size"]),
            in_channels=int(image["in_channels"]),
            out_channels=int(image["out_channels"]),
            inputs=inputs,
            outputs=outputs,
            batch={k: int(io["batch"][k]) for k in ("min", "opt", "max")},
            diffusion=DiffusionConfig.from_dict(diff),
            betas=betas,
            precision=data["precision"],
            opset=int(data["opset"]),
            onnx=files["onnx"],
            plan=files.get("plan"),
            parity=data.get("parity", {}),
            source=data.get("source", {}),
            model=data.get("model", {}),
            export=data.get("export", {}),
            quantization=data.get("quantization", {}),
            created_by=data.get("created_by", ""),
        )
    except DtkError as e:
        raise file_error(where, str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise file_error(where, f"malformed manifest ({type(e).__name__}: {e})") from None
    need(len(betas) == manifest.diffusion.num_train_timesteps, "betas do not match num_train_timesteps")
    need(bool(np.all((betas > 0) & (betas < 1))), "betas must lie in (0, 1)")
    need(manifest.precision in PRECISIONS, f"unknown precision {manifest.precision!r}")
    need(
        (manifest.precision == "int8") == bool(manifest.quantization),
        "an int8 bundle needs a quantization section, and only an int8 bundle has one",
    )
    need(
        1 <= manifest.batch["min"] <= manifest.batch["opt"] <= manifest.batch["max"],
        "batch needs 1 <= min <= opt <= max",
    )
    names = [s.name for s in inputs]
    need(
        len(inputs) == 2 and len(outputs) == 1,
        f"expected inputs (sample, timestep) and one output, got {names}",
    )
    for spec in inputs + outputs:
        need(spec.dtype in DTYPES, f"tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
    return manifest


def resolve_bundle(path: str | Path) -> tuple[Path, Manifest]:
    """A bundle directory, or an .onnx / .plan with dtk.json beside it → (bundle dir, manifest)."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    bundle = path if path.is_dir() else path.parent
    return bundle, load_manifest(bundle / MANIFEST_NAME)
