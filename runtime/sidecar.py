"""unet.plan.json: what a TensorRT plan was built with and for, and whether this machine may run it.

A plan runs only under the TensorRT version and on the GPU model it was built for, unless it was built
version-compatible (later TensorRT of the same major, or the next major) or hardware-compatible (any discrete
Ampere or newer GPU on the same platform; never on Jetson's integrated GPUs). A GPU model is its name, compute
capability and SM count (Jetson Orin modules share one name). Anything else is refused here with a rebuild
hint, before TensorRT sees the plan.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dtk.runtime.errors import file_error
from dtk.runtime.files import write_text
from dtk.runtime.manifest import ONNX_NAME, PRECISIONS, SIDECAR_SUFFIX

SCHEMA = "dtk.plan"
SCHEMA_VERSION = 2  # 2 added architecture, integrated, sm_count, platform and parity; 1 is still read
HARDWARE_COMPAT = ("none", "ampere+")
AMPERE = (8, 0)
# Version-compatible plans also run on these later majors (TensorRT's support matrix): built -> runtime majors
CROSS_MAJOR = {8: (9, 10), 10: (11,)}
ARCHITECTURES = {7: "Volta", 8: "Ampere", 9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell"}


@dataclass
class PlanSidecar:
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profiles: list[dict]  # per optimization profile: {input name: {"min": shape, "opt": shape, "max": shape}}
    onnx_sha256: str
    plan_sha256: str
    onnx: str = ONNX_NAME
    strongly_typed: bool = False
    hardware_compat: str = "none"
    version_compat: bool = False
    build: dict = field(default_factory=dict)  # the build options and how long it took, informative
    created_by: str = ""
    architecture: str = ""  # the GPU's, e.g. "Ampere"; "" in schema 1 sidecars
    integrated: bool | None = None  # an integrated GPU (Jetson); None: not recorded (schema 1)
    sm_count: int | None = None  # multiprocessors; None: not recorded (schema 1)
    platform: str = ""  # e.g. "linux_aarch64"; "" in schema 1 sidecars
    parity: dict = field(default_factory=dict)  # the engine against ONNX Runtime at build time

    @property
    def sm(self) -> str:
        return "sm_{}{}".format(*self.compute_capability)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created_by": self.created_by,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "architecture": self.architecture,
            "integrated": self.integrated,
            "sm_count": self.sm_count,
            "platform": self.platform,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "hardware_compat": self.hardware_compat,
            "version_compat": self.version_compat,
            "profiles": self.profiles,
            "onnx": self.onnx,
            "onnx_sha256": self.onnx_sha256,
            "plan_sha256": self.plan_sha256,
            "build": self.build,
            "parity": self.parity,
        }

    def save(self, plan_path: str | Path) -> Path:
        path = sidecar_path(plan_path)
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data, where: str = "unet.plan.json") -> PlanSidecar:
        def need(cond, problem):
            if not cond:
                raise file_error(where, problem)

        need(
            isinstance(data, dict) and data.get("schema") == SCHEMA,
            f'not a dtk plan sidecar (no "schema": "{SCHEMA}")',
        )
        version = data.get("schema_version")
        need(isinstance(version, int), "schema_version is missing")
        need(version <= SCHEMA_VERSION, f"schema version {version} is newer than this dtk reads; upgrade dtk")
        try:
            major, minor = (int(v) for v in data["compute_capability"])
            sidecar = cls(
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=(major, minor),
                precision=data["precision"],
                profiles=list(data["profiles"]),
                onnx_sha256=str(data["onnx_sha256"]),
                plan_sha256=str(data["plan_sha256"]),
                onnx=str(data.get("onnx", ONNX_NAME)),
                strongly_typed=bool(data.get("strongly_typed", False)),
                hardware_compat=data.get("hardware_compat", "none"),
                version_compat=bool(data.get("version_compat", False)),
                build=dict(data.get("build", {})),
                created_by=str(data.get("created_by", "")),
                architecture=str(data.get("architecture", "")),
                integrated=None if data.get("integrated") is None else bool(data["integrated"]),
                sm_count=None if data.get("sm_count") is None else int(data["sm_count"]),
                platform=str(data.get("platform", "")),
                parity=dict(data.get("parity") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise file_error(where, f"malformed sidecar ({type(e).__name__}: {e})") from None
        need(sidecar.precision in PRECISIONS, f"unknown precision {sidecar.precision!r}")
        need(
            sidecar.hardware_compat in HARDWARE_COMPAT, f"unknown hardware_compat {sidecar.hardware_compat!r}"
        )
        need(
            bool(_version_tuple(sidecar.tensorrt_version)),
            f"unreadable TensorRT version {sidecar.tensorrt_version!r}",
        )
        return sidecar


@dataclass(frozen=True)
class Target:
    """The machine a plan is about to run on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    sm_count: int | None = None
    integrated: bool | None = None
    platform: str = ""

    @property
    def sm(self) -> str:
        return "sm_{}{}".format(*self.compute_capability)


def this_platform() -> str:
    """The OS and CPU a plan is built or loaded on, as TensorRT plans are tied to them: "linux_aarch64"."""
    return f"{sys.platform}_{_platform.machine().lower()}"


def architecture(compute_capability: tuple[int, int]) -> str:
    major, minor = compute_capability
    if (major, minor) == (8, 9):
        return "Ada"
    return ARCHITECTURES.get(major, f"sm_{major}x")


def sidecar_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + SIDECAR_SUFFIX)


def load_sidecar(plan_path: str | Path) -> PlanSidecar:
    """Read and validate the sidecar beside `plan_path`."""
    plan_path = Path(plan_path)
    path = sidecar_path(plan_path)
    if not path.is_file():
        raise file_error(
            plan_path,
            f"has no sidecar {path.name}, so nothing says which TensorRT and GPU it was built for; "
            f"{rebuild_hint(plan_path)}",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    return PlanSidecar.from_dict(data, str(path))


def rebuild_hint(plan_path: str | Path) -> str:
    return f"rebuild it on the target with `dtk build-engine {Path(plan_path).parent}`"


def compatibility_problems(sidecar: PlanSidecar, target: Target) -> list[str]:
    """Why `target` may not run the plan; empty when it may."""
    problems = []
    if not tensorrt_accepts(sidecar.tensorrt_version, target.tensorrt_version, sidecar.version_compat):
        built = f"TensorRT {sidecar.tensorrt_version}" + (
            " (version-compatible)" if sidecar.version_compat else ""
        )
        problems.append(f"built with {built}, this machine has TensorRT {target.tensorrt_version}")
    if sidecar.platform and target.platform and sidecar.platform != target.platform:
        problems.append(f"built on {sidecar.platform}, this machine is {target.platform}")
    if sidecar.hardware_compat == "ampere+":
        problems += _hardware_compat_problems(sidecar, target)
    elif tuple(target.compute_capability) != tuple(sidecar.compute_capability):
        problems.append(
            f"built for {sidecar.gpu_name} ({sidecar.sm}), this GPU is {target.gpu_name} ({target.sm})"
        )
    elif target.gpu_name != sidecar.gpu_name:
        problems.append(
            f"built on {sidecar.gpu_name}, this GPU is {target.gpu_name} "
            f"(same {target.sm}, but TensorRT tunes a plan to one GPU model)"
        )
    elif sidecar.sm_count and target.sm_count and sidecar.sm_count != target.sm_count:
        problems.append(
            f"built on {sidecar.gpu_name} with {sidecar.sm_count} SMs, this one has {target.sm_count} "
            f"(same name and {target.sm}, another module: TensorRT tunes a plan to one GPU model)"
        )
    return problems


def _hardware_compat_problems(sidecar: PlanSidecar, target: Target) -> list[str]:
    if sidecar.integrated or target.integrated:
        where = target.gpu_name if target.integrated else sidecar.gpu_name
        return [
            f"built hardware-compatible (ampere+), which TensorRT does not support on integrated GPUs "
            f"such as {where} (Jetson)"
        ]
    if tuple(target.compute_capability) < AMPERE:
        return [
            f"built hardware-compatible for Ampere and newer GPUs (sm_80+), "
            f"this GPU is {target.gpu_name} ({target.sm})"
        ]
    return []


def check_sidecar(sidecar: PlanSidecar, target: Target, plan_path: str | Path) -> None:
    """Refuse a plan this machine may not run, saying what differs and how to rebuild it."""
    problems = compatibility_problems(sidecar, target)
    if problems:
        raise file_error(plan_path, "; ".join(problems) + f"; {rebuild_hint(plan_path)}")


def check_plan_bytes(sidecar: PlanSidecar, data: bytes, plan_path: str | Path) -> None:
    """The sidecar must describe these very bytes (a rebuild interrupted between plan and sidecar leaves a
    pair that does not match)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar.plan_sha256:
        raise file_error(
            plan_path, f"does not match its sidecar (sha256 {digest[:12]}…); {rebuild_hint(plan_path)}"
        )


def tensorrt_accepts(built: str, running: str, version_compat: bool) -> bool:
    """Whether TensorRT `running` loads a plan built by TensorRT `built`."""
    if built == running:
        return True
    if not version_compat:
        return False
    b, r = _version_tuple(built), _version_tuple(running)
    if not b or not r or r < b:
        return False
    return r[0] == b[0] or r[0] in CROSS_MAJOR.get(b[0], ())


def _version_tuple(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(v) for v in match.group(0).split(".")) if match else ()


def current_target(device: int = 0) -> Target:
    """The running TensorRT and GPU `device`; DtkError saying what is missing when either is."""
    from dtk.runtime.backends.cuda import gpu_info
    from dtk.runtime.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    return target_for(trt.__version__, gpu_info(device))


def target_for(tensorrt_version: str, gpu) -> Target:
    """The Target of TensorRT `tensorrt_version` on `gpu` (a dtk.runtime.backends.cuda.GpuInfo), here."""
    return Target(
        tensorrt_version, gpu.name, gpu.compute_capability, gpu.sm_count, gpu.integrated, this_platform()
    )


def check_plan(plan_path: str | Path, device: int = 0) -> PlanSidecar:
    """Load the plan's sidecar and check it against this machine; returns the sidecar."""
    sidecar = load_sidecar(plan_path)
    check_sidecar(sidecar, current_target(device), plan_path)
    return sidecar


def bundle_plans(bundle_dir: str | Path, preferred: str | None = None) -> list[Path]:
    """The bundle's plans that have a sidecar: the manifest's own first, then `unet-<name>.plan` by name."""
    bundle_dir = Path(bundle_dir)
    found = sorted(p for p in bundle_dir.glob("unet*.plan") if sidecar_path(p).is_file())
    found.sort(key=lambda p: p.name != preferred)
    return found


def pick_plan(plans: list[Path], target: Target) -> tuple[Path, str]:
    """The first plan whose sidecar lets `target` run it, and a line saying which was taken and why; a
    DtkError naming every plan's problem when none fits."""
    problems = {}
    for plan in plans:
        sidecar = load_sidecar(plan)
        found = compatibility_problems(sidecar, target)
        if not found:
            return plan, (
                f"using engine {plan.name} of {len(plans)}: built for {sidecar.gpu_name} ({sidecar.sm}), "
                f"{sidecar.precision}, TensorRT {sidecar.tensorrt_version}"
            )
        problems[plan.name] = "; ".join(found)
    listed = " | ".join(f"{name}: {why}" for name, why in problems.items())
    where = plans[0].parent if plans else "the bundle"
    raise file_error(where, f"no engine here runs on this machine ({listed}); {rebuild_hint(plans[0])}")
