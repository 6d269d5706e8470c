"""Speed levers applied to diffusers' Wan transformer as small functions (measured in docs/benchmarks.md).

- Partial activation checkpointing: only the first N transformer blocks recompute their activations
  in the backward pass; the rest keep them, spending memory to save one extra forward per block
  (N comes from `wanpair.train.memory_plan`). It plugs into diffusers' own checkpointing hook, so
  each block is still called as a module and a compiled block runs compiled inside the checkpoint.
  Streamed blocks (`wanpair.train.streaming`) checkpoint themselves.
- Compiling the repeated block with torch.compile: every block has the same code, so one compiled
  graph serves all of them; fp8 quantisation and dequantisation (`wanpair.models.fp8`) fuse into it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .streaming import StreamedCall


def checkpoint_blocks(model, n: int) -> None:
    """Recompute activations of the first `n` blocks in backward."""
    selected = {id(b) for b in list(model.blocks._modules.values())[:n]}

    def run_block(block, *args):
        if id(block) in selected and not isinstance(block, StreamedCall):
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
