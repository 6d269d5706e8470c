"""Where a run spends GPU memory: how many blocks keep their activations, how many stream from the host.

The choice is made once, after the expert is loaded with its LoRA, from the memory this process may
use (the GPU's free memory, a per-process fraction, or `memory_budget_gb`) and the largest batch the
dataset holds. In order of preference, because each step costs speed:
1. every block resident and as few checkpointed as fit (a kept block saves one forward per step);
   compiled blocks are checkpointed inside their graph, and spare memory goes first to letting every
   checkpointed block keep its attention outputs (the most speed per GiB), then to kept blocks;
2. every block checkpointed, and just enough blocks streamed from pinned host memory to fit
   (`wanpair.train.streaming`; the copies hide behind compute); compiled, the streamed blocks recompute
   inside their graph like the others (1.6 % faster than around it for images, 3.4 % for long clips, H100);
3. when even every block streamed does not fit (long clips: each block's input alone is 0.31 GiB at
   32 760 tokens), compiled blocks also offload what they save for backward to pinned host memory, every
   block streaming and recomputing inside its graph.
`memory_mode = "fast"` never streams (and says so when it cannot fit); `"low"` plans for 16 GiB
(the card-sharing / 24 GB-card case) unless a budget is given.

The per-token activation sizes below are in units of the model width `dim` (bytes per token per
block / dim), measured on the H100 with the 14B expert at 3 600 tokens (docs/benchmarks.md); they
scale with width and tokens, and attention (flash / cuDNN SDPA) is linear in tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import WanpairError
from ..models.fp8 import Fp8Linear, block_linears
from .streaming import SLOTS

GIB = 2**30
LOW_MODE_BUDGET_GIB = 16.0
ACTIVATION_PER_TOKEN = 44  # x dim bytes: everything a non-checkpointed block keeps for backward
# x dim bytes, blocks checkpointed inside their compiled graph (H200, 2026-12-01): what the recompute-all policy
# still keeps (measured 0.6), and what keeping the self- and cross-attention outputs (bf16) adds up to (3.9)
IN_GRAPH_RECOMPUTE_PER_TOKEN = 1
IN_GRAPH_ATTENTION_PER_TOKEN = 5
WORKING_PER_TOKEN = 80  # x dim bytes: one block's recompute + backward in flight, plus the loss
MARGIN_GIB = 1.0  # allocator fragmentation and the odd temporary
OFFLOADS_IN_FLIGHT = 2  # blocks whose saved tensors are on the GPU at once: leaving or arriving, and in use


@dataclass
class MemoryPlan:
    budget_gib: float
    blocks: int
    checkpointed: int  # the first N blocks recompute their activations in backward
    streamed: list[int] = field(default_factory=list)  # blocks whose fp8 weights live on the host
    estimate_gib: float = 0.0
    transposed: bool = False  # keep W^T of every fp8 weight too (backward reads it instead of transposing)
    in_graph: bool = False  # resident checkpointed blocks recompute inside their compiled graph
    keep_attention: int = 0  # of those, how many keep their attention outputs (the last ones)
    offloaded: list[int] = field(default_factory=list)  # blocks whose saved tensors wait in pinned host memory

    def policies(self) -> list[str | None]:
        """Per block, how it saves for backward (`wanpair.train.speed.checkpoint_blocks`)."""
        return [None if i >= self.checkpointed else
                "eager" if not self.in_graph else
                "save-attention" if i >= self.checkpointed - self.keep_attention else "recompute"
                for i in range(self.blocks)]

    def describe(self) -> str:
        stream = (f"{len(self.streamed)} of {self.blocks} blocks streamed from pinned host memory"
                  if self.streamed else "all blocks resident")
        budget = f"; estimated peak {self.estimate_gib:.1f} of {self.budget_gib:.1f} GiB" if self.budget_gib else ""
        where = ""
        if self.in_graph and self.checkpointed:
            where = " (inside the compiled graph" + (f", {self.keep_attention} keeping their attention outputs"
                                                     if self.keep_attention else "") + ")"
        extra = ", fp8 weights also kept transposed" if self.transposed else ""
        if self.offloaded:
            extra += f", {len(self.offloaded)} keeping what they save for backward in pinned host memory"
        return f"memory plan: {stream}, {self.checkpointed} of {self.blocks} checkpointed{where}{extra}{budget}"


def _budget_gib(device: torch.device, mode: str, budget_gb: float) -> float:
    if budget_gb:
        return budget_gb
    free, total = torch.cuda.mem_get_info(device)
    usable = (free + torch.cuda.memory_reserved(device)) / GIB  # what this process holds plus what is free
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    usable = min(usable, fraction * total / GIB)
    return min(usable, LOW_MODE_BUDGET_GIB) if mode == "low" else usable


def plan_memory(model, tokens: int, settings, device: torch.device, lora_bytes: int,
                compiled: bool = False) -> MemoryPlan:
    """Choose checkpointed and streamed blocks for `tokens` tokens per batch (see the module docstring);
    `compiled`: the blocks are compiled, so they can be checkpointed inside their graph."""
    blocks = len(model.blocks)
    forced = settings.checkpoint_blocks if settings.gradient_checkpointing else 0
    if device.type != "cuda":
        return MemoryPlan(0.0, blocks, blocks if forced < 0 else min(forced, blocks))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    linears = [m for n, m in block_linears(model) if n.startswith("blocks.0.")]
    streamable = all(isinstance(m, Fp8Linear) for m in linears)
    block_gib = sum(m.weight.numel() * m.weight.element_size() for m in linears) / GIB
    transposed_gib = sum(m.weight.numel() for m in linears if getattr(m, "use_fp8_matmul", False)) / GIB
    resident = torch.cuda.memory_allocated(device) / GIB  # weights and LoRA
    return plan_for(blocks, dim, tokens, resident, lora_bytes, block_gib if streamable else 0.0, transposed_gib,
                    _budget_gib(device, settings.memory_mode, settings.memory_budget_gb), settings, compiled)


def plan_for(blocks: int, dim: int, tokens: int, resident_gib: float, lora_bytes: int, block_gib: float,
             transposed_gib: float, budget: float, settings, compiled: bool = False) -> MemoryPlan:
    """The plan from sizes alone: `resident_gib` = weights + LoRA on the GPU, `block_gib` = one block's
    streamable fp8 weights (0: not streamable), `transposed_gib` = one block's W^T (0: no fp8 matmuls).
    `plan_memory` measures these on the loaded model; `wanpair doctor` estimates them from the file."""
    forced = settings.checkpoint_blocks if settings.gradient_checkpointing else 0
    fixed = (resident_gib
             + 3 * lora_bytes / GIB  # LoRA gradients + two AdamW moments
             + blocks * tokens * dim * 2 / GIB  # each checkpoint's input
             + WORKING_PER_TOKEN * dim * tokens / GIB + MARGIN_GIB)
    per_block = dim * tokens / GIB
    tiers = (IN_GRAPH_RECOMPUTE_PER_TOKEN * per_block, IN_GRAPH_ATTENTION_PER_TOKEN * per_block) if compiled else None
    return decide(blocks, budget, fixed, ACTIVATION_PER_TOKEN * per_block, block_gib, settings.memory_mode,
                  forced, tokens, transposed_gib, tiers, 2 * per_block if compiled else 0.0)


def block_linear_params(config: dict) -> tuple[int, int]:
    """(weights, LoRA parameters per unit of rank) of one block's Linear layers, from a DiT config: the
    eight attention projections (dim x dim) and the feed-forward pair (dim x ffn, ffn x dim)."""
    dim, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    return 8 * dim * dim + 2 * dim * ffn, 8 * 2 * dim + 2 * (dim + ffn)


def pinned_allocation_bytes(nbytes: int) -> int:
    """Page-locked host memory one pinned allocation of `nbytes` takes: torch's caching host allocator rounds
    every request up to a power of two (ATen/core/CachingHostAllocator.h), so a 67.5 MiB feed-forward weight
    takes 128 MiB. (A `pinned_max_round_threshold_mb` set in PYTORCH_ALLOC_CONF turns that off above it, and
    this then over-counts.)"""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


def streamed_block_host_bytes(config: dict) -> int:
    """Pinned host memory one streamed block's fp8 weights take: each Linear weight is an allocation of its own
    (`wanpair.train.streaming.BlockStreamer`), rounded as above -- 512 MiB for a 14B block of 335 MiB."""
    dim, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    return 8 * pinned_allocation_bytes(dim * dim) + 2 * pinned_allocation_bytes(dim * ffn)


def offloaded_block_host_bytes(config: dict, tokens: int) -> int:
    """Pinned host memory one offloaded block's saved tensors take: its input (tokens x dim in bf16), rounded as
    above -- 512 MiB for a 14B block at 32 760 tokens. What its recompute policy keeps besides is smaller than a
    copy is worth (`wanpair.train.streaming.OFFLOAD_MIN_BYTES`) or shared by all blocks, and stays on the GPU."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return pinned_allocation_bytes(2 * dim * tokens)


def plan_from_config(config: dict, tokens: int, settings, budget: float, fp8_matmul: bool,
                     compiled: bool = True) -> MemoryPlan:
    """An estimate of the plan before loading anything (for `wanpair doctor`): the weights' sizes from
    the architecture instead of the allocator. The run's own plan, measured, is logged when it starts."""
    blocks, dim = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    weights, per_rank = block_linear_params(config)
    block_bytes = weights * (1 if settings.fp8_base else 2)
    # the rest, in bf16: text and time embeddings, the time projection (6 x dim), norms and biases
    other = 2 * (config["text_dim"] * dim + 8 * dim * dim + config["freq_dim"] * dim + blocks * 20 * dim)
    lora_bytes = blocks * settings.rank * per_rank * 4
    resident = (blocks * block_bytes + other + lora_bytes) / GIB
    return plan_for(blocks, dim, tokens, resident, lora_bytes, block_bytes / GIB if settings.fp8_base else 0.0,
                    weights / GIB if settings.fp8_base and fp8_matmul else 0.0, budget, settings, compiled)


def decide(blocks: int, budget: float, fixed: float, activation: float, block_gib: float, mode: str,
           forced: int, tokens: int, transposed_gib: float = 0.0,
           tiers: tuple[float, float] | None = None, input_gib: float = 0.0) -> MemoryPlan:
    """The choice itself, in GiB: `fixed` is the peak with every block resident and checkpointed (around
    the block), `activation` what each un-checkpointed block adds, `block_gib` what each streamed block
    saves (0 when blocks cannot stream: no fp8 base), `transposed_gib` what a transposed copy of one
    block's fp8-matmul weights costs (0: none use fp8 matmuls), `tiers` what a block checkpointed inside
    its compiled graph keeps (recomputing all, keeping its attention outputs; None: not compiled).
    `forced` >= 0 fixes the checkpointed count. Spare memory goes first to attention outputs (~0.6 ms
    saved per block for 0.07 GiB on the H200), then to un-checkpointed blocks (~2 ms more for 0.7 GiB),
    then, if all of them fit, to transposed weights (~10 ms per step in all)."""
    recompute, attention = tiers or (0.0, 0.0)
    base = fixed + blocks * recompute  # every block checkpointed
    if mode != "low" and base <= budget:
        if forced >= 0:
            kept = blocks - min(forced, blocks)
            if base + kept * (activation - recompute) > budget:
                raise WanpairError(
                    f"[train] checkpoint_blocks = {forced} needs about {base + kept * (activation - recompute):.1f} "
                    f"GiB for {tokens} tokens per batch, more than the {budget:.1f} GiB available; set "
                    "checkpoint_blocks = -1 (automatic).")
        elif tiers:
            spare = budget - base - blocks * (attention - recompute)
            kept = min(blocks, int(spare / (activation - attention))) if spare > 0 else 0
        else:
            kept = min(blocks, int((budget - base) / activation))
        spare = budget - base - kept * (activation - recompute)
        keep_attention = min(blocks - kept, int(spare / (attention - recompute))) if tiers else 0
        estimate = base + kept * (activation - recompute) + keep_attention * (attention - recompute)
        transposed = transposed_gib > 0 and kept == blocks and estimate + blocks * transposed_gib <= budget
        return MemoryPlan(budget, blocks, blocks - kept, [], estimate + transposed * blocks * transposed_gib, transposed,
                          bool(tiers), keep_attention)
    if base <= budget:  # "low" asked for, and it fits without streaming
        return MemoryPlan(budget, blocks, blocks, [], base, in_graph=bool(tiers))
    if mode == "fast" or forced == 0 or not block_gib:
        why = ("memory_mode = \"fast\" forbids" if mode == "fast" else
               "gradient_checkpointing = false forbids" if forced == 0 else "fp8_base = false rules out")
        raise WanpairError(
            f"the expert needs about {base:.1f} GiB with every block resident ({tokens} tokens per batch), more than "
            f"the {budget:.1f} GiB available, and {why} streaming blocks from the host. Use memory_mode = \"auto\" "
            "with fp8_base = true (streams only what does not fit), or fewer tokens (smaller resolution / fewer frames).")
    n = min(blocks, math.ceil((base - budget) / block_gib) + SLOTS)
    # n * recompute is not counted: checkpointed around itself (not compiled), a streamed block keeps only its input;
    # inside its graph it keeps what its recompute policy saves, but the measured peaks stay under this estimate
    # (`fixed` over-counts by more; H100, docs/benchmarks.md twelfth round: 14.1 GiB at 3 600 tokens against 15.8
    # planned; 27.6 at 32 760 against 28.2, where the checkpoint around the block peaked at 24.4)
    estimate = base - (n - min(SLOTS, n)) * block_gib - n * recompute
    if estimate > budget and input_gib:
        # offload every block's saved tensors (two blocks' worth in flight) and stream every block: a step this long
        # (>= ~20 000 tokens) computes a block for 100 ms or more, against ~10 ms to copy its weights, so streaming
        # them all costs next to nothing and leaves the most room (inductor's first-step autotuning, fragmentation)
        # What the recompute policy keeps besides the input (`recompute`, measured at 3 600 tokens) did not grow
        # with the tokens: at 32 760, every block streamed and only the inputs offloaded peaked at 15.7 GiB on an
        # H100 (docs/benchmarks.md, tenth round), so it is not counted here; the offloaded inputs are, but two.
        estimate = (base - (blocks - min(SLOTS, blocks)) * block_gib - blocks * recompute
                    - (blocks - min(OFFLOADS_IN_FLIGHT, blocks)) * input_gib)
        if estimate <= budget:
            return MemoryPlan(budget, blocks, blocks, list(range(blocks)), estimate, in_graph=True,
                              offloaded=list(range(blocks)))
    if estimate > budget:
        raise WanpairError(
            f"the expert needs about {estimate:.1f} GiB even with all {blocks} blocks streamed from the host"
            f"{' and what they save for backward offloaded to it' if input_gib else ''} ({tokens} tokens per batch); "
            f"the budget is {budget:.1f} GiB. Train at a smaller resolution or fewer "
            "frames, or raise memory_budget_gb if the GPU has more.")
    streamed = sorted({round((k + 0.5) * blocks / n - 0.5) for k in range(n)})  # spread evenly between kept blocks
    return MemoryPlan(budget, blocks, blocks, streamed, estimate, in_graph=bool(tiers))
