"""`wanpair caption` at full size: load time, peak GPU memory and images/s for 18 images at 960x960.

    PYTHONPATH=src python bench/caption_speed.py --dir /tmp/captioner           # bf16 and fp8, on the GPU
    PYTHONPATH=src python bench/caption_speed.py --dir /tmp/tiny --smoke        # the same path, tiny, on the CPU

The model is Qwen2.5-VL-7B-Instruct's architecture with random weights: the config below is its config.json
(hub repository Qwen/Qwen2.5-VL-7B-Instruct: text 3584 wide, 28 layers, 28 query / 4 key-value heads, MLP 18944,
vocabulary 152064, M-RoPE sections 16/24/24; vision 32 blocks 1280 wide, MLP 3420, 16 heads, window 112, full
attention in blocks 7/15/23/31, patch 14, merge 2) and its preprocessor_config.json (min_pixels 3136, max_pixels
12845056). The weights are made on the GPU in bf16 and saved as the hub's folder is, with a made-up byte-level
tokenizer of the real vocabulary size (`wanpair.demo.make_captioner`); then the real `wanpair caption` code
(`caption_folder`) captions 18 random 960x960 images, with exactly `--tokens` new tokens per caption (random
weights would stop at any moment; a real caption is 100-200 tokens). Random weights say nothing of the captions'
quality: that needs the real weights.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wanpair.caption import Captioner, caption_folder
from wanpair.demo import TINY_CAPTIONER, make_captioner

QWEN25_VL_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768,
              max_window_layers=28, use_sliding_window=False, tie_word_embeddings=False, hidden_act="silu"),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2, in_chans=3, hidden_act="silu"),
    max_pixels=12845056, vocab_size=152064)


def images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i + 1:02d}.png")
    return folder


def run(folder: Path, media: Path, device: str, precision: str, batch: int, tokens: int) -> None:
    for p in media.glob("*.txt"):
        p.unlink()
    gc.collect()  # the last run's captioner, so that its weights are not counted as this one's
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    captioner = Captioner(folder, device, precision, max_new_tokens=tokens, min_new_tokens=tokens)
    load = time.perf_counter() - t
    weights = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    t = time.perf_counter()
    report = caption_folder(media, captioner, batch_size=batch)
    elapsed = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    n = len(report.written)
    print(f"RESULT precision={captioner.precision} batch={batch} load={load:.1f}s weights={weights:.1f}GiB "
          f"peak={peak:.1f}GiB images={n} failed={len(report.failed)} time={elapsed:.1f}s images/s={n / elapsed:.2f} "
          f"new_tokens/s={n * tokens / elapsed:.0f}", flush=True)
    del captioner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the model folder and the images are written")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: checks the script, measures nothing")
    ap.add_argument("--precision", choices=("bf16", "fp8", "both"), default="both")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=120, help="new tokens per caption (default 120)")
    ap.add_argument("--images", type=int, default=18)
    ap.add_argument("--size", type=int, default=960)
    args = ap.parse_args()
    model = args.dir / "Qwen2.5-VL-7B-Instruct"
    device = "cpu" if args.smoke else "cuda"
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        if args.smoke:
            make_captioner(model, **TINY_CAPTIONER)
        else:
            make_captioner(model, **QWEN25_VL_7B, device="cuda", dtype=torch.bfloat16)
            torch.cuda.empty_cache()
        print(f"made {model} in {time.perf_counter() - t:.0f} s", flush=True)
    media = images(args.dir / "images", args.images, 64 if args.smoke else args.size)
    for precision in ("bf16", "fp8") if args.precision == "both" else (args.precision,):
        for batch in args.batch:
            run(model, media, device, precision, batch, 8 if args.smoke else args.tokens)


if __name__ == "__main__":
    main()
