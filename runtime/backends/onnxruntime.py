"""ONNX Runtime denoiser: explicit providers (TensorRT EP, CUDA EP, CPU), I/O read from the session.

On a GPU provider `run_chain` keeps the sample on the device between steps: the network and the sampler update
(a tiny ONNX graph built here, run by a second session on the same device) exchange device OrtValues through
IOBinding, and only the timestep and each step's host-drawn noise are uploaded. On the CPU provider the host
arrays are the device memory, and `run_chain` is the numpy `sample_loop`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from dtk.runtime.backends.base import DenoiserBase, TimestepArrays
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.guidance import check_labels
from dtk.runtime.manifest import CLASS_LABELS, Manifest

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}
UNBOUNDED_BATCH = sys.maxsize


class OnnxRuntimeDenoiser(DenoiserBase):
    """`unet.onnx` in an ONNX Runtime session: `(sample [B,C,H,W], timestep [B]) → model output`, host arrays.

    providers: names ("tensorrt", "cuda", "cpu" or ONNX Runtime's own) or (name, options) pairs, highest
    priority first; default CUDA then CPU where onnxruntime-gpu is installed, else CPU. The TensorRT EP is
    used only when asked for (it builds an engine when the session opens; `dtk build-engine` and the
    TensorRT backend are the fast path).
    threads: CPU intra-op threads (default: the CPUs this process may use).
    io_binding: run `run_chain` on device OrtValues (default: when the first provider is a GPU one)."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path,
        manifest: Manifest | None = None,
        providers=None,
        threads: int | None = None,
        device_id: int = 0,
        io_binding: bool | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise file_error(self.path, "no such ONNX file")
        self._ort = ort
        self._update_session = None
        self.device_id = device_id
        self.threads = threads or _usable_cpus()
        self.providers = _provider_list(ort, providers, device_id, manifest, self.path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=self._session_options(), providers=self.providers
            )
        except Exception as e:  # onnxruntime raises its own types (InvalidGraph, Fail, ...)
            raise file_error(self.path, f"ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        active = self.session.get_providers()
        if active[0] != self.providers[0][0]:
            raise file_error(
                self.path,
                f"{self.providers[0][0]} did not start (ONNX Runtime fell back to {active[0]}); "
                "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs",
            )
        self.device_type = "cpu" if active[0] == PROVIDER_NAMES["cpu"] else "cuda"
        self.io_binding = self.device_type != "cpu" if io_binding is None else io_binding
        self._read_io()
        self.batch_range = self._batch_range(manifest)
        # a conditional graph called without labels gets the null class, as the U-Net does
        self.null_class = (
            manifest.classes["null_class"] if manifest is not None and manifest.classes else None
        )
        if manifest is not None:
            self._check_manifest(manifest)

    def _session_options(self):
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        return options

    def _read_io(self) -> None:
        """Names, dtypes and shapes from the session: the rank-4 input is the sample, rank-1 the timestep;
        a class-conditional graph also has `class_labels` int64 [B]."""
        graph_inputs = self.session.get_inputs()
        labels = [i for i in graph_inputs if i.name == CLASS_LABELS]
        self.class_labels_name = labels[0].name if labels else None
        inputs = {len(i.shape): i for i in graph_inputs if i.name != CLASS_LABELS}
        outputs = self.session.get_outputs()
        if sorted(inputs) != [1, 4] or len(graph_inputs) != 2 + len(labels) or len(outputs) != 1:
            found = [(i.name, i.shape) for i in graph_inputs]
            raise file_error(self.path, f"expected inputs sample [B,C,H,W] and timestep [B], found {found}")
        if labels and labels[0].type != "tensor(int64)":
            raise file_error(self.path, f"{CLASS_LABELS} must be int64, found {labels[0].type}")
        sample, timestep, output = inputs[4], inputs[1], outputs[0]
        self.sample_name, self.timestep_name, self.output_name = sample.name, timestep.name, output.name
        self.sample_dtype = np.dtype(_dtype(sample.type, self.path))
        self.timestep_dtype = np.dtype(_dtype(timestep.type, self.path))
        self._timestep_arrays = TimestepArrays(self.timestep_dtype)  # for an integer t
        self.sample_shape = list(sample.shape)  # [batch or int, C, H, W]
        self.output_shape = list(output.shape)
        self.output_dtype = np.dtype(_dtype(output.type, self.path))
        if not all(isinstance(d, int) for d in self.sample_shape[1:]):
            raise file_error(self.path, f"sample input needs fixed C, H, W, got {self.sample_shape}")

    def _batch_range(self, manifest: Manifest | None) -> tuple[int, int]:
        graph_batch = self.sample_shape[0]
        fixed = graph_batch if isinstance(graph_batch, int) and graph_batch > 0 else None
        if manifest is None:
            return (fixed, fixed) if fixed else (1, UNBOUNDED_BATCH)
        low, high = manifest.batch["min"], manifest.batch["max"]
        if fixed and (low, high) != (fixed, fixed):
            raise file_error(self.path, f"graph has fixed batch {fixed} but dtk.json says {low}..{high}")
        return low, high

    def _check_manifest(self, manifest: Manifest) -> None:
        """The graph must be the one dtk.json describes: names, dtypes, and every fixed dimension."""
        graph = {
            self.sample_name: (self.sample_dtype.name, self.sample_shape),
            self.timestep_name: (self.timestep_dtype.name, [self.sample_shape[0]]),
            self.output_name: (self.output_dtype.name, self.output_shape),
        }
        if self.class_labels_name is not None:
            graph[self.class_labels_name] = ("int64", [self.sample_shape[0]])
        problems = []
        for spec in manifest.inputs + manifest.outputs:
            if spec.name not in graph:
                problems.append(f"no tensor named {spec.name!r} (graph has {sorted(graph)})")
                continue
            dtype, shape = graph[spec.name]
            if dtype != spec.dtype:
                problems.append(f"{spec.name} is {dtype}, dtk.json says {spec.dtype}")
            fixed = [
                (g, m)
                for g, m in zip(shape, spec.shape, strict=False)
                if isinstance(g, int) and isinstance(m, int)
            ]
            if len(shape) != len(spec.shape) or any(g != m for g, m in fixed):
                problems.append(f"{spec.name} has shape {shape}, dtk.json says {spec.shape}")
        chw = [manifest.in_channels, *manifest.image_size]
        if self.sample_shape[1:] != chw:
            problems.append(f"sample is {self.sample_shape[1:]} per image, dtk.json says {chw}")
        if problems:
            raise file_error(self.path, "does not match dtk.json: " + "; ".join(problems))

    @property
    def sample_chw(self) -> tuple[int, int, int]:
        return tuple(self.sample_shape[1:])

    def _check_batch(self, batch: int) -> None:
        low, high = self.batch_range
        if not low <= batch <= high:
            hint = f"exactly {low}" if low == high else f"{low}..{high}"
            raise DtkError(f"{self.path}: batch {batch} is outside the model's batch range ({hint})")

    def _timesteps(self, timestep, batch: int) -> np.ndarray:
        if type(timestep) is int:
            return self._timestep_arrays(timestep, batch)
        t = np.asarray(timestep, dtype=self.timestep_dtype)
        return np.full(batch, t, dtype=self.timestep_dtype) if t.ndim == 0 else t

    def __call__(self, sample: np.ndarray, timestep, class_labels=None) -> np.ndarray:
        """One evaluation: `sample` [B,C,H,W] (cast to the graph's dtype), `timestep` [B] or a scalar;
        `class_labels` int64 [B] for a class-conditional graph (and only for one; None: its null class)."""
        if self.session is None:
            raise DtkError(f"{self.path}: the denoiser is closed")
        sample = np.asarray(sample)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != self.sample_chw:
            raise DtkError(
                f"{self.path}: sample must be [B, {', '.join(map(str, self.sample_chw))}], "
                f"got {list(sample.shape)}"
            )
        self._check_batch(sample.shape[0])
        feed = {
            self.sample_name: np.ascontiguousarray(sample, dtype=self.sample_dtype),
            self.timestep_name: self._timesteps(timestep, sample.shape[0]),
        }
        if feed[self.timestep_name].shape != (sample.shape[0],):
            raise DtkError(f"{self.path}: timestep must be [B] with B = {sample.shape[0]}")
        if class_labels is None and self.class_labels_name is not None:
            class_labels = self.null_class
        if (class_labels is None) != (self.class_labels_name is None):
            need = "needs class_labels" if class_labels is None else "is unconditional: no class_labels"
            raise DtkError(f"{self.path}: the model {need}")
        if class_labels is not None:
            feed[self.class_labels_name] = check_labels(class_labels, sample.shape[0], self.path)
        return self.session.run([self.output_name], feed)[0]

    def run_chain(self, plan, x: np.ndarray, noise, callback=None) -> np.ndarray:
        """`sample_loop(self, x, plan, noise, callback)`, with the sample kept on the device under IOBinding.

        On the device path `callback(i, t, x)` receives the device OrtValue (`.numpy()` copies it)."""
        from dtk.runtime.samplers import sample_loop

        if not self.io_binding or plan.history > 1 or plan.threshold is not None:
            # the bound update graph has one x0 history term and clips only: the host loop does the rest
            return sample_loop(self, x, plan, noise, callback)
        return self._run_bound_chain(plan, np.asarray(x, dtype=np.float32), noise, callback)

    def _run_bound_chain(self, plan, x: np.ndarray, noise, callback) -> np.ndarray:
        if self.session is None:
            raise DtkError(f"{self.path}: the denoiser is closed")
        if self.class_labels_name is not None:
            raise DtkError(
                f"{self.path}: a class-conditional model samples through Pipeline.sample(labels=...)"
            )
        if self.sample_dtype != np.float32 or self.output_dtype != np.float32:
            raise DtkError(f"{self.path}: IOBinding needs float32 sample and output, not {self.sample_dtype}")
        self._check_batch(x.shape[0])
        OrtValue, device, device_id = self._ort.OrtValue, self.device_type, self.device_id

        def upload(array):
            """A buffer of its own on the device (on CPU ortvalue_from_numpy would share the array)."""
            array = np.require(array, requirements="C")
            value = OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, device, device_id)
            value.update_inplace(array)
            return value

        zeros = np.zeros_like(x)
        # double buffers: step i reads x and x0_prev from [i % 2] and writes them to [(i + 1) % 2]
        xs, x0s = [upload(x), upload(zeros)], [upload(zeros), upload(zeros)]
        model_output, step_noise = upload(zeros), upload(zeros)
        # every step's timesteps and scalars go to the device once, before the loop
        timesteps = [upload(np.full(x.shape[0], t, dtype=self.timestep_dtype)) for t in plan.timesteps]
        coeffs = [[upload(c) for c in row[: len(UPDATE_COEFFS)]] for row in plan.coeffs.astype(np.float32)]
        clip = np.array(plan.clip or np.finfo(np.float32).max, dtype=np.float32)
        bounds = [upload(-clip), upload(clip)]

        unet = self.session.io_binding()
        unet.bind_ortvalue_output(self.output_name, model_output)
        update_session = self._update()
        update = update_session.io_binding()
        update.bind_ortvalue_input("out", model_output)
        update.bind_ortvalue_input("noise", step_noise)  # left stale where e == 0: e * noise is then 0
        for name, value in zip(("clip_min", "clip_max"), bounds, strict=True):
            update.bind_ortvalue_input(name, value)
        needs_noise = plan.needs_noise.tolist()  # plain Python values for the per-step test
        for i, t in enumerate(plan.timesteps.tolist()):
            current, following = i % 2, (i + 1) % 2
            unet.bind_ortvalue_input(self.sample_name, xs[current])
            unet.bind_ortvalue_input(self.timestep_name, timesteps[i])
            self.session.run_with_iobinding(unet)
            if needs_noise[i]:
                step_noise.update_inplace(np.ascontiguousarray(noise(i), dtype=np.float32))
            update.bind_ortvalue_input("x", xs[current])
            update.bind_ortvalue_input("x0_prev", x0s[current])
            for name, value in zip(UPDATE_COEFFS, coeffs[i], strict=True):
                update.bind_ortvalue_input(name, value)
            update.bind_ortvalue_output("x_next", xs[following])
            update.bind_ortvalue_output("x0", x0s[following])
            update_session.run_with_iobinding(update)
            if callback is not None:
                callback(i, t, xs[following])
        return xs[len(plan.timesteps) % 2].numpy()

    def _update(self):
        """The session running the sampler update on this denoiser's device (CUDA EP for TensorRT EP too)."""
        if self._update_session is None:
            providers = update_providers(self.providers, self._ort.get_available_providers(), self.device_id)
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._update_session = self._ort.InferenceSession(
                update_graph(), sess_options=options, providers=providers
            )
        return self._update_session

    def close(self) -> None:
        self.session = None
        self._update_session = None


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _dtype(ort_type: str, path: Path) -> str:
    if ort_type not in ORT_DTYPES:
        raise file_error(path, f"unsupported tensor type {ort_type}")
    return ORT_DTYPES[ort_type]


def _provider_list(ort, providers, device_id: int, manifest: Manifest | None, path: Path) -> list:
    """Explicit (name, options) pairs, each checked against what this onnxruntime build offers."""
    available = ort.get_available_providers()
    if providers is None:
        providers = ["cuda", "cpu"] if PROVIDER_NAMES["cuda"] in available else ["cpu"]
    if isinstance(providers, str):
        providers = [providers]
    resolved = []
    for entry in providers:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full not in available:
            gpu_hint = (
                "" if full == PROVIDER_NAMES["cpu"] else " (GPU providers need the onnxruntime-gpu package)"
            )
            raise DtkError(
                f"ONNX Runtime provider {name!r} is not available; this build has "
                f"{', '.join(available)}{gpu_hint}"
            )
        defaults = {}
        if full in (PROVIDER_NAMES["cuda"], PROVIDER_NAMES["tensorrt"]):
            defaults["device_id"] = device_id
        if full == PROVIDER_NAMES["tensorrt"]:
            defaults.update(tensorrt_ep_options(manifest, path))
        resolved.append((full, {**defaults, **options}))
    return resolved


def update_providers(providers: list, available: list[str], device_id: int) -> list:
    """The sampler-update session's providers: the denoiser's without the TensorRT EP (an engine for a few
    elementwise ops is not worth building), with the CUDA EP in its place when this build has it, so that the
    update runs where the network's output already is instead of copying to the CPU and back every step."""
    tensorrt, cuda = PROVIDER_NAMES["tensorrt"], PROVIDER_NAMES["cuda"]
    kept = [p for p in providers if p[0] != tensorrt]
    names = [p[0] for p in providers]
    if tensorrt in names and cuda not in names and cuda in available:
        kept.insert(names.index(tensorrt), (cuda, {"device_id": device_id}))
    return kept


def tensorrt_ep_options(manifest: Manifest | None, path: Path) -> dict:
    """One optimisation profile over the manifest's batch range, and an engine cache beside the ONNX file."""
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(path.parent / "ort_trt_cache")}
    if manifest is not None:
        sample, timestep = manifest.inputs[0].name, manifest.inputs[1].name
        chw = "x".join(str(d) for d in (manifest.in_channels, *manifest.image_size))
        for key in ("min", "opt", "max"):
            batch = manifest.batch[key]
            options[f"trt_profile_{key}_shapes"] = f"{sample}:{batch}x{chw},{timestep}:{batch}" + "".join(
                f",{spec.name}:{batch}" for spec in manifest.inputs[2:]
            )
    return options


# The sampler update as an ONNX graph (the samplers' `update`):
#   x0 = clip(p*x + q*out);  x_next = a*x + b*out + c*x0 + d*x0_prev + e*noise, added up in update's order
UPDATE_COEFFS = ("p", "q", "a", "b", "c", "d", "e")
_UPDATE_NODES = [
    ("Mul", ["p", "x"], "px"),
    ("Mul", ["q", "out"], "qo"),
    ("Add", ["px", "qo"], "x0_raw"),
    ("Clip", ["x0_raw", "clip_min", "clip_max"], "x0"),
    ("Mul", ["a", "x"], "ax"),
    ("Mul", ["b", "out"], "bo"),
    ("Mul", ["c", "x0"], "cx0"),
    ("Mul", ["d", "x0_prev"], "dx0"),
    ("Mul", ["e", "noise"], "en"),
    ("Add", ["ax", "dx0"], "s1"),
    ("Add", ["s1", "en"], "s2"),
    ("Add", ["s2", "bo"], "s3"),
    ("Add", ["s3", "cx0"], "x_next"),
]
_LATENTS = ("x", "out", "x0_prev", "noise")


def update_graph() -> bytes:
    """The update model serialized as ONNX protobuf, written by hand so the runtime needs no `onnx` package.

    Wire format: field tags are (number << 3 | wire type); 0 is a varint, 2 a length-delimited payload.
    Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto, TypeProto)."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def field(number: int, payload) -> bytes:
        if isinstance(payload, int):
            return varint(number << 3) + varint(payload)
        payload = payload.encode() if isinstance(payload, str) else payload
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def value_info(name: str, rank4: bool) -> bytes:
        dims = b"".join(field(1, field(2, d)) for d in "NCHW") if rank4 else b""
        tensor_type = field(1, 1) + field(2, dims)  # elem_type FLOAT; shape (empty for a scalar)
        return field(1, name) + field(2, field(1, tensor_type))

    nodes = b"".join(
        field(1, b"".join(field(1, i) for i in inputs) + field(2, output) + field(3, output) + field(4, op))
        for op, inputs, output in _UPDATE_NODES
    )
    inputs = [value_info(n, True) for n in _LATENTS]
    inputs += [value_info(n, False) for n in (*UPDATE_COEFFS, "clip_min", "clip_max")]
    outputs = [value_info(n, True) for n in ("x_next", "x0")]
    graph = nodes + field(2, "dtk_sampler_update")
    graph += b"".join(field(11, v) for v in inputs) + b"".join(field(12, v) for v in outputs)
    opset = field(1, "") + field(2, 17)
    return field(1, 8) + field(2, "dtk") + field(7, graph) + field(8, opset)  # ir_version 8, opset 17
