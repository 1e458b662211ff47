"""The TensorRT backend: a unet.plan as a Denoiser, and whole sampling chains that stay on the GPU.

    with TensorRTDenoiser("bundle/unet.plan", manifest, cuda_graph=True) as denoiser:
        x = denoiser.run_chain(plan, x, noise)      # x: float32 [B, C, H, W] on the host, in and out

The sidecar is checked first (TensorRT version, GPU), then the plan is deserialized. Buffers for the largest
batch are allocated once; the engine's named tensors are bound to them once. `run_chain` uploads x, then per
step copies that step's timestep, coefficients and host noise through pinned memory, runs the engine and the
NVRTC update kernel; x only comes back at the end (or for a callback). With `cuda_graph=True` a step is
captured once per batch size and replayed: its inputs are read from the pinned buffers at replay time, so
every step's own numbers flow through one unchanged graph. With labels and a guidance scale the engine runs on
the conditional and unconditional halves and the update kernel combines them in the same launch.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtk.runtime.backends.base import DenoiserBase
from dtk.runtime.backends.cuda import (
    COEFF_SLOTS,
    Cuda,
    CudaSession,
    DeviceBuffer,
    UpdateKernel,
    UpdateKernelUnavailable,
    gpu_info,
    kernel_coefficients,
)
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.manifest import Manifest
from dtk.runtime.sidecar import check_plan_bytes, check_sidecar, load_sidecar, rebuild_hint, target_for

TENSORRT_HINT = (
    "install it with `pip install dtk[tensorrt]` (NVIDIA's tensorrt wheels for x86-64 and ARM servers), "
    "or on Jetson use the TensorRT that ships with JetPack 6 (`sudo apt install nvidia-jetpack`, "
    "in a venv made with --system-site-packages)"
)


class TensorRTMissing(DtkError):
    """`import tensorrt` failed."""


def import_tensorrt():
    """The tensorrt module, or a DtkError saying how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise TensorRTMissing(f"TensorRT is not installed ({e}): {TENSORRT_HINT}") from None
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def make_logger(trt, verbose: bool = False):
    """A TensorRT logger: warnings and errors (all when verbose) to stderr; errors kept for messages.

    `clear()` before a call and `reason()` after it give that call's errors only, as one line."""

    class DtkLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
            if verbose or level <= int(trt.ILogger.Severity.WARNING):
                _echo(f"[TensorRT] {msg}")

        def clear(self) -> None:
            self.errors.clear()

        def reason(self, default: str = "no reason given") -> str:
            return "; ".join(self.errors) or default

    return DtkLogger()


def create(factory, logger, what: str, *args):
    """`trt.Builder(logger)`, `trt.Runtime(logger)`, `trt.OnnxParser(network, logger)`: these never return
    None; on failure pybind11 raises TypeError ("factory function returned nullptr") after TensorRT logged
    why (e.g. "CUDA initialization failure with error 35"). That reason becomes one DtkError line."""
    logger.clear()
    try:
        return factory(*args)
    except TypeError as e:
        raise DtkError(
            f"TensorRT could not create {what}: {logger.reason(' '.join(str(e).split()))}"
        ) from None


def _echo(line: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr)


@dataclass(frozen=True)
class ChainGuide:
    """How a chain's steps run: `count` elements of x; with guidance the unconditional output and where x
    is mirrored (the second half of a 2B input), or a second engine call with the null labels."""

    mode: str
    count: int
    out_u: DeviceBuffer | None = None
    x_copy: DeviceBuffer | None = None
    second_call: bool = False


class TensorRTDenoiser(DenoiserBase):
    """A TensorRT plan on one GPU: `__call__` on host arrays, `run_chain` for device-resident sampling."""

    name = "tensorrt"
    chain_guidance = True  # run_chain takes labels and a guidance scale

    def __init__(
        self,
        plan_path: str | Path,
        manifest: Manifest,
        device: int = 0,
        cuda_graph: bool = False,
        allocator: str = "cuda-python",
        verbose: bool = False,
    ):
        self.plan_path = Path(plan_path)
        self.manifest = manifest
        self.cuda_graph = cuda_graph
        self._session: CudaSession | None = None
        self._context = self._engine = self._runtime = None
        self._graphs: dict[str, object] = {}
        self._kernel: UpdateKernel | None = None
        self._guide_out: DeviceBuffer | None = None  # the unconditional output of two-call guidance
        self._closed = False
        if not self.plan_path.is_file():
            raise file_error(self.plan_path, "no such plan; build one with `dtk build-engine BUNDLE`")
        self.sidecar = load_sidecar(self.plan_path)
        trt = import_tensorrt()
        cuda = Cuda()
        gpu = gpu_info(device, cuda)
        check_sidecar(self.sidecar, target_for(trt.__version__, gpu), self.plan_path)
        data = self.plan_path.read_bytes()
        check_plan_bytes(self.sidecar, data, self.plan_path)
        self._session = CudaSession(device, allocator, cuda=cuda, gpu=gpu)
        try:
            self._open_engine(trt, data, verbose)
            self._allocate()
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------------------------------

    def _open_engine(self, trt, data: bytes, verbose: bool) -> None:
        self._logger = logger = make_logger(trt, verbose)
        self._runtime = create(trt.Runtime, logger, f"a runtime for {self.plan_path}", logger)
        if self.sidecar.version_compat:  # the plan carries its own lean runtime; we built it, so we trust it
            self._runtime.engine_host_code_allowed = True
        logger.clear()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise file_error(
                self.plan_path,
                f"TensorRT could not load this plan ({logger.reason()}); {rebuild_hint(self.plan_path)}",
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise DtkError(
                f"{self.plan_path}: TensorRT could not create an execution context (GPU memory full?)"
            )

        engine = self._engine
        self._sample = self.manifest.inputs[0].name
        self._timestep = self.manifest.inputs[1].name
        self._output = self.manifest.outputs[0].name
        # class_labels int64 [B] of a class-conditional plan; None labels feed the null class
        self._labels = self.manifest.inputs[2].name if len(self.manifest.inputs) > 2 else None
        classes = self.manifest.classes or {}
        self._null_class = classes.get("null_class")
        inputs = [self._sample, self._timestep] + ([self._labels] if self._labels else [])
        found = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        wanted = {*inputs, self._output}
        if not wanted <= found:
            raise file_error(
                self.plan_path,
                f"has tensors {sorted(found)}, the manifest names {sorted(wanted)}; "
                f"{rebuild_hint(self.plan_path)}",
            )
        for name, mode in [(n, "INPUT") for n in inputs] + [(self._output, "OUTPUT")]:
            if engine.get_tensor_mode(name) != getattr(trt.TensorIOMode, mode):
                raise file_error(self.plan_path, f"tensor {name!r} is not an {mode.lower()} of the plan")
        self._dtype = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in wanted}

        C, (H, W) = self.manifest.in_channels, self.manifest.image_size
        shape = tuple(int(d) for d in engine.get_tensor_shape(self._sample))
        if shape[1:] != (C, H, W):
            raise file_error(
                self.plan_path, f"takes samples of shape {shape}, the manifest says [B, {C}, {H}, {W}]"
            )
        if shape[0] < 0:
            low, opt, high = (int(dims[0]) for dims in engine.get_tensor_profile_shape(self._sample, 0))
        else:
            low = opt = high = shape[0]
        self.batch_range = (low, high)
        self._opt_batch = opt

    def _allocate(self) -> None:
        session, high = self._session, self.batch_range[1]
        C, Co, (H, W) = self.manifest.in_channels, self.manifest.out_channels, self.manifest.image_size
        self._elements = {self._sample: C * H * W, self._timestep: 1, self._output: Co * H * W}
        if self._labels:
            self._elements[self._labels] = 1
        self._device, self._host = {}, {}
        for name, per_image in self._elements.items():
            nbytes = high * per_image * self._dtype[name].itemsize
            self._device[name] = session.device_buffer(nbytes)
            self._host[name] = session.host_buffer(nbytes)
            session.zero(self._device[name])
            if not self._context.set_tensor_address(name, self._device[name].ptr):
                raise DtkError(f"{self.plan_path}: TensorRT refused the address of tensor {name!r}")
        session.synchronize()
        self._batch: int | None = None

    def _chain_buffers(self) -> UpdateKernel:
        """x0_prev, noise and coefficient buffers, and the compiled update kernel, made on the first chain."""
        if self._kernel is None:
            session = self._session
            nbytes = self.batch_range[1] * self._elements[self._sample] * 4
            kernel = UpdateKernel(session)  # compiles first: NvrtcUnavailable leaves nothing half made
            self._x0_prev = session.device_buffer(2 * nbytes)  # the x0 history: x0_prev, x0_prev2
            self._noise_device = session.device_buffer(nbytes)
            self._noise_host = session.host_buffer(nbytes)
            self._coeffs_device = session.device_buffer(4 * COEFF_SLOTS)
            self._coeffs_host = session.host_buffer(4 * COEFF_SLOTS)
            self._kernel = kernel
        return self._kernel

    def _set_batch(self, batch: int) -> None:
        if batch == self._batch:
            return
        low, high = self.batch_range
        if not low <= batch <= high:
            raise DtkError(f"batch {batch} is outside this plan's batch range {low}..{high}")
        C, Co, (H, W) = self.manifest.in_channels, self.manifest.out_channels, self.manifest.image_size
        self._drop_graphs()  # graphs hold the old shapes
        self._batch = None  # until both shapes are set: a half-set context must not pass for the old batch
        self._logger.clear()
        ok = self._context.set_input_shape(self._sample, (batch, C, H, W))
        ok = self._context.set_input_shape(self._timestep, (batch,)) and ok
        if self._labels:
            ok = self._context.set_input_shape(self._labels, (batch,)) and ok
        if not ok:
            raise DtkError(f"{self.plan_path}: TensorRT refused batch {batch}: {self._logger.reason()}")
        out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self._output))
        if out_shape != (batch, Co, H, W):
            raise file_error(
                self.plan_path, f"outputs {out_shape} for batch {batch}, expected {(batch, Co, H, W)}"
            )
        self._batch = batch

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs = {}

    # -- one evaluation --------------------------------------------------------------------------------------

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels=None) -> np.ndarray:
        sample = self._check_sample(sample)
        batch = sample.shape[0]
        timestep = np.broadcast_to(np.asarray(timestep), (batch,))
        self._session.activate()
        self._set_batch(batch)
        self._stage(self._sample, sample)
        self._stage(self._timestep, timestep)
        self._stage_labels(class_labels, batch)
        self._execute()
        return self._fetch(self._output, batch)

    def _check_sample(self, sample) -> np.ndarray:
        self._check_open()
        sample = np.asarray(sample)
        C, (H, W) = self.manifest.in_channels, self.manifest.image_size
        if sample.ndim != 4 or sample.shape[1:] != (C, H, W):
            raise DtkError(f"sample has shape {sample.shape}, this plan takes [B, {C}, {H}, {W}]")
        return sample

    def _stage_labels(self, class_labels, batch: int) -> None:
        """The class labels of a conditional plan (None: its null class); refused for an unconditional one."""
        from dtk.runtime.guidance import check_labels

        if class_labels is None and self._labels:
            class_labels = self._null_class
            if class_labels is None:
                raise DtkError(f"{self.plan_path}: the model needs class_labels (it has no null class)")
        if class_labels is not None and not self._labels:
            raise DtkError(f"{self.plan_path}: the model is unconditional: no class_labels")
        if class_labels is not None:
            self._stage(self._labels, check_labels(class_labels, batch, self.plan_path))

    def _check_open(self) -> None:
        if self._closed:
            raise DtkError(f"{self.plan_path}: the TensorRT denoiser is closed")

    def _stage(self, name: str, array: np.ndarray) -> None:
        """Host array → pinned staging → the tensor's device buffer (async on the stream)."""
        view = self._host[name].array(self._dtype[name], array.size)
        view[...] = np.asarray(array).reshape(-1)
        self._session.upload(self._device[name], self._host[name], view.nbytes)

    def _fetch(self, name: str, batch: int) -> np.ndarray:
        """The tensor's first `batch` images: device → pinned → a new float32 host array (waits for it)."""
        count = batch * self._elements[name]
        self._session.download(self._host[name], self._device[name], count * self._dtype[name].itemsize)
        self._session.synchronize()
        channels = self.manifest.out_channels if name == self._output else self.manifest.in_channels
        shape = (batch, channels, *self.manifest.image_size)
        return self._host[name].array(self._dtype[name], count).reshape(shape).astype(np.float32)

    def _execute(self) -> None:
        self._logger.clear()
        if not self._context.execute_async_v3(self._session.stream_handle):
            raise DtkError(f"{self.plan_path}: TensorRT failed to run the plan ({self._logger.reason()})")

    # -- sampling on the device ------------------------------------------------------------------------------

    def run_chain(
        self, plan, x: np.ndarray, noise, callback=None, labels=None, guidance_scale: float = 1.0
    ) -> np.ndarray:
        """`sample_loop` with x kept on the GPU: per step the engine, then the update kernel, on one stream.

        `noise(i)` is called (host generator, same order as on the CPU) for steps that need noise, one step
        ahead so it overlaps the GPU's work. With a callback, x is copied back after every step for
        `callback(i, t, x)`. A conditional plan samples `labels` (None: its null class); a guidance scale
        s ∉ {0, 1} runs the engine on the conditional and unconditional halves (one call on 2B images where
        the profile allows it, else two calls) and the update kernel combines them in its one launch.
        """
        x = np.ascontiguousarray(self._check_sample(x), dtype=np.float32)
        for name in (self._sample, self._output):
            if self._dtype[name] != np.float32:
                raise file_error(
                    self.plan_path, f"tensor {name!r} is {self._dtype[name]}; run_chain needs float32 I/O"
                )
        session = self._session
        session.activate()
        try:
            kernel = self._chain_buffers()
        except UpdateKernelUnavailable as e:
            warnings.warn(
                f"{e}; applying the sampler update on the host instead", RuntimeWarning, stacklevel=2
            )
            from dtk.runtime.samplers import sample_loop

            return sample_loop(
                self._host_denoise(labels, guidance_scale, x.shape[0]), x, plan, noise, callback
            )
        batch, shape = x.shape[0], x.shape
        count = x.size
        guide = self._stage_chain(x, labels, guidance_scale)
        session.zero(self._x0_prev, 8 * count)

        coeffs = kernel_coefficients(plan, self._elements[self._sample], guidance_scale)
        needs_noise = np.asarray(plan.needs_noise, dtype=bool)
        timesteps = np.asarray(plan.timesteps)
        graph = self._step_graph(kernel, guide) if self.cuda_graph else None
        # the pinned staging buffers, viewed once: each step writes its inputs into them
        timestep_host = self._host[self._timestep].array(self._dtype[self._timestep], self._batch)
        coeffs_host = self._coeffs_host.array(np.float32)
        noise_host = self._noise_host.array(np.float32, count)
        pending = self._draw(noise, 0, shape) if len(timesteps) and needs_noise[0] else None
        for i, t in enumerate(timesteps):
            session.synchronize()  # the previous step has read the pinned staging buffers
            timestep_host[:] = t
            coeffs_host[:] = coeffs[i]
            if pending is not None:
                noise_host[:] = pending.reshape(-1)
            if graph is not None:
                graph.launch()
            else:
                self._enqueue_step(kernel, guide, with_noise=pending is not None)
            if callback is not None:
                callback(i, int(t), self._fetch(self._sample, batch))
            last = i + 1 == len(timesteps)
            pending = self._draw(noise, i + 1, shape) if not last and needs_noise[i + 1] else None
        return self._fetch(self._sample, batch)

    def _enqueue_step(self, kernel: UpdateKernel, guide: ChainGuide, with_noise: bool) -> None:
        """One sampler step on the stream: the step's inputs from pinned memory, the engine (twice for
        guidance in two calls: the second with the null labels into the unconditional output), the update."""
        session = self._session
        timestep_bytes = self._batch * self._dtype[self._timestep].itemsize
        session.upload(self._device[self._timestep], self._host[self._timestep], timestep_bytes)
        session.upload(self._coeffs_device, self._coeffs_host, 4 * COEFF_SLOTS)
        if with_noise:
            session.upload(self._noise_device, self._noise_host, 4 * guide.count)
        self._execute()
        if guide.second_call:
            self._bind(self._labels, self._null_labels)
            self._bind(self._output, guide.out_u)
            try:
                self._execute()
            finally:
                self._bind(self._labels, self._device[self._labels])
                self._bind(self._output, self._device[self._output])
        self._launch_update(kernel, guide, guide.count)

    def _bind(self, name: str, buffer: DeviceBuffer) -> None:
        if not self._context.set_tensor_address(name, buffer.ptr):
            raise DtkError(f"{self.plan_path}: TensorRT refused the address of tensor {name!r}")

    def _launch_update(self, kernel: UpdateKernel, guide: ChainGuide, count: int) -> None:
        kernel.launch(
            x=self._device[self._sample],
            x0_prev=self._x0_prev,
            out=self._device[self._output],
            noise=self._noise_device,
            coeffs=self._coeffs_device,
            n=count,
            image_elements=self._elements[self._sample],
            out_u=guide.out_u,
            x_copy=guide.x_copy,
        )

    def _step_graph(self, kernel: UpdateKernel, guide: ChainGuide):
        key = f"step-{guide.mode}"  # the kernel's pointers differ per mode; the batch is fixed until dropped
        if key not in self._graphs:
            self._warm_up()
            # the kernel's first launch loads it, which a capture allows only on drivers from CUDA 12.3:
            # launch it once outside the capture, over no elements
            self._launch_update(kernel, guide, 0)
            self._graphs[key] = self._session.capture(
                lambda: self._enqueue_step(kernel, guide, with_noise=True)
            )
        return self._graphs[key]

    def _stage_chain(self, x: np.ndarray, labels, guidance_scale: float) -> ChainGuide:
        """Set the engine's batch and upload x and the labels for a chain: B images and `labels` (s = 1) or
        the null class (s = 0, or no labels); with guidance [x, x] and [labels, null] on 2B images, or, where
        the profile's max batch is below 2B, B images and the null labels in their own buffer for a second
        call into a second output buffer."""
        from dtk.runtime.guidance import check_labels, check_scale

        batch, count = x.shape[0], x.size
        check_scale(guidance_scale, self.manifest.classes)
        if labels is not None:
            labels = check_labels(labels, batch, self.plan_path)
        if labels is None or guidance_scale in (0.0, 1.0):
            self._set_batch(batch)
            self._stage(self._sample, x)
            self._stage_labels(labels if guidance_scale == 1.0 else None, batch)
            return ChainGuide("plain", count)
        null = np.full(batch, self._null_class, dtype=np.int64)
        if 2 * batch <= self.batch_range[1]:
            self._set_batch(2 * batch)
            self._stage(self._sample, np.concatenate([x, x]))
            self._stage_labels(np.concatenate([labels, null]), 2 * batch)
            out, sample = self._device[self._output], self._device[self._sample]
            out_u = DeviceBuffer(out.ptr + 4 * count, out.nbytes - 4 * count)
            x_copy = DeviceBuffer(sample.ptr + 4 * count, sample.nbytes - 4 * count)
            return ChainGuide("one-call", count, out_u=out_u, x_copy=x_copy)
        self._set_batch(batch)
        self._stage(self._sample, x)
        if self._guide_out is None:  # TensorRT wants 256-byte aligned tensors: buffers of their own
            session, high = self._session, self.batch_range[1]
            self._guide_out = session.device_buffer(high * self._elements[self._output] * 4)
            self._null_labels = session.device_buffer(high * 8)
        staging = self._host[self._labels]  # the null labels through the labels' staging buffer, once
        staging.array(np.int64, batch)[:] = null
        self._session.upload(self._null_labels, staging, 8 * batch)
        self._session.synchronize()  # before the staging buffer takes the conditional labels
        self._stage_labels(labels, batch)
        return ChainGuide("two-call", count, out_u=self._guide_out, second_call=True)

    def _host_denoise(self, labels, guidance_scale: float, batch: int):
        """The chain's denoiser on the host (no update kernel here): labels and guidance as on the GPU."""
        if labels is None:
            return self._denoise
        from dtk.runtime.guidance import guided

        def denoise(x, t, class_labels):
            return self(x, np.full(x.shape[0], t, dtype=self._dtype[self._timestep]), class_labels)

        return guided(denoise, np.asarray(labels), self._null_class, guidance_scale, self.batch_range[1])

    def _warm_up(self) -> None:
        """TensorRT finishes shape-dependent setup on the first enqueue after a shape change: keep it out of
        a capture."""
        self._execute()
        self._session.synchronize()

    @staticmethod
    def _draw(noise, i: int, shape: tuple) -> np.ndarray:
        drawn = np.asarray(noise(i), dtype=np.float32)
        if drawn.shape != shape:
            raise DtkError(f"noise({i}) has shape {drawn.shape}, the sample is {shape}")
        return drawn

    def _denoise(self, x: np.ndarray, t: int) -> np.ndarray:
        return self(x, np.full(x.shape[0], t, dtype=self._dtype[self._timestep]))

    # -- benchmarking ----------------------------------------------------------------------------------------

    def device_call(self, batch: int | None = None):
        """A function that runs the engine once on the resident buffers and waits (no host transfers)."""
        self._check_open()
        batch = batch or self._batch or self._opt_batch
        session = self._session

        def run() -> None:
            session.activate()
            self._set_batch(batch)
            if self.cuda_graph:
                if "engine" not in self._graphs:
                    self._warm_up()
                    self._graphs["engine"] = session.capture(self._execute)
                self._graphs["engine"].launch()
            else:
                self._execute()
            session.synchronize()

        run()  # fail here, not inside the timing loop
        return run

    # -- teardown --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the graphs, the TensorRT objects and every CUDA allocation; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        session = self._session
        try:
            if session is not None and not session.closed:
                session.activate()  # this GPU current on this thread, then nothing left in flight
                session.synchronize()
                self._drop_graphs()
        finally:
            self._context = self._engine = self._runtime = None  # context before engine before runtime
            self._kernel = None
            if session is not None:
                session.close()
