"""Time wanpair's caching stage on 18 images at 960x960 with full-size random VAE and umT5-XXL.

    PYTHONPATH=src python bench/cache.py

Builds the Wan 2.1 VAE (base 96, 16 latent channels) and umT5-XXL (24 layers, d_model 4096, 64 heads,
d_ff 10240) with random weights on the GPU in bf16, writes 18 random 960x960 PNGs with captions and a
Musubi dataset.toml, and runs the same `wanpair.cache.plan` + `fill` that `wanpair cache` runs (VAE
posterior means in batches of 4, captions padded to 512 tokens as Wan does). Model build time is
reported separately from encoding time; a second `fill` shows the all-reused path.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> int:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from wanpair.cache import fill, plan
    from wanpair.data.dataset_config import load_dataset_config
    from wanpair.data.items import check_dataset, require_clean
    from wanpair.demo import make_tokenizer

    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    captions = []
    for i in range(18):
        Image.fromarray(rng.integers(0, 256, (960, 960, 3), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
        captions.append(f"a photo number {i} of a person standing in a bright room, detailed, natural light")
        (root / f"img_{i:02d}.txt").write_text(captions[-1])
    (root / "dataset.toml").write_text('[general]\nresolution = [960, 960]\nenable_bucket = true\n'
                                       '[[datasets]]\nimage_directory = "."\n')
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(make_tokenizer(root / "tok", captions)))
    items = require_clean(check_dataset(load_dataset_config(root / "dataset.toml")))
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        vae = AutoencoderKLWan(base_dim=96, z_dim=16).eval()
        te = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                         is_encoder_decoder=False)).eval()
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    build = time.perf_counter() - t0
    p = plan(items, {0: root / "cache"}, "vae", "t5", "tok")
    t0 = time.perf_counter()
    stats = fill(items, p, lambda: vae, lambda: (te, tok))
    torch.cuda.synchronize()
    encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = fill(items, plan(items, {0: root / "cache"}, "vae", "t5", "tok"), lambda: vae, lambda: (te, tok))
    reuse = time.perf_counter() - t0
    print(f"build (random init, not in a real run): {build:.1f} s")
    print(f"encode 18 images at 960x960 + 18 captions: {encode:.1f} s  ({stats})")
    print(f"second run, everything reused: {reuse:.2f} s  ({again})")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
