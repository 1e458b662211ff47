"""A fake GPU on host memory for machines without one: the cuda-python calls dtk makes, and a `tensorrt`.

Device memory is host memory (ctypes buffers, filled with 0xFF so unwritten floats read as NaN), so copies,
the "engine" and the update kernel really move and compute numbers. Streams queue work until synchronized, so
staging a pinned buffer before the previous step has consumed it gives a wrong answer here too. Graph capture
records the queued operations and replays them, reading memory at replay time like the real thing. Every
allocation, stream, module and graph is tracked: `gpu.live()` is empty after a correct close.

This is a model of the documented API surface, not of CUDA or TensorRT: passing against it says the control
flow, buffer sizes and bindings are right, not that a real GPU agrees.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

KERNEL_NAME = b"dtk_sampler_update"


def fake_unet(sample: np.ndarray, timestep: np.ndarray, out_channels: int | None = None) -> np.ndarray:
    """What every fake engine computes: a fixed function of (x, t), so results are predictable on the host."""
    sample = sample.astype(np.float32)
    out = np.float32(0.5) * sample + np.float32(1e-3) * timestep.astype(np.float32)[:, None, None, None]
    return (out - np.float32(0.1)).astype(np.float32)


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_NOT_FOUND = 500


class nvrtcResult(enum.IntEnum):
    NVRTC_SUCCESS = 0
    NVRTC_ERROR_INVALID_OPTION = 5
    NVRTC_ERROR_COMPILATION = 6


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle
        self.queue: list = []
        self.capture: list | None = None

    def __int__(self):
        return self.handle


class LibraryNotFound(RuntimeError):
    """What cuda-python raises when a wrapped library cannot be loaded."""


class FakeGpu:
    def __init__(self, name="NVIDIA Fake GPU", compute_capability=(8, 7), devices=1, driver=True, nvrtc=True):
        self.name, self.compute_capability, self.devices = name, tuple(compute_capability), devices
        self.driver_ok, self.nvrtc_ok = driver, nvrtc
        self.memory: dict[
            int, tuple[object, int, str]
        ] = {}  # base address -> (buffer, size, "device"|"pinned")
        self.streams: dict[int, FakeStream] = {}
        self.modules: set[int] = set()
        self.graphs: dict[int, list] = {}
        self.graph_execs: dict[int, list] = {}
        self.programs: dict[int, bytes] = {}
        self.log: list[str] = []  # names of the operations that ran on a stream, in order
        self.nvrtc_options: list[list[bytes]] = []
        self.launches: list[dict] = []
        self.current_device = None
        self._next = 1
        self.runtime = self._runtime()
        self.driver = self._driver()
        self.nvrtc = self._nvrtc()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def live(self) -> dict[str, int]:
        kinds = [kind for _, _, kind in self.memory.values()]
        counts = {
            "device": kinds.count("device"),
            "pinned": kinds.count("pinned"),
            "streams": len(self.streams),
            "modules": len(self.modules),
            "graphs": len(self.graphs),
            "graph_execs": len(self.graph_execs),
        }
        return {k: v for k, v in counts.items() if v}

    def handle(self) -> int:
        self._next += 1
        return self._next

    def allocate(self, nbytes: int, kind: str) -> int:
        buffer = ctypes.create_string_buffer(max(int(nbytes), 1))
        address = ctypes.addressof(buffer)
        ctypes.memset(address, 0xFF, len(buffer))
        self.memory[address] = (buffer, int(nbytes), kind)
        return address

    def region(self, ptr: int, nbytes: int, kind: str | None = None) -> bool:
        for base, (_, size, what) in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return kind is None or what == kind
        return False

    def view(self, ptr: int, count: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        assert self.region(ptr, count * dtype.itemsize, "device"), (
            f"{count} x {dtype} at {ptr:#x} is not device memory"
        )
        return np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)).view(
            dtype
        )

    def enqueue(self, stream, name: str, op) -> None:
        stream = self.streams[int(stream)]
        (stream.capture if stream.capture is not None else stream.queue).append((name, op))

    def run(self, stream: FakeStream) -> None:
        while stream.queue:
            name, op = stream.queue.pop(0)
            self.log.append(name)
            op()

    # -- cuda.bindings.runtime -------------------------------------------------------------------------------

    def _runtime(self):
        gpu, ok = self, cudaError_t.cudaSuccess
        rt = types.SimpleNamespace(
            cudaError_t=cudaError_t,
            cudaMemcpyKind=cudaMemcpyKind,
            cudaStreamCaptureMode=cudaStreamCaptureMode,
            cudaStreamNonBlocking=1,
        )

        def device_count():
            if not gpu.driver_ok:
                return cudaError_t.cudaErrorInsufficientDriver, None
            return ok, gpu.devices

        def properties(device):
            if not 0 <= device < gpu.devices:
                return cudaError_t.cudaErrorInvalidValue, None
            major, minor = gpu.compute_capability
            prop = types.SimpleNamespace(name=gpu.name.encode() + b"\0\0", major=major, minor=minor)
            prop.totalGlobalMem = 8 << 30
            return ok, prop

        def set_device(device):
            if not gpu.driver_ok:
                return (cudaError_t.cudaErrorInsufficientDriver,)
            gpu.current_device = device
            return (ok,)

        def malloc(kind):
            def allocate(nbytes):
                return ok, gpu.allocate(nbytes, kind)

            return allocate

        def free(kind):
            def release(ptr):
                if ptr not in gpu.memory or gpu.memory[ptr][2] != kind:
                    return (cudaError_t.cudaErrorInvalidValue,)
                del gpu.memory[ptr]
                return (ok,)

            return release

        def stream_create(flags):
            stream = FakeStream(gpu.handle())
            gpu.streams[stream.handle] = stream
            return ok, stream

        def stream_destroy(stream):
            if int(stream) not in gpu.streams:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            gpu.run(gpu.streams.pop(int(stream)))
            return (ok,)

        def synchronize(stream):
            stream = gpu.streams[int(stream)]
            if stream.capture is not None:
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            gpu.run(stream)
            return (ok,)

        def memcpy_async(dst, src, count, kind, stream):
            sides = {
                cudaMemcpyKind.cudaMemcpyHostToDevice: ("device", "pinned"),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: ("pinned", "device"),
            }
            if kind not in sides or not gpu.region(dst, count, sides[kind][0]):
                return (cudaError_t.cudaErrorInvalidValue,)
            if not gpu.region(src, count, sides[kind][1]):
                return (cudaError_t.cudaErrorInvalidValue,)
            name = "H2D" if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else "D2H"
            gpu.enqueue(stream, name, lambda: ctypes.memmove(dst, src, count))
            return (ok,)

        def memset_async(ptr, value, count, stream):
            if not gpu.region(ptr, count, "device"):
                return (cudaError_t.cudaErrorInvalidValue,)
            gpu.enqueue(stream, "memset", lambda: ctypes.memset(ptr, value, count))
            return (ok,)

        def begin_capture(stream, mode):
            gpu.streams[int(stream)].capture = []
            return (ok,)

        def end_capture(stream):
            stream = gpu.streams[int(stream)]
            graph = gpu.handle()
            gpu.graphs[graph], stream.capture = stream.capture, None
            return ok, graph

        def instantiate(graph, flags):
            graph_exec = gpu.handle()
            gpu.graph_execs[graph_exec] = list(gpu.graphs[graph])
            return ok, graph_exec

        def graph_launch(graph_exec, stream):
            if graph_exec not in gpu.graph_execs:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            for name, op in gpu.graph_execs[graph_exec]:
                gpu.enqueue(stream, name, op)
            return (ok,)

        def destroy(table):
            def release(handle):
                if handle not in table:
                    return (cudaError_t.cudaErrorInvalidResourceHandle,)
                del table[handle]
                return (ok,)

            return release

        rt.cudaGetDeviceCount = device_count
        rt.cudaGetDeviceProperties = properties
        rt.cudaSetDevice = set_device
        rt.cudaMalloc, rt.cudaFree = malloc("device"), free("device")
        rt.cudaMallocHost, rt.cudaFreeHost = malloc("pinned"), free("pinned")
        rt.cudaStreamCreateWithFlags = stream_create
        rt.cudaStreamDestroy = stream_destroy
        rt.cudaStreamSynchronize = synchronize
        rt.cudaMemcpyAsync = memcpy_async
        rt.cudaMemsetAsync = memset_async
        rt.cudaStreamBeginCapture = begin_capture
        rt.cudaStreamEndCapture = end_capture
        rt.cudaGraphInstantiate = instantiate
        rt.cudaGraphLaunch = graph_launch
        rt.cudaGraphExecDestroy = destroy(self.graph_execs)
        rt.cudaGraphDestroy = destroy(self.graphs)
        rt.cudaGetErrorName = lambda error: (ok, error.name.encode())
        rt.cudaGetErrorString = lambda error: (ok, f"fake text for {error.name}".encode())
        return rt

    # -- cuda.bindings.driver --------------------------------------------------------------------------------

    def _driver(self):
        gpu, ok = self, CUresult.CUDA_SUCCESS
        drv = types.SimpleNamespace(CUresult=CUresult)

        def needs_driver(fn):
            def call(*args):
                if not gpu.driver_ok:
                    raise LibraryNotFound(
                        '"cuda" is an NVIDIA driver library and can only be found via system search'
                    )
                return fn(*args)

            return call

        def load(image):
            module = gpu.handle()
            gpu.modules.add(module)
            return ok, module

        def unload(module):
            if module not in gpu.modules:
                return (CUresult.CUDA_ERROR_INVALID_HANDLE,)
            gpu.modules.remove(module)
            return (ok,)

        def get_function(module, name):
            if module not in gpu.modules or name != KERNEL_NAME:
                return CUresult.CUDA_ERROR_NOT_FOUND, None
            return ok, ("function", module)

        def launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            if function[1] not in gpu.modules or gx * bx < 1:
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            # kernelParams: seven pointers, each to an 8-byte argument (the driver copies them now)
            slots = (ctypes.c_uint64 * 7).from_address(params)
            x, history, out, noise, coeffs, n, image_n = (
                ctypes.c_uint64.from_address(slot).value for slot in slots
            )
            for ptr in (x, out, noise):
                if not gpu.region(ptr, 4 * n, "device"):
                    return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            if not gpu.region(history, 8 * n, "device") or not gpu.region(coeffs, 48, "device"):
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            if gy * image_n != n:
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            gpu.launches.append({"grid": (gx, gy, gz), "block": (bx, by, bz), "n": n})

            def run():
                p, q, a, b, c, d, e, d2, clip, low, fraction, top = gpu.view(coeffs, 12, np.float32)
                xs, outs = gpu.view(x, n, np.float32), gpu.view(out, n, np.float32)
                x0s, x0s_before = gpu.view(history, n, np.float32), gpu.view(history + 4 * n, n, np.float32)
                v = p * xs + q * outs
                if low >= 0:  # dynamic thresholding per image, from the quantile's position
                    images = np.sort(np.abs(v.reshape(gy, -1)), axis=1)
                    k = int(low)
                    lo, hi = images[:, k], images[:, min(k + 1, image_n - 1)]
                    scale = np.clip(lo + fraction * (hi - lo), 1.0, top)
                    v = (np.clip(v.reshape(gy, -1), -scale[:, None], scale[:, None]) / scale[:, None]).ravel()
                elif clip > 0:
                    v = np.where(v < -clip, -clip, np.where(v > clip, clip, v))
                nxt = a * xs + b * outs + c * v + d * x0s
                if d2 != 0:
                    nxt = nxt + d2 * x0s_before
                if e != 0:
                    nxt = nxt + e * gpu.view(noise, n, np.float32)
                x0s_before[:] = x0s
                xs[:], x0s[:] = nxt, v

            gpu.enqueue(stream, "update", run)
            return (ok,)

        drv.cuInit = needs_driver(lambda flags: (ok,))
        drv.cuModuleLoadData = needs_driver(load)
        drv.cuModuleUnload = needs_driver(unload)
        drv.cuModuleGetFunction = needs_driver(get_function)
        drv.cuLaunchKernel = needs_driver(launch)
        drv.cuGetErrorName = lambda error: (ok, error.name.encode())
        drv.cuGetErrorString = lambda error: (ok, b"fake driver error")
        return drv

    # -- cuda.bindings.nvrtc ---------------------------------------------------------------------------------

    def _nvrtc(self):
        gpu, ok = self, nvrtcResult.NVRTC_SUCCESS
        rtc = types.SimpleNamespace(nvrtcResult=nvrtcResult)

        def needs_nvrtc(fn):
            def call(*args):
                if not gpu.nvrtc_ok:
                    raise LibraryNotFound('Failure finding "libnvrtc.so.13 or libnvrtc.so.12"')
                return fn(*args)

            return call

        def fill(buffer: bytes, data: bytes):  # cuda-python writes into the bytes object it is given
            assert len(buffer) >= len(data)
            ctypes.memmove(ctypes.c_char_p(buffer), data, len(data))

        def create(source, name, count, headers, names):
            program = gpu.handle()
            gpu.programs[program] = source
            return ok, program

        def compile_(program, count, options):
            gpu.nvrtc_options.append(list(options))
            if KERNEL_NAME not in gpu.programs[program]:
                return (nvrtcResult.NVRTC_ERROR_COMPILATION,)
            return (ok,)

        image = b"FAKE-CUBIN:" + KERNEL_NAME
        rtc.nvrtcCreateProgram = needs_nvrtc(create)
        rtc.nvrtcCompileProgram = needs_nvrtc(compile_)
        rtc.nvrtcGetSupportedArchs = needs_nvrtc(lambda: (ok, [75, 80, 86, 87, 89, 90]))
        rtc.nvrtcGetCUBINSize = needs_nvrtc(lambda program: (ok, len(image)))
        rtc.nvrtcGetCUBIN = needs_nvrtc(lambda program, buffer: (fill(buffer, image), (ok,))[1])
        rtc.nvrtcGetPTXSize = needs_nvrtc(lambda program: (ok, len(image) + 1))
        rtc.nvrtcGetPTX = needs_nvrtc(lambda program, buffer: (fill(buffer, image + b"\0"), (ok,))[1])
        rtc.nvrtcGetProgramLogSize = needs_nvrtc(lambda program: (ok, 12))
        rtc.nvrtcGetProgramLog = needs_nvrtc(lambda program, buffer: (fill(buffer, b"fake log\0"), (ok,))[1])
        rtc.nvrtcDestroyProgram = needs_nvrtc(lambda program: (gpu.programs.pop(program), (ok,))[1])
        rtc.nvrtcGetErrorString = lambda error: (ok, error.name.encode())
        return rtc


# -- a fake `tensorrt` module --------------------------------------------------------------------------------


def fake_tensorrt(gpu: FakeGpu, version: str = "10.3.0") -> types.ModuleType:
    """The tensorrt API surface dtk uses. Version 11 lacks BuilderFlag.FP16, as the real TensorRT 11 does.

    Plans are JSON; the last build's flags, profiles and limits are kept in `trt.builds` for tests to read."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.builds = []

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        pass

    ILogger.Severity = Severity

    class IProgressMonitor:
        pass

    flags = ["TF32", "VERSION_COMPATIBLE", "REFIT"] + (["FP16", "INT8"] if major < 11 else [])
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(flags)})
    creation = {"STRONGLY_TYPED": 1} if major < 11 else {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "TACTIC_SHARED_MEMORY": 1})
    trt.HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT32": 3, "INT64": 4})
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}
    trt.nptype = lambda dtype: numpy_types[dtype.name]
    trt.ILogger, trt.IProgressMonitor = ILogger, IProgressMonitor

    class ParserError:
        def __init__(self, info: dict):
            self.info = info

        def desc(self):
            return self.info["desc"]

        def node_name(self):
            return self.info.get("node_name", "")

        def node_operator(self):
            return self.info.get("op", "")

        def node(self):
            return self.info.get("node", -1)

    class Tensor:
        def __init__(self, name, shape, dtype="FLOAT"):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.build_error = None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            try:
                with open(path, encoding="utf-8") as f:
                    graph = json.loads(f.read())
            except (OSError, ValueError) as e:
                self.errors = [{"desc": f"Failed to parse ONNX model from file: {path} ({type(e).__name__})"}]
                return False
            self.errors = graph.get("errors", [])
            self.network.build_error = graph.get("build_error")
            for spec in graph["inputs"]:
                self.network.inputs.append(Tensor(spec["name"], spec["shape"], spec.get("dtype", "FLOAT")))
            for spec in graph["outputs"]:
                self.network.outputs.append(Tensor(spec["name"], spec["shape"], spec.get("dtype", "FLOAT")))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return ParserError(self.errors[i])

    class TimingCache:
        def __init__(self, data: bytes):
            if data and not data.startswith(b"FAKECACHE"):
                raise RuntimeError("invalid timing cache")
            info = (
                json.loads(data[len(b"FAKECACHE") :])
                if data
                else {"version": version, "gpu": gpu.name, "entries": 0}
            )
            self.info = info

        def serialize(self):
            return memoryview(b"FAKECACHE" + json.dumps(self.info).encode())

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class BuilderConfig:
        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default
            self.pool_limits = {}
            self.builder_optimization_level = 3
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE
            self.progress_monitor = None
            self.profiles = []
            self.cache = None

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pool_limits[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.info["version"] != version or cache.info["gpu"] != gpu.name:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 3)
                for step in range(3):
                    if not monitor.step_complete("Tactic selection", step):
                        monitor.phase_finish("Tactic selection")
                        monitor.phase_finish("Building engine")
                        return None
                monitor.phase_finish("Tactic selection")
                monitor.step_complete("Building engine", 0)
                monitor.step_complete("Building engine", 1)
                monitor.phase_finish("Building engine")
            if network.build_error:
                self.logger.log(Severity.ERROR, network.build_error)
                return None
            dynamic = any(-1 in t.shape for t in network.inputs)
            if dynamic and not config.profiles:
                self.logger.log(
                    Severity.ERROR, "Network has dynamic or shape inputs, but no optimization profile"
                )
                return None
            profile = config.profiles[0].shapes if config.profiles else {}
            if config.cache is not None:
                config.cache.info["entries"] += 1
            trt.builds.append({"network_flags": network.flags, "config": config, "profile": profile})
            io = []
            for tensor, mode in [(t, "INPUT") for t in network.inputs] + [
                (t, "OUTPUT") for t in network.outputs
            ]:
                shapes = profile.get(tensor.name)
                io.append(
                    {
                        "name": tensor.name,
                        "mode": mode,
                        "dtype": tensor.dtype,
                        "shape": list(tensor.shape),
                        "profile": [list(s) for s in shapes] if shapes else None,
                    }
                )
            plan = {"fake_plan": version, "io": io}
            return memoryview(json.dumps(plan).encode())

    class ExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            self.executions = 0

        def set_input_shape(self, name, shape):
            spec = self.engine.io[name]
            low, _, high = spec["profile"] or [spec["shape"]] * 3
            if len(shape) != len(low) or not all(
                lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
            ):
                self.engine.logger.log(Severity.ERROR, f"{name}: shape {tuple(shape)} is outside the profile")
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            spec = self.engine.io[name]
            if spec["mode"] == "INPUT":
                return self.shapes.get(name, tuple(spec["shape"]))
            batch = self.shapes[self.engine.inputs[0]][0] if self.engine.inputs[0] in self.shapes else -1
            return (batch, *spec["shape"][1:])

        def execute_async_v3(self, stream_handle):
            sample_name, timestep_name = self.engine.inputs
            if set(self.addresses) != set(self.engine.io) or set(self.shapes) != set(self.engine.inputs):
                self.engine.logger.log(Severity.ERROR, "enqueueV3: not every address and input shape is set")
                return False
            shape = self.shapes[sample_name]
            out_name = self.engine.outputs[0]
            out_shape = (shape[0], *self.engine.io[out_name]["shape"][1:])
            t_dtype = trt.nptype(trt.DataType[self.engine.io[timestep_name]["dtype"]])
            addresses = dict(self.addresses)
            self.executions += 1

            def run():
                x = gpu.view(addresses[sample_name], int(np.prod(shape)), np.float32).reshape(shape)
                t = gpu.view(addresses[timestep_name], shape[0], t_dtype)
                result = fake_unet(x, t)
                gpu.view(addresses[out_name], int(np.prod(out_shape)), np.float32)[:] = result.reshape(-1)

            gpu.enqueue(stream_handle, "engine", run)
            return True

    class CudaEngine:
        def __init__(self, plan, logger):
            self.logger = logger
            self.io = {spec["name"]: spec for spec in plan["io"]}
            self.names = [spec["name"] for spec in plan["io"]]
            self.inputs = [spec["name"] for spec in plan["io"] if spec["mode"] == "INPUT"]
            self.outputs = [spec["name"] for spec in plan["io"] if spec["mode"] == "OUTPUT"]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode[self.io[name]["mode"]]

        def get_tensor_dtype(self, name):
            return trt.DataType[self.io[name]["dtype"]]

        def get_tensor_shape(self, name):
            return tuple(self.io[name]["shape"])

        def get_tensor_profile_shape(self, name, profile_index):
            return [tuple(s) for s in self.io[name]["profile"]]

        def create_execution_context(self):
            return ExecutionContext(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                self.logger.log(Severity.ERROR, "Serialization assertion: magic tag does not match")
                return None
            if plan.get("fake_plan") != version:
                self.logger.log(Severity.ERROR, f"plan built by {plan.get('fake_plan')}, this is {version}")
                return None
            return CudaEngine(plan, self.logger)

    trt.OnnxParser, trt.Builder, trt.Runtime = OnnxParser, Builder, Runtime
    return trt


# -- a fake pycuda -------------------------------------------------------------------------------------------


def fake_pycuda(gpu: FakeGpu) -> tuple[types.ModuleType, types.ModuleType]:
    """(pycuda, pycuda.driver) whose allocations land in `gpu`'s memory table."""
    driver = types.ModuleType("pycuda.driver")
    driver.context_stack = []

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.ptr = gpu.allocate(nbytes, "device")

        def __int__(self):
            return self.ptr

        def free(self):
            del gpu.memory[self.ptr]

    class HostAllocation(bytearray):
        def free(self):
            del gpu.memory[np.frombuffer(self, np.uint8).ctypes.data]

    def pagelocked_empty(nbytes, dtype):  # like pycuda: an ndarray whose .base is the allocation
        allocation = HostAllocation(nbytes)
        array = np.ndarray((nbytes // np.dtype(dtype).itemsize,), dtype, buffer=allocation)
        gpu.memory[array.ctypes.data] = (allocation, nbytes, "pinned")
        return array

    class Context:
        def push(self):
            driver.context_stack.append(self)

        def pop(self):
            driver.context_stack.remove(self)

    class Device:
        def __init__(self, index):
            self.index = index

        def retain_primary_context(self):
            return Context()

    driver.init = lambda: None
    driver.Device, driver.mem_alloc, driver.pagelocked_empty = Device, DeviceAllocation, pagelocked_empty
    package = types.ModuleType("pycuda")
    package.driver = driver
    return package, driver


# -- a bundle for the fakes ----------------------------------------------------------------------------------


def write_fake_bundle(directory, batch=(1, 2, 4), precision="fp32", channels=1, size=8, **onnx_extra):
    """dtk.json plus a 'unet.onnx' the fake parser reads (JSON naming the graph's inputs and outputs)."""
    from pathlib import Path

    from dtk.runtime.manifest import Manifest, TensorSpec
    from dtk.runtime.schedule import DiffusionConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    low, opt, high = batch
    dim = low if low == high else "batch"
    image = [channels, size, size]
    config = DiffusionConfig()
    Manifest(
        image_size=(size, size),
        in_channels=channels,
        out_channels=channels,
        inputs=[TensorSpec("sample", "float32", [dim, *image]), TensorSpec("timestep", "float32", [dim])],
        outputs=[TensorSpec("model_output", "float32", [dim, *image])],
        batch={"min": low, "opt": opt, "max": high},
        diffusion=config,
        betas=config.betas,
        precision=precision,
    ).save(directory)
    onnx_dim = low if low == high else -1
    graph = {
        "inputs": [
            {"name": "sample", "shape": [onnx_dim, *image]},
            {"name": "timestep", "shape": [onnx_dim]},
        ],
        "outputs": [{"name": "model_output", "shape": [onnx_dim, *image]}],
        **onnx_extra,
    }
    (directory / "unet.onnx").write_text(json.dumps(graph))
    return directory
