"""Peak host memory and time of loading a full-size Wan DiT file with `wanpair.models.load_dit`.

    PYTHONPATH=src python bench/load_dit.py --make /tmp/wan2.2_t2v_high_noise_14B_fp16.safetensors
    PYTHONPATH=src python bench/load_dit.py --load /tmp/wan2.2_t2v_high_noise_14B_fp16.safetensors

`--make` writes a random full-size A14B expert in the original Wan key layout and fp16 (28.6 GB).
`--load` loads it the way `wanpair train` does (`load_dit(fp8=True)`: streamed tensor by tensor onto
the GPU, each block weight quantised to fp8 with row scales as it arrives) and prints wall time,
peak host RSS and GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def make(path: Path) -> None:
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from train_step import A14B

    from wanpair.models.dit import to_original_name

    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**A14B)
    sd = {to_original_name(k): v.to("cpu", torch.float16) for k, v in model.state_dict().items()}
    del model
    t = time.perf_counter()
    save_file(sd, str(path), metadata={"format": "pt"})
    print(f"wrote {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t:.1f} s")


def load(path: Path) -> dict:
    from wanpair.models import load_dit

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    model = load_dit(path, dtype=torch.bfloat16, device="cuda", fp8=True)
    torch.cuda.synchronize()
    loaded = time.perf_counter() - t
    result = dict(file_gb=path.stat().st_size / 1e9, load_s=loaded, blocks=len(model.blocks),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rss_before_gib=rss0,
                  gpu_allocated_gib=torch.cuda.memory_allocated() / 2**30,
                  gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path)
    ap.add_argument("--load", type=Path)
    a = ap.parse_args()
    if a.make:
        make(a.make)
    if a.load:
        load(a.load)
