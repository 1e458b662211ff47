"""Every Pillow mode a training PNG/JPEG opens in decodes to the right 8-bit pixels: 16-bit scaled, alpha
composited over white, palettes and CMYK converted; an unsupported mode is one line naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dtk.data import load_image_folder
from dtk.decode import decode

pytestmark = pytest.mark.usefixtures("single_thread")

SIXTEEN = np.array([[0, 257, 32896, 65535], [25700, 128, 129, 65534]], dtype=np.uint16)  # 2 x 4
EIGHT = np.array([[0, 1, 128, 255], [100, 0, 1, 255]], dtype=np.uint8)  # SIXTEEN / 257, rounded


def _load(tmp_path, image: Image.Image, name="a.png", channels=None):
    """Save `image` as a PNG in a folder and load the folder at its own size: no resampling, exact pixels."""
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    image.save(folder / name)
    width, height = image.size
    assert width == height
    return load_image_folder(folder, width, channels).images[0].permute(1, 2, 0).numpy()


def _square(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array, array], axis=0)  # 4 x 4


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_gray_is_scaled_not_clipped(mode):
    raw = SIXTEEN.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    image = (
        Image.frombytes(mode, (4, 2), raw, "raw", mode)
        if mode != "I"
        else Image.fromarray(SIXTEEN.astype(np.int32), "I")
    )
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(decode(image, 1)), EIGHT)
    np.testing.assert_array_equal(np.asarray(decode(image, 3)), np.repeat(EIGHT[..., None], 3, -1))


def test_sixteen_bit_png_file_loads_scaled(tmp_path):
    image = Image.frombytes("I;16", (4, 4), _square(SIXTEEN).astype("<u2").tobytes())
    pixels = _load(tmp_path, image)
    assert pixels.shape == (4, 4, 1)  # a 16-bit PNG counts as grayscale
    np.testing.assert_array_equal(pixels[..., 0], _square(EIGHT))


def test_gray_with_alpha_is_composited_over_white(tmp_path):
    gray = np.array([[0, 0, 0, 200]] * 4, dtype=np.uint8)
    alpha = np.array([[0, 255, 128, 255]] * 4, dtype=np.uint8)
    image = Image.fromarray(np.stack([gray, alpha], -1), "LA")
    pixels = _load(tmp_path, image)
    assert pixels.shape == (4, 4, 1)
    np.testing.assert_array_equal(pixels[0, :, 0], [255, 0, 127, 200])  # 0 * 128/255 + 255 * 127/255 = 127


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, :] = [255, 0, 0, 128]
    rgba[0, 0] = [10, 20, 30, 0]  # fully transparent: white, not its hidden colour
    rgba[0, 1] = [10, 20, 30, 255]
    pixels = _load(tmp_path, Image.fromarray(rgba, "RGBA"))
    assert pixels.shape == (4, 4, 3)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [10, 20, 30]
    assert pixels[1, 1].tolist() == [255, 127, 127]


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # 0: black, 1: blue
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    pixels = _load(tmp_path, image)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [0, 0, 255]

    opaque = Image.new("P", (4, 4), 1)
    opaque.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    opaque.putpixel((0, 0), 0)
    assert _load(tmp_path, opaque, "b.png")[0, 0].tolist() == [0, 0, 0]


def test_rgb_with_a_transparent_colour_is_composited():
    image = Image.new("RGB", (2, 1), (9, 9, 9))
    image.putpixel((1, 0), (1, 2, 3))
    image.info["transparency"] = (1, 2, 3)
    assert np.asarray(decode(image, 3)).tolist() == [[[9, 9, 9], [255, 255, 255]]]


@pytest.mark.parametrize(
    "mode, value, gray, rgb",
    [
        ("1", 1, 255, [255, 255, 255]),
        ("L", 77, 77, [77, 77, 77]),
        ("RGB", (200, 100, 50), 124, [200, 100, 50]),  # ITU-R 601: .299 R + .587 G + .114 B
        ("RGBX", (200, 100, 50, 0), 124, [200, 100, 50]),
        ("CMYK", (0, 255, 255, 0), 76, [255, 0, 0]),
        ("YCbCr", (255, 128, 128), 255, [255, 255, 255]),
    ],
)
def test_opaque_modes(mode, value, gray, rgb):
    image = Image.new(mode, (1, 1), value)
    assert np.asarray(decode(image, 1)).tolist() == [[gray]]
    assert np.asarray(decode(image, 3)).tolist() == [[rgb]]


def test_jpeg_cmyk_file_loads_as_rgb(tmp_path):
    image = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    pixels = _load(tmp_path, image, "c.jpg")
    assert pixels.shape == (8, 8, 3) and int(pixels.min()) >= 250  # no ink: white, within JPEG's error


@pytest.mark.parametrize("mode", ["F", "HSV", "LAB"])
def test_unsupported_mode_is_refused(mode):
    with pytest.raises(ValueError, match=f"unsupported image mode {mode} "):
        decode(Image.new(mode, (1, 1)), 3)
