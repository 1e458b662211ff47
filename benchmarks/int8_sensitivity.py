"""Which layers must stay in float for INT8? Each candidate group quantized on its own, judged by the images.

For a trained checkpoint: export fp32, calibrate once (the export's calibration set), then quantize with
every candidate float group kept in float (the baseline) and, one at a time, with one group quantized too,
with each calibration method, and with float convolution outputs. Each graph samples the same seeds with
the export check's 20-step DDIM chain; the table is the mean |Δ| of its images against the fp32 graph's
(in /255) and the check's Fréchet distances. The export's `KEEP_FLOAT` and `DEFAULT_METHOD`
(dtk.export.quantize) follow this measurement.

    python benchmarks/int8_sensitivity.py --checkpoint runs/digits/model.pt

Writes benchmarks/results/int8_sensitivity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def measure(manifest, fp32, int8, real, num, seed) -> dict:
    from dtk.export.int8_checks import check_int8

    checks = check_int8(manifest, fp32, int8, real, num, seed).to_dict()
    return {
        "mean_abs_255": checks["chain"]["mean_abs_255"],
        "max_image_mean_abs_255": checks["chain"]["max_image_mean_abs_255"],
        "fd_int8": checks["quality"]["int8"],
        "fd_fp32": checks["quality"]["fp32"],
        "fd_floor": checks["quality"]["floor"],
        "passed": checks["passed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--calibration-data", help="default: the checkpoint's dataset")
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--num", type=int, default=128, help="samples per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from dtk.export.bundle import ExportOptions, _manifest, export_bundle
    from dtk.export.calibration import calibration_set
    from dtk.export.quantize import DEFAULT_METHOD, GROUPS, quantize
    from dtk.export.source import load_source
    from dtk.runtime.files import sha256, write_text
    from dtk.runtime.manifest import load_manifest
    from dtk.runtime.system import machine_name, system_info

    source = load_source(args.checkpoint)
    calibration = calibration_set(source, args.calibration_data, args.calibration_size, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtk-sensitivity-") as tmp:
        tmp = Path(tmp)
        export_bundle(args.checkpoint, tmp / "fp32", ExportOptions(batch=(1, 16, 32)), progress=False)
        fp32 = tmp / "fp32" / "unet.onnx"
        manifest = load_manifest(tmp / "fp32")
        graph_manifest = _manifest(fp32, source, manifest.batch, manifest.opset, "fp32", {}, {})
        every = tuple(GROUPS)
        settings = [("all candidates in float", every, DEFAULT_METHOD, "int8")]
        settings += [
            (f"{g} quantized", tuple(k for k in every if k != g), DEFAULT_METHOD, "int8") for g in every
        ]
        settings += [("nothing kept in float", (), DEFAULT_METHOD, "int8")]
        settings += [(f"method {m}", every, m, "int8") for m in args.methods if m != DEFAULT_METHOD]
        settings += [("float outputs", every, DEFAULT_METHOD, "float")]
        for label, keep, method, outputs in settings:
            start = time.perf_counter()
            copy = tmp / "work.onnx"
            copy.write_bytes(fp32.read_bytes())
            int8 = tmp / "int8.onnx"
            row = {"setting": label, "kept_float": list(keep), "method": method, "outputs": outputs}
            try:
                result = quantize(copy, int8, calibration, keep_float=keep, method=method, outputs=outputs)
                row.update(measure(graph_manifest, fp32, int8, calibration.images, args.num, args.seed))
            except Exception as e:  # onnxruntime cannot quantize (or then load) every group: record why
                row["error"] = f"{type(e).__name__}: {e}".strip()
                rows.append(row)
                print(f"{label:32} failed: {row['error'][:200]}", file=sys.stderr)
                continue
            row["quantized_ops"] = result.quantized
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(
                f"{label:32} mean |Δ| {row['mean_abs_255']:6.2f}/255  "
                f"worst {row['max_image_mean_abs_255']:6.2f}"
                f"  FD int8 {row['fd_int8']:.4g} fp32 {row['fd_fp32']:.4g}",
                file=sys.stderr,
            )
    system = system_info()
    data = {
        "checkpoint": {
            "path": str(args.checkpoint),
            "sha256": sha256(args.checkpoint),
            "model": source.model_info,
        },
        "calibration": calibration.to_dict(),
        "num": args.num,
        "seed": args.seed,
        "results": rows,
        "machine": machine_name(system),
        "system": system,
        "load_average": list(np.round(np.array(__import__("os").getloadavg()), 2)),
    }
    path = args.out / "int8_sensitivity.json"
    write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
