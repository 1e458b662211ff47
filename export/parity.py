"""Parity: the exported graph in ONNX Runtime against the PyTorch module it came from; failing fails export.

Two checks, on seeded inputs:
- single calls at timesteps near 0, T/2 and T−1 at the smallest and the largest batch, elementwise
  |onnx − torch| ≤ atol + rtol·|torch|. Timesteps are distinct per image, so a graph that broadcast one
  timestep fails; a batch of 3 or more covers all three regions in one call;
- a short DDIM chain (same seed, same initial noise, η = 0) through `sample_loop`, whose final samples must
  agree within chain_atol · max(1, max |x_torch|) (random-weight models drift far from [-1, 1]), because
  per-step error compounds.
NaN or Inf in any output fails the check and is named.

`compare_denoisers` is the same check between any two denoisers; dtk.export.engine_check runs it on a TensorRT
engine against ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from dtk.runtime.errors import DtkError, file_error


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    chain_atol: (
        float  # bound on max |x_onnx − x_torch| of the final chain sample, per unit of max(1, |x_torch|)
    )


# fp32: ONNX Runtime and PyTorch differ by float reassociation only (~1e-6 measured).
# fp16: the fp16 graph against the fp32 PyTorch model; ~1e-3 relative per call measured on random weights.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, chain_atol=1e-3),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2, chain_atol=1e-1),
}
CHAIN_SAMPLER = "ddim"


@dataclass
class ParityCase:
    batch: int
    timesteps: list[int]
    max_abs: float  # max |onnx − torch|
    max_ref: float  # max |torch|, for scale
    worst_ratio: float  # max of |onnx − torch| / (atol + rtol·|torch|); ≤ 1 passes
    passed: bool
    problem: str = ""


@dataclass
class ChainResult:
    sampler: str
    steps: int
    batch: int
    seed: int
    max_abs: float
    max_ref: float
    bound: float
    passed: bool
    problem: str = ""


@dataclass
class ParityReport:
    precision: str
    tolerance: Tolerance
    provider: str
    seed: int
    cases: list[ParityCase] = field(default_factory=list)
    chain: ChainResult | None = None
    seconds: float = 0.0
    reference: str = "PyTorch fp32 on CPU"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases) and (self.chain is None or self.chain.passed)

    def failures(self) -> list[str]:
        out = [
            f"batch {c.batch} t={_span(c.timesteps)}: {c.problem or _excess(c.max_abs, c.worst_ratio)}"
            for c in self.cases
            if not c.passed
        ]
        if self.chain is not None and not self.chain.passed:
            c = self.chain
            out.append(
                f"{c.steps}-step {c.sampler} chain: "
                + (c.problem or f"max |Δ| {c.max_abs:.3g} > bound {c.bound:.3g}")
            )
        return out

    def to_dict(self) -> dict:
        return {
            "verified": True,
            "passed": self.passed,
            "precision": self.precision,
            **asdict(self.tolerance),
            "provider": self.provider,
            "reference": self.reference,
            "seed": self.seed,
            "cases": [asdict(c) for c in self.cases],
            "chain": asdict(self.chain) if self.chain else None,
            "seconds": round(self.seconds, 2),
        }


def report_from_dict(data: dict) -> ParityReport:
    """The report back from a manifest's `parity` entry (for printing the table of a written bundle)."""
    chain = data.get("chain")
    return ParityReport(
        precision=data["precision"],
        tolerance=Tolerance(data["atol"], data["rtol"], data["chain_atol"]),
        provider=data["provider"],
        seed=data["seed"],
        cases=[ParityCase(**c) for c in data["cases"]],
        chain=ChainResult(**chain) if chain else None,
        seconds=data.get("seconds", 0.0),
        reference=data.get("reference", "PyTorch fp32 on CPU"),
    )


class ParityError(DtkError):
    """The exported graph does not match PyTorch; carries the report so the CLI can print the table."""

    def __init__(self, report: ParityReport):
        self.report = report
        lines = "; ".join(report.failures())
        super().__init__(
            f"parity check failed ({report.precision}): {lines}. No bundle was written. If the difference is "
            "expected, loosen the bound with --atol/--rtol/--chain-atol, or skip the check with --no-verify"
        )


def skipped(reason: str) -> dict:
    """The manifest's parity entry for an unverified export."""
    return {"verified": False, "passed": None, "reason": reason}


def check_parity(
    onnx_path,
    module,
    diffusion,
    sample_shape: tuple[int, int, int],
    batch: dict,
    precision: str = "fp32",
    *,
    tolerance: Tolerance | None = None,
    chain_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> ParityReport:
    """Run every case; the report says what passed (raise ParityError yourself, or use `verify`)."""
    session = _session(onnx_path)
    with _one_torch_thread():
        return compare_denoisers(
            lambda x, t: _run(session, x, t),
            lambda x, t: _torch(module, x, t),
            diffusion,
            sample_shape,
            batch,
            precision,
            tolerance=tolerance or TOLERANCES[precision],
            chain_steps=chain_steps,
            seed=seed,
            progress=progress,
            provider=session.get_providers()[0],
        )


def compare_denoisers(
    candidate,
    reference,
    diffusion,
    sample_shape: tuple[int, int, int],
    batch: dict,
    precision: str,
    *,
    tolerance: Tolerance,
    chain_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    provider: str = "",
    reference_name: str = "PyTorch fp32 on CPU",
    candidate_chain=None,
) -> ParityReport:
    """The parity cases and chain of `candidate` against `reference`, each `(x float32 [B,C,H,W], t [B]) →
    output`. `candidate_chain(plan, x, noise)`, when given, runs the candidate's chain instead of
    `sample_loop` over `candidate` (a TensorRT engine's chain stays on the GPU)."""
    start = time.perf_counter()
    report = ParityReport(precision, tolerance, provider, seed, reference=reference_name)
    T = diffusion.num_train_timesteps
    cases = [(b, t) for b in sorted({batch["min"], batch["max"]}) for t in parity_timesteps(b, T)]
    rng = np.random.default_rng(seed)
    inputs = [(rng.standard_normal((b, *sample_shape), dtype=np.float32), t) for b, t in cases]

    with _bar(2 * len(cases) + (1 if chain_steps else 0), progress) as bar:
        # all candidate calls, then all reference ones: their thread pools must not compete for few cores
        outs = [bar.step(candidate(x, _timesteps(t, len(x)))) for x, t in inputs]
        refs = [bar.step(reference(x, _timesteps(t, len(x)))) for x, t in inputs]
        for (b, t), out, ref in zip(cases, outs, refs, strict=True):
            report.cases.append(_compare(b, t, out, ref, tolerance))
        if chain_steps:  # at the smallest batch: the chain checks error growth, the cases above the batches
            report.chain = _chain(
                candidate, reference, diffusion, sample_shape, batch["min"], chain_steps, seed, tolerance,
                candidate_chain,
            )  # fmt: skip
            bar.update(1)
    report.seconds = time.perf_counter() - start
    return report


def verify(*args, **kwargs) -> ParityReport:
    """`check_parity`, raising ParityError when anything is out of tolerance."""
    report = check_parity(*args, **kwargs)
    if not report.passed:
        raise ParityError(report)
    return report


def format_table(report: ParityReport) -> str:
    tol = report.tolerance
    head = (
        f"parity ({report.precision}, {report.provider} vs {report.reference.removesuffix(' on CPU')}): "
        f"|Δ| ≤ {tol.atol:g} + {tol.rtol:g}·|ref| per call, chain |Δ| ≤ {tol.chain_atol:g}·max(1, |ref|)"
    )
    rows = [("check", "batch", "timesteps", "max |Δ|", "max |ref|", "Δ/tol", "result")]
    for c in report.cases:
        rows.append(
            (
                "single call",
                str(c.batch),
                _span(c.timesteps),
                f"{c.max_abs:.2e}",
                f"{c.max_ref:.3g}",
                f"{c.worst_ratio:.3f}",
                "ok" if c.passed else f"FAIL {c.problem}".strip(),
            )
        )
    if report.chain is not None:
        c = report.chain
        rows.append(
            (
                f"{c.steps}-step {c.sampler} chain",
                str(c.batch),
                f"seed {c.seed}",
                f"{c.max_abs:.2e}",
                f"{c.max_ref:.3g}",
                f"{_ratio(c.max_abs, c.bound):.3f}",
                "ok" if c.passed else f"FAIL {c.problem}".strip(),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    verdict = "passed" if report.passed else "FAILED"
    lines.append(f"parity {verdict} in {report.seconds:.1f} s")
    return "\n".join(lines)


def parity_timesteps(batch: int, T: int) -> list[np.ndarray]:
    """The timestep vectors checked at `batch`: near 0, T/2 and T−1, a call per region or all in one."""
    bases = (0, T // 2, T - 1)
    if batch < len(bases):
        return [_near(base, batch, T) for base in bases]
    sizes = [batch // 3 + (1 if k < batch % 3 else 0) for k in range(3)]
    return [np.concatenate([_near(base, n, T) for base, n in zip(bases, sizes, strict=True)])]


def _span(ts: list[int]) -> str:
    """[0, 1, 2, 500, 501, 999, 998] → "0..2,500..501,999..998"."""
    runs, start = [], 0
    for k in range(1, len(ts) + 1):
        if k == len(ts) or abs(ts[k] - ts[k - 1]) != 1:
            runs.append(str(ts[start]) if k - start == 1 else f"{ts[start]}..{ts[k - 1]}")
            start = k
    return ",".join(runs)


def _ratio(value: float, bound: float) -> float:
    if bound:
        return value / bound
    return 0.0 if value == 0 else float("inf")


def _excess(max_abs: float, ratio: float) -> str:
    return f"max |Δ| {max_abs:.3g} is {ratio:.3g}× the tolerance"


def _near(base: int, batch: int, T: int) -> np.ndarray:
    """`batch` distinct timesteps next to `base`, inside [0, T-1]."""
    step = -1 if base == T - 1 else 1
    return np.clip(base + step * np.arange(batch), 0, T - 1).astype(np.int64)


def _session(onnx_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # share the cores with torch
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise file_error(
            onnx_path, f"ONNX Runtime cannot load the exported graph ({type(e).__name__}: {e})"
        ) from None


def _timesteps(t, batch: int) -> np.ndarray:
    """float32 [batch] (a copy: torch wants writable arrays) from a scalar or a vector."""
    return np.array(np.broadcast_to(np.asarray(t, dtype=np.float32), (batch,)))


def _run(session, x: np.ndarray, t) -> np.ndarray:
    return session.run(["model_output"], {"sample": x, "timestep": _timesteps(t, x.shape[0])})[0]


def _torch(module, x: np.ndarray, t) -> np.ndarray:
    import torch

    with torch.inference_mode():
        sample = torch.from_numpy(np.array(x, dtype=np.float32))
        return module(sample, torch.from_numpy(_timesteps(t, x.shape[0]))).float().numpy()


def _nonfinite(out: np.ndarray, ref: np.ndarray) -> str:
    if not np.all(np.isfinite(ref)):
        bad = int(np.sum(~np.isfinite(ref)))
        return f"NaN/Inf in the PyTorch output ({bad} values): the model itself is broken"
    if not np.all(np.isfinite(out)):
        bad = ~np.isfinite(out)
        return f"NaN/Inf in the ONNX output ({int(bad.sum())} of {out.size} values)"
    return ""


def _compare(batch: int, ts, out: np.ndarray, ref: np.ndarray, tol: Tolerance) -> ParityCase:
    problem = _nonfinite(out, ref)
    if out.shape != ref.shape:
        problem = f"shape {list(out.shape)} != {list(ref.shape)}"
    if problem:
        return ParityCase(
            batch, [int(t) for t in ts], float("nan"), float("nan"), float("inf"), False, problem
        )
    diff = np.abs(out.astype(np.float64) - ref)
    ratio = (
        float(np.max(diff / (tol.atol + tol.rtol * np.abs(ref)))) if tol.atol or tol.rtol else float("inf")
    )
    if not np.any(diff):
        ratio = 0.0
    return ParityCase(
        batch=batch,
        timesteps=[int(t) for t in ts],
        max_abs=float(diff.max()),
        max_ref=float(np.abs(ref).max()),
        worst_ratio=ratio,
        passed=ratio <= 1.0,
    )


def _chain(
    candidate, reference, diffusion, sample_shape, batch, steps, seed, tol: Tolerance, candidate_chain=None
) -> ChainResult:
    from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

    plan = make_plan(CHAIN_SAMPLER, diffusion, steps, eta=0.0)

    def run(denoise, chain=None):
        source = NoiseSource(seed)

        def noise(i):
            return source.step(batch, sample_shape)

        def call(x, t):
            return denoise(np.asarray(x, dtype=np.float32), _timesteps(t, len(x)))

        x = source.initial(batch, sample_shape)
        return sample_loop(call, x, plan, noise) if chain is None else chain(plan, x, noise)

    out = run(candidate, candidate_chain)
    ref = run(reference)
    problem = _nonfinite(np.asarray(out), np.asarray(ref))
    max_abs = float(np.max(np.abs(out - ref))) if not problem else float("nan")
    max_ref = float(np.max(np.abs(ref))) if not problem else float("nan")
    bound = tol.chain_atol * max(1.0, max_ref) if not problem else tol.chain_atol
    return ChainResult(
        sampler=CHAIN_SAMPLER,
        steps=steps,
        batch=batch,
        seed=seed,
        max_abs=max_abs,
        max_ref=max_ref,
        bound=bound,
        passed=not problem and max_abs <= bound,
        problem=problem,
    )


@contextlib.contextmanager
def _one_torch_thread():
    """PyTorch on one thread while it shares the process with ONNX Runtime: its multi-threaded kernels wait on
    each other whenever another thread holds a core (measured on 2 busy cores: ddpm-cifar10 at batch 1 took
    1.7 s per call on 2 threads, 0.15 s on 1). The reference calls are few, so one thread costs little."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _bar:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="parity", unit="check", leave=False)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def step(self, value):
        self.update(1)
        return value

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
