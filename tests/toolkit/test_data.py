"""Training data: built-ins, image folders (resize, crop, channels, errors), and the seeded batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dtk.data import BatchStream, ImageSet, load_dataset
from dtk.runtime.errors import DtkError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_digits_builtin_is_upsampled_sklearn_digits():
    data = load_dataset("digits", 16)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    assert int(data.images[0].sum()) == 18744  # the first "0", bilinear-upsampled from 8x8
    assert data.images.float().mean().item() == pytest.approx(77.8409, abs=1e-3)
    assert load_dataset("digits", 8).images.max() == 255  # ink 16 -> 255


def test_shapes_builtin_is_seeded_rgb():
    first, second = load_dataset("shapes", 8), load_dataset("shapes", 8)
    assert first.images.shape == (2048, 3, 8, 8)
    assert torch.equal(first.images, second.images)
    assert load_dataset("shapes", 16).images.float().mean().item() == pytest.approx(63.1380, abs=1e-3)


def test_builtin_channel_conversion():
    assert load_dataset("digits", 8, channels=3).images.shape == (1797, 3, 8, 8)
    gray = load_dataset("shapes", 8, channels=1).images
    assert gray.shape == (2048, 1, 8, 8)


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


def test_folder_resizes_and_center_crops(tmp_path):
    # 16 rows x 32 columns: red outer quarters, blue middle half -> a 16x16 center crop is all blue
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, :8] = wide[:, 24:] = (255, 0, 0)
    wide[:, 8:24] = (0, 0, 255)
    _save(tmp_path / "a" / "wide.png", wide)
    # a 64x64 gray ramp, saved as JPEG in a subfolder, downscaled by 4
    _save(tmp_path / "b" / "ramp.JPG", np.tile(np.linspace(0, 255, 64), (64, 1)).astype(np.uint8))
    data = load_dataset(str(tmp_path), 16)
    assert data.images.shape == (2, 3, 16, 16)  # one colour image makes the set RGB
    assert data.images[0, 2].min() == 255 and data.images[0, 0].max() == 0
    ramp = data.images[1, 0].float()
    assert torch.equal(data.images[1, 0], data.images[1, 1])  # gray replicated to RGB
    assert ramp[:, 0].mean() < 20 and ramp[:, -1].mean() > 235


def test_folder_of_grayscale_images_is_one_channel(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.png", np.full((20, 20), 40 * i))
    data = load_dataset(str(tmp_path), 16)
    assert data.images.shape == (3, 1, 16, 16) and data.source == str(tmp_path)
    assert sorted(int(v) for v in data.images[:, 0, 8, 8]) == [0, 40, 80]
    assert load_dataset(str(tmp_path), 16, channels=3).images.shape == (3, 3, 16, 16)


def test_batches_are_scaled_to_minus_one_one():
    images = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    batch = BatchStream(ImageSet(images, "test"), batch_size=2).batch(0)
    assert sorted(batch[:, 0, 0, 0].tolist()) == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root / "missing", "missing: no such dataset folder"),
        (lambda root: root, "no PNG or JPEG images found"),
        (
            lambda root: (root / "broken.png").write_bytes(b"not a png") and root,
            "broken.png: cannot read image",
        ),
        (
            lambda root: _save(root / "small.png", np.zeros((10, 40))) and root,
            "small.png: image is 40x10, smaller",
        ),
    ],
)
def test_folder_errors_name_the_file(tmp_path, setup, message):
    root = setup(tmp_path)
    with pytest.raises(DtkError, match=message):
        load_dataset(str(root), 16)


def test_truncated_png_is_reported(tmp_path):
    path = _save(tmp_path / "cut.png", np.random.default_rng(0).integers(0, 255, (32, 32, 3)))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DtkError, match="cut.png: cannot read image"):
        load_dataset(str(tmp_path), 16)


def test_bad_channels_and_size():
    with pytest.raises(DtkError, match="channels must be 1"):
        load_dataset("digits", 8, channels=2)
    with pytest.raises(DtkError, match="image size must be positive"):
        load_dataset("digits", 0)


def _numbered(n: int) -> ImageSet:
    return ImageSet(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1), "numbered")


def test_stream_visits_every_image_once_per_epoch_and_is_seeded():
    data = _numbered(10)
    stream = BatchStream(data, batch_size=5, seed=3)
    epoch = torch.cat([stream.indices(0)[0], stream.indices(1)[0]])
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(BatchStream(data, 5, seed=3).indices(7)[0], stream.indices(7)[0])
    assert not torch.equal(BatchStream(data, 5, seed=4).indices(0)[0], stream.indices(0)[0])
    # a batch that straddles two epochs (positions 8..11 of a 10-image stream)
    straddle = BatchStream(data, batch_size=4, seed=3).indices(2)[0]
    assert straddle.shape == (4,)


def test_ranks_read_disjoint_images():
    data = _numbered(16)
    rank0 = BatchStream(data, 4, seed=0, rank=0, world_size=2)
    rank1 = BatchStream(data, 4, seed=0, rank=1, world_size=2)
    seen = torch.cat([rank0.indices(0)[0], rank1.indices(0)[0], rank0.indices(1)[0], rank1.indices(1)[0]])
    assert sorted(seen.tolist()) == list(range(16))


def test_hflip_flips_about_half_the_images():
    images = torch.zeros(64, 1, 1, 2, dtype=torch.uint8)
    images[..., 1] = 255  # dark left pixel, bright right one
    stream = BatchStream(ImageSet(images, "edges"), batch_size=64, seed=0, hflip=True)
    batch = stream.batch(0)
    flipped = int((batch[:, 0, 0, 0] > 0).sum())
    assert 16 < flipped < 48
    assert torch.equal(batch, BatchStream(ImageSet(images, "edges"), 64, seed=0, hflip=True).batch(0))
    assert not BatchStream(ImageSet(images, "edges"), 64, seed=0).batch(0)[:, 0, 0, 0].gt(0).any()
