"""What machine a benchmark ran on: CPU, GPUs (driver, CUDA), Jetson power mode and clocks, library versions.

Torch-free, and nothing heavy is imported: GPUs are found through nvidia-smi (else cuda-python), versions
through package metadata. `system_info` gathers it all for a result's "system" record, `format_system` prints
it as the machine part of a report header, `machine_name` turns it into a short file-name-safe name.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# distributions that provide each library, first match wins (versions are read without importing the library)
DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean"),
    "torch": ("torch",),
    "cuda-python": ("cuda-python", "cuda-bindings"),
    "dtk": ("dtk",),
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


# the instructions int8 and bf16 speed depends on (x86 `flags`, Arm `Features` in /proc/cpuinfo)
MATRIX_FEATURES = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip
# the best tier present names a CPU in result files: the same model name covers hosts with and without them
ISA_TIERS = (
    ("amx_int8", "amx"), ("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni"), ("avx512f", "avx512"),
    ("avx2", "avx2"), ("i8mm", "i8mm"), ("asimddp", "dotprod"), ("asimd", "neon"),
)  # fmt: skip


def isa_tier(features) -> str | None:
    """The most capable int8 tier among `features`: amx, avx512vnni, ..., avx2 (x86); i8mm, dotprod, neon."""
    return next((tier for feature, tier in ISA_TIERS if feature in (features or ())), None)


def cpu_info(root: str | Path = "/") -> dict:
    """CPU model (x86 `model name`, Arm `Hardware`/device-tree model as a fallback), core counts, memory, and
    the matrix-math instructions it has (MATRIX_FEATURES)."""
    root = Path(root)
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    model = None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            model = match.group(1).strip()
            break
    if model is None:
        model = platform.processor() or platform.machine()
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(flags.group(1).split()) if flags else set()
    meminfo = _read(root / "proc/meminfo") or ""
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "features": [f for f in MATRIX_FEATURES if f in flags],
    }


def parse_nvidia_smi(query_csv: str, banner: str | None = None) -> list[dict]:
    """`nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader,nounits`,
    plus the CUDA version from the plain `nvidia-smi` banner ("CUDA Version: 12.4")."""
    cuda = None
    if banner:
        match = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        cuda = match.group(1) if match else None
    gpus = []
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        gpu = {"name": parts[0], "driver": parts[1], "cuda": cuda}
        if len(parts) > 2 and parts[2].replace(".", "", 1).isdigit():
            gpu["memory_mib"] = int(float(parts[2]))
        if len(parts) > 3 and re.fullmatch(r"\d+\.\d+", parts[3]):
            gpu["compute_capability"] = parts[3]
        gpus.append(gpu)
    return gpus


def gpu_info(run=_run) -> list[dict]:
    """GPUs through nvidia-smi, else through cuda-python where it is installed; [] when there is none."""
    fields = "name,driver_version,memory.total,compute_cap"
    query = run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if query is None:  # older drivers do not know compute_cap
        query = run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
        )
    if query is not None:
        return parse_nvidia_smi(query, run(["nvidia-smi"]))
    return _gpu_info_cuda_python()


def _gpu_info_cuda_python() -> list[dict]:
    import importlib.util

    try:
        if importlib.util.find_spec("cuda.bindings") is None:
            return []
        from cuda.bindings import runtime as cudart
    except (ImportError, ValueError):
        return []
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return []
    err, driver = cudart.cudaDriverGetVersion()
    gpus = []
    for device in range(count):
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            continue
        name = (
            props.name.decode(errors="replace").rstrip("\x00")
            if isinstance(props.name, bytes)
            else props.name
        )
        gpus.append(
            {
                "name": str(name),
                "driver": None,
                "cuda": f"{driver // 1000}.{driver % 1000 // 10}",
                "memory_mib": int(props.totalGlobalMem) // 2**20,
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q` prints "NV Power Mode: MAXN" and the mode's number on the next line."""
    match = re.search(r"NV Power Mode:\s*(\S.*?)\s*\n\s*(\d+)", text + "\n")
    if match:
        return {"name": match.group(1), "id": int(match.group(2))}
    match = re.search(r"NV Power Mode:\s*(\S.*)", text)
    return {"name": match.group(1).strip(), "id": None} if match else {}


def jetson_info(root: str | Path = "/", run=_run) -> dict | None:
    """On a Jetson: board, L4T release, power mode (nvpmodel -q) and current clocks from sysfs; else None."""
    root = Path(root)
    release = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model")
    if release is None and not (model and "jetson" in model.lower()):
        return None
    info: dict = {"model": model}
    if release:
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        info["l4t"] = f"R{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0]
    query = run(["nvpmodel", "-q"])
    info["power_mode"] = parse_nvpmodel(query) if query else None
    cpu_mhz = []
    for path in sorted(glob.glob(str(root / "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))):
        value = _read(Path(path))
        if value and value.isdigit():
            cpu_mhz.append(int(value) // 1000)
    info["cpu_mhz"] = cpu_mhz
    gpu = {}
    for device in sorted(glob.glob(str(root / "sys/class/devfreq/*"))):
        name = os.path.basename(device)
        if not any(tag in name for tag in ("gpu", "ga10b", "gv11b", "gp10b")):
            continue
        for key in ("cur_freq", "min_freq", "max_freq"):
            value = _read(Path(device) / key)
            if value and value.isdigit():
                gpu[key.replace("_freq", "_mhz")] = int(value) // 1_000_000
        break
    info["gpu_clock"] = gpu or None
    emc = _read(root / "sys/kernel/debug/bpmp/debug/clk/emc/rate")  # readable as root only
    info["emc_mhz"] = int(emc) // 1_000_000 if emc and emc.isdigit() else None
    return info


def package_versions() -> dict:
    """Versions of the libraries a figure depends on, from package metadata: nothing is imported here.

    A library that is already imported reports its own `__version__` (the one that actually ran)."""
    versions = {}
    for name, dists in DISTRIBUTIONS.items():
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        for dist in dists:
            if version:
                break
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
        versions[name] = version
    return versions


def system_info(root: str | Path = "/", run=_run) -> dict:
    """Everything the header of a benchmark names: host, CPU, GPUs, Jetson power state, library versions."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_info(root),
        "load_average": _load_average(),
        "gpus": gpu_info(run),
        "jetson": jetson_info(root, run),
        "versions": package_versions(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load: on a shared machine, what else competed for the cores while measuring."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_name(system: dict) -> str:
    """A short, file-name-safe name of the machine behind a result: `cpu-amd-epyc-2c-avx2` (the CPU's ISA
    tier where known: int8 and bf16 speed depend on it), `gpu-nvidia-h100`."""
    if system.get("gpus"):
        prefix, name = "gpu", system["gpus"][0]["name"]
    elif system.get("jetson"):
        prefix, name = "jetson", system["jetson"].get("model") or ""
    else:
        cpu = system["cpu"]
        tier = isa_tier(cpu.get("features"))
        prefix, name = "cpu", f"{cpu['model']}-{cpu['usable_cores']}c" + (f"-{tier}" if tier else "")
    slug = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return f"{prefix}-{slug}" if slug else prefix


def format_system(system: dict) -> list[tuple[str, str]]:
    """The machine part of the header as (label, text) rows."""
    cpu = system["cpu"]
    memory = f", {cpu['memory_gib']} GiB" if cpu.get("memory_gib") else ""
    rows = [
        (
            "system",
            f"{cpu['model']}, {cpu['usable_cores']}/{cpu['cores']} cores{memory}"
            + (f" ({' '.join(cpu['features'])})" if cpu.get("features") else "")
            + f" | {system['platform']} | Python {system['python']}",
        )
    ]
    load = system.get("load_average")
    if load:
        rows[0] = (rows[0][0], rows[0][1] + f" | load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    gpus = system.get("gpus") or []
    for gpu in gpus:
        parts = [gpu["name"]]
        if gpu.get("compute_capability"):
            parts.append(f"sm {gpu['compute_capability']}")
        if gpu.get("memory_mib"):
            parts.append(f"{gpu['memory_mib'] / 1024:.0f} GiB")
        parts.append(f"driver {gpu.get('driver') or '?'}")
        parts.append(f"CUDA {gpu.get('cuda') or '?'}")
        rows.append(("gpu", ", ".join(parts)))
    if not gpus:
        rows.append(("gpu", "none found (nvidia-smi / cuda-python)"))
    jetson = system.get("jetson")
    if jetson:
        mode = jetson.get("power_mode") or {}
        mode_text = f"{mode.get('name')} ({mode.get('id')})" if mode else "unknown (nvpmodel -q failed)"
        cpu_mhz = jetson.get("cpu_mhz") or []
        clocks = f"CPU {max(cpu_mhz)} MHz ×{len(cpu_mhz)}" if cpu_mhz else "CPU clock unknown"
        gpu_clock = jetson.get("gpu_clock") or {}
        if gpu_clock.get("cur_mhz") is not None:
            clocks += f", GPU {gpu_clock['cur_mhz']} MHz (max {gpu_clock.get('max_mhz', '?')})"
        if jetson.get("emc_mhz"):
            clocks += f", EMC {jetson['emc_mhz']} MHz"
        rows.append(
            ("jetson", f"{jetson.get('model')}, L4T {jetson.get('l4t', '?')}, power mode {mode_text}")
        )
        rows.append(("clocks", clocks))
    versions = system.get("versions", {})
    rows.append(("versions", " | ".join(f"{k} {v or '-'}" for k, v in versions.items())))
    return rows
