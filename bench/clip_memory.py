"""Host memory of a long clip through `check` and the cache, with the VAE encoding on the device.

    PYTHONPATH=src python bench/clip_memory.py WORK --vae wan_2.1_vae.safetensors [--seconds 20] [--device cuda]

Writes a 20 s 1080p H.264 clip (600 frames at 30 fps, PyAV), a dataset.toml that cuts it into 81-frame clips
(`frame_extraction = "uniform"`, `frame_sample = 3`, `source_fps = 30`, an 832x480 bucket), then in this process:
the dataset check (`check_dataset`: the clip's facts from its container), and the cache's latent path for each clip
(`cache.pixels`, the VAE's `encode_latents` on the device). After each phase: the process's peak resident memory
(`ru_maxrss`: torch and the VAE's weights included, measured before the clip too) and the seconds it took.
One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_clip(path: Path, seconds: int, fps: int = 30, size=(1920, 1080)) -> None:
    """A moving gradient with a square crossing it, encoded frame by frame (never all frames in memory)."""
    import av
    import numpy as np

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            frame = np.concatenate([(x + 3 * i) % 256 + 0 * y, (y + 2 * i) % 256 + 0 * x, 0 * x + 0 * y + 128], axis=2)
            s = (i * 7) % (w - 200)
            frame[400:600, s:s + 200] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch

    from wanpair.cache import encode_latents, pixels
    from wanpair.data.dataset_config import load_dataset_config
    from wanpair.data.items import check_dataset, require_clean
    from wanpair.models.vae import load_vae

    videos = args.work / "longclip"
    videos.mkdir(parents=True, exist_ok=True)
    clip = videos / "long.mp4"
    started = time.perf_counter()
    if not clip.exists():
        write_clip(clip, args.seconds)
    (videos / "long.txt").write_text("a white square crossing a moving gradient")
    toml = videos / "dataset.toml"
    toml.write_text('[general]\nresolution = [832, 480]\nbatch_size = 1\nenable_bucket = true\n\n[[datasets]]\n'
                    f'video_directory = "{videos}"\ncache_directory = "{videos / "cache"}"\ntarget_frames = [81]\n'
                    'frame_extraction = "uniform"\nframe_sample = 3\nsource_fps = 30\n')
    made = time.perf_counter() - started
    result = {"clip": f"{args.seconds} s 1920x1080 30 fps, {clip.stat().st_size / 1e6:.0f} MB", "write_s": round(made, 1),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    vae = load_vae(args.vae, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, device=args.device)
    result["before_gib"] = round(peak_gib(), 2)  # torch, CUDA context, the VAE's weights

    started = time.perf_counter()
    items = require_clean(check_dataset(load_dataset_config(toml)))
    result |= {"check_s": round(time.perf_counter() - started, 2), "check_peak_gib": round(peak_gib(), 2),
               "clips": [f"{it.frames} frames from {it.start}, {it.bucket[0]}x{it.bucket[1]}" for it in items]}

    started = time.perf_counter()
    for item in items:
        latent = encode_latents(vae, pixels(item)[None])
        if args.device == "cuda":
            torch.cuda.synchronize()
    result |= {"cache_s": round(time.perf_counter() - started, 2), "cache_peak_gib": round(peak_gib(), 2),
               "latent": list(latent.shape)}
    if args.device == "cuda":
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
