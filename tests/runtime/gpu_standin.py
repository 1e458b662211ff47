"""A test-only TensorRT stand-in for GPU machines without TensorRT: the engine is a PyTorch module on the GPU.

`TensorRTDenoiser` runs unchanged on top of it: its cuda-python buffers, pinned staging, stream, NVRTC update
kernel, CUDA-graph capture and replay, downloads and close are all real. Only "the engine" differs:
`execute_async_v3(stream)` wraps the bound device pointers as torch tensors (`__cuda_array_interface__`, no
copies) and runs the module on that same stream (`torch.cuda.ExternalStream`), so a graph captured on the
stream records the module's kernels too. The module's temporaries come from PyTorch's caching allocator; the
denoiser's warm-up run before every capture leaves them cached, so a capture allocates nothing, and the
chain never runs other PyTorch work while a replay is in flight (it synchronizes every step).

    trt = standin_tensorrt(module)          # then sys.modules["tensorrt"] = trt
    plan = write_standin_plan(bundle, trt)  # unet-standin.plan + sidecar for this GPU

Nothing here says TensorRT works: it says everything dtk does around TensorRT works on a real GPU.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path

import numpy as np

VERSION = "10.0.0+standin"
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64"}
TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "INT32": "<i4", "INT64": "<i8"}


class _DevicePointer:
    """A raw device pointer seen as an array by torch.as_tensor (CUDA array interface v3, no stream sync)."""

    def __init__(self, ptr: int, shape: tuple, trt_type: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape),
            "typestr": TYPESTR[trt_type],
            "data": (int(ptr), False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def standin_tensorrt(module, device: int = 0) -> types.ModuleType:
    """A `tensorrt` whose plans run `module(sample, timestep)` (a torch.nn.Module on cuda:`device`)."""
    import torch

    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt._executions = 0

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT32": 3, "INT64": 4})
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}
    trt.nptype = lambda trt_type: numpy_types[trt_type.name]

    class IExecutionContext:
        def __init__(self, engine):
            self._engine, self._shapes, self._addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            low, _, high = self._engine._io[name]["profile"]
            if len(shape) != len(low) or not all(
                lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
            ):
                self._engine._logger.log(Severity.ERROR, f"{name}: {tuple(shape)} is outside the profile")
                return False
            self._shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, memory):
            if memory % 256:
                self._engine._logger.log(Severity.ERROR, f"{name}: address not 256-byte aligned")
                return False
            self._addresses[name] = memory
            return True

        def get_tensor_shape(self, name):
            spec = self._engine._io[name]
            if spec["mode"] == "INPUT":
                return self._shapes.get(name, tuple(spec["shape"]))
            return (self._shapes["sample"][0], *spec["shape"][1:])

        def execute_async_v3(self, stream_handle):
            io = self._engine._io
            shape = self._shapes["sample"]
            view = {
                name: torch.as_tensor(
                    _DevicePointer(self._addresses[name], self.get_tensor_shape(name), io[name]["dtype"]),
                    device=f"cuda:{device}",
                )
                for name in io
            }
            assert view["sample"].shape == shape
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle, device=f"cuda:{device}")):
                with torch.inference_mode():
                    out = module(view["sample"].float(), view["timestep"].float())
                view["model_output"].copy_(out)
            trt._executions += 1
            return True

    class ICudaEngine:
        def __init__(self, plan, logger):
            self._logger = logger
            self._io = {spec["name"]: spec for spec in plan["io"]}
            self._names = [spec["name"] for spec in plan["io"]]

        @property
        def num_io_tensors(self):
            return len(self._names)

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode[self._io[name]["mode"]]

        def get_tensor_dtype(self, name):
            return trt.DataType[self._io[name]["dtype"]]

        def get_tensor_shape(self, name):
            return tuple(self._io[name]["shape"])

        def get_tensor_profile_shape(self, name, profile_index):
            return [tuple(s) for s in self._io[name]["profile"]]

        def create_execution_context(self, strategy=None):
            return IExecutionContext(self)

    class Runtime:
        def __init__(self, logger):
            self._logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, serialized_engine):
            plan = json.loads(bytes(serialized_engine))
            return ICudaEngine(plan, self._logger) if plan.get("standin") == VERSION else None

    trt.Runtime = Runtime
    return trt


def write_standin_plan(bundle: Path, device: int = 0, name: str = "unet-standin.plan") -> Path:
    """A stand-in plan for the bundle's I/O and batch range, with a sidecar for this GPU and platform."""
    import hashlib

    from dtk.runtime.backends.cuda import gpu_info
    from dtk.runtime.manifest import load_manifest
    from dtk.runtime.sidecar import PlanSidecar, target_for

    manifest = load_manifest(bundle)
    low, opt, high = (manifest.batch[k] for k in ("min", "opt", "max"))
    chw = [manifest.in_channels, *manifest.image_size]
    out_chw = [manifest.out_channels, *manifest.image_size]

    def spec(name, mode, shape, profile):
        return {"name": name, "mode": mode, "dtype": "FLOAT", "shape": shape, "profile": profile}

    io = [
        spec("sample", "INPUT", [-1, *chw], [[b, *chw] for b in (low, opt, high)]),
        spec("timestep", "INPUT", [-1], [[low], [opt], [high]]),
        spec("model_output", "OUTPUT", [-1, *out_chw], None),
    ]
    data = json.dumps({"standin": VERSION, "io": io}).encode()
    target = target_for(VERSION, gpu_info(device))
    plan = Path(bundle) / name
    plan.write_bytes(data)
    PlanSidecar(
        tensorrt_version=VERSION,
        gpu_name=target.gpu_name,
        compute_capability=target.compute_capability,
        precision="fp32",
        profiles=[],
        onnx_sha256="",
        plan_sha256=hashlib.sha256(data).hexdigest(),
        sm_count=target.sm_count,
        integrated=target.integrated,
        platform=target.platform,
        created_by="tests/runtime/gpu_standin.py",
    ).save(plan)
    return plan


def open_standin(bundle: Path, checkpoint: Path, device: int = 0, cuda_graph: bool = False):
    """(TensorRTDenoiser over a stand-in plan of `checkpoint`'s EMA U-Net, the module, the stand-in).
    Installs the stand-in as `tensorrt` in sys.modules (the caller restores it)."""
    import sys

    import torch

    from dtk.checkpoint import load_checkpoint
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser
    from dtk.runtime.manifest import load_manifest

    ckpt = load_checkpoint(checkpoint)
    module = ckpt.build_model(weights="ema" if ckpt.ema_state is not None else "raw")
    module = module.to(torch.device("cuda", device)).eval()
    trt = standin_tensorrt(module, device)
    sys.modules["tensorrt"] = trt
    plan = write_standin_plan(bundle, device)
    return TensorRTDenoiser(plan, load_manifest(bundle), device=device, cuda_graph=cuda_graph), module, trt


def chain_against_host(
    denoiser, batch: int = 4, steps: int = 20, sampler: str = "ddpm", seed: int = 0
) -> dict:
    """`run_chain` on the device against `sample_loop` on the host over the same engine calls and the same
    seeded noise: max |Δ| of the latents and of the uint8 images (1/255 is one level)."""
    from dtk.runtime.images import to_uint8
    from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

    manifest = denoiser.manifest
    shape = (manifest.in_channels, *manifest.image_size)
    plan = make_plan(sampler, manifest.diffusion, steps)

    def run(chain):
        source = NoiseSource(seed)
        x = source.initial(batch, shape)
        return chain(x, lambda i: source.step(batch, shape))

    on_device = run(lambda x, noise: denoiser.run_chain(plan, x, noise))
    on_host = run(lambda x, noise: sample_loop(denoiser._denoise, x, plan, noise))
    levels = np.abs(to_uint8(on_device).astype(int) - to_uint8(on_host).astype(int))
    return {
        "sampler": sampler,
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "cuda_graph": denoiser.cuda_graph,
        "max_abs_latent": float(np.max(np.abs(on_device - on_host))),
        "max_levels": int(levels.max()),
        "images_within_1_level": bool(levels.max() <= 1),
    }
