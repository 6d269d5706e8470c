"""Time wanpair's real training step on a full-size Wan 2.2 A14B expert with random weights.

    PYTHONPATH=src python bench/train_step.py --variant default --variant fp8mm-compile ...
    PYTHONPATH=src python bench/train_step.py --cap-gib 16 --variant low      # a 16 GiB budget
    PYTHONPATH=src python bench/train_step.py --accuracy                      # fp8 vs bf16 loss and gradients
    PYTHONPATH=src python bench/train_step.py --variant default --saved      # what a block keeps for backward
    PYTHONPATH=src python bench/train_step.py --variant default --variant default-separate-lora --rounds 2
    PYTHONPATH=src python bench/train_step.py --config tiny --device cpu --steps 3   # smoke test on a CPU
    PYTHONPATH=src python bench/train_step.py --config i2v-a14b --input video --cap-gib 24 --variant budget-24

Each variant is timed twice: reading every step before the next (`median_s`, per step) and in the training
loop's order, the next step queued before this one is read (`pipelined_s`, the mean over as many steps).
The `ckpt-*` variants checkpoint all 40 blocks in one way each, to compare the ways.

The model is built directly on the GPU (no files) block by block -- with an fp8 base each block is
quantised as soon as it exists, as `load_dit(fp8=True)` does, so the bf16 form of the whole expert
never exists -- then goes through the same functions `wanpair train` uses: `prepare_expert` (LoRA
rank 16 on every block Linear, fp8 storage and matmuls, compile, the memory plan: checkpointing and
block streaming) and `train_step` (flow-matching loss, backward, AdamW through accelerate). Inputs:
a 960x960 image (latent 16x1x120x120 -> 3 600 tokens) or an 81-frame 832x480 clip (16x21x60x104 ->
32 760 tokens), with a 512-token text context. `--cap-gib` limits the process's GPU memory with
`torch.cuda.set_per_process_memory_fraction` (what a smaller card would have).

Useful FLOPs per step (counted, not measured: `wanpair.setup.doctor.useful_flops`, which `wanpair doctor` scales
its speed estimate by): the frozen base needs the forward pass and the input-gradient half of the backward pass,
so linear layers count 2 x forward; attention (no weights) counts forward + a 2.5 x forward backward
(FlashAttention's convention):
  linear fwd  = 2 * L * [N * (4d^2 + 2d^2 + 2*d*ffn) + 512 * 2d^2]       (self q,k,v,o; cross q,o; ffn; cross k,v)
  attn fwd    = 2 * L * [2 * N^2 * d + 2 * N * 512 * d]                 (QK^T and PV, self and cross)
  useful      = 2 * linear fwd + 3.5 * attn fwd
For the image case this is 2.2e14 FLOP; MFU = useful / time / dense bf16 peak of the GPU (fp8
matmuls still count against the bf16 peak, as the issue's target does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
import sys
import time
import traceback

import wanpair.cli  # noqa: F401  -- the environment `wanpair train` runs in: allocator, compile caches

import torch
import torch._inductor.config  # noqa: F401  (INDUCTOR options are patched per variant)

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
I2V_A14B = dict(A14B, in_channels=36)  # Wan 2.2 I2V A14B: noisy latent | 4 mask channels | first-frame latent
TINY = dict(A14B, num_attention_heads=1, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2)
SHAPES = {"image": (1, 120, 120), "video": (21, 60, 104), "tiny": (1, 8, 8)}
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}

ALL_CKPT = dict(checkpoint_blocks=40)
VARIANTS = {  # TrainSettings overrides; "default" is exactly what `wanpair train` does with the recipe's settings
    "default": {},
    "fp8store": dict(fp8_matmul="off", compile="off", **ALL_CKPT),  # fp8 storage only, eager (the old default)
    "bf16": dict(fp8_base=False, compile="off", **ALL_CKPT),
    "bf16-compile": dict(fp8_base=False, compile="on", **ALL_CKPT),
    "fp8store-compile": dict(fp8_matmul="off", compile="on", **ALL_CKPT),
    "fp8mm": dict(fp8_matmul="on", compile="off", **ALL_CKPT),
    "fp8mm-compile": dict(fp8_matmul="on", compile="on", **ALL_CKPT),
    "default-no-transpose": {},  # the default without W^T stored beside W (see run_variant)
    "default-cudagraphs": {},  # probe: the default with each block compiled in "reduce-overhead" mode (CUDA graphs)
    "fp8mm-compile-cudagraphs": dict(fp8_matmul="on", compile="on", **ALL_CKPT),  # probe: all checkpointed, CUDA graphs
    "default-exact-accum": {},  # the default with the fp8 matmuls' fast accumulation off (Fp8Linear.fast_accum)
    "default-peftcast": {},  # the default with peft's fp32 cast of every LoRA input left on (see run_variant)
    "default-eager": dict(cuda_graph="off"),  # the default with every step launched eagerly (no CUDA graph)
    # all 40 checkpointed in one way each (FORCED_POLICY below), for comparison; fp8mm-compile: as the plan chooses
    "ckpt-eager": dict(fp8_matmul="on", compile="on", **ALL_CKPT),
    "ckpt-graph-recompute": dict(fp8_matmul="on", compile="on", **ALL_CKPT),
    "ckpt-graph-attn": dict(fp8_matmul="on", compile="on", **ALL_CKPT),
    "ckpt-graph": dict(fp8_matmul="on", compile="on", **ALL_CKPT),
    "default-sdpa": dict(attention="sdpa"),  # the default with torch's SDPA for self-attention (no FlashAttention-4)
    "default-maxnorm": dict(scale_weight_norms=1.0),  # the default with max-norm after every update, as the loop does
    "budget-24": dict(memory_budget_gb=24.0),  # the field's common cards: a 24 GiB and a 32 GiB budget
    "budget-32": dict(memory_budget_gb=32.0),
    "low": dict(memory_mode="low"),
    "low-14": dict(memory_mode="low", memory_budget_gb=14.0),  # plan for 14 GiB: more streamed, more headroom
    "default-separate-lora": {},  # the default with q, k and v's LoRA down-projections one by one (see run_variant)
    "default-cdt": {},  # probe: the default with inductor tuning its Triton kernels' block sizes (INDUCTOR below)
    "default-multikernel": {},  # probe: rows up to 16 384 wide also as one-pass (persistent) reductions, the faster kept
    "default-persistent": {},  # probe: every row reduction one-pass (persistent), whatever its width
}

# variant -> torch._inductor.config options its compiled blocks are built with
# (multi_kernel: torch/_inductor/choices.py raises the one-pass threshold 16x and benchmarks both forms at run time;
# the fp8 quantisation's per-row amax over 5 120- and 13 824-wide rows is otherwise a two-pass loop)
INDUCTOR = {"default-cdt": {"coordinate_descent_tuning": True},
            "default-multikernel": {"triton.multi_kernel": 1},
            "default-persistent": {"triton.multi_kernel": 2}}

# variant -> how every block is checkpointed (`wanpair.train.speed.checkpoint_blocks`): around the compiled
# block, or inside its graph keeping nothing, its attention outputs, or what inductor's partitioner picks
FORCED_POLICY = {"ckpt-eager": "eager", "ckpt-graph-recompute": "recompute", "ckpt-graph-attn": "save-attention",
                 "ckpt-graph": "partitioner"}


def build_expert(cfg: dict, fp8: bool, compute: torch.dtype, device: torch.device):
    """A random full-size expert on `device`, one block at a time (each quantised at once with fp8)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from wanpair.models.fp8 import to_fp8_linears

    torch.set_default_dtype(compute)
    with torch.device(device):
        model = WanTransformer3DModel(**dict(cfg, num_layers=0))
        for _ in range(cfg["num_layers"]):
            model.blocks.append(WanTransformerBlock(cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"],
                                                    cfg["num_attention_heads"], cfg["qk_norm"], cfg["cross_attn_norm"],
                                                    cfg["eps"]))
            if fp8:
                to_fp8_linears(model, compute)
    torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False)


def print_profile(step, n: int = 3) -> None:
    """GPU kernel time per step by kind and the top kernels (torch.profiler over `n` steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e3 / n
    kinds = {"attention": ("sdpa", "flash", "fmha", "cudnn"), "matmul": ("gemm", "cutlass", "cublas", "xmma", "nvjet"),
             "host-to-device copy": ("Memcpy",), "triton (fused elementwise)": ("triton",)}
    totals = dict.fromkeys([*kinds, "other"], 0.0)
    for k, ms in kernels.items():
        kind = next((kind for kind, keys in kinds.items() if any(key in k for key in keys)), "other")
        totals[kind] += ms
    print("GPU ms per step: " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()) + f", total {sum(totals.values()):.1f}")
    print_gaps([e for e in prof.events() if e.device_type.name == "CUDA"], n)
    for k, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:22]:
        print(f"  {ms:7.2f} ms  {k[:110]}")
    # one more step with the host's operations recorded too (which slows the host a little: its "late" count is
    # an upper bound), to tell the long gaps' causes apart
    import tempfile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            print_gap_causes(json.load(f)["traceEvents"])


def print_gap_causes(trace: list[dict], min_us: float = 50.0) -> None:
    """For each GPU idle gap of `min_us` or more in a profiler trace (Chrome format, host and GPU activity): was
    the kernel after it launched only after the GPU had gone idle (the host was late: the host operation running
    at that moment is named) or before (the GPU waited on something else: a stream or event dependency)?"""
    def spans(cats):
        return [e for e in trace if e.get("ph") == "X" and e.get("cat") in cats]

    gpu = sorted(spans(("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in spans(("cuda_runtime", "cuda_driver"))
                if "correlation" in e.get("args", {})}
    ops: dict = {}
    for e in spans(("cpu_op", "user_annotation")):
        ops.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))

    def running(tid, t: float) -> str:
        inside = [(start, name) for start, end, name in ops.get(tid, []) if start <= t <= end]
        return max(inside)[1] if inside else "(no operation)"

    late: dict[str, list] = {}
    waited: dict[str, list] = {}
    unlinked: dict[str, list] = {}  # no launch call in the trace for it (kernel after)
    if not gpu:
        return
    busy = gpu[0]["ts"] + gpu[0]["dur"]
    for k in gpu[1:]:
        gap = k["ts"] - busy
        if gap >= min_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is None:
                unlinked.setdefault(k["name"], []).append(gap)
            elif launch["ts"] > busy:
                late.setdefault(running(launch.get("tid"), busy), []).append(gap)
            else:
                waited.setdefault(k["name"], []).append(gap)
        busy = max(busy, k["ts"] + k["dur"])
    for title, found in (("host late (running then)", late), ("launched in time, GPU waited (kernel after)", waited),
                         ("launch not in the trace (kernel after)", unlinked)):
        total = sum(map(sum, found.values()))
        print(f"gaps >= {min_us:.0f} us, {title}: {sum(map(len, found.values()))} gaps, {total / 1e3:.1f} ms")
        for name, gaps in sorted(found.items(), key=lambda kv: -sum(kv[1]))[:8]:
            print(f"  {len(gaps):4d} gaps {sum(gaps) / 1e3:6.2f} ms  {name[:100]}")


def print_gaps(events, n: int) -> None:
    """Where the GPU idles inside the profiled steps: kernel count, idle time between kernels (any stream)
    by gap size, and the longest gaps with the kernel before each -- launch latency shows as many tiny
    gaps, the host falling behind as fewer long ones."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    if not spans:
        return
    bins = {"< 5 us": [0, 0.0], "5-50 us": [0, 0.0], "50-500 us": [0, 0.0], ">= 500 us": [0, 0.0]}
    longest, busy_until, before = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        gap = start - busy_until  # microseconds
        if gap > 0:
            key = "< 5 us" if gap < 5 else "5-50 us" if gap < 50 else "50-500 us" if gap < 500 else ">= 500 us"
            bins[key][0] += 1
            bins[key][1] += gap
            longest.append((gap, before, name))
        if end > busy_until:
            busy_until, before = end, name
    wall = (busy_until - spans[0][0]) / 1e3 / n
    idle = sum(v[1] for v in bins.values()) / 1e3 / n
    print(f"kernels per step {len(spans) / n:.0f}; first to last kernel {wall:.1f} ms per step, GPU idle {idle:.1f} ms: "
          + ", ".join(f"{k} {c / n:.0f} gaps {t / 1e3 / n:.1f} ms" for k, (c, t) in bins.items()))
    for gap, a, b in sorted(longest, reverse=True)[:6]:
        print(f"  gap {gap / 1e3:6.2f} ms after {a[:60]}  before {b[:60]}")


def time_validation(model, acc, batch, compute, forwards: int = 16, profile: bool = False) -> dict:
    """Seconds for `forwards` no-grad forward passes of the batch (what one validation evaluation does: 4
    items x 4 timesteps), with the compiled blocks run eagerly (until 2026-12-03) and compiled (their no-grad
    graph compiles at the first pass, timed apart), compiled with each pass's inputs copied from pageable or pinned
    host memory, and as forwards // 4 passes of 4 samples each. With `profile`, the compiled forward's kernels and
    gaps as the training step's (to set beside its forward)."""
    from wanpair.train.expert import _on
    from wanpair.train.flow_matching import flow_matching_loss
    from wanpair.train.speed import eager

    x0, noise, t, text, cond = batch[0]

    def evaluate(n: int, batch: int = 1, host: str | None = None) -> float:
        """`host`: each pass's inputs copied from host memory first, "pageable" (`.to(device)`: the host waits for
        the GPU's queued work) or "pinned" (`_on`, as `ExpertTraining.validate` does: queued behind it)."""
        x, e, tt, c = (v.expand(batch, *v.shape[1:]) for v in (x0, noise, t, text))
        i2v = None if cond is None else cond.expand(batch, *cond.shape[1:])
        inputs = kept = (x, e, tt, c, i2v)
        if host:
            kept = tuple(None if v is None else v.cpu() for v in inputs)
        torch.cuda.synchronize()
        s = time.perf_counter()
        total = torch.zeros((), device=x0.device)
        for _ in range(n):
            if host == "pinned":
                inputs = _on(x0.device, kept)
            elif host == "pageable":
                inputs = tuple(None if v is None else v.to(x0.device) for v in kept)
            total += flow_matching_loss(model, *inputs[:4], compute, cond=inputs[4]).float()
        total.item()
        return time.perf_counter() - s

    model.eval()
    with torch.no_grad(), acc.autocast():
        with eager():
            evaluate(1)
            eager_s = evaluate(forwards)
        first_s = evaluate(1)
        compiled_s = evaluate(forwards)
        pageable_s, pinned_s = evaluate(forwards, host="pageable"), evaluate(forwards, host="pinned")
        if profile:
            print("one compiled validation forward (no gradients), profiled as a step:", flush=True)
            print_profile(lambda: evaluate(1), n=4)
        evaluate(1, batch=4)  # a graph of its own: an item's 4 timesteps in one pass, as validation could run them
        batched_s = evaluate(forwards // 4, batch=4)
        extra = {b: working_gib(lambda: evaluate(1, batch=b)) for b in (1, 4)}
    model.train()
    per_token = model.config.num_attention_heads * model.config.attention_head_dim * x0[0, 0].numel() / 4 / 2**30
    return dict(validation_eager_s=eager_s, validation_compiled_s=compiled_s, validation_first_compiled_s=first_s,
                validation_inputs_from_pageable_s=pageable_s, validation_inputs_from_pinned_s=pinned_s,
                validation_batched4_s=batched_s, validation_working_gib={b: round(g, 3) for b, g in extra.items()},
                validation_working_per_token_dim={b: round(g / (b * per_token), 1) for b, g in extra.items()})


def working_gib(run) -> float:
    """GiB the allocator's peak rose above what was allocated before `run` (a pass's working set)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def saved_for_backward(model, acc, batch, compute, blocks: int, tokens: int, dim: int) -> dict:
    """What one training forward keeps for its backward (every tensor autograd saves, each storage once), in units of
    dim bytes per token per block -- the memory plan's ACTIVATION_PER_TOKEN for blocks that are not checkpointed --
    grouped by dtype and last dimension, the largest groups first. The model's own weights, which the fp8 matmuls
    keep a reference to for their backward (W, its scales, W^T), are resident anyway and not counted (on the H100,
    2026-12-06, they were 18.8 of the first version's 28.1 for the 24 GiB plan)."""
    from wanpair.train.flow_matching import flow_matching_loss

    seen: dict[int, tuple[str, int, int]] = {}
    weights = [*model.parameters(), *model.buffers(), *(m.weight_t for m in model.modules()
                                                       if getattr(m, "weight_t", None) is not None)]
    resident = {w.untyped_storage().data_ptr() for w in weights if w.device.type != "meta"}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in resident:
            seen.setdefault(t.untyped_storage().data_ptr(), (str(t.dtype).replace("torch.", ""),
                                                             t.shape[-1] if t.dim() else 1, t.untyped_storage().nbytes()))
        return t

    x0, noise, t, text, cond = batch[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), acc.autocast():
        loss = flow_matching_loss(model, x0, noise, t, text, compute, cond=cond)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    unit = blocks * tokens * dim
    groups: dict[str, float] = {}
    for dtype, last, nbytes in seen.values():
        key = f"{dtype} [..., {last}]"
        groups[key] = groups.get(key, 0.0) + nbytes / unit
    ordered = dict(sorted(groups.items(), key=lambda kv: -kv[1]))
    return {"saved_per_token_dim": round(sum(ordered.values()), 1), "saved_tensors": len(seen),
            "saved_groups": {k: round(v, 2) for k, v in ordered.items() if v >= 0.05}}


def run_variant(name: str, cfg: dict, shape: tuple, steps: int, warmup: int, device: torch.device,
                profile: bool = False, validation: bool = False, saved: bool = False) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from wanpair.project import TrainSettings
    from wanpair.train.optim import build_optimizer
    from wanpair.models.attention import separate_projections
    from wanpair.train.lora import apply_max_norm, lora_pairs
    from wanpair.train.model_setup import prepare_expert
    from wanpair.setup.doctor import useful_flops
    from wanpair.train.speed import checkpoint_blocks
    from wanpair.train.step import finish, forward_backward, train_step, update
    from wanpair.train.step_graph import StepGraphs, why_not

    # each variant compiles its own graphs: dynamo would otherwise keep every earlier variant's entries
    # and check their guards on every block call (the later variants' host time grew by ~100 ms a step)
    torch._dynamo.reset()
    settings = dataclasses.replace(TrainSettings(), **VARIANTS[name])
    if settings.checkpoint_blocks > cfg["num_layers"]:
        settings.checkpoint_blocks = cfg["num_layers"]
    compute = torch.bfloat16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    f, h, w = shape
    model = build_expert(cfg, settings.fp8_base, compute, device)
    params, plan = prepare_expert(model, settings, compute, tokens=f * (h // 2) * (w // 2))
    why = why_not(device, settings.cuda_graph, 1, plan, 1, settings.module_dropout, 1)
    # replayed as CUDA graphs where the training loop would (wanpair.train.step_graph); not under the probes that
    # graph each block or force a checkpoint form after the plan
    graphed = why is None and not name.endswith("cudagraphs") and name not in FORCED_POLICY
    print(plan.describe() + ("; steps replayed as a CUDA graph" if graphed else f"; eager steps: {why or 'a probe'}"),
          flush=True)
    if name == "default-no-transpose":
        for m in model.modules():
            if getattr(m, "weight_t", None) is not None:
                m.weight_t = None
    if name in FORCED_POLICY:
        checkpoint_blocks(model, [FORCED_POLICY[name]] * cfg["num_layers"])
    if name.endswith("-cudagraphs"):
        for block in model.blocks._modules.values():
            block.compile(mode="reduce-overhead")
    if name == "default-exact-accum":
        for m in model.modules():
            if hasattr(m, "fast_accum"):
                m.fast_accum = False
    if name == "default-separate-lora":
        for block in model.blocks._modules.values():
            block.attn1.processor.project = separate_projections
    if name == "default-peftcast":
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = True
    model.train()
    pairs = lora_pairs(model)
    build_s = time.perf_counter() - t0
    optimizer = build_optimizer(params, settings)  # AdamW, the recipe's optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model, optimizer = acc.prepare(model, optimizer)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, 16, f, h, w, generator=g, device=device)
    noise = torch.randn(1, 16, f, h, w, generator=g, device=device)
    text = torch.randn(1, 512, cfg["text_dim"], generator=g, device=device)
    t = torch.rand(1, generator=g, device=device)
    cond = None  # I2V: the mask and first-frame latent beside the noisy one (wanpair.models.i2v)
    if cfg["in_channels"] > 16:
        cond = torch.randn(1, cfg["in_channels"] - 16, f, h, w, generator=g, device=device)
    batch = [(x0, noise, t, text, cond)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    step_fb = forward_backward
    for i in range(warmup + steps):
        if graphed and i == warmup:
            # the training loop's graphs: a shape's first pass runs eagerly, the next is captured and replayed --
            # the same batch and LoRA both times, so the two can be compared
            graphs = StepGraphs(params, 1, print)
            fb = functools.partial(graphs.forward_backward, lambda mbs: forward_backward(model, acc, mbs, compute))
            ref_loss = fb(batch, 1.0).item()
            ref_grads = torch.cat([p.grad.flatten().float() for p in params])
            optimizer.zero_grad(set_to_none=True)
            graph_loss = fb(batch, 1.0).item()
            step_fb = lambda model, acc, batch, compute: fb(batch, 1.0)  # noqa: E731
            graph_grads = torch.cat([p.grad.flatten().float() for p in params])
            optimizer.zero_grad(set_to_none=True)
            checks = dict(graph_loss=graph_loss, eager_loss=ref_loss,
                          graph_grad_max_abs_diff=(graph_grads - ref_grads).abs().max().item(),
                          graph_grad_cosine=torch.nn.functional.cosine_similarity(graph_grads, ref_grads, dim=0).item())
            print("graph vs eager, same batch and LoRA:", checks, flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        if step_fb is forward_backward:
            loss, _ = train_step(model, optimizer, scheduler, acc, params, batch, compute, 0.0)
        else:
            fb_loss = step_fb(model, acc, batch, compute)
            finish(update(optimizer, acc, params, fb_loss, 0.0), scheduler)
            loss = fb_loss.item()
        if settings.scale_weight_norms:
            apply_max_norm(pairs, settings.scale_weight_norms, settings.alpha / settings.rank).tolist()
        losses.append(loss)  # train_step waited for the step
        if i >= warmup:
            times.append(time.perf_counter() - s)
        elif i == 0:
            first = time.perf_counter() - s
            if device.type == "cuda":
                print(torch._dynamo.utils.compile_times(repr="str"), flush=True)
                # the first step compiles and autotunes (inductor benchmarks kernels on copies of their
                # buffers): its peak apart from the steady one, which is what a warm compile cache sees
                first_peak = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats()
            counters = torch._dynamo.utils.counters
            print("compile caches:", dict(counters["aot_autograd"]), dict(counters["inductor"]), flush=True)
    # the training loop's order (wanpair.train.expert): step k+1's forward and backward are queued before
    # step k's verdict is read, so the GPU does not wait while the host finishes a step
    if device.type == "cuda":
        torch.cuda.synchronize()
    s, verdict = time.perf_counter(), None
    for i in range(steps):
        loss = step_fb(model, acc, batch, compute)
        if verdict is not None:
            finish(verdict, scheduler)
        verdict = update(optimizer, acc, params, loss, 0.0)
        if settings.scale_weight_norms:
            apply_max_norm(pairs, settings.scale_weight_norms, settings.alpha / settings.rank)
    finish(verdict, scheduler)
    pipelined = (time.perf_counter() - s) / steps
    # bytes streamed and offloaded over the warm-up, the timed and the pipelined steps (validation's forwards below
    # stream too); the offloaded blocks' pinned host buffers
    calls = getattr(model.blocks, "calls", {}).values()
    streamers, offloaders = {c.streamer for c in calls} - {None}, {c.offloader for c in calls} - {None}
    copied = sum(x.copied_bytes for x in streamers)
    offloaded = sum(x.copied_bytes for x in offloaders)
    offload_host = sum(x.host_bytes for x in offloaders)
    steady_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    probes = time_validation(model, acc, batch, compute, profile=profile) if validation and device.type == "cuda" else {}
    if probes:
        print("one validation evaluation (16 forwards):", probes, flush=True)
    if saved:
        probes |= saved_for_backward(model, acc, batch, compute, cfg["num_layers"], f * (h // 2) * (w // 2),
                                     cfg["num_attention_heads"] * cfg["attention_head_dim"])
        print("saved for backward (dim bytes per token per block):", probes["saved_per_token_dim"],
              probes["saved_groups"], flush=True)
    if profile and device.type == "cuda":
        print_profile(functools.partial(train_step, model, optimizer, scheduler, acc, params, batch, compute, 0.0))
    med = statistics.median(times)
    flops = useful_flops(cfg, f * (h // 2) * (w // 2))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    fa4 = any(b.attn1.processor.flash for b in model.blocks._modules.values())
    result = dict(variant=name, tokens=f * (h // 2) * (w // 2), first_losses=losses[:3],
                  self_attention="fa4" if fa4 else "sdpa", median_s=med, pipelined_s=pipelined, min_s=min(times), max_s=max(times),
                  first_step_s=first, build_s=build_s, steps=steps, useful_tflop=flops / 1e12,
                  tflops=flops / med / 1e12, mfu=(flops / med / 1e12 / peak) if peak else None,
                  loss_finite=all(map(lambda v: v == v and abs(v) < float("inf"), losses)), gpu=gpu,
                  checkpointed=plan.checkpointed, streamed=len(plan.streamed), planned_gib=plan.estimate_gib,
                  budget_gib=plan.budget_gib, streamed_gib_per_step=copied / (warmup + 2 * steps) / 2**30,
                  offloaded=len(plan.offloaded), offloaded_gib_per_step=offloaded / (warmup + 2 * steps) / 2**30,
                  offload_host_gib=offload_host / 2**30, in_graph=plan.in_graph,
                  **(checks if graphed else {}), **probes)
    if device.type == "cuda":
        result.update(max_allocated_gib=max(first_peak, steady_peak, torch.cuda.max_memory_allocated(device)) / 2**30,
                      first_step_allocated_gib=first_peak / 2**30, steady_allocated_gib=steady_peak / 2**30,
                      max_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    if graphed:
        graphs.release()  # before the next variant builds its expert
    del model, optimizer, scheduler, acc, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def accuracy(cfg: dict, shape: tuple, device: torch.device) -> list[dict]:
    """Loss and LoRA gradients of one step with the base in bf16, in fp8 storage, and with fp8 matmuls,
    on the same random expert and inputs (the LoRA's up matrices made non-zero so every gradient is)."""
    from wanpair.models.fp8 import to_fp8_linears, use_fp8_matmul
    from wanpair.train.flow_matching import flow_matching_loss
    from wanpair.train.lora import add_lora
    from wanpair.train.speed import checkpoint_blocks

    compute = torch.bfloat16
    torch.manual_seed(0)
    model = build_expert(cfg, False, compute, device)
    params = add_lora(model, 16, 16.0)
    checkpoint_blocks(model, ["eager"] * cfg["num_layers"])
    model.train()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in params:
            if p.shape[1] == 16:  # lora_B (out, rank)
                p.normal_(0.0, 0.01, generator=g)
    x0, noise = (torch.randn(1, 16, *shape, generator=g, device=device) for _ in range(2))
    text = torch.randn(1, 512, cfg["text_dim"], generator=g, device=device)
    cond = None  # I2V: the mask and first-frame latent beside the noisy one
    if cfg["in_channels"] > 16:
        cond = torch.randn(1, cfg["in_channels"] - 16, *shape, generator=g, device=device)

    def step(t: float):
        for p in params:
            p.grad = None
        with torch.autocast(device.type, compute):
            loss = flow_matching_loss(model, x0, noise, torch.tensor([t], device=device), text, compute, cond=cond)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in params])

    rows = []
    times = (0.3, 0.9)
    ref = {t: step(t) for t in times}
    to_fp8_linears(model, compute)
    for name, mm, fast in (("fp8 storage", False, True), ("fp8 matmul, exact accumulation", True, False),
                           ("fp8 matmul", True, True)):
        use_fp8_matmul(model, mm)
        for m in model.modules():
            if hasattr(m, "fast_accum"):
                m.fast_accum = fast
        for t in times:
            loss, grad = step(t)
            rloss, rgrad = ref[t]
            rows.append(dict(accuracy=name, t=t, loss=loss, loss_bf16=rloss, loss_rel_err=abs(loss - rloss) / abs(rloss),
                             grad_rel_err=((grad - rgrad).norm() / rgrad.norm()).item(),
                             grad_cosine=torch.nn.functional.cosine_similarity(grad, rgrad, dim=0).item()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("a14b", "i2v-a14b", "tiny"), default="a14b",
                    help="i2v-a14b: the I2V expert (36 input channels, a first-frame condition beside the latent)")
    ap.add_argument("--input", choices=("image", "video", "tiny"), default="image",
                    help="tiny: 16 tokens, so the step time is mostly the host's launch overhead")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable; default: default")
    ap.add_argument("--cap-gib", type=float, help="limit this process's GPU memory (per-process memory fraction)")
    ap.add_argument("--profile", action="store_true", help="after timing, print GPU kernel time by kind")
    ap.add_argument("--validation", action="store_true", help="after timing, time one validation evaluation, "
                    "eager, compiled, and in passes of 4 samples")
    ap.add_argument("--saved", action="store_true", help="after timing, what one forward keeps for backward, per block "
                    "(dim bytes per token, by dtype and last dimension)")
    ap.add_argument("--accuracy", action="store_true", help="compare fp8 storage / matmuls with bf16 instead of timing")
    ap.add_argument("--rounds", type=int, default=1, help="run the variant list this many times (A B A B ...): a GPU "
                    "whose clocks drift during a process slows the later variants of one round (H100, 2026-12-06)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    cfg = {"a14b": A14B, "i2v-a14b": I2V_A14B, "tiny": TINY}[args.config]
    shape = SHAPES["tiny"] if args.config == "tiny" else SHAPES[args.input]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    if args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)
    if args.accuracy:
        for r in accuracy(cfg, shape, device):
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
        return 0
    rows = []
    for name in (args.variant or ["default"]) * args.rounds:
        try:
            with torch._inductor.config.patch(INDUCTOR.get(name, {})):
                r = run_variant(name, cfg, shape, args.steps, args.warmup, device, args.profile, args.validation,
                                args.saved)
        except Exception as e:  # a failed variant is a result too; go on with the others
            traceback.print_exc(limit=-12)
            r = dict(variant=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:600]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'variant':<22}{'s/step':>8}{'pipelined':>10}{'TFLOP/s':>9}{'MFU':>7}{'alloc GiB':>11}{'first s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        print(f"{r['variant']:<22}{r['median_s']:>8.3f}{r['pipelined_s']:>10.3f}{r['tflops']:>9.0f}{mfu:>7}"
              f"{r.get('max_allocated_gib', 0):>11.1f}{r['first_step_s']:>9.1f}")
    if args.rounds > 1:  # each variant's median over the rounds: what drifts in time falls on every variant alike
        medians: dict[str, list[float]] = {}
        for r in rows:
            if "error" not in r:
                medians.setdefault(r["variant"], []).append(r["median_s"])
        for name, values in medians.items():
            print(f"{name:<22} median of {len(values)} rounds {statistics.median(values):.4f} s/step "
                  f"(rounds: {', '.join(f'{v:.4f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
