"""`Pipeline`: a bundle, an .onnx or a .plan → uint8 images, on TensorRT or ONNX Runtime, without torch.

    with Pipeline.load("bundle/") as pipe:
        images = pipe.sample(num=16, steps=50, sampler="ddim", seed=0)   # uint8 [16, H, W, C]
        images = pipe(num_images=16, num_inference_steps=50, generator=0).images   # diffusers-style, [0, 1]

Images are sampled in chunks of at most the model's batch. Each image draws its noise from its own
generator (`NoiseSource(seed, first_index=k)` for the chunk starting at image k), so chunking never changes
an image.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from dtk.runtime.backends.base import TimestepArrays
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.guidance import sampling_labels
from dtk.runtime.images import to_uint8
from dtk.runtime.integrity import check_onnx_files
from dtk.runtime.manifest import Manifest, resolve_bundle
from dtk.runtime.samplers import NoiseSource, make_plan, sample_loop

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Pipeline:
    """A bundle's manifest and a denoiser on it → images. `Pipeline.load` opens both from files; a custom
    denoiser (anything with the Denoiser protocol, optionally `run_chain`) can be passed in directly."""

    def __init__(self, manifest: Manifest, denoiser, bundle_dir: Path | None = None):
        if manifest.out_channels != manifest.in_channels:
            raise DtkError(
                f"{bundle_dir}: the model predicts {manifest.out_channels} channels for "
                f"{manifest.in_channels} input channels; samplers need one prediction per input channel"
            )
        self.manifest = manifest
        self.denoiser = denoiser
        self.bundle_dir = bundle_dir
        self._plans = {}  # (sampler, steps, eta) → SamplerPlan: an app sampling in a loop plans once
        self._timestep = TimestepArrays(manifest.inputs[1].dtype)  # (t, batch) → the graph's [batch] input

    @classmethod
    def load(cls, path, backend: str = "auto", **opts) -> Pipeline:
        """Open a bundle directory, or an .onnx / .plan with dtk.json beside it, on `choose_backend`'s choice.

        `opts` go to the backend: OnnxRuntimeDenoiser(providers, threads, device_id, io_binding) or
        TensorRTDenoiser(device, cuda_graph)."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise DtkError(f"Pipeline.load takes a bundle directory, .onnx or .plan path, got {path!r}")
        backend, model_path, bundle_dir, manifest = choose_backend(path, backend)
        if backend == "tensorrt":
            from dtk.runtime.backends.tensorrt import TensorRTDenoiser as Denoiser
        else:
            from dtk.runtime.backends.onnxruntime import OnnxRuntimeDenoiser as Denoiser
        _check_options(Denoiser, backend, opts)
        return cls(manifest, Denoiser(model_path, manifest, **opts), bundle_dir)

    @property
    def backend(self) -> str:
        return self.denoiser.name

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.manifest.in_channels, *self.manifest.image_size)

    def chunks(self, num: int, max_batch: int | None = None, **deprecated) -> list[tuple[int, int, int]]:
        """(first image, images kept, batch run) per chunk of at most `max_batch` images (default: the model's
        largest batch); a run is padded up to the model's min batch."""
        max_batch = _renamed_batch_size(max_batch, deprecated)
        if num < 1:
            raise DtkError(f"num must be at least 1, got {num}")
        low, high = self.denoiser.batch_range
        size = min(high, self.manifest.batch["max"]) if max_batch is None else max_batch
        if not low <= size <= high:
            hint = f"exactly {low}" if low == high else f"{low}..{high}"
            raise DtkError(f"batch size {size} is outside the model's batch range ({hint})")
        return [(k, min(size, num - k), max(min(size, num - k), low)) for k in range(0, num, size)]

    def sample_latents(
        self,
        num: int = 1,
        steps: int = 50,
        sampler: str | None = None,
        seed: int = 0,
        eta: float = 0.0,
        callback=None,
        max_batch: int | None = None,
        progress: bool = False,
        seeds=None,
        *,
        latents=None,
        step_callback=None,
        labels=None,
        guidance_scale: float = 1.0,
        **deprecated,
    ) -> np.ndarray:
        """float32 [num, C, H, W] in the model's data range. `callback(done, total)` after every denoising
        step, counted over all chunks; `progress` shows a tqdm bar on stderr. `seeds`, one per image,
        replaces num and seed: image k is then what `num=1, seed=seeds[k]` gives (a server's requests).

        `max_batch` is the most images per network call (the run is split into chunks of it; diffusers'
        `batch_size` is the number of images, `num` here; the old name `batch_size` still works, with a
        DeprecationWarning). `latents` float32 [num, C, H, W] replaces the initial noise x_T (each image's
        generator still draws it, so the step noise is the same: `latents` equal to what the seed draws gives
        the same images). `step_callback(step_index, timestep, x)` sees each chunk's current sample after
        every step.

        A class-conditional bundle takes `labels`: one label for every image (an index, its text "7" or a
        class name), one per image (a None entry: no class for that image, the null class), or "all" (a row
        per class); None samples the null class. With `guidance_scale` s ≠ 1, classifier-free guidance
        (`dtk.runtime.guidance`); an image without a class is then the unconditional sample, exactly as in a
        run of its own, so one call may mix labelled and unlabelled images."""
        max_batch = _renamed_batch_size(max_batch, deprecated)

        for value in [seed] if seeds is None else seeds:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise DtkError(f"seed must be a non-negative integer, got {value!r}")
        num = num if seeds is None else len(seeds)
        _check_sample_args(num, steps, sampler, eta, callback, max_batch)
        plan = self.plan(sampler, steps, eta)
        sampler = plan.name
        chunks = self.chunks(num, max_batch)
        class_labels = sampling_labels(self.manifest.classes, labels, guidance_scale, num, self.bundle_dir)
        shape = self.sample_shape
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != (num, *shape):
                raise DtkError(f"latents must be float32 {[num, *shape]}, got shape {list(latents.shape)}")
        total = len(chunks) * plan.steps
        noisy_steps = plan.noisy_steps
        bar = _progress_bar(total, sampler) if progress else None
        done = 0

        keep = 0

        def on_step(i, t, x):
            nonlocal done
            done += 1
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(done, total)
            if step_callback is not None:
                step_callback(i, int(t), np.asarray(x, dtype=np.float32)[:keep])

        # without a listener no step callback at all: a device chain would copy x back for it
        listening = callback is not None or bar is not None or step_callback is not None
        run_chain = getattr(self.denoiser, "run_chain", None)
        images = []
        try:
            for first, keep, run in chunks:
                if seeds is None:
                    source = NoiseSource(seed, first_index=first)
                else:  # a run padded past `keep` repeats the last seed; those images are dropped
                    chunk = list(seeds[first : first + keep])
                    source = NoiseSource.per_image(chunk + chunk[-1:] * (run - keep))
                x = source.initial(run, shape, noisy_steps)
                if latents is not None:  # drawn all the same: the step noise that follows stays the same
                    x[:keep] = latents[first : first + keep]
                noise = source.stepper(run, shape, noisy_steps)

                chunk_labels = None
                if class_labels is not None:
                    chunk_labels = np.resize(class_labels[first : first + keep], run)  # pad: any label
                if chunk_labels is not None and getattr(self.denoiser, "chain_guidance", False):
                    # the device chain: guidance folded into its update kernel
                    x = run_chain(
                        plan, x, noise, on_step if listening else None, chunk_labels, guidance_scale
                    )
                elif chunk_labels is not None:  # on the host: guidance combines two outputs before the update
                    denoise = self._guided(chunk_labels, guidance_scale)
                    x = sample_loop(denoise, x, plan, noise, on_step if listening else None)
                elif run_chain is not None:
                    x = run_chain(plan, x, noise, on_step if listening else None)
                else:
                    x = sample_loop(self._denoise, x, plan, noise, on_step if listening else None)
                images.append(np.asarray(x, dtype=np.float32)[:keep])
        finally:
            if bar is not None:
                bar.close()
        return np.concatenate(images)

    @property
    def default_sampler(self) -> str:
        """The bundle's sampler (set by a diffusers scheduler class at export), else dtk's default."""
        from dtk.runtime.schedule import DEFAULT_SAMPLER

        return self.manifest.diffusion.sampler or DEFAULT_SAMPLER

    def plan(self, sampler: str | None, steps: int, eta: float = 0.0):
        """The sampler's plan on this bundle's schedule (None: its default sampler), made once per
        (sampler, steps, eta)."""
        sampler = sampler or self.default_sampler
        key = (sampler, steps, eta)
        if key not in self._plans:
            self._plans[key] = make_plan(sampler, self.manifest.diffusion, steps, eta=eta)
        return self._plans[key]

    def _denoise(self, x: np.ndarray, t: int) -> np.ndarray:
        return self.denoiser(x, self._timestep(t, x.shape[0]))

    def _guided(self, labels: np.ndarray, guidance_scale: float):
        from dtk.runtime.guidance import guided

        def denoise(x, t, class_labels):
            return self.denoiser(x, self._timestep(t, x.shape[0]), class_labels)

        null = self.manifest.classes["null_class"]
        return guided(denoise, labels, null, guidance_scale, self.denoiser.batch_range[1])

    def sample(
        self,
        num: int = 1,
        steps: int = 50,
        sampler: str | None = None,
        seed: int = 0,
        eta: float = 0.0,
        callback=None,
        max_batch: int | None = None,
        progress: bool = False,
        seeds=None,
        **options,
    ) -> np.ndarray:
        """uint8 images [num, H, W, C]; the arguments are those of `sample_latents`."""
        latents = self.sample_latents(
            num, steps, sampler, seed, eta, callback, max_batch, progress, seeds, **options
        )
        return to_uint8(latents)

    def __call__(
        self,
        num_images: int = 1,
        num_inference_steps: int = 50,
        generator=None,
        output_type: str = "np",
        latents=None,
        *,
        sampler: str | None = None,
        eta: float = 0.0,
        callback=None,
        callback_steps: int = 1,
        max_batch: int | None = None,
        progress: bool = False,
        return_dict: bool = True,
        class_labels=None,
        guidance_scale: float = 1.0,
    ):
        """The call a diffusers user reaches for: `pipe(num_images=4, num_inference_steps=20,
        generator=np.random.default_rng(0)).images`. The same images as `sample` / `sample_latents`.

        `generator`: an int seed, an `np.random.Generator`, a list of either (one per image), or None (a fresh
        random seed). A Generator is used for one draw, `seed = int(generator.integers(2**63))`; image k then
        gets its noise from `PCG64([seed, k])`, exactly as `sample(seed=seed)`. A list gives image k what
        `sample(num=1, seed=entry)` gives for its own entry.

        `output_type`: "np" float32 [N, H, W, C] in [0, 1] (diffusers' convention: (x + 1) / 2 clipped),
        "uint8" [N, H, W, C] as `sample` returns, "pil" a list of PIL images, "latent" the raw float32
        [N, C, H, W] in the model's range [-1, 1]. `latents`: float32 [N, C, H, W] for x_T.
        `callback(step_index, timestep, latents)` every `callback_steps` steps with the chunk's current
        sample (previews); with more images than `max_batch` it runs per chunk. Returns
        `PipelineOutput(images)`, or `(images,)` when `return_dict=False`. `class_labels` and
        `guidance_scale` are `labels` and `guidance_scale` of `sample_latents`."""
        from dtk.runtime.pipeline_output import PipelineOutput, convert_images, seeds_for

        check_output_type(output_type)
        seed, seeds = seeds_for(generator, num_images)
        step_callback = None
        if callback is not None:
            if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps < 1:
                raise DtkError(f"callback_steps must be a positive integer, got {callback_steps!r}")

            def step_callback(i, t, x):
                if i % callback_steps == 0:
                    callback(i, t, x)

        x = self.sample_latents(
            num_images,
            num_inference_steps,
            sampler,
            seed,
            eta,
            max_batch=max_batch,
            progress=progress,
            seeds=seeds,
            latents=latents,
            step_callback=step_callback,
            labels=class_labels,
            guidance_scale=guidance_scale,
        )
        images = convert_images(x, output_type)
        return PipelineOutput(images) if return_dict else (images,)

    def close(self) -> None:
        self.denoiser.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def choose_backend(path, backend: str = "auto") -> tuple[str, Path, Path, Manifest]:
    """→ (backend, model file, bundle dir, manifest) for a bundle directory, an .onnx or a .plan.

    "auto" takes TensorRT for a .plan, and for a bundle whose plan exists when TensorRT and a GPU are usable;
    ONNX Runtime otherwise."""
    if backend not in BACKENDS:
        raise DtkError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if path.is_file() and path.suffix not in (".onnx", ".plan"):
        raise file_error(path, "not a bundle directory, .onnx or .plan")
    bundle_dir, manifest = resolve_bundle(path)
    if path.suffix in (".onnx", ".plan"):
        onnx_path, plan_path = (path, None) if path.suffix == ".onnx" else (None, path)
    else:
        onnx_path = bundle_dir / manifest.onnx
        onnx_path = onnx_path if onnx_path.is_file() else None
        plan_path = bundle_dir / manifest.plan if manifest.plan else None
        plan_path = plan_path if plan_path is not None and plan_path.is_file() else None
    if backend == "auto":
        use_plan = plan_path is not None and (onnx_path is None or tensorrt_usable())
        backend = "tensorrt" if use_plan else "onnxruntime"
    if backend == "tensorrt" and path.is_dir():
        plan_path = _matching_plan(bundle_dir, manifest) or plan_path
    if backend == "tensorrt" and plan_path is None:
        raise file_error(path, "has no TensorRT plan; build one with `dtk build-engine BUNDLE`")
    if backend == "onnxruntime" and onnx_path is None:
        what = "is a TensorRT plan" if path.suffix == ".plan" else f"has no {manifest.onnx}"
        raise file_error(path, f"{what}; the onnxruntime backend needs the bundle's ONNX file")
    if backend == "onnxruntime":
        check_onnx_files(onnx_path, manifest)
    return backend, (plan_path if backend == "tensorrt" else onnx_path), bundle_dir, manifest


def _matching_plan(bundle_dir: Path, manifest: Manifest) -> Path | None:
    """With several engines in the bundle (one per GPU model or precision), the one this machine may run,
    saying on stderr which was taken; None with one engine or none (the backend checks that one itself)."""
    from dtk.runtime.sidecar import bundle_plans, current_target, pick_plan

    plans = bundle_plans(bundle_dir, manifest.plan)
    if len(plans) < 2:
        return None
    plan, line = pick_plan(plans, current_target())
    print(line, file=sys.stderr)
    return plan


def tensorrt_usable() -> bool:
    """TensorRT imports and cuda-python sees at least one GPU."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime

        error, count = runtime.cudaGetDeviceCount()
        return error == runtime.cudaError_t.cudaSuccess and count > 0
    except Exception:  # not installed, no driver, a broken install: all mean "not usable here"
        return False


def _check_options(denoiser_class, backend: str, opts: dict) -> None:
    import inspect

    parameters = inspect.signature(denoiser_class).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("onnx_path", "plan_path", "manifest")]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise DtkError(
            f"unknown option {', '.join(unknown)} for the {backend} backend; it takes {', '.join(accepted)}"
        )


def _check_sample_args(num, steps, sampler, eta, callback, max_batch) -> None:
    """Wrong argument types as DtkError naming the argument, not a TypeError from deep inside a sampler."""

    def integer(value, name):  # ranges are checked where they are known (chunks, make_plan)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DtkError(f"{name} must be an integer, got {value!r}")

    integer(num, "num")
    integer(steps, "steps")
    if max_batch is not None:
        integer(max_batch, "max_batch")
    if sampler is not None and not isinstance(sampler, str):  # None: the bundle's default sampler
        raise DtkError(f"sampler must be a sampler name, got {sampler!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not math.isfinite(eta):
        raise DtkError(f"eta must be a finite number, got {eta!r}")
    if callback is not None and not callable(callback):
        raise DtkError(f"callback must be callable, got {callback!r}")


def check_output_type(output_type) -> None:
    from dtk.runtime.pipeline_output import OUTPUT_TYPES

    if output_type not in OUTPUT_TYPES:
        raise DtkError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")


def _renamed_batch_size(max_batch, deprecated: dict):
    """`batch_size=` (the old name of `max_batch`) still works, with a DeprecationWarning."""
    if not deprecated:
        return max_batch
    unknown = set(deprecated) - {"batch_size"}
    if unknown:
        raise DtkError(f"unknown argument {sorted(unknown)[0]!r}")
    import warnings

    warnings.warn(
        "batch_size is renamed max_batch: it is the most images per network call, not diffusers' "
        "batch_size (the number of images, `num` here)",
        DeprecationWarning,
        stacklevel=3,
    )
    if max_batch is not None:
        raise DtkError("pass max_batch only (batch_size is its old name)")
    return deprecated["batch_size"]


def _progress_bar(total: int, sampler: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"sampling ({sampler})", unit="step", leave=False)
