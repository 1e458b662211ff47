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

from dtk.runtime.backends.cuda import (
    COEFF_SLOTS,
    UPDATE_KERNEL_NAME,
    UPDATE_KERNEL_SOURCE,
    kernel_coefficients,
)
from dtk.runtime.errors import DtkError
from dtk.runtime.guidance import combine
from dtk.runtime.samplers import SamplerPlan, Threshold, update

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
__SOURCE__
// in: n, image_n, guided (int64), coeffs[13], then x, out, x0_prev, x0_prev2, noise, out_u (n float32
// each; out_u read only when guided); out: x_next, x0 (n float32 each). Per image: the kernel's threshold
// search, then its element update, each on the kernel's (guided) model output.
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    long long n, image_n, guided;
    float coeffs[13];
    if (fread(&n, 8, 1, in) != 1 || fread(&image_n, 8, 1, in) != 1 || fread(&guided, 8, 1, in) != 1) return 2;
    if (fread(coeffs, 4, 13, in) != 13) return 2;
    float* data = (float*)malloc(24 * n);
    float* result = (float*)malloc(8 * n);
    if (fread(data, 4, 6 * n, in) != (size_t)(6 * n)) return 3;
    fclose(in);
    const float* all_out_u = guided ? data + 5 * n : nullptr;
    for (long long begin = 0; begin < n; begin += image_n) {
        const float* x = data + begin;
        const float* out = data + n + begin;
        const float* out_u = guided ? all_out_u + begin : nullptr;
        auto count_le = [&](unsigned int key) {
            long long count = 0;
            for (long long j = 0; j < image_n; ++j) {
                count += dtk_abs_key(dtk_x0_raw(x[j], dtk_model_out(out, out_u, coeffs, j), coeffs)) <= key;
            }
            return count;
        };
        auto select = [&](long long k) {
            DtkBisection b = {0u, 0x7fffffffu};
            while (b.low < b.high) b = dtk_bisection_step(b, count_le(dtk_bisection_mid(b)), k);
            return b.low;
        };
        float scale = 0.0f;
        if (coeffs[9] >= 0.0f) {
            const long long k = (long long)coeffs[9];
            scale = dtk_threshold_scale(select(k), k + 1 < image_n ? select(k + 1) : select(k), coeffs);
        }
        for (long long i = begin; i < begin + image_n; ++i) {
            float noise = coeffs[6] != 0.0f ? data[4 * n + i] : 0.0f;  // as the kernel reads them
            float prev2 = coeffs[7] != 0.0f ? data[3 * n + i] : 0.0f;
            const float model_out = dtk_model_out(data + n, all_out_u, coeffs, i);
            dtk_update_element(data[i], model_out, data[2 * n + i], prev2, noise, coeffs, scale,
                               &result[i], &result[n + i]);
        }
    }
    FILE* out = fopen(argv[2], "wb");
    fwrite(result, 4, 2 * n, out);
    fclose(out);
    return 0;
}
"""

# (p, q, a, b, c, d, e, d2), clip, threshold: DDPM-like with clipping, DPM++(2M)-like with history, huge x0
# factors, no noise; UniPC/3M-like with two history terms; dynamic thresholding on those
CASES = [
    ((1.02, -0.2, 0.0, 0.0, 0.7, 0.0, 0.3, 0.0), 1.0, None),
    ((1.0, -0.05, 0.4, 0.0, 0.9, -0.35, 0.0, 0.0), None, None),
    ((157.0, -156.9, 0.02, 0.0, 0.98, 0.0, 0.0, 0.0), 1.0, None),
    ((0.0, 1.0, -0.3, 0.2, 0.5, 0.25, -0.8, 0.0), 2.5, None),
    ((1.0, -0.05, 0.4, 0.0, 1.1, -0.6, 0.0, 0.15), None, None),
    ((1.02, -0.2, 0.0, 0.0, 0.7, 0.0, 0.3, 0.0), None, Threshold(0.9, 2.0)),
    ((1.0, -0.05, 0.4, 0.0, 1.1, -0.6, 0.0, 0.15), None, Threshold(0.995, 1.5)),
    ((0.0, 1.0, -0.3, 0.2, 0.5, 0.25, -0.8, 0.1), None, Threshold(0.5, 8.0)),
]
IMAGES = 3


def _inputs(n: int, seed: int, finite: bool = False):
    rng = np.random.default_rng(seed)
    x, out, x0_prev, x0_prev2, noise = (rng.standard_normal(n, dtype=np.float32) * 3 for _ in range(5))
    if not finite:
        x[:3] = [np.nan, np.inf, -1e30]  # NaN stays NaN through the clamp, like numpy's clip
    return x, out, x0_prev, x0_prev2, noise


def _numpy_update(row, clip, threshold, x, out, x0_prev, x0_prev2, noise, images=IMAGES):
    """dtk.runtime.samplers.update on the batch as [images, C·H·W]."""
    shaped = [a.reshape(images, -1) for a in (x, out, x0_prev, x0_prev2, noise)]
    x, out, x0_prev, x0_prev2, noise = shaped
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 on purpose
        x_next, x0 = update(
            np.asarray(row), x, out, x0_prev, noise if row[6] != 0 else None, clip, x0_prev2, threshold
        )
    return x_next.ravel(), x0.ravel()


def _plan(row, clip, threshold):
    return SamplerPlan("case", np.array([0]), np.array([row]), clip, threshold)


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
    # 5 pointers + n + image_n + the unconditional output and x's copy (null without guidance)
    assert re.findall(r"\.param \.(\w+)", entry.group(1)) == ["u64"] * 9


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


def _run_harness(harness, folder, coeffs, image_n, x, out, x0_prev, x0_prev2, noise, out_u=None):
    """The harness on these arrays (with `out_u`: guided, s from the row) → x_next, x0."""
    n = x.size
    guided = out_u is not None
    out_u = out_u if guided else np.full(n, np.nan, dtype=np.float32)  # never read without guidance
    (folder / "in.bin").write_bytes(
        np.array([n, image_n, guided], dtype=np.int64).tobytes()
        + coeffs.tobytes()
        + np.concatenate([x, out, x0_prev, x0_prev2, noise, out_u]).tobytes()
    )
    run = subprocess.run([str(harness), str(folder / "in.bin"), str(folder / "out.bin")], capture_output=True)
    assert run.returncode == 0, run.stderr
    return np.fromfile(folder / "out.bin", dtype=np.float32).reshape(2, n)


@pytest.mark.parametrize(("row", "clip", "threshold"), CASES)
def test_the_kernels_arithmetic_is_the_contract_update(harness, tmp_path, row, clip, threshold):
    image_n = 333  # not a multiple of anything the kernel uses
    n = IMAGES * image_n
    x, out, x0_prev, x0_prev2, noise = _inputs(n, seed=len(tmp_path.name), finite=threshold is not None)
    if row[6] == 0:
        noise[:] = np.nan  # never read when e == 0
    if row[7] == 0:
        x0_prev2[:] = np.nan  # never read when d2 == 0
    coeffs = kernel_coefficients(_plan(row, clip, threshold), image_n)[0]
    x_next, x0 = _run_harness(harness, tmp_path, coeffs, image_n, x, out, x0_prev, x0_prev2, noise)

    want_next, want_x0 = _numpy_update(row, clip, threshold, x, out, x0_prev, x0_prev2, noise)
    np.testing.assert_allclose(x0, want_x0, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(x_next, want_next, rtol=1e-6, atol=1e-5, equal_nan=True)
    if clip:
        assert np.nanmax(np.abs(x0)) <= clip
    if threshold is not None:  # each image ends in [-1, 1], and at least one was scaled rather than clipped
        assert np.abs(x0).max() <= 1.0
        raw = np.abs(row[0] * x + row[1] * out).reshape(IMAGES, -1)
        assert (np.quantile(raw, threshold.ratio, axis=1) > 1.0).any()
    else:
        p, a, c = row[0], row[2], row[4]
        # a NaN in x reaches x0 through p, and x_next through a or through x0 (zero terms are left out)
        assert np.isnan(x0[0]) == (p != 0)
        assert np.isnan(x_next[0]) == (a != 0 or (p != 0 and c != 0))


@pytest.mark.parametrize("scale", [3.0, 0.5])
@pytest.mark.parametrize(("row", "clip", "threshold"), CASES)
def test_the_guided_kernel_is_guidance_then_the_update(harness, tmp_path, row, clip, threshold, scale):
    """out_u + s·(out_c − out_u) (runtime.guidance.combine), then samplers.update, thresholding included."""
    image_n = 333
    n = IMAGES * image_n
    x, out_c, x0_prev, x0_prev2, noise = _inputs(n, seed=7, finite=True)
    out_u = np.random.default_rng(8).standard_normal(n, dtype=np.float32) * 3
    coeffs = kernel_coefficients(_plan(row, clip, threshold), image_n, guidance_scale=scale)[0]
    assert coeffs[12] == np.float32(scale)
    x_next, x0 = _run_harness(harness, tmp_path, coeffs, image_n, x, out_c, x0_prev, x0_prev2, noise, out_u)

    guided_out = combine(out_c, out_u, scale)
    want_next, want_x0 = _numpy_update(row, clip, threshold, x, guided_out, x0_prev, x0_prev2, noise)
    np.testing.assert_allclose(x0, want_x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_next, want_next, rtol=1e-5, atol=1e-4)
    # guidance changed the result: the conditional output alone gives another update
    plain_next, _ = _numpy_update(row, clip, threshold, x, out_c, x0_prev, x0_prev2, noise)
    assert np.abs(x_next - plain_next).max() > 1e-2


def test_kernel_coefficients_place_the_quantile_as_numpy_does():
    rows = kernel_coefficients(_plan(CASES[0][0], None, Threshold(0.995, 1.5)), 3 * 16 * 16)
    assert rows.shape == (1, COEFF_SLOTS) and rows.dtype == np.float32
    # numpy's linear quantile: position 0.995 · (768 − 1) = 763.165 between order statistics 763 and 764
    np.testing.assert_allclose(rows[0, 8:], [0.0, 763.0, 0.165, 1.5, 1.0], rtol=1e-4)  # s = 1: no guidance
    clipped = kernel_coefficients(_plan(CASES[0][0], 2.5, None), 10)[0]
    assert clipped[8] == 2.5 and clipped[9] == -1.0


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
    """x, out, noise [n]; the x0 history [2, n] as one buffer; the coefficient row."""
    sizes = {"x": 4 * n, "out": 4 * n, "noise": 4 * n, "history": 8 * n, "coeffs": 4 * COEFF_SLOTS}
    device = {name: session.device_buffer(size) for name, size in sizes.items()}
    host = {name: session.host_buffer(size) for name, size in sizes.items()}
    return device, host


def _upload(session, device, host, values: dict):
    for name, value in values.items():
        host[name].array(np.float32, value.size)[:] = value
        session.upload(device[name], host[name], 4 * value.size)


def _launch(kernel, device, n, image_n):
    kernel.launch(
        device["x"], device["history"], device["out"], device["noise"], device["coeffs"], n, image_n
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("row", "clip", "threshold"), CASES)
def test_device_update_matches_numpy(session, row, clip, threshold):
    kernel = _kernel(session)
    image_n = 3 * 32 * 32 + 7  # not a multiple of the block size
    n = IMAGES * image_n
    device, host = _device_arrays(session, n)
    x, out, x0_prev, x0_prev2, noise = _inputs(n, seed=1, finite=threshold is not None)
    history = np.concatenate([x0_prev, x0_prev2])
    coeffs = kernel_coefficients(_plan(row, clip, threshold), image_n)[0]
    _upload(session, device, host, {"x": x, "out": out, "noise": noise, "history": history, "coeffs": coeffs})
    _launch(kernel, device, n, image_n)
    session.download(host["x"], device["x"], 4 * n)
    session.download(host["history"], device["history"], 8 * n)
    session.synchronize()

    want_next, want_x0 = _numpy_update(row, clip, threshold, x, out, x0_prev, x0_prev2, noise)
    got_history = host["history"].array(np.float32, 2 * n)
    np.testing.assert_allclose(got_history[:n], want_x0, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(got_history[n:], x0_prev)  # the history shifts by one step
    np.testing.assert_allclose(
        host["x"].array(np.float32, n), want_next, rtol=1e-5, atol=1e-4, equal_nan=True
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("row", "clip", "threshold"), [CASES[0], CASES[4], CASES[6]])
def test_device_guided_update_matches_numpy(session, row, clip, threshold):
    """The 2B layout of a guided chain: out holds [out_c, out_u], x_next goes to x and to its copy after."""
    from dtk.runtime.backends.cuda import DeviceBuffer

    kernel = _kernel(session)
    image_n = 3 * 32 * 32 + 7
    n = IMAGES * image_n
    x, out_c, x0_prev, x0_prev2, noise = _inputs(n, seed=3, finite=True)
    out_u = np.random.default_rng(4).standard_normal(n, dtype=np.float32)
    device = {name: session.device_buffer(8 * n) for name in ("x", "out", "history")}
    device |= {"noise": session.device_buffer(4 * n), "coeffs": session.device_buffer(4 * COEFF_SLOTS)}
    host = {name: session.host_buffer(buffer.nbytes) for name, buffer in device.items()}
    coeffs = kernel_coefficients(_plan(row, clip, threshold), image_n, guidance_scale=3.0)[0]
    values = {"x": np.concatenate([x, x]), "out": np.concatenate([out_c, out_u]), "noise": noise}
    _upload(
        session, device, host, values | {"history": np.concatenate([x0_prev, x0_prev2]), "coeffs": coeffs}
    )
    second = [DeviceBuffer(device[name].ptr + 4 * n, 4 * n) for name in ("out", "x")]
    kernel.launch(
        device["x"], device["history"], device["out"], device["noise"], device["coeffs"], n, image_n, *second
    )
    session.download(host["x"], device["x"], 8 * n)
    session.synchronize()

    want_next, _ = _numpy_update(
        row, clip, threshold, x, combine(out_c, out_u, 3.0), x0_prev, x0_prev2, noise
    )
    got = host["x"].array(np.float32, 2 * n)
    np.testing.assert_allclose(got[:n], want_next, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got[n:], got[:n])


@pytest.mark.gpu
def test_a_captured_graph_replays_each_steps_coefficients(session):
    """One graph, the rows of every case in turn (clipping, two history terms, thresholding among them)."""
    kernel = _kernel(session)
    image_n = 2048
    n = 2 * image_n
    device, host = _device_arrays(session, n)
    x, out, x0_prev, x0_prev2, noise = _inputs(n, seed=2, finite=True)
    _upload(
        session,
        device,
        host,
        {"x": x, "out": out, "noise": noise, "history": np.concatenate([x0_prev, x0_prev2])},
    )
    session.synchronize()

    def step():
        session.upload(device["coeffs"], host["coeffs"], 4 * COEFF_SLOTS)
        _launch(kernel, device, n, image_n)

    graph = session.capture(step)
    want_x, want_prev, want_prev2 = x, x0_prev, x0_prev2
    for row, clip, threshold in CASES:
        session.synchronize()
        host["coeffs"].array(np.float32)[:] = kernel_coefficients(_plan(row, clip, threshold), image_n)[0]
        graph.launch()
        want_x, x0 = _numpy_update(row, clip, threshold, want_x, out, want_prev, want_prev2, noise, images=2)
        want_prev, want_prev2 = x0, want_prev
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
