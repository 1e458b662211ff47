"""`dtk_sampler` for a class-conditional bundle on a real tritonserver: class labels (per image, by index or
by name) and the guidance scale give the local runtime's images byte for byte, and bad labels or scales get
an error for their request only."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dtk.export.triton import SamplerOptions, write_sampler_model
from dtk.runtime import Pipeline

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from dtk.export.triton_server import ServerOptions, TritonServer  # noqa: E402
from dtk.runtime.manifest import MANIFEST_NAME  # noqa: E402

STEPS = 3


NO_NULL = "dtk_sampler_no_null"


@pytest.fixture(scope="module")
def server(conditional_bundle, tmp_path_factory):
    """dtk_sampler for the conditional bundle, and NO_NULL for the same bundle recorded without a null class
    (as a diffusers model with num_class_embeds exports): one server for both."""
    repo = tmp_path_factory.mktemp("triton-conditional-repo")
    write_sampler_model(conditional_bundle, repo, SamplerOptions(steps=STEPS, sampler="ddim"))
    no_null = tmp_path_factory.mktemp("no-null") / "bundle"
    shutil.copytree(conditional_bundle, no_null)
    manifest = json.loads((no_null / MANIFEST_NAME).read_text())
    manifest["classes"]["null_class"] = None
    (no_null / MANIFEST_NAME).write_text(json.dumps(manifest))
    write_sampler_model(no_null, repo, SamplerOptions(name=NO_NULL, steps=STEPS, sampler="ddim"))
    with TritonServer(repo, ServerOptions(models=("dtk_sampler", NO_NULL))) as running:
        yield running


@pytest.fixture(scope="module")
def local(conditional_bundle):
    """The local runtime, one image per call: (seed, label or None, scale) → what the server must send."""
    with Pipeline.load(conditional_bundle) as pipe:

        def image(seed, label=None, scale=1.0):
            labels = None if label is None else [label]
            return pipe.sample(
                num=1, seed=seed, steps=STEPS, sampler="ddim", labels=labels, guidance_scale=scale
            )[0]

        yield image


def infer(client, seeds, labels=None, scale=None, parameters=None, model="dtk_sampler"):
    inputs = {
        "seed": (seeds, np.int64),
        "class_label": (labels, np.int64),
        "guidance_scale": (scale, np.float32),
    }
    tensors = []
    for name, (values, dtype) in inputs.items():
        if values is None:
            continue
        array = np.asarray(values, dtype=dtype).reshape(-1, 1)
        tensor = tritonclient.InferInput(name, list(array.shape), "INT64" if dtype is np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer(model, tensors, parameters=parameters).as_numpy("image")


@pytest.fixture
def client(server):
    with tritonclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def test_the_contract_has_labels_and_the_scale(client):
    metadata = client.get_model_metadata("dtk_sampler", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("seed", "INT64", ["-1", "1"]),
        ("steps", "INT32", ["-1", "1"]),
        ("eta", "FP32", ["-1", "1"]),
        ("class_label", "INT64", ["-1", "1"]),
        ("guidance_scale", "FP32", ["-1", "1"]),
    ]


def test_labels_names_and_guidance_give_the_local_images(client, local):
    for seed, label, scale in [(0, 0, None), (1, 2, None), (2, 1, 3.0), (3, None, None), (4, None, 2.5)]:
        image = infer(client, [seed], None if label is None else [label], None if scale is None else [scale])[
            0
        ]
        assert np.array_equal(image, local(seed, label, 1.0 if scale is None else scale)), (
            seed,
            label,
            scale,
        )
    # a class by name, as a request parameter
    assert np.array_equal(
        infer(client, [5], scale=[3.0], parameters={"class": "triangle"})[0], local(5, 2, 3.0)
    )
    # labels per row of one request, and labels change the image
    images = infer(client, [6, 6, 6], [0, 1, 2], [2.0] * 3)  # Triton wants every input [n, 1]
    assert all(np.array_equal(images[k], local(6, k, 2.0)) for k in range(3))
    assert len({image.tobytes() for image in images}) == 3


def test_concurrent_labels_and_scales_share_runs(server, local):
    """Many labels, requests without one, and two scales at once: runs group by scale only, the labels vary
    inside a run (the null class for a request without one), and every image is the one it gets alone."""
    jobs = [(400 + k, [k % 3, None][k % 4 == 3], [1.0, 3.0][k % 2]) for k in range(16)]
    start = threading.Barrier(len(jobs))

    def send(job):
        seed, label, scale = job
        with tritonclient.InferenceServerClient(server.grpc_url) as c:
            start.wait()
            return infer(c, [seed], None if label is None else [label], [scale])[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        images = list(pool.map(send, jobs))
    for job, image in zip(jobs, images, strict=True):
        assert np.array_equal(image, local(*job)), job


BAD = [
    ("label out of range", {"labels": [3]}, None, "class 3 is out of range: this model has classes 0..2"),
    ("negative label", {"labels": [-1]}, None, "class -1 is out of range"),
    ("unknown class name", {}, {"class": "star"}, "unknown class 'star'; this model's classes are circle"),
    ("name and label", {"labels": [1]}, {"class": "square"}, "not both"),
    ("negative scale", {"scale": [-1.0]}, None, "guidance scale must be a finite number ≥ 0"),
    ("infinite scale", {"scale": [np.inf]}, None, "input 'guidance_scale' is not finite"),
    ("NaN scale", {"scale": [np.nan]}, None, "input 'guidance_scale' is not finite"),
    ("fewer labels than seeds (Triton)", {"seeds": [1, 2], "labels": [1]}, None, "batch size does not match"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda case: case[0])
def test_bad_labels_and_scales_get_a_clear_error(client, case):
    _, inputs, parameters, fragment = case
    with pytest.raises(InferenceServerException) as info:
        infer(client, inputs.get("seeds", [1]), inputs.get("labels"), inputs.get("scale"), parameters)
    assert fragment in info.value.message()


def test_a_bundle_without_a_null_class_needs_labels_and_takes_no_guidance(client, local):
    """Its labelled images are those of the same network with labels (guidance off); no label, or s ≠ 1: an
    error."""
    assert np.array_equal(infer(client, [7], [1], model=NO_NULL)[0], local(7, 1))
    for labels, scale, fragment in [
        (None, None, "dtk_sampler: this model has no null class; pass class labels"),
        (
            [1],
            [3.0],
            "guidance scale 3 needs a model trained with a null class; this model has no null class",
        ),
    ]:
        with pytest.raises(InferenceServerException) as info:
            infer(client, [7], labels, scale, model=NO_NULL)
        assert fragment in info.value.message()


def test_bad_requests_leave_the_rest_of_the_batch_answered(server, client, local):
    jobs = [("good", (500 + k, k % 3, 2.0)) for k in range(8)] + [("bad", case) for case in BAD]
    start = threading.Barrier(len(jobs))

    def send(job):
        kind, value = job
        with tritonclient.InferenceServerClient(server.grpc_url) as c:
            start.wait()
            try:
                if kind == "good":
                    return infer(c, [value[0]], [value[1]], [value[2]])[0]
                _, inputs, parameters, _ = value
                infer(c, inputs.get("seeds", [1]), inputs.get("labels"), inputs.get("scale"), parameters)
            except InferenceServerException as e:
                return e
        return None

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    for (kind, value), result in zip(jobs, results, strict=True):
        if kind == "good":
            assert isinstance(result, np.ndarray) and np.array_equal(result, local(*value)), value
        else:
            assert isinstance(result, InferenceServerException) and value[3] in result.message(), value[0]
    assert client.is_model_ready("dtk_sampler")


def test_client_example_asks_for_a_class(server, local, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[2] / "examples" / "triton_client.py"
    spec = importlib.util.spec_from_file_location("examples_triton_client_conditional", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "squares.png"
    argv = [
        "--url",
        server.grpc_url,
        "--num",
        "2",
        "--seed",
        "30",
        "--class",
        "square",
        "--guidance-scale",
        "3",
    ]
    assert example.main([*argv, "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[2:10, 2:10], local(30, 1, 3.0)[..., 0])  # the first image, inside the padding
    assert example.main([*argv[:-4], "--class", "star", "--out", str(tmp_path / "x.png")]) == 1
    assert "unknown class 'star'" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
