"""The one image decoder: a file -> uint8 [3,H,W] RGB, for training, eval and predict alike (numpy + Pillow, no torch).

Sharing it is what makes the three accept the same formats and give the same pixels for the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Formats Pillow reads whose files a class folder may hold (GIF and TIFF included: predict always read them)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": how some Pillow versions open 16-bit PNGs


def decode_image(path: str | os.PathLike, size: int = 32) -> np.ndarray:
    """One image file -> uint8 [3,size,size] RGB (bilinear resize if needed). Pillow's decompression-bomb limit stays on.

    16-bit greyscale (PNG, TIFF) is scaled to 8 bits: Pillow's own conversion clips it, which turns a normal
    16-bit photo white. Raises what Pillow raises for a file it cannot read.
    """
    from PIL import Image

    with Image.open(Path(path)) as image:
        if image.mode in SIXTEEN_BIT_MODES:
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8), "L")
        elif image.mode == "F":
            raise ValueError("32-bit floating-point images are not supported")
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
