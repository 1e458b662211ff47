"""Decoded training pictures: every Pillow mode a PNG or JPEG opens in, as 8-bit grayscale or RGB.

16-bit grayscale (`I;16`, `I;16B`, `I;16L`, and `I`, which older Pillow gives 16-bit PNGs) is scaled to
8 bits, not clipped; transparency (an alpha channel, a palette's or a tRNS colour) is composited over white.
"""

from __future__ import annotations

import numpy as np

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L")
ALPHA_MODES = ("LA", "PA", "RGBA", "La", "RGBa")
MODES = (*GRAY_MODES, "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
BACKGROUND = 255  # transparent pixels show white


def decode(image, channels: int):
    """A PIL image in any of MODES → an 8-bit "L" (channels 1) or "RGB" (channels 3) PIL image.

    Raises ValueError for a mode outside MODES."""
    from PIL import Image

    if image.mode not in MODES:
        raise ValueError(f"unsupported image mode {image.mode} (dtk reads {', '.join(MODES)})")
    target = "L" if channels == 1 else "RGB"
    if image.mode in SIXTEEN_BIT:
        image = Image.fromarray(_eight_bit(np.asarray(image)), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert(target)


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255, rounded (65535 / 257 = 255 exactly)."""
    scaled = np.rint(pixels.astype(np.float64) / 257.0)
    return scaled.clip(0, 255).astype(np.uint8)
