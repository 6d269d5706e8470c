"""Video training items: decoding clips and cutting them into the frame ranges the dataset asks for.

A video is a file (mp4, webm, mov, avi, mkv; decoded with PyAV) or a folder of frame images
(sorted by name). Cutting follows the reference trainer's `frame_extraction` modes (Musubi-Tuner
`dataset/image_video_dataset.py`), each giving clips of a `target_frames` length (4k+1):
- head:    the first N frames, for each N in target_frames
- chunk:   consecutive non-overlapping N-frame pieces
- slide:   N-frame windows every `frame_stride` frames
- uniform: `frame_sample` N-frame windows with evenly spaced starts
- full:    the whole video up to `max_frames`, rounded down to 4k+1
With `source_fps`, frames are first resampled to Wan's 16 fps by dropping frames.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset_config import DatasetSpec
from .images import IMAGE_EXTENSIONS, load_rgb

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".avi", ".mkv"}
WAN_FPS = 16  # Wan 2.1/2.2 T2V generate 16 fps video (Wan2.2 `wan/configs`: sample_fps = 16)


def is_video(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() in VIDEO_EXTENSIONS


def read_frames(path: Path) -> list[Image.Image]:
    """All frames as RGB images; raises OSError/ValueError for unreadable videos."""
    if path.is_dir():
        return [load_rgb(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    import av

    try:
        with av.open(str(path)) as container:
            return [f.to_image().convert("RGB") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode video ({e})") from None


def resample(frames: list, source_fps: float | None) -> list:
    """Drop frames so a `source_fps` video plays at Wan's 16 fps."""
    if not source_fps or source_fps <= WAN_FPS:
        return frames
    step = source_fps / WAN_FPS
    return [frames[int(k * step)] for k in range(int(len(frames) / step))]


def clip_ranges(frame_count: int, spec: DatasetSpec) -> list[tuple[int, int]]:
    """(start, length) of every clip a video of `frame_count` frames gives under the dataset's settings."""
    ranges = []
    mode = spec.frame_extraction
    if mode == "full":
        n = min(frame_count, spec.max_frames)
        return [(0, (n - 1) // 4 * 4 + 1)] if n >= 1 else []
    for n in spec.target_frames:
        if frame_count < n:
            continue
        if mode == "head":
            ranges.append((0, n))
        elif mode == "chunk":
            ranges += [(i, n) for i in range(0, frame_count - n + 1, n)]
        elif mode == "slide":
            ranges += [(i, n) for i in range(0, frame_count - n + 1, spec.frame_stride)]
        elif mode == "uniform":
            ranges += [(int(i), n) for i in np.linspace(0, frame_count - n, spec.frame_sample, dtype=int)]
    return ranges


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()
