"""Triton Python-backend model `dtk_sampler`: whole-image requests → uint8 images, sampled with dtk.runtime.

Copied into a repository as `dtk_sampler/1/model.py` (`dtk.export.triton.write_sampler_model`); it runs
inside Triton's Python stub, never imported by dtk itself. One `execute` gets the requests of one dynamic
batch; those that share (sampler, steps, eta, guidance scale) run as one batched `Pipeline.sample(seeds=...)`,
so each step is one denoiser call for all of them, and each image is exactly what `sample(num=1, seed=seed)`
makes (with `labels=[label], guidance_scale=s` for a class-conditional bundle; labels differ per image, and a
request without a label takes a None entry, the null class).

Contract (docs/serving.md): input `seed` INT64 [1], optional `steps` INT32 [1] and `eta` FP32 [1], request
parameter `sampler` (a string: strings never travel as TYPE_STRING tensors, which crash the stub of Triton
2.51 under numpy 2) → output `image` UINT8 [H, W, C]. A class-conditional bundle also takes `class_label`
INT64 [1] (or the request parameter `class`, a class name) and `guidance_scale` FP32 [1]. A bad request gets
its own error response; the rest of the batch is answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from dtk.runtime.errors import DtkError
from dtk.runtime.pipeline import Pipeline, choose_backend

# Triton 2.51's Python backend predates numpy 2: as_numpy() misreads and Tensor(name, array) writes an empty
# buffer there, while DLPack works. Under numpy 1 the classic calls work and from_dlpack crashes the stub.
NUMPY2 = int(np.__version__.split(".")[0]) >= 2
PARAMETERS = ("sampler", "class")
# request parameters of Triton's protocol that clients may send along (tritonclient.http sends the first)
PROTOCOL_PARAMETERS = (
    "binary_data_output",
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
)


class RequestError(Exception):
    """What is wrong with one request; it becomes that request's Triton error."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / params["bundle"]
        on_gpu = args.get("model_instance_kind") == "GPU"
        device = int(args.get("model_instance_device_id") or 0)
        backend = choose_backend(bundle, params.get("backend", "auto"))[0]
        if backend == "tensorrt":
            opts = {"device": device, "cuda_graph": params.get("cuda_graph") == "true"}
        else:
            threads = int(params.get("threads") or 0)
            opts = {"threads": threads or None}
            if on_gpu:
                opts.update(providers=["CUDAExecutionProvider", "CPUExecutionProvider"], device_id=device)
        self.pipe = Pipeline.load(bundle, backend=backend, **opts)
        self.default_steps = int(params["default_steps"])
        self.default_sampler = params["default_sampler"]

    def execute(self, requests):
        responses = [None] * len(requests)
        read = []
        for index, request in enumerate(requests):
            try:
                read.append((index, *self._read(request)))
            except (RequestError, DtkError) as e:
                responses[index] = _error(str(e))
        for (sampler, steps, eta, scale), members, labels in sampling_runs(read):
            seeds = [seed for _, request_seeds, _ in members for seed in request_seeds]
            try:
                images = self.pipe.sample(
                    steps=steps, sampler=sampler, eta=eta, seeds=seeds, labels=labels, guidance_scale=scale
                )
            except Exception as e:  # a failed run answers its requests; the model stays up for the next batch
                for index, _, _ in members:
                    responses[index] = _error(f"sampling failed: {e}")
                continue
            first = 0
            for index, request_seeds, _ in members:
                image = np.ascontiguousarray(images[first : first + len(request_seeds)])
                responses[index] = pb_utils.InferenceResponse(output_tensors=[_tensor("image", image)])
                first += len(request_seeds)
        return responses

    def _read(self, request) -> tuple[tuple[str, int, float, float], list[int], list[int] | None]:
        """→ (its (sampler, steps, eta, guidance scale), the request's seeds, their class labels or None for
        the null class), checked against the bundle's schedule and classes."""
        params = json.loads(request.parameters() or "{}")
        unknown = sorted(set(params) - set(PARAMETERS) - set(PROTOCOL_PARAMETERS))
        if unknown:
            raise RequestError(f"unknown request parameter {unknown[0]!r}; known: 'sampler' and 'class'")
        sampler = params.get("sampler", self.default_sampler)
        if not isinstance(sampler, str):
            raise RequestError(f"the sampler parameter must be a string, got {sampler!r}")
        seed = _input(request, "seed", np.int64)
        if seed is None:
            raise RequestError("input 'seed' (INT64 [1]) is missing")
        if np.any(seed < 0):
            raise RequestError(f"seed must be non-negative, got {int(seed.min())}")
        steps = _setting(request, "steps", np.int32, self.default_steps)
        eta = _setting(request, "eta", np.float32, None)
        if eta is not None and sampler != "ddim":
            raise RequestError(f"eta applies to the ddim sampler only; leave it out for {sampler}")
        eta = 0.0 if eta is None else float(eta)
        self.pipe.plan(sampler, int(steps), eta)  # refuses an unknown sampler and steps off the schedule
        seeds = [int(s) for s in seed.reshape(-1)]
        labels, scale = self._classes(request, params, len(seeds))
        return (sampler, int(steps), eta, scale), seeds, labels

    def _classes(self, request, params: dict, rows: int) -> tuple[list[int] | None, float]:
        """The request's labels (one per row; None: the null class) and guidance scale, checked against the
        bundle's classes exactly as `Pipeline.sample` checks them."""
        from dtk.runtime.guidance import sampling_labels

        labels = _input(request, "class_label", np.int64)
        name = params.get("class")
        if name is not None and not isinstance(name, str):
            raise RequestError(f"the class parameter must be a string (a class name), got {name!r}")
        if name is not None and labels is not None:
            raise RequestError("give the class as input 'class_label' or as parameter 'class', not both")
        if labels is not None:
            labels = [int(label) for label in labels.reshape(-1)]  # Triton checks: one per row of seed
        elif name is not None:
            labels = name
        scale = _setting(request, "guidance_scale", np.float32, 1.0)
        resolved = sampling_labels(self.pipe.manifest.classes, labels, scale, rows, "dtk_sampler")
        return (None if labels is None else resolved.tolist()), float(scale)

    def finalize(self):
        self.pipe.close()


def sampling_runs(read):
    """Requests `(index, settings, seeds, labels)` → one `(settings, members, labels)` sampling run per
    settings, members `(index, seeds, labels)` in request order. The run's labels are one per image, its
    requests' concatenated, a request without labels giving None entries (the null class: under guidance
    its unconditional sample, exactly as alone); None when no request of the run has labels (so an
    unconditional bundle gets none)."""
    runs: dict[tuple, list] = {}
    for index, settings, seeds, labels in read:
        runs.setdefault(settings, []).append((index, seeds, labels))
    return [(settings, members, _run_labels(members)) for settings, members in runs.items()]


def _run_labels(members) -> list | None:
    """One label per image of the run (None: no class), or None when none of its requests has labels."""
    if all(labels is None for _, _, labels in members):
        return None
    run = []
    for _, seeds, labels in members:
        run += [None] * len(seeds) if labels is None else labels
    return run


def _input(request, name: str, dtype) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = np.from_dlpack(tensor).copy() if NUMPY2 else np.array(tensor.as_numpy())
    if array.dtype != dtype:  # Triton checks the config's types; a mismatch here means a changed config
        raise RequestError(f"input {name!r} must be {np.dtype(dtype).name}, got {array.dtype.name}")
    return array


def _setting(request, name: str, dtype, default):
    """A per-request setting sent as [batch, 1]: every row of the request must carry the same value."""
    array = _input(request, name, dtype)
    if array is None:
        return default
    values = np.unique(array)
    if values.size != 1:
        raise RequestError(f"input {name!r} differs between the rows of one request: {values.tolist()}")
    value = values[0]
    if not np.isfinite(value):
        raise RequestError(f"input {name!r} is not finite: {value}")
    return value.item()


def _tensor(name: str, array: np.ndarray):
    return pb_utils.Tensor.from_dlpack(name, array) if NUMPY2 else pb_utils.Tensor(name, array)


def _error(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
