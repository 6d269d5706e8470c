"""Speed levers applied to diffusers' Wan transformer as small functions (measured in docs/benchmarks.md).

- Partial activation checkpointing: only the first N transformer blocks recompute their activations
  in the backward pass; the rest keep them, spending memory to save one extra forward per block.
  It plugs into diffusers' own checkpointing hook, so each block is still called as a module and
  a compiled block runs compiled inside the checkpoint.
- Compiling the repeated block with torch.compile: every block has the same code, so one compiled
  graph serves all of them. Not combined with diffusers' fp8 layerwise casting: its hook casts the
  weight back to fp8 after the forward, and the compiled backward (or a checkpoint's recompute)
  then finds an fp8 weight where it saved a bf16 one; the project file refuses the combination.
"""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model, n: int) -> int:
    """Recompute activations of the first `n` blocks (n < 0: all) in backward; returns how many."""
    blocks = list(model.blocks)
    n = len(blocks) if n < 0 else min(n, len(blocks))
    selected = {id(b) for b in blocks[:n]}

    def maybe_checkpoint(block, *args):
        if id(block) in selected:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=maybe_checkpoint)
    return n


def compile_blocks(model) -> None:
    """torch.compile each transformer block in place (one graph, reused by all blocks)."""
    for block in model.blocks:
        block.compile()
