"""cuda-python plumbing for the TensorRT backend: checked calls, buffers, one stream, update kernel, graphs.

`CudaSession` owns one GPU's stream and everything made through it (device buffers from cudaMalloc, pinned
host staging from cudaMallocHost, the NVRTC-compiled sampler update kernel, captured CUDA graphs) and frees
all of it on close. cuda-python is imported lazily: `cuda.bindings` (12.6 and later) or the older
`cuda.cudart` layout. pycuda can stand in as the allocator where an application already uses it; it is never
required.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dtk.runtime.backends.update_kernel import (  # noqa: F401 (the kernel's names are cuda's API)
    BLOCK_SIZE,
    COEFF_SLOTS,
    UPDATE_KERNEL_NAME,
    UPDATE_KERNEL_SOURCE,
    kernel_coefficients,
)
from dtk.runtime.errors import DtkError

CUDA_PYTHON_HINT = (
    "install it with `pip install dtk[tensorrt]` (on Jetson `pip install 'dtk[jetson]'`; or `pip install "
    "cuda-python` of your driver's CUDA major)"
)
NVRTC_HINT = (
    "NVRTC (libnvrtc) is missing: with cuda-python 13 `pip install nvidia-cuda-nvrtc` (13.x), with 12.8 or "
    "later 12.x `pip install nvidia-cuda-nvrtc-cu12` (cuda-bindings finds these wheels from 12.8 on), or "
    "install the CUDA toolkit; JetPack ships libnvrtc on Jetson (/usr/local/cuda/lib64)"
)
# cuModuleLoadData's answers when the driver cannot run what NVRTC made (an NVRTC newer than the driver)
MODULE_TOO_NEW = ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_NO_BINARY_FOR_GPU")
ALLOCATORS = ("cuda-python", "pycuda")

MAX_BLOCKS = 65535


class CudaError(DtkError):
    """A CUDA, driver or NVRTC call failed; the message names the call and the error, `code` its enum name."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class CudaLibraryMissing(CudaError):
    """cuda-python could not load a library it wraps (libcuda without a driver, libnvrtc without NVRTC)."""


class UpdateKernelUnavailable(DtkError):
    """The update kernel cannot run here; callers fall back to the host update (with a warning saying why)."""


class NvrtcUnavailable(UpdateKernelUnavailable):
    """The update kernel cannot be compiled here (no NVRTC)."""


@dataclass(frozen=True)
class Bindings:
    runtime: object
    driver: object
    nvrtc: object


def _load_bindings() -> Bindings:
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python before 12.6
            from cuda import cudart as runtime
            from cuda import nvrtc
        except ImportError:
            raise DtkError(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None
    return Bindings(runtime, driver, nvrtc)


class Cuda:
    """cuda-python, every call checked: `cuda.rt("cudaMalloc", n)` returns the pointer or raises CudaError."""

    def __init__(self, bindings: Bindings | None = None):
        self.bindings = bindings or _load_bindings()
        self.runtime = self.bindings.runtime
        self.driver = self.bindings.driver
        self.nvrtc = self.bindings.nvrtc

    def rt(self, name: str, *args):
        return self._call(self.runtime, name, args)

    def drv(self, name: str, *args):
        return self._call(self.driver, name, args)

    def rtc(self, name: str, *args):
        return self._call(self.nvrtc, name, args)

    def _call(self, module, name: str, args: tuple):
        try:
            result = getattr(module, name)(*args)
        except RuntimeError as e:  # cuda-python raises when the library behind a call cannot be loaded
            raise CudaLibraryMissing(f"{name}: {e}") from None
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            raise CudaError(f"{name} failed: {self.describe(error)}", getattr(error, "name", str(error)))
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def describe(self, error) -> str:
        """'cudaErrorMemoryAllocation (out of memory)' for any cudaError_t, CUresult or nvrtcResult."""
        lookups = {
            "cudaError_t": (self.runtime, "cudaGetErrorName", "cudaGetErrorString"),
            "CUresult": (self.driver, "cuGetErrorName", "cuGetErrorString"),
            "nvrtcResult": (self.nvrtc, "nvrtcGetErrorString", None),
        }
        module, name_fn, text_fn = lookups.get(type(error).__name__, (None, None, None))
        try:
            name = _text(getattr(module, name_fn)(error)[1])
            text = _text(getattr(module, text_fn)(error)[1]) if text_fn else ""
        except Exception:  # describing an error must never hide it
            return f"error {int(error)} ({error})"
        return f"{name} ({text})" if text and text != name else name


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode(errors="replace")
    return str(value)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    sm_count: int | None = None  # multiprocessors: Orin modules share a name, not a count
    integrated: bool | None = None  # shares memory with the CPU (Jetson)

    @property
    def sm(self) -> str:
        return "sm_{}{}".format(*self.compute_capability)


def gpu_info(device: int = 0, cuda: Cuda | None = None) -> GpuInfo:
    """Name, compute capability and memory of GPU `device`; a DtkError saying why when there is none."""
    cuda = cuda or Cuda()
    try:
        count = cuda.rt("cudaGetDeviceCount")
    except CudaError as e:
        detail = f"; {driver_mismatch(cuda)}" if e.code == "cudaErrorInsufficientDriver" else ""
        raise DtkError(
            f"no CUDA GPU is usable here ({e}{detail}); TensorRT needs an NVIDIA GPU and its driver"
        ) from None
    if not count:
        raise DtkError("no CUDA GPU is visible (cudaGetDeviceCount returned 0); check CUDA_VISIBLE_DEVICES")
    if not 0 <= device < count:
        raise DtkError(f"GPU {device} does not exist; this machine has {count} (0..{count - 1})")
    prop = cuda.rt("cudaGetDeviceProperties", device)
    return GpuInfo(
        device,
        _text(prop.name),
        (int(prop.major), int(prop.minor)),
        int(prop.totalGlobalMem),
        int(prop.multiProcessorCount),
        bool(prop.integrated),
    )


def driver_mismatch(cuda: Cuda) -> str:
    """'the driver supports CUDA 12.6, these cuda-python bindings are 13.0.2 (CUDA 13.0)' and what to do."""
    try:
        driver = _cuda_version(cuda.rt("cudaDriverGetVersion"))
    except DtkError:
        driver = "unknown"
    try:
        runtime = _cuda_version(cuda.rt("cudaRuntimeGetVersion"))
    except DtkError:
        runtime = "unknown"
    bindings = f"these cuda-python bindings are {_bindings_version(cuda)} (CUDA {runtime})"
    if driver == "unknown":
        return f"{bindings}; update the driver or install bindings of its CUDA major"
    major = int(driver.split(".")[0])
    return (
        f"the NVIDIA driver supports CUDA {driver}, {bindings}: install bindings of the driver's CUDA "
        f"major (`pip install 'cuda-python>={driver},<{major + 1}'`; on Jetson with JetPack 6 "
        "`pip install 'dtk[jetson]'`), or update the driver"
    )


def _cuda_version(value) -> str:
    """12060 → '12.6'; 0 (no driver) → 'unknown'."""
    value = int(value)
    return f"{value // 1000}.{value % 1000 // 10}" if value else "unknown"


def _bindings_version(cuda: Cuda) -> str:
    import importlib.metadata

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return getattr(cuda.runtime, "__version__", "unknown")


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int


@dataclass
class HostBuffer:
    """Pinned (page-locked) host memory, readable and writable as numpy arrays."""

    ptr: int
    nbytes: int
    _raw: np.ndarray | None = field(default=None, repr=False, compare=False)

    def array(self, dtype, count: int | None = None) -> np.ndarray:
        if self._raw is None:
            self._raw = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))
        view = self._raw.view(np.dtype(dtype))
        return view if count is None else view[:count]


class CudaAllocator:
    """cudaMalloc and cudaMallocHost through cuda-python (the default)."""

    name = "cuda-python"

    def __init__(self, cuda: Cuda):
        self.cuda = cuda

    def device(self, nbytes: int) -> int:
        return int(self.cuda.rt("cudaMalloc", nbytes))

    def free_device(self, ptr: int) -> None:
        self.cuda.rt("cudaFree", ptr)

    def host(self, nbytes: int) -> int:
        return int(self.cuda.rt("cudaMallocHost", nbytes))

    def free_host(self, ptr: int) -> None:
        self.cuda.rt("cudaFreeHost", ptr)

    def close(self) -> None:
        pass


class PyCudaAllocator:
    """The same buffers from pycuda, in the device's primary context (the one the CUDA runtime uses)."""

    name = "pycuda"

    def __init__(self, device: int):
        try:
            import pycuda.driver as drv
        except ImportError:
            raise DtkError(
                "allocator 'pycuda' needs pycuda (`pip install pycuda`); the default does not"
            ) from None
        drv.init()
        self._drv = drv
        self._context = drv.Device(device).retain_primary_context()
        self._context.push()
        self._device: dict[int, object] = {}
        self._host: dict[int, np.ndarray] = {}

    def device(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(nbytes)
        self._device[int(allocation)] = allocation
        return int(allocation)

    def free_device(self, ptr: int) -> None:
        self._device.pop(ptr).free()

    def host(self, nbytes: int) -> int:
        array = self._drv.pagelocked_empty(nbytes, np.uint8)
        self._host[array.ctypes.data] = array
        return array.ctypes.data

    def free_host(self, ptr: int) -> None:
        self._host.pop(ptr).base.free()

    def close(self) -> None:
        self._context.pop()


class CudaGraph:
    """An instantiated graph captured on the session's stream; `launch` replays it there."""

    def __init__(self, session: CudaSession, graph, graph_exec):
        self._session, self._graph, self._exec = session, graph, graph_exec

    def launch(self) -> None:
        self._session.cuda.rt("cudaGraphLaunch", self._exec, self._session.stream)

    def destroy(self) -> None:
        if self._exec is None:
            return
        cuda = self._session.cuda
        cuda.rt("cudaGraphExecDestroy", self._exec)
        cuda.rt("cudaGraphDestroy", self._graph)
        self._exec = self._graph = None
        self._session._graphs.remove(self)


class CudaSession:
    """One GPU and one non-blocking stream, with every buffer, module and graph made through it."""

    def __init__(
        self,
        device: int = 0,
        allocator: str = "cuda-python",
        cuda: Cuda | None = None,
        gpu: GpuInfo | None = None,
    ):
        if allocator not in ALLOCATORS:
            raise DtkError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
        self.cuda = cuda or Cuda()
        self.gpu = gpu or gpu_info(device, self.cuda)
        self.device = device
        self._device_buffers: list[DeviceBuffer] = []
        self._host_buffers: list[HostBuffer] = []
        self._modules: list = []
        self._graphs: list[CudaGraph] = []
        self.stream = None
        self.closed = False
        self.activate()
        self.allocator = CudaAllocator(self.cuda) if allocator == "cuda-python" else PyCudaAllocator(device)
        try:
            self.stream = self.cuda.rt("cudaStreamCreateWithFlags", self.cuda.runtime.cudaStreamNonBlocking)
        except BaseException:
            self.close()
            raise

    @property
    def stream_handle(self) -> int:
        """The stream as the integer handle TensorRT's execute_async_v3 takes."""
        return int(self.stream)

    def activate(self) -> None:
        """Make this GPU (its primary context) current on the calling thread."""
        self.cuda.rt("cudaSetDevice", self.device)

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        buffer = DeviceBuffer(self.allocator.device(nbytes), nbytes)
        self._device_buffers.append(buffer)
        return buffer

    def host_buffer(self, nbytes: int) -> HostBuffer:
        buffer = HostBuffer(self.allocator.host(nbytes), nbytes)
        self._host_buffers.append(buffer)
        return buffer

    def upload(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int) -> None:
        _check_fits(nbytes, dst, src)
        kind = self.cuda.runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.cuda.rt("cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, kind, self.stream)

    def download(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int) -> None:
        _check_fits(nbytes, dst, src)
        kind = self.cuda.runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.cuda.rt("cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, kind, self.stream)

    def zero(self, buffer: DeviceBuffer, nbytes: int | None = None) -> None:
        nbytes = buffer.nbytes if nbytes is None else nbytes
        _check_fits(nbytes, buffer)
        self.cuda.rt("cudaMemsetAsync", buffer.ptr, 0, nbytes, self.stream)

    def synchronize(self) -> None:
        self.cuda.rt("cudaStreamSynchronize", self.stream)

    def load_function(self, image: bytes, name: str):
        """Load a cubin or PTX image into this GPU's context and return its kernel `name`."""
        self.cuda.drv("cuInit", 0)
        self.activate()  # the module belongs to the current context
        module = self.cuda.drv("cuModuleLoadData", image)
        self._modules.append(module)
        return self.cuda.drv("cuModuleGetFunction", module, name.encode())

    def capture(self, enqueue: Callable[[], None]) -> CudaGraph:
        """Record what `enqueue` puts on the stream (nothing runs) and instantiate it as a graph to replay."""
        runtime = self.cuda.runtime
        mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.cuda.rt("cudaStreamBeginCapture", self.stream, mode)
        try:
            enqueue()
        except BaseException:
            with contextlib.suppress(CudaError):
                broken = self.cuda.rt("cudaStreamEndCapture", self.stream)
                if broken is not None:
                    self.cuda.rt("cudaGraphDestroy", broken)
            raise
        graph = self.cuda.rt("cudaStreamEndCapture", self.stream)
        try:
            graph_exec = self.cuda.rt("cudaGraphInstantiate", graph, 0)
        except CudaError:
            self.cuda.rt("cudaGraphDestroy", graph)
            raise
        captured = CudaGraph(self, graph, graph_exec)
        self._graphs.append(captured)
        return captured

    def close(self) -> None:
        """Free everything, even after an error; the first failure is raised once all is released."""
        if self.closed:
            return
        self.closed = True
        failures: list[BaseException] = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except Exception as e:  # keep releasing the rest
                failures.append(e)

        attempt(self.activate)  # modules unload from, and memory is freed in, the current context
        if self.stream is not None:
            attempt(self.synchronize)
        for graph in list(self._graphs):
            attempt(graph.destroy)
        for module in self._modules:
            attempt(self.cuda.drv, "cuModuleUnload", module)
        for buffer in self._device_buffers:
            attempt(self.allocator.free_device, buffer.ptr)
        for buffer in self._host_buffers:
            attempt(self.allocator.free_host, buffer.ptr)
        self._graphs, self._modules, self._device_buffers, self._host_buffers = [], [], [], []
        if self.stream is not None:
            attempt(self.cuda.rt, "cudaStreamDestroy", self.stream)
            self.stream = None
        if hasattr(self, "allocator"):
            attempt(self.allocator.close)
        if failures:
            raise failures[0]


def _check_fits(nbytes: int, *buffers) -> None:
    for buffer in buffers:
        if nbytes > buffer.nbytes:
            raise ValueError(f"copy of {nbytes} bytes into a {buffer.nbytes}-byte buffer")


_COMPILED: dict[tuple[int, int], bytes] = {}


def compile_update_kernel(cuda: Cuda, compute_capability: tuple[int, int]) -> bytes:
    """The update kernel for this GPU: a cubin for its sm, or PTX for the newest arch NVRTC knows below it."""
    if compute_capability in _COMPILED:
        return _COMPILED[compute_capability]
    arch = compute_capability[0] * 10 + compute_capability[1]
    try:
        program = cuda.rtc("nvrtcCreateProgram", UPDATE_KERNEL_SOURCE.encode(), b"dtk_update.cu", 0, [], [])
    except CudaLibraryMissing as e:
        raise NvrtcUnavailable(f"{NVRTC_HINT} ({e})") from None
    try:
        supported = [int(a) for a in cuda.rtc("nvrtcGetSupportedArchs")]
        cubin = arch in supported
        if cubin:
            option = f"--gpu-architecture=sm_{arch}"
        else:
            older = [a for a in supported if a <= arch]
            if not older:
                raise NvrtcUnavailable(
                    f"this NVRTC cannot target sm_{arch} (it knows {supported}); update CUDA"
                )
            option = f"--gpu-architecture=compute_{max(older)}"
        try:
            cuda.rtc("nvrtcCompileProgram", program, 1, [option.encode()])
        except CudaError as e:
            raise DtkError(  # noqa: B904 (the compiler log is the useful part, not the chain)
                f"NVRTC could not compile the sampler update kernel: {e}\n{_program_log(cuda, program)}"
            )
        size_fn, get_fn = (
            ("nvrtcGetCUBINSize", "nvrtcGetCUBIN") if cubin else ("nvrtcGetPTXSize", "nvrtcGetPTX")
        )
        buffer = bytearray(int(cuda.rtc(size_fn, program)))  # cuda-python writes into it: never `bytes`
        cuda.rtc(get_fn, program, buffer)
        image = bytes(buffer)
    finally:
        cuda.rtc("nvrtcDestroyProgram", program)
    _COMPILED[compute_capability] = image
    return image


def _program_log(cuda: Cuda, program) -> str:
    try:
        log = bytearray(int(cuda.rtc("nvrtcGetProgramLogSize", program)))
        cuda.rtc("nvrtcGetProgramLog", program, log)
        return _text(bytes(log))
    except DtkError:
        return "(no compiler log)"


class UpdateKernel:
    """The sampler update on device buffers, launched on the session's stream (graph capture records it)."""

    def __init__(self, session: CudaSession):
        self._session = session
        image = compile_update_kernel(session.cuda, session.gpu.compute_capability)
        try:
            self._function = session.load_function(image, UPDATE_KERNEL_NAME)
        except CudaError as e:
            if e.code not in MODULE_TOO_NEW:
                raise
            raise UpdateKernelUnavailable(
                f"the driver cannot load the update kernel NVRTC compiled ({e}): NVRTC is newer than the "
                "driver; install the NVRTC of the driver's CUDA major or update the driver"
            ) from None

    def launch(
        self,
        x: DeviceBuffer,
        x0_prev: DeviceBuffer,
        out: DeviceBuffer,
        noise: DeviceBuffer,
        coeffs: DeviceBuffer,
        n: int,
        image_elements: int,
        out_u: DeviceBuffer | None = None,
        x_copy: DeviceBuffer | None = None,
    ) -> None:
        """x ← x_next and the x0 history ← (x0, x0_prev) over the first `n` float32 elements, images of
        `image_elements` each; x0_prev holds [2, n] (x0_prev, then x0_prev2); coeffs holds one
        `kernel_coefficients` row. With `out_u` (the unconditional output) the update uses
        out_u + s·(out − out_u), s from the row; x_next also goes to `x_copy` when given."""
        if image_elements < 1 or n % image_elements:
            raise ValueError(f"{n} elements are not whole images of {image_elements}")
        extra = [b for b in (out_u, x_copy) if b is not None]
        _check_fits(4 * n, x, out, noise, *extra)
        _check_fits(8 * n, x0_prev)
        _check_fits(4 * COEFF_SLOTS, coeffs)
        # cuLaunchKernel takes an array of pointers to the argument values; all nine are 8 bytes wide.
        optional = [b.ptr if b is not None else 0 for b in (out_u, x_copy)]  # 0: a null pointer
        values = np.array(
            [x.ptr, x0_prev.ptr, out.ptr, noise.ptr, coeffs.ptr, n, image_elements, *optional],
            dtype=np.uint64,
        )
        pointers = values.ctypes.data + 8 * np.arange(len(values), dtype=np.uint64)
        blocks = max(1, min(-(-image_elements // BLOCK_SIZE), MAX_BLOCKS))
        self._session.cuda.drv(
            "cuLaunchKernel",
            self._function,
            blocks,
            n // image_elements,
            1,
            BLOCK_SIZE,
            1,
            1,
            0,
            self._session.stream,
            pointers.ctypes.data,
            0,
        )
