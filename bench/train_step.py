"""Time wanpair's real training step on a full-size Wan 2.2 A14B expert with random weights.

    PYTHONPATH=src python bench/train_step.py --variant fp8 --variant bf16 --variant bf16-compile
    PYTHONPATH=src python bench/train_step.py --config tiny --device cpu --steps 3   # smoke test on a CPU

The model is built directly on the GPU (no files), then goes through the same functions `wanpair
train` uses: `prepare_expert` (LoRA rank 16 on every block Linear, fp8 storage, checkpointing,
compile) and `train_step` (flow-matching loss, backward, AdamW through accelerate). Inputs: a
960x960 image (latent 16x1x120x120 -> 3 600 tokens) or an 81-frame 832x480 clip (16x21x60x104 ->
32 760 tokens), with a 512-token text context.

Useful FLOPs per step (counted here, not measured): the frozen base needs the forward pass and
the input-gradient half of the backward pass, so linear layers count 2 x forward; attention
(no weights) counts forward + a 2.5 x forward backward (FlashAttention's convention):
  linear fwd  = 2 * L * [N * (4d^2 + 2d^2 + 2*d*ffn) + 512 * 2d^2]       (self q,k,v,o; cross q,o; ffn; cross k,v)
  attn fwd    = 2 * L * [2 * N^2 * d + 2 * N * 512 * d]                 (QK^T and PV, self and cross)
  useful      = 2 * linear fwd + 3.5 * attn fwd
For the image case this is 2.2e14 FLOP; MFU = useful / time / dense bf16 peak of the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
TINY = dict(A14B, num_attention_heads=1, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2)
SHAPES = {"image": (1, 120, 120), "video": (21, 60, 104), "tiny": (1, 8, 8)}
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}

VARIANTS = {
    "fp8": dict(fp8_base=True, gradient_checkpointing=True, checkpoint_blocks=-1, compile=False),
    "bf16": dict(fp8_base=False, gradient_checkpointing=True, checkpoint_blocks=-1, compile=False),
    "bf16-compile": dict(fp8_base=False, gradient_checkpointing=True, checkpoint_blocks=-1, compile=True),
    "fp8-compile": dict(fp8_base=True, gradient_checkpointing=True, checkpoint_blocks=-1, compile=True),  # fails
    "bf16-compile-ckpt24": dict(fp8_base=False, gradient_checkpointing=True, checkpoint_blocks=24, compile=True),
    "bf16-compile-ckpt12": dict(fp8_base=False, gradient_checkpointing=True, checkpoint_blocks=12, compile=True),
}


def useful_flops(cfg: dict, frames: int, h: int, w: int, text: int = 512) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = frames * (h // 2) * (w // 2)
    L, ffn = cfg["num_layers"], cfg["ffn_dim"]
    linear = 2 * L * (n * (4 * d * d + 2 * d * d + 2 * d * ffn) + text * 2 * d * d)
    attn = 2 * L * (2 * n * n * d + 2 * n * text * d)
    return 2 * linear + 3.5 * attn


def run_variant(name: str, cfg: dict, shape: tuple, steps: int, warmup: int, device: torch.device) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import WanTransformer3DModel

    from wanpair.project import TrainSettings
    from wanpair.train.recipe import prepare_expert, train_step

    settings = dataclasses.replace(TrainSettings(), **VARIANTS[name])
    compute = torch.bfloat16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(compute)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    torch.set_default_dtype(torch.float32)
    params = prepare_expert(model, settings, compute)
    model.train()
    build_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    f, h, w = shape
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, 16, f, h, w, generator=g, device=device)
    noise = torch.randn(1, 16, f, h, w, generator=g, device=device)
    text = torch.randn(1, 512, cfg["text_dim"], generator=g, device=device)
    t = torch.rand(1, generator=g, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        loss, _ = train_step(model, optimizer, scheduler, acc, params, x0, noise, t, text, compute, 0.0)
        losses.append(loss.item())  # syncs
        if i >= warmup:
            times.append(time.perf_counter() - s)
        elif i == 0:
            first = time.perf_counter() - s
    med = statistics.median(times)
    flops = useful_flops(cfg, f, h, w)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    result = dict(variant=name, tokens=f * (h // 2) * (w // 2), median_s=med, min_s=min(times), max_s=max(times),
                  first_step_s=first, build_s=build_s, steps=steps, useful_tflop=flops / 1e12,
                  tflops=flops / med / 1e12, mfu=(flops / med / 1e12 / peak) if peak else None,
                  loss_finite=all(map(lambda v: v == v and abs(v) < float("inf"), losses)), gpu=gpu)
    if device.type == "cuda":
        result.update(max_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                      max_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    del model, optimizer, scheduler, acc, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("a14b", "tiny"), default="a14b")
    ap.add_argument("--input", choices=("image", "video"), default="image")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable; default fp8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    cfg = A14B if args.config == "a14b" else TINY
    shape = SHAPES["tiny"] if args.config == "tiny" else SHAPES[args.input]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    rows = []
    for name in args.variant or ["fp8"]:
        try:
            r = run_variant(name, cfg, shape, args.steps, args.warmup, device)
        except Exception as e:  # a failed variant is a result too; go on with the others
            r = dict(variant=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'variant':<22}{'s/step':>8}{'TFLOP/s':>9}{'MFU':>7}{'alloc GiB':>11}{'first s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        print(f"{r['variant']:<22}{r['median_s']:>8.3f}{r['tflops']:>9.0f}{mfu:>7}"
              f"{r.get('max_allocated_gib', 0):>11.1f}{r['first_step_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
