"""dtk.runtime samples a bundle in a process where torch, onnx and the rest of dtk cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from dtk.runtime import Pipeline

# Runs first in the child: a meta-path finder that refuses torch, onnx, dtk.export and every dtk module
# outside dtk.runtime, then a full sample through the public API.
CHILD = textwrap.dedent(
    """
    import json, sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in ("torch", "onnx", "torchvision") or (
                root == "dtk" and name != "dtk" and not name.startswith("dtk.runtime")
            ):
                raise ImportError(f"{name} is not available in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    try:
        import torch  # noqa: F401
        sys.exit("torch was importable: the test would prove nothing")
    except ImportError:
        pass

    import numpy as np
    from dtk.runtime import Pipeline
    from dtk.runtime.images import save_grid

    bundle, out = sys.argv[1], sys.argv[2]
    with Pipeline.load(bundle, backend="auto", threads=1) as pipe:
        images = pipe.sample(num=3, steps=6, sampler="ddpm", seed=21)
    np.save(out + ".npy", images)
    save_grid(images, out + ".png")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx") or m.startswith("dtk.exp"))
    print(json.dumps({"backend": pipe.backend, "heavy": heavy}))
    """
)


def test_full_sample_without_torch(tiny_bundle, tmp_path):
    out = tmp_path / "images"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_bundle), str(out)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report == {"backend": "onnxruntime", "heavy": []}
    images = np.load(out.with_suffix(".npy"))
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    assert out.with_suffix(".png").stat().st_size > 0
    with Pipeline.load(
        tiny_bundle, threads=1
    ) as pipe:  # the same call with torch around gives the same bytes
        np.testing.assert_array_equal(images, pipe.sample(num=3, steps=6, sampler="ddpm", seed=21))
