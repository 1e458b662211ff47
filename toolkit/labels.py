"""Class labels for class-conditional training: digits 0–9, shapes by kind, an image folder's subfolders.

A folder's classes are its first-level subfolders, in sorted order, each holding that class's images (at any
depth below it); their names become the class names. The null class of a conditional model is one past the
last class (`num_class_embeds = num_classes + 1`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dtk.data import SHAPE_KINDS, ImageSet, find_images, shapes_with_kinds
from dtk.runtime.errors import DtkError, file_error
from dtk.unet import UNetConfig

DIGIT_NAMES = tuple(str(d) for d in range(10))


def with_labels(data: ImageSet, dataset: str) -> ImageSet:
    """`data` (loaded from `dataset`) with `labels` and `class_names` set."""
    if dataset == "digits":
        labels, names = digit_labels(), DIGIT_NAMES
    elif dataset == "shapes":
        labels, names = shapes_with_kinds(data.image_size)[1], SHAPE_KINDS
    else:
        labels, names = folder_labels(Path(dataset))
    if len(labels) != len(data):
        raise DtkError(f"{dataset}: {len(labels)} labels for {len(data)} images")
    return dataclasses.replace(data, labels=labels, class_names=tuple(names))


def digit_labels() -> torch.Tensor:
    """int64 [1797]: the digit shown by each of scikit-learn's digits, in `dtk.data.digits` order."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target).long()


def folder_labels(root: Path) -> tuple[torch.Tensor, tuple]:
    """(int64 [N] in `find_images` order, class names): each image's first-level subfolder under `root`."""
    files = find_images(root)
    loose = [f for f in files if f.parent == root]
    if loose:
        raise file_error(
            loose[0],
            "is not in a class subfolder; --class-conditional takes one subfolder per class "
            f"({len(loose)} image(s) directly in {root})",
        )
    classes = [f.relative_to(root).parts[0] for f in files]
    names = tuple(sorted(set(classes)))
    if len(names) < 2:
        raise file_error(root, f"--class-conditional needs at least 2 class subfolders, found {len(names)}")
    index = {name: k for k, name in enumerate(names)}
    return torch.tensor([index[c] for c in classes], dtype=torch.long), names


def conditional_setup(data: ImageSet, dataset: str, model_config: UNetConfig) -> tuple[ImageSet, UNetConfig]:
    """The labelled data and the U-Net config with a class embedding per class plus the null class."""
    data = with_labels(data, dataset)
    return data, dataclasses.replace(model_config, num_class_embeds=len(data.class_names) + 1)
