"""`dtk_sampler` on a real tritonserver (Triton 2.51 from the nvidia-pytriton wheel the install brings):
readiness, the local runtime's images byte for byte, 32 concurrent clients, merged batches, bad requests
answered one by one, and a clean stop of `dtk serve`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dtk.export.triton import SamplerOptions, write_sampler_model
from dtk.export.triton_server import SHM_DIR, TritonServer, stub_pids, triton_pids
from dtk.runtime import Pipeline

tritonclient = pytest.importorskip("tritonclient.grpc")
http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

STEPS = 4  # the model's default: short runs keep the module fast
MAX_BATCH = 4  # tiny_bundle's batch range is 1..4
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triton_client.py"


def _example():
    spec = importlib.util.spec_from_file_location("examples_triton_client", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client_example = _example()
request_image = client_example.request_image


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    write_sampler_model(tiny_bundle, repo, SamplerOptions(steps=STEPS, sampler="ddim"))
    with TritonServer(repo) as running:
        yield running
    assert not stub_pids(running.shm_prefix)
    assert not list(SHM_DIR.glob(f"{running.shm_prefix}*"))


@pytest.fixture(scope="module")
def local(tiny_bundle):
    """The local runtime, one image per call: what every served image must equal."""
    with Pipeline.load(tiny_bundle) as pipe:
        cache = {}

        def image(seed, steps=STEPS, sampler="ddim", eta=0.0):
            key = (seed, steps, sampler, eta)
            if key not in cache:
                cache[key] = pipe.sample(num=1, seed=seed, steps=steps, sampler=sampler, eta=eta)[0]
            return cache[key]

        yield image


@pytest.fixture
def client(server):
    with tritonclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def infer(client, inputs: dict, parameters=None):
    """Raw request: name → (array, Triton dtype)."""
    tensors = []
    for name, (array, dtype) in inputs.items():
        tensor = tritonclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer("dtk_sampler", tensors, parameters=parameters)
    return result.as_numpy("image")


def test_ready_with_the_contract(server, client):
    assert client.is_server_ready() and client.is_model_ready("dtk_sampler")
    metadata = client.get_model_metadata("dtk_sampler", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("seed", "INT64", ["-1", "1"]),
        ("steps", "INT32", ["-1", "1"]),
        ("eta", "FP32", ["-1", "1"]),
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("image", "UINT8", ["-1", "16", "16", "1"])
    ]
    config = client.get_model_config("dtk_sampler", as_json=True)["config"]
    assert config["max_batch_size"] == MAX_BATCH and "dynamic_batching" in config


def test_seeds_0_to_7_are_the_local_images(client, local):
    for seed in range(8):
        image = request_image(client, seed)
        assert image.dtype == np.uint8 and image.shape == (16, 16, 1)
        assert np.array_equal(image, local(seed)), seed
    assert len({local(seed).tobytes() for seed in range(8)}) == 8  # eight different images


def test_settings_travel_with_the_request(client, local):
    assert np.array_equal(request_image(client, 3, steps=6, sampler="ddpm"), local(3, 6, "ddpm"))
    assert np.array_equal(request_image(client, 3, steps=5, sampler="dpmpp-2m"), local(3, 5, "dpmpp-2m"))
    assert np.array_equal(request_image(client, 3, steps=5, eta=0.5), local(3, 5, "ddim", 0.5))
    # one request of three seeds: three images, each the seed's own
    images = infer(client, {"seed": (np.array([[5], [6], [7]], dtype=np.int64), "INT64")})
    assert images.shape == (3, 16, 16, 1)
    assert all(np.array_equal(images[k], local(5 + k)) for k in range(3))


def test_http_clients_and_plain_json(server, local):
    """tritonclient.http (which adds protocol parameters of its own), and the JSON of serving.md's curl."""
    import json
    import urllib.request

    with http.InferenceServerClient(server.http_url) as c:
        seed = http.InferInput("seed", [1, 1], "INT64")
        seed.set_data_from_numpy(np.array([[9]], dtype=np.int64))
        image = c.infer("dtk_sampler", [seed], parameters={"sampler": "ddim"}).as_numpy("image")
    assert np.array_equal(image[0], local(9))
    body = {
        "parameters": {"sampler": "ddpm"},
        "inputs": [
            {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [7]},
            {"name": "steps", "datatype": "INT32", "shape": [1, 1], "data": [6]},
        ],
    }
    url = f"http://{server.http_url}/v2/models/dtk_sampler/infer"
    with urllib.request.urlopen(url, data=json.dumps(body).encode(), timeout=30) as response:
        (output,) = json.loads(response.read())["outputs"]
    assert output["name"] == "image" and output["datatype"] == "UINT8" and output["shape"] == [1, 16, 16, 1]
    assert np.array_equal(np.array(output["data"], dtype=np.uint8).reshape(16, 16, 1), local(7, 6, "ddpm"))


def test_32_concurrent_clients_share_batches(server, tiny_bundle):
    """32 clients at once, connected first, on runs long enough (20 steps) that later requests queue behind
    the first run: every image right, and the statistics show runs that took several requests."""
    import threading

    stats = http.InferenceServerClient(server.http_url)

    def model_stats():
        return stats.get_inference_statistics("dtk_sampler")["model_stats"][0]

    seeds, steps = list(range(100, 132)), 20
    clients = [tritonclient.InferenceServerClient(server.grpc_url) for _ in seeds]
    start = threading.Barrier(len(seeds))

    def send(k):
        start.wait()
        return request_image(clients[k], seeds[k], steps=steps)

    before = model_stats()
    with ThreadPoolExecutor(len(seeds)) as pool:
        images = list(pool.map(send, range(len(seeds))))
    deadline = time.monotonic() + 10.0  # the statistics can trail the last responses by a moment under load
    while (after := model_stats())["inference_count"] - before["inference_count"] < len(seeds):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for c in clients:
        c.close()
    with Pipeline.load(tiny_bundle) as pipe:  # the same as one num=1 call per seed (tests/runtime pins that)
        expected = pipe.sample(seeds=seeds, steps=steps, sampler="ddim")
    for k, image in enumerate(images):
        assert np.array_equal(image, expected[k]), seeds[k]
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 32
    assert executions < 32  # requests were merged: fewer sampling runs than requests
    merged = {b["batch_size"] for b in after["batch_stats"] if b["batch_size"] > 1}
    assert merged and max(merged) <= MAX_BATCH


def test_concurrent_requests_with_different_settings(server, local):
    """One dynamic batch may hold several settings: each group runs on its own, every image is still right."""
    settings = [{}, {"steps": 3, "sampler": "ddpm"}, {"steps": 5, "eta": 1.0}]
    jobs = [(300 + k, settings[k % 3]) for k in range(12)]

    def send(job):
        seed, extra = job
        with tritonclient.InferenceServerClient(server.grpc_url) as c:
            return request_image(c, seed, **extra)

    with ThreadPoolExecutor(12) as pool:
        images = list(pool.map(send, jobs))
    for (seed, extra), image in zip(jobs, images, strict=True):
        expected = local(seed, extra.get("steps", STEPS), extra.get("sampler", "ddim"), extra.get("eta", 0.0))
        assert np.array_equal(image, expected), (seed, extra)


def bad_requests():
    """(what is wrong, inputs, parameters, a fragment of the error)."""
    seed = (np.array([[1]], dtype=np.int64), "INT64")
    return [
        ("missing seed", {"steps": (np.array([[4]], dtype=np.int32), "INT32")}, None, "seed"),
        ("seed as FP32", {"seed": (np.array([[1.0]], dtype=np.float32), "FP32")}, None, "seed"),
        ("steps 0", {"seed": seed, "steps": (np.array([[0]], dtype=np.int32), "INT32")}, None, "steps"),
        (
            "steps past T",
            {"seed": seed, "steps": (np.array([[5000]], dtype=np.int32), "INT32")},
            None,
            "steps",
        ),
        ("unknown sampler", {"seed": seed}, {"sampler": "euler-x"}, "unknown sampler 'euler-x'"),
        (
            "eta with ddpm",
            {"seed": seed, "eta": (np.array([[0.5]], dtype=np.float32), "FP32")},
            {"sampler": "ddpm"},
            "eta applies to the ddim sampler only",
        ),
        ("negative seed", {"seed": (np.array([[-3]], dtype=np.int64), "INT64")}, None, "non-negative"),
        (
            "rows with different steps",
            {
                "seed": (np.array([[1], [2]], dtype=np.int64), "INT64"),
                "steps": (np.array([[3], [4]], dtype=np.int32), "INT32"),
            },
            None,
            "differs between the rows of one request",
        ),
        ("unknown parameter", {"seed": seed}, {"sampler": "ddim", "step": "5"}, "unknown request parameter"),
        ("class on an unconditional model", {"seed": seed}, {"class": "1"}, "this model is unconditional"),
        (
            "guidance on an unconditional model",
            {"seed": seed, "guidance_scale": (np.array([[3.0]], dtype=np.float32), "FP32")},
            None,
            "unexpected inference input 'guidance_scale'",
        ),
        (
            "batch over max_batch_size",
            {"seed": (np.arange(MAX_BATCH + 1, dtype=np.int64).reshape(-1, 1), "INT64")},
            None,
            f"must be <= {MAX_BATCH}",
        ),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_a_bad_request_gets_a_clear_error(client, case):
    _, inputs, parameters, fragment = case
    with pytest.raises(InferenceServerException) as info:
        infer(client, inputs, parameters)
    assert fragment in info.value.message()


def test_bad_requests_in_a_batch_leave_the_others_answered(server, client, local):
    """A burst of bad and good requests at once: each good one gets its image, each bad one its error."""
    import threading

    cases = bad_requests() * 2
    good_seeds = list(range(200, 216))
    lock, clients = threading.Lock(), {}

    def own_client():
        with lock:
            key = threading.get_ident()
            if key not in clients:
                clients[key] = tritonclient.InferenceServerClient(server.grpc_url)
            return clients[key]

    def send(job):
        kind, value = job
        try:
            if kind == "good":
                return request_image(own_client(), value)
            infer(own_client(), value[1], value[2])
        except InferenceServerException as e:
            return e
        return None

    jobs = [("good", s) for s in good_seeds] + [("bad", case) for case in cases]
    order = np.random.default_rng(0).permutation(len(jobs))
    with ThreadPoolExecutor(16) as pool:
        results = dict(zip(order.tolist(), pool.map(send, [jobs[i] for i in order]), strict=True))
    for index, (kind, value) in enumerate(jobs):
        if kind == "good":
            assert isinstance(results[index], np.ndarray), results[index]
            assert np.array_equal(results[index], local(value))
        else:
            assert isinstance(results[index], InferenceServerException), value[0]
            assert value[3] in results[index].message()
    # still healthy afterwards, with the right images
    assert client.is_server_ready() and client.is_model_ready("dtk_sampler")
    assert np.array_equal(request_image(client, 7), local(7))


def test_client_example_writes_a_grid(server, local, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert (
        client_example.main(["--url", server.grpc_url, "--num", "4", "--seed", "20", "--out", str(out)]) == 0
    )
    assert "4 images in" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[2:18, 2:18], local(20)[..., 0])  # the first image, inside the grid's padding
    closed = f"127.0.0.1:{server.ports['metrics']}"  # no gRPC service there
    assert client_example.main(["--url", closed, "--num", "1", "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {closed}: ")
    assert not (tmp_path / "x.png").exists()


def _interruptible():
    """A test run started in the background inherits SIGINT ignored; `dtk serve` here must see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def dtk_serve(bundle, tmp):
    """`dtk serve BUNDLE` on free ports with TMPDIR=tmp → (the process, its banner once ready)."""
    command = [sys.executable, "-m", "dtk", "serve", str(bundle), "--serve-steps", str(STEPS)]
    ports = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    env = {**os.environ, "TMPDIR": str(tmp)}
    process = subprocess.Popen(
        [*command, *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_interruptible,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("Ctrl-C") for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        banner = "\n".join(lines)
        assert "ready: model dtk_sampler (default 4 ddim steps)" in banner, banner + process.stderr.read()
        yield process, banner
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_dtk_serve_prints_endpoints_and_stops_clean(tiny_bundle, local, tmp_path, stop):
    """`dtk serve` as a user runs it, then stopped: exit 0, nothing left in its TMPDIR or /dev/shm."""
    with dtk_serve(tiny_bundle, tmp_path) as (process, banner):
        grpc_url = re.search(r"gRPC\s+(\S+)", banner).group(1)
        assert grpc_url.startswith("127.0.0.1:")
        assert f"--url {grpc_url}" in banner
        with tritonclient.InferenceServerClient(grpc_url) as c:
            assert np.array_equal(request_image(c, 11), local(11))
        prefix = f"dtk_{process.pid}_"
        assert list(SHM_DIR.glob(f"{prefix}*"))  # the stub's regions exist while it runs ...
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err
    assert not list(SHM_DIR.glob(f"{prefix}*"))  # ... and are gone after the stop
    assert not stub_pids(prefix) and not triton_pids(prefix)
    assert (
        list(tmp_path.iterdir()) == []
    )  # repository, backends copy, log, the stub's temp files: all removed


def test_killed_dtk_serve_takes_its_server_along(tiny_bundle, tmp_path):
    """SIGKILL leaves dtk no chance to clean up; the server still ends (Linux's parent-death signal)."""
    with dtk_serve(tiny_bundle, tmp_path) as (process, _):
        prefix = f"dtk_{process.pid}_"
        assert triton_pids(prefix)
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while (triton_pids(prefix) or stub_pids(prefix)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not triton_pids(prefix) and not stub_pids(prefix)
    assert not list(SHM_DIR.glob(f"{prefix}*"))  # the server, stopped by SIGTERM, removed its stubs' regions
    shutil.rmtree(tmp_path, ignore_errors=True)  # what dtk could not remove: its TMPDIR is this test's


def test_serve_without_a_bundle_says_so(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dtk", "serve", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
