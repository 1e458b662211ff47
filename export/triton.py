"""A Triton Inference Server model repository from a bundle: DIR/<name>/config.pbtxt + DIR/<name>/1/model.*.

Two models: `dtk_sampler` (`write_sampler_model`), a Python-backend model that answers whole-image requests
with dtk.runtime (the request contract is in docs/serving.md), and the denoiser alone
(`write_triton_repository`) for GPU servers with the ONNX Runtime or TensorRT backends, whose clients run
the sampling loop themselves.

The config is built as plain data (`triton_config`) and rendered as protobuf text (`render_pbtxt`) in the
shape of Triton's `inference.ModelConfig`. A dynamic-batch bundle becomes `max_batch_size: <max>` with dims
that leave out the batch, and the [batch] timestep input is declared `dims: [1]` with
`reshape { shape: [] }`; a fixed-batch bundle becomes `max_batch_size: 0` with full shapes. The bundle's
dtk.json is copied beside config.pbtxt for clients (the schedule and prediction type); Triton ignores it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import atomic_dir, write_text
from dtk.runtime.manifest import MANIFEST_NAME, Manifest, resolve_bundle

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
DATA_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
VERSION = "1"


SAMPLER_MODEL = "dtk_sampler"
SAMPLER_SOURCE = Path(__file__).with_name("triton_model.py")  # copied as <repo>/dtk_sampler/1/model.py
ENGINE_FILES = ("unet*.plan", "unet*.plan.json")  # every engine of the bundle, with its sidecar


class Enum(str):
    """A protobuf enum value: rendered without quotes."""


@dataclass
class TritonOptions:
    name: str = "dtk_unet"
    model: str = "auto"  # "onnx", "plan", or "auto": the plan when the bundle has one
    kind: str = "gpu"  # instance_group kind: "gpu" or "cpu" (ONNX only)
    instances: int = 1  # instance_group count
    warmup: bool = True  # a model_warmup request at the largest batch
    max_queue_delay_us: int = 100  # dynamic batching: how long to wait to fill a batch


def write_triton_repository(bundle, repo_dir, options: TritonOptions | None = None) -> Path:
    """Add the bundle as model `options.name` to the repository `repo_dir`; return the model directory."""
    options = options or TritonOptions()
    bundle_dir, manifest = resolve_bundle(bundle)
    model = _model_kind(bundle_dir, manifest, options)
    config = triton_config(manifest, options, model)
    target = Path(repo_dir) / options.name
    if target.exists() and not (target / "config.pbtxt").is_file():
        raise file_error(target, "exists and is not a Triton model directory; refusing to replace it")

    source = bundle_dir / (manifest.plan if model == "plan" else manifest.onnx)
    with atomic_dir(target) as tmp:
        version = tmp / VERSION
        version.mkdir()
        shutil.copyfile(source, version / PLATFORMS[model][1])
        data = source.with_name(source.name + ".data")
        if model == "onnx" and data.is_file():  # the graph names its weight file; keep that name
            shutil.copyfile(data, version / data.name)
        write_text(tmp / "config.pbtxt", render_pbtxt(config))
        shutil.copyfile(bundle_dir / MANIFEST_NAME, tmp / MANIFEST_NAME)
    return target


@dataclass
class SamplerOptions:
    """`dtk_sampler`: defaults for requests that leave out steps or the sampler, instances, batching."""

    name: str = SAMPLER_MODEL
    steps: int = 50  # --serve-steps
    sampler: str = "ddim"  # --serve-sampler
    kind: str = "cpu"  # instance_group kind; KIND_GPU hands each instance its GPU
    instances: int = 1
    max_queue_delay_us: int = 2000  # a sampling run lasts far longer: waiting 2 ms fills batches cheaply
    backend: str = "auto"  # dtk.runtime backend: auto, onnxruntime or tensorrt
    threads: int = 0  # ONNX Runtime intra-op threads per instance (0: its default)
    cuda_graph: bool = False  # TensorRT: capture the denoiser step in a CUDA graph (fixed-batch plans)


def write_sampler_model(bundle, repo_dir, options: SamplerOptions | None = None) -> Path:
    """Add `dtk_sampler` for the bundle to the repository `repo_dir`: config.pbtxt, 1/model.py and the bundle
    in 1/bundle/. Return the model directory."""
    options = options or SamplerOptions()
    bundle_dir, manifest = resolve_bundle(bundle)
    config = sampler_config(manifest, options)
    target = Path(repo_dir) / options.name
    if target.exists() and not (target / "config.pbtxt").is_file():
        raise file_error(target, "exists and is not a Triton model directory; refusing to replace it")
    with atomic_dir(target) as tmp:
        version = tmp / VERSION
        (version / "bundle").mkdir(parents=True)
        shutil.copyfile(SAMPLER_SOURCE, version / "model.py")
        for path in _bundle_files(bundle_dir, manifest):
            shutil.copyfile(path, version / "bundle" / path.name)
        write_text(tmp / "config.pbtxt", render_pbtxt(config))
    return target


def _bundle_files(bundle_dir: Path, manifest: Manifest) -> list[Path]:
    """What the runtime reads: the manifest, the ONNX file and its weights, every engine and sidecar."""
    names = [MANIFEST_NAME, manifest.onnx, manifest.export.get("onnx_data")]
    files = [bundle_dir / name for name in names if isinstance(name, str) and name]
    files += [path for pattern in ENGINE_FILES for path in sorted(bundle_dir.glob(pattern))]
    return [path for path in dict.fromkeys(files) if path.is_file()]


def sampler_config(manifest: Manifest, options: SamplerOptions) -> dict:
    """`dtk_sampler`'s ModelConfig: seed INT64 [1], optional steps INT32 [1] and eta FP32 [1] (and for a
    class-conditional bundle class_label INT64 [1] and guidance_scale FP32 [1]) → image UINT8 [H, W, C],
    batched up to the bundle's largest batch, with the defaults as string parameters."""
    from dtk.runtime.samplers import make_plan

    if options.kind not in KINDS:
        raise DtkError(f"unknown Triton instance kind {options.kind!r}; choose one of {', '.join(KINDS)}")
    if options.instances < 1:
        raise DtkError(f"Triton instance count must be at least 1, got {options.instances}")
    make_plan(options.sampler, manifest.diffusion, options.steps)  # refuses a default no request could use
    height, width = manifest.image_size
    parameters = {
        "bundle": "bundle",
        "default_steps": options.steps,
        "default_sampler": options.sampler,
        "backend": options.backend,
        "threads": options.threads,
        "cuda_graph": options.cuda_graph,
    }
    return {
        "name": options.name,
        "backend": "python",
        "max_batch_size": manifest.batch["max"],
        "input": [
            {"name": "seed", "data_type": Enum("TYPE_INT64"), "dims": [1]},
            {"name": "steps", "data_type": Enum("TYPE_INT32"), "dims": [1], "optional": True},
            {"name": "eta", "data_type": Enum("TYPE_FP32"), "dims": [1], "optional": True},
            *_class_inputs(manifest),
        ],
        "output": [
            {"name": "image", "data_type": Enum("TYPE_UINT8"), "dims": [height, width, manifest.in_channels]}
        ],
        "instance_group": [{"count": options.instances, "kind": Enum(KINDS[options.kind])}],
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "parameters": [
            {
                "key": key,
                "value": {"string_value": str(value).lower() if isinstance(value, bool) else str(value)},
            }
            for key, value in parameters.items()
        ],
    }


def _class_inputs(manifest: Manifest) -> list[dict]:
    """A class-conditional bundle's optional inputs: `class_label` INT64 [1] (absent: the null class) and
    `guidance_scale` FP32 [1] (absent: 1, no guidance); an unconditional bundle takes neither."""
    if manifest.classes is None:
        return []
    return [
        {"name": "class_label", "data_type": Enum("TYPE_INT64"), "dims": [1], "optional": True},
        {"name": "guidance_scale", "data_type": Enum("TYPE_FP32"), "dims": [1], "optional": True},
    ]


def triton_config(manifest: Manifest, options: TritonOptions, model: str = "onnx") -> dict:
    """The ModelConfig as plain data (field names as in Triton's model_config.proto)."""
    if options.kind not in KINDS:
        raise DtkError(f"unknown Triton instance kind {options.kind!r}; choose one of {', '.join(KINDS)}")
    if model == "plan" and options.kind != "gpu":
        raise DtkError("a TensorRT plan runs on the GPU only; use --triton-kind gpu")
    if options.instances < 1:
        raise DtkError(f"Triton instance count must be at least 1, got {options.instances}")
    fixed = manifest.fixed_batch
    if not fixed and manifest.batch["min"] > 1:
        raise DtkError(
            f"Triton may send any batch from 1 to max_batch_size, but this bundle takes "
            f"{manifest.batch['min']}..{manifest.batch['max']}; export with --batch 1:OPT:MAX for Triton"
        )
    sample, timestep = manifest.input("sample"), manifest.input("timestep")
    output = manifest.outputs[0]

    def tensor(spec, reshape_scalar=False):
        dims = [int(d) for d in spec.shape] if fixed else [int(d) for d in spec.shape[1:]]
        entry = {"name": spec.name, "data_type": Enum(DATA_TYPES[spec.dtype]), "dims": dims}
        if reshape_scalar and not fixed:  # model shape [batch]: clients send [batch, 1]
            entry["dims"] = [1]
            entry["reshape"] = {"shape": []}
        return entry

    inputs = [tensor(sample), tensor(timestep, reshape_scalar=True)]
    config = {
        "name": options.name,
        "platform": PLATFORMS[model][0],
        "max_batch_size": 0 if fixed else manifest.batch["max"],
        "input": inputs,
        "output": [tensor(output)],
        "instance_group": [{"count": options.instances, "kind": Enum(KINDS[options.kind])}],
    }
    if not fixed:
        preferred = sorted({manifest.batch["opt"], manifest.batch["max"]})
        config["dynamic_batching"] = {
            "preferred_batch_size": preferred,
            "max_queue_delay_microseconds": options.max_queue_delay_us,
        }
    if options.warmup:
        config["model_warmup"] = [_warmup(inputs, 1 if fixed else manifest.batch["max"])]
    return config


def _warmup(inputs: list[dict], batch_size: int) -> dict:
    """One request of random samples at timestep 0 (zeros), at the largest batch."""
    entries = []
    for spec in inputs:
        fill = {"zero_data": True} if spec["name"] == "timestep" else {"random_data": True}
        entries.append(
            {"key": spec["name"], "value": {"data_type": spec["data_type"], "dims": spec["dims"], **fill}}
        )
    return {"name": "dtk_warmup", "batch_size": batch_size, "inputs": entries}


def _model_kind(bundle_dir: Path, manifest: Manifest, options: TritonOptions) -> str:
    if options.model not in ("auto", *PLATFORMS):
        raise DtkError(f"unknown Triton model {options.model!r}; choose auto, onnx or plan")
    model = options.model
    if model == "auto":
        model = "plan" if manifest.plan and (bundle_dir / manifest.plan).is_file() else "onnx"
    if model == "plan" and not (manifest.plan and (bundle_dir / manifest.plan).is_file()):
        raise file_error(
            bundle_dir, "has no TensorRT plan; build one with `dtk build-engine` or use the ONNX model"
        )
    return model


def render_pbtxt(config: dict) -> str:
    """Protobuf text format, indented two spaces per level."""
    return "".join(_field(key, value, 0) for key, value in config.items())


def _field(key: str, value, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, dict):
        return f"{pad}{key} {{\n{''.join(_field(k, v, depth + 1) for k, v in value.items())}{pad}}}\n"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        blocks = ",\n".join(
            f"{pad}  {{\n{''.join(_field(k, v, depth + 2) for k, v in item.items())}{pad}  }}"
            for item in value
        )
        return f"{pad}{key} [\n{blocks}\n{pad}]\n"
    if isinstance(value, list):
        return f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n"
    return f"{pad}{key}: {_scalar(value)}\n"


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def write_serving_repository(
    bundle, repo_dir, sampler: SamplerOptions | None = None, denoiser: TritonOptions | None = None
) -> list[Path]:
    """Both models for the bundle in `repo_dir`: `dtk_sampler` and the denoiser alone; → their directories."""
    return [
        write_sampler_model(bundle, repo_dir, sampler),
        write_triton_repository(bundle, repo_dir, denoiser),
    ]
