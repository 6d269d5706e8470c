"""Making a loaded expert trainable and fast: one function, its steps in the order each needs the last.

1. fp8 storage: every block Linear holds its weight as e4m3 with a scale per row (`load_dit(fp8=True)`
   already did this while reading a single file; a diffusers folder is converted here).
2. LoRA: fp32 adapters on every block Linear (peft), plus kohya's rank/module dropout.
3. fp8 matmuls for the frozen base where the GPU has fp8 tensor cores; self-attention's processor
   (`wanpair.models.attention`): FlashAttention-4 where it is installed, and q, k, v's LoRA down-projections in
   one matmul -- before compiling, so that the graph holds them.
4. torch.compile of the repeated block (one graph for all 40).
5. The memory plan, for the largest batch's tokens: which blocks keep activations, which recompute them
   (inside their compiled graph, keeping their attention outputs or not), which stream from host memory,
   whether W^T is kept (`wanpair.train.memory_plan`).
6. The plan applied: transposed weights, streamed and offloaded blocks, checkpointing -- in that order,
   because streaming moves the (transposed-or-not) fp8 weights to the host and checkpointing wraps what runs.
Each step is a small function of its own module; this one only says what happens when.
"""

from __future__ import annotations

import logging

import torch

from ..models.attention import describe_attention, use_self_attention, wants_fa4
from ..models.fp8 import fp8_matmul_available, keep_transposed, to_fp8_linears, use_fp8_matmul
from ..project import TrainSettings
from .lora import add_lora, add_lora_dropouts, shared_input_projections
from .memory_plan import MemoryPlan, plan_memory
from .speed import checkpoint_blocks, compile_blocks
from .streaming import use_host_memory

log = logging.getLogger(__name__)


def prepare_expert(model, t: TrainSettings, compute_dtype: torch.dtype,
                   tokens: int = 0) -> tuple[list[torch.nn.Parameter], MemoryPlan]:
    """Steps 1-6 above on a loaded expert; returns the trainable (LoRA) parameters and the plan."""
    device = next(model.parameters()).device
    if t.fp8_base:
        to_fp8_linears(model, compute_dtype)
    params = add_lora(model, t.rank, t.alpha, t.lora_dropout, t.include_modules, t.exclude_modules)
    add_lora_dropouts(model, t.rank_dropout, t.module_dropout)
    wants_fp8_matmul = t.fp8_matmul == "on" or (t.fp8_matmul == "auto" and fp8_matmul_available(device))
    fp8_matmuls = use_fp8_matmul(model, wants_fp8_matmul)
    fa4 = wants_fa4(t.attention, device, compute_dtype)
    use_self_attention(model, fa4, shared_input_projections)
    compiled = t.compile == "on" or (t.compile == "auto" and device.type == "cuda")
    if compiled:
        compile_blocks(model)
    plan = plan_memory(model, tokens, t, device, sum(p.numel() * p.element_size() for p in params), compiled)
    if plan.transposed:
        keep_transposed(model)
    use_host_memory(model, plan.streamed, plan.offloaded, plan.in_graph)
    checkpoint_blocks(model, plan.policies())
    log.info("fp8 matmuls in %d layers; %s; %s", fp8_matmuls, describe_attention(fa4, device, compute_dtype, t.attention), plan.describe())
    return params, plan
