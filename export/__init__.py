"""dtk.export: checkpoint or diffusers model → ONNX bundle (parity-checked, fp32 or fp16), TensorRT, Triton.

`from dtk.export import ExportOptions, export_bundle`; torch and onnx load only when an export runs."""

__all__ = ["ExportOptions", "ParityError", "export_bundle", "load_source"]


def __getattr__(name):
    if name in ("ExportOptions", "export_bundle"):
        from dtk.export import bundle

        return getattr(bundle, name)
    if name == "ParityError":
        from dtk.export.parity import ParityError

        return ParityError
    if name == "load_source":
        from dtk.export.source import load_source

        return load_source
    raise AttributeError(name)
