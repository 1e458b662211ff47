"""A freshly built TensorRT engine against ONNX Runtime on the same seeded inputs, Polygraphy-style.

The cases are export parity's (dtk.export.parity): single calls at timesteps near 0, T/2 and T−1 at the
smallest and largest batch of the profile, and a 20-step DDIM chain, here run on the GPU (`run_chain`) against
the bundle's ONNX graph on ONNX Runtime's CPU provider. An engine outside the tolerance is not installed.
"""

from __future__ import annotations

from pathlib import Path

from dtk.export.parity import Tolerance, compare_denoisers
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.manifest import Manifest

# Estimates, not yet measured on a GPU: fp32 engines are built with TF32 off and differ from ONNX Runtime's
# CPU kernels by summation order (the export check's 1e-4 with room for GPU convolution algorithms); an fp16
# engine of an fp32 graph (TensorRT 10's FP16 flag) is held to the fp16 export's bounds.
ENGINE_TOLERANCES = {
    "fp32": Tolerance(atol=2e-4, rtol=1e-3, chain_atol=1e-3),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2, chain_atol=1e-1),
    # int8: the same Q/DQ graph on both sides; TensorRT's fusions and rounding may move a value by a
    # quantization step (an estimate too; the int8 export's image checks are the measured bound)
    "int8": Tolerance(atol=5e-2, rtol=5e-2, chain_atol=2e-1),
}


class EngineParityError(DtkError):
    """The engine does not match ONNX Runtime; carries the report so the CLI can print the table."""

    def __init__(self, report, plan_name: str):
        self.report = report
        super().__init__(
            f"the engine does not match ONNX Runtime ({report.precision}): {'; '.join(report.failures())}. "
            f"No {plan_name} was written. If the difference is expected, loosen the bound with "
            "--atol/--rtol/--chain-atol, or skip the check with --no-verify"
        )


def tolerance_for(precision: str, atol=None, rtol=None, chain_atol=None) -> Tolerance:
    base = ENGINE_TOLERANCES[precision]
    return Tolerance(
        atol=base.atol if atol is None else atol,
        rtol=base.rtol if rtol is None else rtol,
        chain_atol=base.chain_atol if chain_atol is None else chain_atol,
    )


def check_engine(
    plan_path: Path,
    onnx_path: Path,
    manifest: Manifest,
    precision: str,
    tolerance: Tolerance,
    *,
    device: int = 0,
    chain_steps: int = 20,
    seed: int = 0,
    progress: bool = False,
):
    """The parity report of the plan at `plan_path` (its sidecar beside it) against `onnx_path`."""
    from dtk.runtime.backends.onnxruntime import OnnxRuntimeDenoiser
    from dtk.runtime.backends.tensorrt import TensorRTDenoiser

    sample_shape = (manifest.in_channels, *manifest.image_size)
    reference = OnnxRuntimeDenoiser(onnx_path, manifest, providers=["cpu"])
    try:
        with TensorRTDenoiser(plan_path, manifest, device=device) as engine:
            return compare_denoisers(
                engine,
                reference,
                manifest.diffusion,
                sample_shape,
                manifest.batch,
                precision,
                tolerance=tolerance,
                chain_steps=chain_steps,
                seed=seed,
                progress=progress,
                provider="TensorRT",
                reference_name="ONNX Runtime CPUExecutionProvider",
                candidate_chain=engine.run_chain,
            )
    except DtkError:
        raise
    except Exception as e:  # the engine ran but something unexpected broke: name it, keep no plan
        raise file_error(plan_path, f"checking the engine failed ({type(e).__name__}: {e})") from None
    finally:
        reference.close()
