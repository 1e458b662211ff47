"""The device path on a real GPU without TensorRT: TensorRTDenoiser over a PyTorch stand-in engine.

Marked `gpu` and skipped without a CUDA GPU (and PyTorch's CUDA build). Everything but TensorRT itself is real
here: cuda-python buffers and pinned staging, the stream, the NVRTC update kernel, graph capture and replay,
close. tests/runtime/gpu_standin.py says how the stand-in runs the U-Net on the bound device pointers.
"""

from __future__ import annotations

import shutil
import sys

import gpu_standin
import numpy as np
import pytest

from dtk.runtime.errors import DtkError

pytestmark = pytest.mark.gpu


def _has_gpu() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        from dtk.runtime.backends.cuda import gpu_info

        gpu_info(0)
    except (ImportError, DtkError):
        return False
    return True


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU with PyTorch's CUDA build")


@pytest.fixture
def standin(tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # restored after the test; the stand-in replaces it

    def open_(cuda_graph=False):
        return gpu_standin.open_standin(bundle, tiny_checkpoint, cuda_graph=cuda_graph)

    return open_


@needs_gpu
def test_engine_calls_match_the_module(standin):
    import torch

    denoiser, module, trt = standin()
    rng = np.random.default_rng(0)
    with denoiser:
        for batch in (1, 4):
            x = rng.standard_normal((batch, 1, 16, 16), dtype=np.float32)
            t = np.array([0, 500, 999, 3][:batch], dtype=np.float32)
            got = denoiser(x, t)
            with torch.inference_mode():
                want = module(torch.from_numpy(x).cuda(), torch.from_numpy(t).cuda()).cpu().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert trt._executions == 2


@needs_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_device_chain_makes_the_host_loops_images(standin, cuda_graph):
    denoiser, _, _ = standin(cuda_graph)
    with denoiser:
        result = gpu_standin.chain_against_host(denoiser, batch=4, steps=20, sampler="ddpm")
    assert result["images_within_1_level"], result
    assert result["max_abs_latent"] < 1e-3, result


@needs_gpu
def test_close_gives_the_device_memory_back(standin):
    from dtk.runtime.backends.cuda import Cuda

    cuda = Cuda()
    denoiser, _, _ = standin(cuda_graph=True)
    x = np.zeros((4, 1, 16, 16), np.float32)
    denoiser.run_chain(_plan(denoiser), x, lambda i: np.zeros_like(x))
    session = denoiser._session
    assert session._device_buffers and session._modules and session._graphs
    free_open, _ = cuda.rt("cudaMemGetInfo")
    denoiser.close()
    free_closed, _ = cuda.rt("cudaMemGetInfo")
    # the driver may keep small freed blocks in its pages, so free memory must not drop, not rise by the sum
    assert free_closed >= free_open
    assert session.closed and (session._device_buffers, session._graphs, session._modules) == ([], [], [])


def _plan(denoiser):
    from dtk.runtime.samplers import make_plan

    return make_plan("ddim", denoiser.manifest.diffusion, 5)
