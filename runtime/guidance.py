"""Class labels and classifier-free guidance (Ho & Salimans 2022) around any denoiser, on any array type.

A conditional model's classes are described by a plain dict, the same in a checkpoint and in `dtk.json`:

    {"num_classes": 10, "names": ["0", ..., "9"], "null_class": 10}

`null_class` is the label the network was trained to treat as "no class" (None when it has none, e.g. a
diffusers model with `num_class_embeds`). Guidance evaluates the network with the requested labels and with
the null class and combines the two outputs before the sampler's update:

    out = out_u + s · (out_c − out_u)

which for ε-prediction is ε = ε_u + s·(ε_c − ε_u); v and x0 predictions are linear in ε, so the same
combination holds for them. s = 1 is the conditional model alone (one call), s = 0 the unconditional one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from dtk.runtime.errors import DtkError

ALL_CLASSES = "all"


def check_classes(classes: dict) -> dict:
    """`classes` (from a checkpoint or a manifest), checked; raises DtkError naming what is wrong."""
    if not isinstance(classes, dict) or "num_classes" not in classes:
        raise DtkError(f"classes must be a dict with num_classes, names and null_class, got {classes!r}")
    count, names, null = classes["num_classes"], classes.get("names"), classes.get("null_class")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DtkError(f"num_classes must be a positive integer, got {count!r}")
    if names is not None and (len(names) != count or not all(isinstance(n, str) for n in names)):
        raise DtkError(f"names must be {count} strings, got {names!r}")
    if null is not None and (isinstance(null, bool) or not isinstance(null, int) or null < 0):
        raise DtkError(f"null_class must be a non-negative integer or null, got {null!r}")
    if null is not None and null < count:
        raise DtkError(f"null_class {null} is one of the {count} classes")
    return {"num_classes": count, "names": list(names) if names is not None else None, "null_class": null}


def class_index(label, classes: dict) -> int:
    """One label → its class index: an int, a class name, the text of an index ("7"), or None (no class:
    the model's null class)."""
    count, names = classes["num_classes"], classes.get("names") or []
    if label is None:
        if classes.get("null_class") is None:
            raise DtkError("this model has no null class, so every image needs a class label (got None)")
        return classes["null_class"]
    if isinstance(label, str):
        if label in names:
            return names.index(label)
        if not label.strip().lstrip("-").isdigit():
            known = ", ".join(names) if names else f"0..{count - 1}"
            raise DtkError(f"unknown class {label!r}; this model's classes are {known}")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise DtkError(f"a class label is an integer or a class name, got {label!r}")
    if not 0 <= int(label) < count:
        raise DtkError(f"class {int(label)} is out of range: this model has classes 0..{count - 1}")
    return int(label)


def resolve_labels(labels, classes: dict | None, num: int) -> np.ndarray:
    """int64 [num] from one label (every image gets it), a list of `num` labels (a None entry: that image has
    no class, the null class), or "all" (an equal share of `num` per class, a grid row each; `num` must be a
    multiple of the class count)."""
    if classes is None:
        raise DtkError("this model is unconditional: it takes no class labels")
    if isinstance(labels, str) and labels == ALL_CLASSES:
        count = classes["num_classes"]
        if num % count:
            raise DtkError(f'class "all" needs a multiple of {count} images (a row per class), got {num}')
        return np.repeat(np.arange(count, dtype=np.int64), num // count)
    if isinstance(labels, (str, int, np.integer)) or not hasattr(labels, "__iter__"):
        return np.full(num, class_index(labels, classes), dtype=np.int64)
    labels = list(labels)
    if len(labels) != num:
        raise DtkError(f"{len(labels)} labels for {num} images; give one label or one per image")
    return np.array([class_index(label, classes) for label in labels], dtype=np.int64)


def check_scale(guidance_scale, classes: dict | None) -> float:
    """The guidance scale as a float; s ≠ 1 needs a conditional model with a null class."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)):
        raise DtkError(f"guidance scale must be a number, got {guidance_scale!r}")
    scale = float(guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise DtkError(f"guidance scale must be a finite number ≥ 0, got {guidance_scale!r}")
    if scale != 1.0 and (classes is None or classes.get("null_class") is None):
        what = (
            "is unconditional" if classes is None else "has no null class (it was not trained for guidance)"
        )
        raise DtkError(f"guidance scale {scale:g} needs a model trained with a null class; this model {what}")
    return scale


def sampling_labels(classes: dict | None, labels, guidance_scale, num: int, where) -> np.ndarray | None:
    """The checked int64 [num] labels a sampling run uses for a model with `classes` (None labels, or a None
    entry for one image: the null class), or None for an unconditional model sampled without labels. `where`
    names the model in errors."""
    check_scale(guidance_scale, classes)
    if classes is None:
        return resolve_labels(labels, classes, num) if labels is not None else None
    if labels is None:
        if classes.get("null_class") is None:
            raise DtkError(f"{where}: this model has no null class; pass class labels")
        return np.full(num, classes["null_class"], dtype=np.int64)
    return resolve_labels(labels, classes, num)


def check_labels(class_labels, batch: int, where) -> np.ndarray:
    """int64 [batch] class labels (a scalar applies to the whole batch), or a DtkError naming `where`."""
    labels = np.asarray(class_labels)
    if labels.ndim == 0:
        labels = np.full(batch, labels)
    if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
        raise DtkError(
            f"{where}: class_labels must be integers [B] with B = {batch}, "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    return np.ascontiguousarray(labels, dtype=np.int64)


def guided(
    denoise: Callable,
    labels,
    null_class: int | None,
    scale: float,
    max_batch: int,
    concat: Callable = np.concatenate,
) -> Callable:
    """`denoise(x, t, labels) → out` turned into the sampler's `(x, t) → out` for these labels at scale s.

    The conditional and unconditional halves run as one call on 2B images when 2B ≤ `max_batch`, else as
    two calls. An image labelled with the null class gets out_u + s·(out_u − out_u) = out_u, its unconditional
    sample, so one run mixes labelled and unlabelled images. `labels` and `concat` are of the array type of x
    (numpy, or torch with `torch.cat`)."""
    if scale == 1.0:
        return lambda x, t: denoise(x, t, labels)
    null = labels * 0 + null_class
    if scale == 0.0:
        return lambda x, t: denoise(x, t, null)
    batch = len(labels)
    pair = concat([labels, null])

    def denoise_guided(x, t):
        if 2 * batch <= max_batch:
            both = denoise(concat([x, x]), t, pair)
            out_c, out_u = both[:batch], both[batch:]
        else:
            out_c, out_u = denoise(x, t, labels), denoise(x, t, null)
        return combine(out_c, out_u, scale)

    return denoise_guided


def combine(out_c, out_u, scale: float):
    """out_u + s · (out_c − out_u)."""
    return out_u + scale * (out_c - out_u)
