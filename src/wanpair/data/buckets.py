"""Aspect-ratio buckets and the resize + centre-crop rule, the same as the reference trainer's for Wan.

Rule (Musubi-Tuner `dataset/image_video_dataset.py`, BucketSelector, Wan step 16):
- For a resolution W x H, area A = W*H and s = floor(sqrt(A)). For every width w from
  floor(s/2) rounded down to a multiple of 16, up to s, in steps of 16, the height is
  floor(A / w) rounded down to a multiple of 16. Each (w, h) and (h, w) is a bucket.
- An image goes to the bucket whose aspect ratio w/h is closest to its own (first on ties).
  With `bucket_no_upscale` and w*h <= A it keeps its own size, rounded down to multiples of 16.
- Resize: scale = max(bw/w, bh/h), size rounded to the nearest pixel (Lanczos when enlarging,
  area averaging when shrinking), then a centre crop to exactly the bucket.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

STEP = 16  # Wan: VAE stride 8 x DiT patch 2


def _floor(x: float) -> int:
    return int(x) // STEP * STEP


def bucket_set(resolution: tuple[int, int]) -> list[tuple[int, int]]:
    """All (width, height) buckets for a resolution, sorted."""
    area = resolution[0] * resolution[1]
    s = int(math.sqrt(area))
    buckets = set()
    for w in range(_floor(s / 2), s + 1, STEP):
        if w == 0:
            continue
        h = _floor(area / w)
        buckets.update({(w, h), (h, w)})
    return sorted(b for b in buckets if b[0] > 0 and b[1] > 0)


def choose_bucket(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool,
                  no_upscale: bool) -> tuple[int, int]:
    """The (width, height) an image of `size` is trained at."""
    w, h = size
    if not enable_bucket:
        return resolution
    area = resolution[0] * resolution[1]
    if no_upscale and w * h <= area:
        return (max(_floor(w), STEP), max(_floor(h), STEP))
    ratio = w / h
    return min(bucket_set(resolution), key=lambda b: abs(b[0] / b[1] - ratio))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Scale to cover the bucket, centre-crop to it; returns an HxWx3 uint8 array."""
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    new = (int(w * scale + 0.5), int(h * scale + 0.5))
    if new != (w, h):
        image = image.resize(new, Image.LANCZOS if scale > 1 else Image.BOX)
    left, top = (new[0] - bw) // 2, (new[1] - bh) // 2
    return np.asarray(image.crop((left, top, left + bw, top + bh)).convert("RGB"))
