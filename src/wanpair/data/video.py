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

from .dataset_config import DatasetSpec
from .images import IMAGE_EXTENSIONS, load_rgb

HASH_PIECE_BYTES = 2**20

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".avi", ".mkv"}
WAN_FPS = 16  # Wan 2.1/2.2 T2V generate 16 fps video (Wan2.2 `wan/configs`: sample_fps = 16)


def is_video(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() in VIDEO_EXTENSIONS


def frame_files(folder: Path) -> list[Path]:
    """A folder of frames: its images, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _step(source_fps: float | None) -> float:
    """Source frames per Wan frame: a `source_fps` video is resampled to Wan's 16 fps by dropping frames."""
    return source_fps / WAN_FPS if source_fps and source_fps > WAN_FPS else 1.0


def video_facts(path: Path, source_fps: float | None) -> tuple[int, tuple[int, int]]:
    """(frames at Wan's frame rate, (width, height)) without keeping a frame: a video file's from its container
    (its frame count, else its packets counted, none decoded); a folder's frames are each opened once (a
    truncated one is named now) and let go. A 20 s 4K clip decoded whole is ~15 GB of host memory."""
    if path.is_dir():
        sizes = [load_rgb(f).size for f in frame_files(path)]  # each frame opened, checked and let go
        size, count = (sizes[0] if sizes else (0, 0)), len(sizes)
    else:
        import av

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                size = (stream.codec_context.width, stream.codec_context.height)
                count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except (av.error.FFmpegError, IndexError) as e:
            raise ValueError(f"cannot decode video ({e})") from None
        if not all(size):
            raise ValueError("cannot decode video (no picture size)")
    return int(count / _step(source_fps)), size


def clip_frames(path: Path, source_fps: float | None, start: int, length: int, bucket: tuple[int, int]) -> np.ndarray:
    """The `length` frames from `start` (at Wan's frame rate) of a video, each cut to `bucket` as it is decoded:
    [F, H, W, 3] uint8. Only the frames the clip uses are kept, one full-size frame at a time, and decoding stops
    after its last: host memory is the clip at its bucket's size plus one frame."""
    from .buckets import resize_and_crop

    step = _step(source_fps)
    wanted = {int(k * step): k - start for k in range(start, start + length)}  # source index -> place in the clip
    out = np.empty((length, bucket[1], bucket[0], 3), dtype=np.uint8)
    found = 0
    if path.is_dir():
        files = frame_files(path)
        for index, place in wanted.items():
            if index < len(files):
                out[place] = resize_and_crop(load_rgb(files[index]), bucket)
                found += 1
    else:
        import av

        last = max(wanted)
        try:
            with av.open(str(path)) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    if index in wanted:
                        out[wanted[index]] = resize_and_crop(frame.to_image().convert("RGB"), bucket)
                        found += 1
                    if index >= last:
                        break
        except (av.error.FFmpegError, IndexError) as e:
            raise ValueError(f"cannot decode video ({e})") from None
    if found < length:
        raise ValueError(f"the video has fewer frames than its container said: {found} of the clip's {length} from "
                         f"frame {start} could be decoded")
    return out


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
    """sha256 of an image's or video's bytes (a folder of frames: each file's name and bytes), read a piece at a
    time: a 4K video of gigabytes, or a file planted in a folder the dashboard checks, is never held in memory."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode() if path.is_dir() else b"")
        with open(f, "rb") as stream:
            while piece := stream.read(HASH_PIECE_BYTES):
                h.update(piece)
    return h.hexdigest()
