"""A local `tritonserver` for a model repository: found, started on free ports, waited for, stopped clean.

The binary is `tritonserver` on PATH (an NGC container), or the Triton 2.51 shipped in the `nvidia-pytriton`
wheel (`pip install 'dtk[serve]'`). For the wheel's server, a private copy of its `backends/` folder gets the
Python backend stub built for this interpreter, `nvidia_pytriton.libs` goes on LD_LIBRARY_PATH and this
environment's `bin/` first on PATH, because the stub finds its interpreter (and so dtk) by looking up
`python3` there. Each server gets its own temporary folder (log, backends, TMPDIR) and its own shared-memory
prefix, so servers started side by side (tests) share nothing; `stop()` ends it by its PID, then any stub
still alive, and removes the folder and the `/dev/shm` regions of that prefix.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dtk.runtime.errors import DtkError

SHM_DIR = Path("/dev/shm")
PORT_RETRIES = 3  # free ports are picked before the server binds them; another process may take one first


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    models: tuple[str, ...] = ("dtk_sampler",)  # loaded explicitly; other models in the repository are left
    exit_timeout_s: int = 5  # how long Triton waits for open requests on stop
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Installation:
    """Where a tritonserver binary lives and what it needs to run: backends folder, libraries, stub."""

    binary: Path
    backends: Path | None  # None: the binary's own default backend directory
    libs: tuple[Path, ...] = ()
    stub: Path | None = None  # the Python backend stub to copy into a private backends/python/


def find_tritonserver() -> Installation:
    """`tritonserver` on PATH, else the one in the nvidia-pytriton wheel, else a DtkError saying how."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), None)
    spec = importlib.util.find_spec("pytriton")  # found, not imported: pytriton's own API needs numpy<2
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" if spec else None
    if root is None or not (root / "bin" / "tritonserver").is_file():
        raise DtkError(
            "no tritonserver found: put one on PATH (an NGC tritonserver container) or install the serve "
            "extra (`pip install 'dtk[serve]'`, which brings the Triton shipped in nvidia-pytriton)"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise DtkError(
            f"{stub.parent.parent}: no Python backend stub for Python {version} in nvidia-pytriton"
        )
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return Installation(root / "bin" / "tritonserver", root / "backends", (libs,), stub)


class TritonServer:
    """`with TritonServer(repo) as server:` a ready server; `server.http_url`, `server.grpc_url`."""

    def __init__(self, repository, options: ServerOptions | None = None):
        self.repository = Path(repository).resolve()
        self.options = options or ServerOptions()
        self.installation: Installation | None = None
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.shm_prefix = f"dtk_{os.getpid()}_{secrets.token_hex(4)}_"
        self.ports: dict[str, int] = {}

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        """Start the server and wait until /v2/health/ready answers; on failure nothing is left running."""
        if not (self.repository / self.options.models[0] / "config.pbtxt").is_file():
            raise DtkError(f"{self.repository}: no model {self.options.models[0]!r} in this repository")
        self.installation = find_tritonserver()
        self.workdir = Path(tempfile.mkdtemp(prefix="dtk-triton-"))
        try:
            backends = self._private_backends()
            fixed = {name: getattr(self.options, f"{name}_port") for name in ("http", "grpc", "metrics")}
            for attempt in range(PORT_RETRIES):
                self.ports = {name: port or _free_port(self.options.host) for name, port in fixed.items()}
                self._launch(backends)
                if self._wait_ready(timeout_s):
                    return self
                log = self.log_tail()
                self._end_process()
                port_taken = "address already in use" in log.lower() and not all(fixed.values())
                if not port_taken or attempt + 1 == PORT_RETRIES:
                    raise DtkError(f"tritonserver did not become ready; the end of its log:\n{log}")
        except BaseException:
            self.stop()
            raise

    def _private_backends(self) -> Path | None:
        installation = self.installation
        if installation.backends is None:
            return None
        backends = self.workdir / "backends"
        shutil.copytree(installation.backends, backends)
        shutil.copy2(installation.stub, backends / "python" / installation.stub.name)
        return backends

    def _launch(self, backends: Path | None) -> None:
        options, ports = self.options, self.ports
        args = [
            str(self.installation.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in options.models],
            f"--http-address={options.host}",
            f"--http-port={ports['http']}",
            f"--grpc-address={options.host}",
            f"--grpc-port={ports['grpc']}",
            f"--metrics-address={options.host}",
            f"--metrics-port={ports['metrics']}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={options.exit_timeout_s}",
            f"--log-verbose={options.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *options.extra_args,
        ]
        if backends is not None:
            args.append(f"--backend-directory={backends}")
        with open(self.log_path, "ab") as log:
            # own session: a Ctrl-C in the terminal reaches dtk, which stops the server in order; and should
            # dtk itself be killed, the kernel sends the server SIGTERM (Linux), so no orphan keeps the ports
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    def _environment(self) -> dict:
        env = dict(os.environ)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR")  # this interpreter's libpython, which the stub embeds
        libs = [str(p) for p in self.installation.libs] + ([libdir] if libdir else [])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env.pop("PYTHONPATH", None)
        return env

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=1) as response,
            ):
                if response.status == 200:
                    return True
            time.sleep(0.1)
        return False

    def log_tail(self, lines: int = 20) -> str:
        if self.workdir is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's PID (SIGKILL after the exit timeout), then any of its stubs still alive;
        remove the temporary folder and this server's shared-memory regions. Safe to call twice."""
        self._end_process()
        for path in SHM_DIR.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                path.unlink()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _end_process(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.options.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in stub_pids(self.shm_prefix):  # orphans of a crashed server: ours by their shm prefix
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def stub_pids(shm_prefix: str) -> list[int]:
    """PIDs of Python backend stubs started with this shared-memory prefix (it is on their command line)."""
    return triton_pids(shm_prefix, "triton_python_backend_stub")


def triton_pids(shm_prefix: str, program: str = "tritonserver") -> list[int]:
    """PIDs of `program` processes whose command line holds `shm_prefix` (zombies have none: not listed)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if cmdline[0].endswith(program.encode()) and any(shm_prefix.encode() in part for part in cmdline):
                pids.append(int(proc.name))
    return pids


def _die_with_parent():
    """A preexec_fn asking Linux to SIGTERM the child when this thread's process dies; None elsewhere.

    prctl is looked up here, before the fork: the child only makes the one system call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_death_signal():
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return set_death_signal


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
