"""Reading image files the way every part of wanpair sees them: which files are images, and their pixels as
8-bit RGB the right way up. Image items, frame-folder videos, the cache and an I2V sample's first frame
share it, so an image trains exactly as it was checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# matched against the lower-cased suffix, so `.PNG` counts too (the dataset check's discovery: `wanpair.data.items`)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully (so truncation is caught), honour EXIF rotation, return 8-bit RGB."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
        return im.convert("RGB")
