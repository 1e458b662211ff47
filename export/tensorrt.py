"""Build a bundle's TensorRT engine: unet.onnx → unet.plan + its sidecar, and the manifest's `plan` field.

TensorRT 10 (JetPack 6 on Jetson Orin) takes the precision as a builder flag (FP16). TensorRT 11 builds
strongly typed networks only: the precision is the ONNX graph's own, so an fp16 engine comes from an fp16
export (`dtk export --precision fp16`). An int8 bundle is a Q/DQ graph (explicit quantization, no calibrator):
TensorRT 11 and strongly typed builds take it as it is; weakly typed TensorRT 10 also needs the INT8 flag.
The installed major version picks the path. Engines are built on the GPU that will run them; the sidecar
records which, and the runtime refuses a plan built for another TensorRT or GPU. A new engine is checked
against ONNX Runtime (dtk.export.engine_check) before it replaces anything: one that fails leaves no plan.
`engine_name` puts several engines in one bundle (`unet-<name>.plan`, one per GPU model or precision), each
with its sidecar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import locked, sha256, write_bytes
from dtk.runtime.manifest import PLAN_NAME, PRECISIONS, Manifest, resolve_bundle
from dtk.runtime.sidecar import AMPERE, HARDWARE_COMPAT, PlanSidecar, architecture, this_platform

MiB = 1 << 20
OPT_LEVELS = range(0, 6)  # TensorRT's builder optimization levels; 3 is its default


@dataclass
class EngineOptions:
    """How to build unet.plan. Each field is one `dtk build-engine` flag."""

    precision: str | None = None  # fp32 | fp16 | int8; None: the bundle's ONNX precision
    workspace: int | None = (
        None  # MiB of scratch memory TensorRT may use (small Jetson boards); None: its default
    )
    timing_cache: str | Path | None = None  # read if present, written back after the build
    opt_level: int | None = None  # builder optimization level 0..5; None: TensorRT's default (3)
    hardware_compat: str = "none"  # none | ampere+ (one plan for every Ampere-or-newer GPU; not on Jetson)
    version_compat: bool = False  # runs on later TensorRT too (same major, or 10 → 11)
    strongly_typed: bool = False  # TensorRT 10: build strongly typed like 11 does (11 always is)
    device: int = 0  # the GPU to build on, which is the GPU the plan is for
    verbose: bool = False  # all of TensorRT's log, not only warnings and errors
    engine_name: str | None = None  # unet-<name>.plan beside the others; None: unet.plan
    verify: bool = True  # compare the engine with ONNX Runtime before installing it
    atol: float | None = None  # engine check bounds; None: dtk.export.engine_check's for the precision
    rtol: float | None = None
    chain_atol: float | None = None

    def __post_init__(self):
        if self.hardware_compat is True:
            self.hardware_compat = "ampere+"
        elif self.hardware_compat in (False, None):
            self.hardware_compat = "none"
        if self.precision is not None and self.precision not in PRECISIONS:
            raise DtkError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise DtkError(f"unknown hardware compatibility {self.hardware_compat!r}; choose none or ampere+")
        if self.workspace is not None and self.workspace < 1:
            raise DtkError(f"workspace must be at least 1 MiB, got {self.workspace}")
        if self.opt_level is not None and self.opt_level not in OPT_LEVELS:
            raise DtkError(f"opt level must be 0..5, got {self.opt_level}")
        if self.engine_name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.engine_name):
            raise DtkError(
                f"engine name {self.engine_name!r}: use lowercase letters, digits, '.', '_' and '-' "
                "(e.g. orin-nx-fp16)"
            )

    @property
    def plan_name(self) -> str:
        return PLAN_NAME if self.engine_name is None else f"unet-{self.engine_name}.plan"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["timing_cache"] = None if self.timing_cache is None else str(self.timing_cache)
        return out


def build_engine(bundle_dir, options: EngineOptions | None = None, progress: bool = True) -> Path:
    """Build `unet.plan` for the bundle on this machine's GPU and return its path.

    Writes the plan and its sidecar atomically and sets the manifest's `plan`. Without TensorRT or a GPU: one
    DtkError saying what is missing and how to get it."""
    options = options or EngineOptions()
    bundle, manifest = resolve_bundle(bundle_dir)
    onnx_path = bundle / manifest.onnx
    if not onnx_path.is_file():
        raise file_error(onnx_path, "missing: the bundle has no ONNX graph to build from (export it again)")
    trt, gpu = _require_tensorrt_and_gpu(options.device)
    _check_hardware_compat(options, gpu)

    from dtk.runtime.backends.tensorrt import create, make_logger, tensorrt_major

    major = tensorrt_major(trt)
    if major < 10:
        raise DtkError(f"TensorRT {trt.__version__} is too old: dtk builds with TensorRT 10 or 11")
    strongly_typed = major >= 11 or options.strongly_typed
    precision = _precision(options, manifest, strongly_typed, major)

    logger = make_logger(trt, options.verbose)
    builder = create(trt.Builder, logger, "a builder", logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = create(trt.OnnxParser, logger, "an ONNX parser", network, logger)
    logger.clear()
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights (unet.onnx.data) load
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise file_error(
            onnx_path, "TensorRT's ONNX parser failed: " + " | ".join(errors or ["no reason given"])
        )
    shapes = _profile_shapes(manifest)
    dynamic = _check_network_inputs(network, shapes, onnx_path)

    config = builder.create_builder_config()
    _configure(trt, config, options, precision, strongly_typed)
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        logger.clear()
        if config.add_optimization_profile(profile) < 0:
            raise file_error(onnx_path, f"TensorRT refused the batch profile {shapes}: {logger.reason()}")
    if options.timing_cache is not None:
        _load_timing_cache(config, Path(options.timing_cache))

    monitor = _progress_monitor(trt) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    start = time.perf_counter()
    logger.clear()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    seconds = time.perf_counter() - start
    if serialized is None:
        if monitor is not None and monitor.cancelled:
            raise KeyboardInterrupt
        reason = logger.reason("no reason given; run with --verbose")
        raise file_error(onnx_path, f"TensorRT could not build an engine: {reason}")
    if options.timing_cache is not None:
        write_bytes(options.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))

    data = bytes(memoryview(serialized))
    del serialized, parser, network, config, builder  # the builder's memory is not needed for the check
    sidecar = PlanSidecar(
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        architecture=architecture(gpu.compute_capability),
        integrated=gpu.integrated,
        sm_count=gpu.sm_count,
        platform=this_platform(),
        precision=precision,
        profiles=[{name: {"min": low, "opt": opt, "max": high} for name, (low, opt, high) in shapes.items()}],
        onnx=manifest.onnx,
        onnx_sha256=sha256(onnx_path),
        plan_sha256=_sha256_bytes(data),
        strongly_typed=strongly_typed,
        hardware_compat=options.hardware_compat,
        version_compat=options.version_compat,
        build={**options.to_dict(), "seconds": round(seconds, 2), "tf32": precision != "fp32"},
        created_by=_created_by(),
    )
    if options.verify:
        sidecar.parity = _checked(data, sidecar, bundle, manifest, options, precision, progress)
    plan_path = bundle / options.plan_name
    with locked(bundle):  # the lock an export takes to replace the bundle: never write into a folder it swaps
        _, manifest = resolve_bundle(bundle)
        if sha256(bundle / manifest.onnx) != sidecar.onnx_sha256:
            raise file_error(
                bundle, "was exported again while the engine was built; run dtk build-engine again"
            )
        write_bytes(plan_path, data)
        sidecar.save(plan_path)
        manifest.plan = options.plan_name
        manifest.save(bundle)
    return plan_path


def _checked(data: bytes, sidecar, bundle: Path, manifest, options, precision, progress) -> dict:
    """The engine against ONNX Runtime, from a scratch folder in the bundle; EngineParityError when it fails
    (the folder, and so the plan, is gone either way)."""
    from dtk.export.engine_check import EngineParityError, check_engine, tolerance_for

    tolerance = tolerance_for(precision, options.atol, options.rtol, options.chain_atol)
    scratch = Path(tempfile.mkdtemp(prefix=".engine-check-", dir=bundle))
    try:
        candidate = scratch / options.plan_name
        candidate.write_bytes(data)
        sidecar.save(candidate)
        report = check_engine(
            candidate, bundle / manifest.onnx, manifest, precision, tolerance, device=options.device,
            progress=progress,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not report.passed:
        raise EngineParityError(report, options.plan_name)
    return report.to_dict()


def _check_hardware_compat(options: EngineOptions, gpu) -> None:
    """TensorRT builds hardware-compatible plans for discrete Ampere-or-newer GPUs only."""
    if options.hardware_compat != "ampere+":
        return
    if gpu.integrated:
        raise DtkError(
            f"--hardware-compat is not supported on {gpu.name}: TensorRT builds hardware-compatible plans "
            "for discrete GPUs only, not for Jetson's integrated GPU; build without it on each board model"
        )
    if tuple(gpu.compute_capability) < AMPERE:
        raise DtkError(f"--hardware-compat needs an Ampere or newer GPU (sm_80+); {gpu.name} is {gpu.sm}")


def _require_tensorrt_and_gpu(device: int):
    """(tensorrt module, GpuInfo), or one DtkError naming everything that is missing."""
    from dtk.runtime.backends.cuda import Cuda, gpu_info
    from dtk.runtime.backends.tensorrt import import_tensorrt

    problems, trt, gpu = [], None, None
    try:
        trt = import_tensorrt()
    except DtkError as e:
        problems.append(str(e))
    try:
        cuda = Cuda()
        gpu = gpu_info(device, cuda)
        cuda.rt("cudaSetDevice", device)  # TensorRT builds on the current device
    except DtkError as e:
        problems.append(str(e))
    if problems:
        raise DtkError(
            "cannot build a TensorRT engine here: "
            + "; ".join(problems)
            + ". Build on the machine whose GPU will run the engine (on Jetson: on the board itself)."
        )
    return trt, gpu


def _network_flags(trt, strongly_typed: bool) -> int:
    """STRONGLY_TYPED when asked (TensorRT 11 keeps the flag but ignores it: it is always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def _precision(options: EngineOptions, manifest: Manifest, strongly_typed: bool, major: int) -> str:
    requested = options.precision or manifest.precision
    if "int8" in (requested, manifest.precision) and requested != manifest.precision:
        raise DtkError(
            f"an {requested} engine cannot come from this {manifest.precision} bundle: int8 engines are "
            "built from the Q/DQ graph of `dtk export --precision int8` (explicit quantization), and only "
            "as int8"
        )
    if strongly_typed and requested != manifest.precision:
        who = f"TensorRT {major}" if major >= 11 else "--strongly-typed"
        raise DtkError(
            f"{who} builds strongly typed networks, whose precision is the ONNX graph's "
            f"({manifest.precision}); for a {requested} engine export with "
            f"`dtk export --precision {requested}`"
        )
    return requested


def _profile_shapes(manifest: Manifest) -> dict[str, tuple]:
    """{input name: (min, opt, max) shape} from the manifest's batch range."""
    C, (H, W) = manifest.in_channels, manifest.image_size
    batches = [manifest.batch[k] for k in ("min", "opt", "max")]
    sample, timestep = manifest.inputs[0].name, manifest.inputs[1].name
    shapes = {
        sample: tuple((b, C, H, W) for b in batches),
        timestep: tuple((b,) for b in batches),
    }
    for spec in manifest.inputs[2:]:  # class_labels [batch] of a class-conditional model
        shapes[spec.name] = tuple((b,) for b in batches)
    return shapes


def _check_network_inputs(network, shapes: dict[str, tuple], onnx_path: Path) -> bool:
    """The parsed graph must take exactly the manifest's inputs; returns whether any dimension is dynamic."""
    found = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        found[tensor.name] = tuple(int(d) for d in tensor.shape)
    if set(found) != set(shapes):
        raise file_error(onnx_path, f"has inputs {sorted(found)}, the manifest names {sorted(shapes)}")
    for name, dims in found.items():
        low, _, high = shapes[name]
        fits = len(dims) == len(low) and all(
            d in (-1, lo, hi) for d, lo, hi in zip(dims, low, high, strict=True)
        )
        if not fits:
            raise file_error(onnx_path, f"input {name!r} has shape {dims}, the manifest says {low} to {high}")
    return any(d < 0 for dims in found.values() for d in dims)


def _configure(trt, config, options: EngineOptions, precision: str, strongly_typed: bool) -> None:
    if options.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace * MiB)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 only: 11 removed the weak-typing flags
    if precision == "int8" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # TensorRT 10 weakly typed: Q/DQ layers need it
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)  # fp32 means fp32: TF32 matmuls would cost parity with ONNX Runtime
    if options.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _load_timing_cache(config, path: Path) -> None:
    """Start from the cache at `path` when it exists and fits this TensorRT and GPU; otherwise from empty."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        if config.set_timing_cache(cache, ignore_mismatch=False):
            return
    except (RuntimeError, TypeError, ValueError):
        pass
    if data:
        _warn(f"{path}: timing cache is from another TensorRT or GPU, or damaged; starting a fresh one")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _parser_error(error) -> str:
    """'node /down.0/conv (Conv): message' from an ONNX parser error, whatever this TensorRT exposes."""

    def field(name):
        with contextlib.suppress(Exception):
            value = getattr(error, name)()
            return value if value not in (None, "", -1) else None
        return None

    desc = field("desc") or str(error)
    node = field("node_name") or (f"#{field('node')}" if field("node") is not None else None)
    op = field("node_operator")
    where = f"node {node}" + (f" ({op})" if op else "") + ": " if node else ""
    return where + desc


def _progress_monitor(trt):
    """TensorRT's build phases as nested tqdm bars on stderr; Ctrl-C cancels the build."""
    from tqdm import tqdm

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, tuple] = {}  # phase → (bar, depth)
            self._lock = threading.Lock()  # TensorRT may report from several threads
            self.cancelled = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                with self._lock:
                    depth = self._bars[parent_phase][1] + 1 if parent_phase in self._bars else 0
                    bar = tqdm(
                        total=num_steps,
                        desc=phase_name,
                        position=depth,
                        leave=False,
                        unit="step",
                        file=sys.stderr,
                    )
                    self._bars[phase_name] = (bar, depth)
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name, step):
            try:
                with self._lock:
                    if phase_name in self._bars:
                        bar = self._bars[phase_name][0]
                        bar.update(step + 1 - bar.n)
            except KeyboardInterrupt:
                self.cancelled = True
            return not self.cancelled

        def phase_finish(self, phase_name):
            try:
                with self._lock:
                    if phase_name in self._bars:
                        self._bars.pop(phase_name)[0].close()
            except KeyboardInterrupt:
                self.cancelled = True

        def close(self):
            with self._lock:
                for bar, _ in self._bars.values():
                    bar.close()
                self._bars = {}

    return BuildProgress()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _created_by() -> str:
    from dtk import __version__

    return f"dtk {__version__}"
