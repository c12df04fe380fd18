"""Image files -> uint8 (H, W, 3) RGB arrays, whatever the file's pixel mode.

Datasets in the wild mix modes: grayscale (``L``), RGBA, palette (``P``), 16-bit grayscale
(``I;16`` from PNG/TIFF, ``I`` from 32-bit TIFF).  PIL's ``convert("RGB")`` handles the 8-bit
ones but *clips* 16-bit values at 255 (a 16-bit image turns almost white), so 16-bit data is
scaled from [0, 65535] to [0, 255] here instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

__all__ = ["UnsupportedImageModeError", "image_header", "decode_rgb"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes PIL cannot turn into a meaningful 8-bit RGB image (float data has no fixed range).
_UNSUPPORTED_MODES = ("F",)


class UnsupportedImageModeError(ValueError):
    """An image whose pixel mode has no well-defined 8-bit RGB rendering."""


def image_header(path: Path) -> Tuple[int, int, str]:
    """``(width, height, mode)`` from the file header only (no pixel decoding).

    Raises ``FileNotFoundError`` when the file is missing, PIL's ``UnidentifiedImageError`` /
    ``OSError`` when the header is unreadable and :class:`UnsupportedImageModeError` for
    float images.
    """
    with Image.open(path) as image:  # lazy: reads the header, decodes nothing
        width, height = image.size
        mode = image.mode
    if mode in _UNSUPPORTED_MODES:
        raise UnsupportedImageModeError(f"pixel mode {mode!r} (float) has no fixed value range")
    return width, height, mode


def decode_rgb(path: Path) -> np.ndarray:
    """The whole image as a writable uint8 (H, W, 3) RGB array.

    Grayscale and palette images are expanded to three channels, alpha is dropped and 16-bit
    values are scaled by 255 / 65535 (not clipped).
    """
    with Image.open(path) as image:
        if image.mode in _SIXTEEN_BIT_MODES:
            values = np.asarray(image)  # (H, W) uint16 (I;16*) or int32 (I)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise UnsupportedImageModeError(
                    f"pixel mode {image.mode!r} with values outside the 16-bit range [0, 65535] "
                    f"(min {values.min()}, max {values.max()})"
                )
            gray = np.rint(values.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)  # (H, W)
            return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        if image.mode in _UNSUPPORTED_MODES:
            raise UnsupportedImageModeError(f"pixel mode {image.mode!r} (float) has no fixed value range")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL asks for this step before dropping palette transparency
        return np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), writable copy
