"""Speed levers applied to diffusers' Wan transformer as small functions (measured in docs/benchmarks.md).

- Partial activation checkpointing: only some transformer blocks recompute their activations in the
  backward pass; the rest keep them, spending memory to save one extra forward per block (which, from
  `wanpair.train.memory_plan`). A compiled block is checkpointed inside its own graph, keeping nothing
  or only its attention outputs (selective checkpointing), which is faster than a checkpoint around
  the compiled block at about the same memory; blocks that are not compiled are checkpointed around.
  It plugs into diffusers' own checkpointing hook, so each block is still called as a module.
  Streamed blocks (`wanpair.train.streaming`) that are not compiled are checkpointed around in their own call.
- Compiling the repeated block with torch.compile: every block has the same code, so one compiled
  graph serves all of them; fp8 quantisation and dequantisation (`wanpair.models.fp8`) fuse into it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models import attention as _registers_wanpair_flash_attention  # noqa: F401  (torch.ops.wanpair)


def _recompute_all(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_RECOMPUTE


_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_efficient_attention") if hasattr(torch.ops.aten, name)} | {torch.ops.wanpair.flash_attention.default}


def _save_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# What a block checkpointed inside its compiled graph keeps for backward: nothing but its input, or its two
# attention outputs too (then attention is not recomputed), or what inductor's partitioner picks (it keeps the
# matmul outputs: faster, but ~4x the memory of "save-attention"; measured for comparison in bench/train_step.py).
IN_GRAPH_POLICIES = {"partitioner": None, "recompute": _recompute_all, "save-attention": _save_attention}


class InGraphCheckpoint:
    """Mixed into a block's class: its forward runs inside `checkpoint`, so that torch.compile traces the
    checkpoint into the block's own graph and the recompute runs inside the compiled backward (no second
    call of the compiled block from Python, and what the policy keeps is not recomputed at all)."""

    context_fn = None  # a selective-checkpoint policy's contexts; None: inductor's partitioner decides
    base_class: type

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        if self.context_fn is None:
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, context_fn=self.context_fn, **kwargs)


# AOTAutograd caches a graph with a selective-checkpoint policy only if the policy says what it is
# (torch/_functorch/_aot_autograd/autograd_cache.py, `_collect_context_fn_hashes`): this file's source
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@functools.cache
def _in_graph_class(cls: type, policy: str) -> type:
    fn = IN_GRAPH_POLICIES[policy]
    context = None
    if fn:
        context = functools.partial(create_selective_checkpoint_contexts, fn)
        context.cache_hash = f"wanpair-{policy}-{_SOURCE_HASH}"
    return type(f"InGraphCheckpointed{cls.__name__}", (InGraphCheckpoint, cls), {"context_fn": context, "base_class": cls})


def checkpoint_blocks(model, policies: list[str | None]) -> None:
    """Apply a memory plan's choice per block (`MemoryPlan.policies`): None keeps the block's activations for
    backward; "eager" recomputes them around the (compiled) block; a key of IN_GRAPH_POLICIES recomputes
    them inside its compiled graph. A streamed block's "eager" is its own call's (`wanpair.train.streaming`)."""
    blocks = list(model.blocks._modules.values())
    if any(p in IN_GRAPH_POLICIES for p in policies):
        # torch warns once that a policy's region must hold no in-place ops; the block's gradients match a
        # kept block's (tests/test_speed_levers.py; compiled on a CPU: within the 0.8 % bf16 difference that
        # compiling alone makes), so the warning would only alarm users
        logging.getLogger("torch._higher_order_ops.wrap").setLevel(logging.ERROR)
    eager = set()
    for block, policy in zip(blocks, policies):
        if isinstance(block, InGraphCheckpoint):
            block.__class__ = block.base_class
        if policy in IN_GRAPH_POLICIES:
            block.__class__ = _in_graph_class(type(block), policy)
        elif policy == "eager":
            eager.add(id(block))

    def run_block(block, *args):
        if id(block) in eager:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=run_block)


def compile_blocks(model) -> None:
    """torch.compile each transformer block in place (one graph, reused by all blocks)."""
    for block in model.blocks._modules.values():
        block.compile()


def eager():
    """Run compiled blocks eagerly for a while (torch >= 2.6; elsewhere nothing changes): a pass without
    gradients (a sample, a validation loss) would otherwise compile a second graph of every block."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()
