"""Training images: an image folder or a built-in set, held as uint8 and served in a seeded, resumable order.

Built-ins need no download: `digits` (scikit-learn's bundled 8x8 handwritten digits, upsampled) and `shapes`
(circles, squares and triangles drawn procedurally from a fixed seed). A folder is searched recursively
for PNG/JPEG files; each image is decoded to 8 bits (dtk.decode: 16-bit scaled, alpha over white), resized
(shorter side) and center-cropped to the image size, then scaled to [-1, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtk.decode import GRAY_MODES, decode
from dtk.runtime.errors import DtkError, file_error

BUILTINS = ("digits", "shapes")
SHAPE_KINDS = ("circle", "square", "triangle")  # the class names of `shapes` by kind
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageSet:
    """All training images, uint8 [N, C, H, W], and where they came from."""

    images: torch.Tensor
    source: str
    labels: torch.Tensor | None = None  # int64 [N] class of each image, for class-conditional training
    class_names: tuple | None = None  # name of each class index

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def dataset_reference(name: str) -> str:
    """What a run records as its dataset: a built-in's name as it is, a folder as an absolute path, so the
    run resumes (and its settings compare) from any working directory."""
    return name if name in BUILTINS else os.path.abspath(name)


def load_dataset(name: str, image_size: int, channels: int | None = None, progress: bool = False) -> ImageSet:
    """A built-in set by name, or an image folder by path. `channels` 1 or 3 forces grayscale or RGB;
    None keeps the data's own (grayscale only if every image is)."""
    if image_size < 1:
        raise DtkError(f"image size must be positive, got {image_size}")
    if channels not in (None, 1, 3):
        raise DtkError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if name == "digits":
        images = digits(image_size)
    elif name == "shapes":
        images = shapes(image_size)
    else:
        return load_image_folder(name, image_size, channels, progress)
    if channels is not None and channels != images.shape[1]:
        images = images.expand(-1, 3, -1, -1).contiguous() if channels == 3 else _to_gray(images)
    return ImageSet(images, name)


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)  # ITU-R 601, as PIL's "L"
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def digits(image_size: int) -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits (8x8, ink 0..16) as white-on-black uint8 [N, 1, S, S]."""
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().images).float().div(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        pixels = torch.nn.functional.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return pixels.mul(255.0).round().clamp(0, 255).to(torch.uint8)


def shapes(image_size: int, count: int = 2048, seed: int = 0) -> torch.Tensor:
    """Seeded procedural RGB images: one to three filled circles, squares or triangles on a dark background,
    drawn at 4x and downsampled for smooth edges. Always the same set for the same size."""
    return shapes_with_kinds(image_size, count, seed)[0]


def shapes_with_kinds(image_size: int, count: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`shapes` and, per image, the kind (index into SHAPE_KINDS) of its largest shape, int64 [N]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = image_size * 4
    out = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    kinds = np.zeros(count, dtype=np.int64)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(0, 60, 3))
        canvas = Image.new("RGB", (big, big), background)
        draw = ImageDraw.Draw(canvas)
        largest = 0.0
        for _ in range(int(rng.integers(1, 4))):
            color = tuple(int(v) for v in rng.integers(90, 256, 3))
            radius = float(rng.uniform(0.12, 0.3)) * big
            cx, cy = (float(v) for v in rng.uniform(radius, big - radius, 2))
            kind = int(rng.integers(0, 3))
            if radius > largest:
                largest, kinds[i] = radius, kind
            if kind == 0:
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
            elif kind == 1:
                draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
            else:
                angle = float(rng.uniform(0, 2 * np.pi))
                corners = [
                    (
                        cx + radius * np.cos(angle + k * 2 * np.pi / 3),
                        cy + radius * np.sin(angle + k * 2 * np.pi / 3),
                    )
                    for k in range(3)
                ]
                draw.polygon(corners, fill=color)
        out[i] = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(kinds)


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_folder(root, image_size: int, channels: int | None = None, progress: bool = False) -> ImageSet:
    """Every PNG/JPEG under `root`, resized and center-cropped to `image_size`, as uint8 [N, C, S, S]."""
    from tqdm import tqdm

    root = Path(root)
    if not root.exists():
        raise file_error(root, f"no such dataset folder (built-in datasets: {', '.join(BUILTINS)})")
    if not root.is_dir():
        raise file_error(root, "the dataset must be a folder of PNG/JPEG images or a built-in name")
    files = find_images(root)
    if not files:
        raise file_error(root, "no PNG or JPEG images found in this folder or below it")

    if channels is None:  # grayscale only if every image is; the header tells the mode
        channels = 1
        for path in files:
            with _open(path, load=False) as image:
                if image.mode not in GRAY_MODES:
                    channels = 3
                    break

    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, path in enumerate(
        tqdm(files, desc="loading images", unit="img", disable=not progress, leave=False)
    ):
        with _open(path) as image:
            width, height = image.size
            if min(width, height) < image_size:
                raise file_error(
                    path,
                    f"image is {width}x{height}, smaller than the image size {image_size}; "
                    "use a smaller --image-size or larger images",
                )
            try:
                pixels = _resize_center_crop(decode(image, channels), image_size)
            except (OSError, ValueError, SyntaxError) as e:
                raise file_error(path, f"cannot read image ({e})") from None
        out[i] = pixels.reshape(image_size, image_size, channels)
    return ImageSet(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), str(root))


def _open(path: Path, load: bool = True):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        if load:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise file_error(path, f"cannot read image ({e})") from None
    return image


def _resize_center_crop(image, size: int) -> np.ndarray:
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, well spread (numpy SeedSequence)."""
    return int(
        np.random.SeedSequence([v & 0xFFFFFFFF for v in values])
        .generate_state(2, np.uint32)
        .view(np.uint64)[0]
        >> 1
    )


class BatchStream:
    """Batches in a fixed order, a function of (seed, batch index), so a resumed run sees the same data.

    The images form an endless stream of epochs, each a seeded permutation (with seeded flip decisions when
    `hflip`). Batch k of rank r takes the stream positions (k * world_size + r) * batch_size onwards, so ranks
    read disjoint images, as torch's DistributedSampler does."""

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        seed: int = 0,
        hflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise DtkError(f"batch size must be at least 1, got {batch_size}")
        self.data, self.batch_size, self.seed, self.hflip = data, batch_size, seed, hflip
        self.rank, self.world_size = rank, world_size
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))
            order = torch.randperm(len(self.data), generator=g)
            flips = torch.randint(0, 2, (len(self.data),), generator=g, dtype=torch.bool)
            self._epochs[epoch] = (order, flips & self.hflip)
        return self._epochs[epoch]

    def indices(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image indices, flip flags) of batch `index` on this rank."""
        n = len(self.data)
        start = (index * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        chosen, flips = [], []
        for epoch in sorted(set((positions // n).tolist())):
            order, flip = self._epoch(epoch)
            within = positions[positions // n == epoch] % n
            chosen.append(order[within])
            flips.append(flip[within])
        return torch.cat(chosen), torch.cat(flips)

    def labels(self, index: int) -> torch.Tensor:
        """int64 [B]: the class labels of batch `index` (the data must have labels)."""
        return self.data.labels[self.indices(index)[0]]

    def batch(self, index: int) -> torch.Tensor:
        """Batch `index` as float32 [B, C, H, W] in [-1, 1]."""
        chosen, flips = self.indices(index)
        images = self.data.images[chosen].float().div(127.5).sub(1.0)
        if flips.any():
            images[flips] = images[flips].flip(-1)
        return images
