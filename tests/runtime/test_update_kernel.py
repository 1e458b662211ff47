"""The CUDA source of the sampler update kernel, checked three ways.

1. nvcc (where installed) compiles it to PTX for Jetson Orin (sm_87) and Hopper (sm_90), warnings as errors,
   and the entry point takes the six 8-byte arguments UpdateKernel.launch packs.
2. nvcc builds a host program around the same source's element function and its results are compared with
   `dtk.runtime.samplers.update` — the kernel's arithmetic, run on the CPU.
3. NVRTC compiles it through cuda-python where libnvrtc is installed (no GPU needed); on an NVIDIA GPU (`gpu`
   marker) the device results, a replayed CUDA graph, and freeing on close are checked. Skipped without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from dtk.runtime.backends.cuda import UPDATE_KERNEL_NAME, UPDATE_KERNEL_SOURCE
from dtk.runtime.errors import DtkError
from dtk.runtime.samplers import update

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
__SOURCE__
// in: n (int64), coeffs[8], then x, out, x0_prev, noise (n float32 each); out: x_next, x0 (n float32 each)
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    long long n;
    float coeffs[8];
    if (fread(&n, 8, 1, in) != 1 || fread(coeffs, 4, 8, in) != 8) return 2;
    float* data = (float*)malloc(16 * n);
    float* result = (float*)malloc(8 * n);
    if (fread(data, 4, 4 * n, in) != (size_t)(4 * n)) return 3;
    fclose(in);
    for (long long i = 0; i < n; ++i) {
        float noise = coeffs[6] != 0.0f ? data[3 * n + i] : 0.0f;  // as the kernel reads it
        dtk_update_element(data[i], data[n + i], data[2 * n + i], noise, coeffs, &result[i], &result[n + i]);
    }
    FILE* out = fopen(argv[2], "wb");
    fwrite(result, 4, 2 * n, out);
    fclose(out);
    return 0;
}
"""

# (p, q, a, b, c, d, e), clip: DDPM-like with clipping, DPM++(2M)-like with history, huge x0 factors, no noise
CASES = [
    ((1.02, -0.2, 0.0, 0.0, 0.7, 0.0, 0.3), 1.0),
    ((1.0, -0.05, 0.4, 0.0, 0.9, -0.35, 0.0), None),
    ((157.0, -156.9, 0.02, 0.0, 0.98, 0.0, 0.0), 1.0),
    ((0.0, 1.0, -0.3, 0.2, 0.5, 0.25, -0.8), 2.5),
]


def _inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x, out, x0_prev, noise = (rng.standard_normal(n, dtype=np.float32) * 3 for _ in range(4))
    x[:3] = [np.nan, np.inf, -1e30]  # NaN stays NaN through the clamp, like numpy's clip
    return x, out, x0_prev, noise


def _numpy_update(row, clip, x, out, x0_prev, noise):
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 on purpose
        return update(np.asarray(row), x, out, x0_prev, noise if row[6] != 0 else None, clip)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvcc_compiles_the_kernel_cleanly(tmp_path, arch):
    source = tmp_path / "update.cu"
    source.write_text(UPDATE_KERNEL_SOURCE)
    ptx = tmp_path / "update.ptx"
    run = subprocess.run(
        [NVCC, "--ptx", f"-arch={arch}", "--Werror", "all-warnings", "-o", str(ptx), str(source)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    text = ptx.read_text()
    entry = re.search(rf"\.visible \.entry {UPDATE_KERNEL_NAME}\((.*?)\)", text, re.S)
    assert entry, 'extern "C" entry point missing (NVRTC looks it up by this unmangled name)'
    assert re.findall(r"\.param \.(\w+)", entry.group(1)) == ["u64"] * 6  # 5 pointers + a 64-bit n


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    folder = tmp_path_factory.mktemp("harness")
    (folder / "harness.cu").write_text(HARNESS.replace("__SOURCE__", UPDATE_KERNEL_SOURCE))
    binary = folder / "harness"
    run = subprocess.run(
        [NVCC, "-O2", "-arch=sm_87", "-o", str(binary), str(folder / "harness.cu")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return binary


@pytest.mark.parametrize(("row", "clip"), CASES)
def test_the_kernels_arithmetic_is_the_contract_update(harness, tmp_path, row, clip):
    n = 1000
    x, out, x0_prev, noise = _inputs(n, seed=len(tmp_path.name))
    if row[6] == 0:
        noise[:] = np.nan  # never read when e == 0
    coeffs = np.array([*row, clip or 0.0], dtype=np.float32)
    (tmp_path / "in.bin").write_bytes(
        np.int64(n).tobytes() + coeffs.tobytes() + np.concatenate([x, out, x0_prev, noise]).tobytes()
    )
    run = subprocess.run(
        [str(harness), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True
    )
    assert run.returncode == 0, run.stderr
    x_next, x0 = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(2, n)

    want_next, want_x0 = _numpy_update(row, clip, x, out, x0_prev, noise)
    np.testing.assert_allclose(x0, want_x0, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(x_next, want_next, rtol=1e-6, atol=1e-5, equal_nan=True)
    if clip:
        assert np.nanmax(np.abs(x0)) <= clip
    p, a, c = row[0], row[2], row[4]
    # a NaN in x reaches x0 through p, and x_next through a or through x0 (zero terms are left out)
    assert np.isnan(x0[0]) == (p != 0)
    assert np.isnan(x_next[0]) == (a != 0 or (p != 0 and c != 0))


def test_nvrtc_compiles_the_kernel_through_cuda_python():
    """Needs libnvrtc, not a GPU: the same calls TensorRTDenoiser makes, down to the cubin."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from dtk.runtime.backends.cuda import Cuda, NvrtcUnavailable, compile_update_kernel

    try:
        cubin = compile_update_kernel(Cuda(), (8, 7))
    except NvrtcUnavailable as e:
        pytest.skip(str(e))
    assert cubin.startswith(b"\x7fELF") and UPDATE_KERNEL_NAME.encode() in cubin


# -- on a real GPU -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session():
    from dtk.runtime.backends.cuda import CudaSession, gpu_info

    try:
        gpu_info(0)
    except DtkError as e:
        pytest.skip(f"needs an NVIDIA GPU ({e})")
    cuda_session = CudaSession(0)
    yield cuda_session
    cuda_session.close()


def _kernel(session):
    from dtk.runtime.backends.cuda import NvrtcUnavailable, UpdateKernel

    try:
        return UpdateKernel(session)
    except NvrtcUnavailable as e:
        pytest.skip(str(e))


def _device_arrays(session, n):
    names = ("x", "out", "x0_prev", "noise")
    device = {name: session.device_buffer(4 * n) for name in names}
    host = {name: session.host_buffer(4 * n) for name in names}
    device["coeffs"], host["coeffs"] = session.device_buffer(32), session.host_buffer(32)
    return device, host


@pytest.mark.gpu
@pytest.mark.parametrize(("row", "clip"), CASES)
def test_device_update_matches_numpy(session, row, clip):
    kernel = _kernel(session)
    n = 3 * 3 * 32 * 32 + 7  # not a multiple of the block size
    device, host = _device_arrays(session, n)
    x, out, x0_prev, noise = _inputs(n, seed=1)
    for name, value in (("x", x), ("out", out), ("x0_prev", x0_prev), ("noise", noise)):
        host[name].array(np.float32, n)[:] = value
        session.upload(device[name], host[name], 4 * n)
    host["coeffs"].array(np.float32)[:] = (*row, clip or 0.0)
    session.upload(device["coeffs"], host["coeffs"], 32)
    kernel.launch(device["x"], device["x0_prev"], device["out"], device["noise"], device["coeffs"], n)
    session.download(host["x"], device["x"], 4 * n)
    session.download(host["x0_prev"], device["x0_prev"], 4 * n)
    session.synchronize()

    want_next, want_x0 = _numpy_update(row, clip, x, out, x0_prev, noise)
    np.testing.assert_allclose(
        host["x0_prev"].array(np.float32, n), want_x0, rtol=1e-5, atol=1e-5, equal_nan=True
    )
    np.testing.assert_allclose(
        host["x"].array(np.float32, n), want_next, rtol=1e-5, atol=1e-4, equal_nan=True
    )


@pytest.mark.gpu
def test_a_captured_graph_replays_each_steps_coefficients(session):
    kernel = _kernel(session)
    n = 4096
    device, host = _device_arrays(session, n)
    x, out, x0_prev, noise = _inputs(n, seed=2)
    x[:3] = 0.0
    for name, value in (("x", x), ("out", out), ("x0_prev", x0_prev), ("noise", noise)):
        host[name].array(np.float32, n)[:] = value
        session.upload(device[name], host[name], 4 * n)
    session.synchronize()

    def step():
        session.upload(device["coeffs"], host["coeffs"], 32)
        kernel.launch(device["x"], device["x0_prev"], device["out"], device["noise"], device["coeffs"], n)

    graph = session.capture(step)
    want_x, want_x0 = x, x0_prev
    for row, clip in CASES:
        session.synchronize()
        host["coeffs"].array(np.float32)[:] = (*row, clip or 0.0)
        graph.launch()
        want_x, want_x0 = _numpy_update(row, clip, want_x, out, want_x0, noise)
    session.download(host["x"], device["x"], 4 * n)
    session.synchronize()
    np.testing.assert_allclose(host["x"].array(np.float32, n), want_x, rtol=1e-4, atol=1e-3)
    graph.destroy()


@pytest.mark.gpu
def test_close_gives_the_memory_back(session):
    from dtk.runtime.backends.cuda import CudaSession

    cuda = session.cuda
    free_before, _ = cuda.rt("cudaMemGetInfo")
    other = CudaSession(0)
    other.device_buffer(256 << 20)
    other.host_buffer(16 << 20)
    free_during, _ = cuda.rt("cudaMemGetInfo")
    other.close()
    free_after, _ = cuda.rt("cudaMemGetInfo")
    assert free_before - free_during >= 256 << 20
    assert abs(free_after - free_before) < 32 << 20
