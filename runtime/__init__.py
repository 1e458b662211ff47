"""dtk.runtime: torch-free sampling on exported bundles (numpy, ONNX Runtime, TensorRT).

Heavy libraries are imported lazily; `import dtk.runtime` pulls in numpy only."""

from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig

__all__ = ["DtkError", "DiffusionConfig", "Pipeline", "load_manifest"]


def __getattr__(name):
    if name == "Pipeline":
        from dtk.runtime.pipeline import Pipeline

        return Pipeline
    if name == "load_manifest":
        from dtk.runtime.manifest import load_manifest

        return load_manifest
    raise AttributeError(name)
