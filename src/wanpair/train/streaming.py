"""Block streaming: some transformer blocks keep their fp8 weights in pinned host memory and borrow a
GPU slot only while they run -- how a 14B expert trains in 16 GiB.

A 14B expert's blocks are 40 x 351 MB in fp8. A streamed block's Linear weights live in page-locked
host memory; a few GPU "slots" (buffers shaped like one block's weights) take turns holding them.
While one block computes, the next one to run is copied into a free slot on a side CUDA stream, so
the copy (~8 ms at 45 GB/s) hides behind the compute (~10 ms per block at 3 600 tokens). CUDA
events order the two streams: a copy waits until the slot's previous block has finished with it,
and a block waits until its own copy has landed.

The use order in a training step is forward 0..39 then backward 39..0, so each streamed block is
needed twice; at the turn the last block simply stays. A streamed block is always checkpointed (its
activations are recomputed in backward with the weights fetched again), and two identity autograd
nodes around it say when its backward starts (fetch) and ends (let go). Slots are evicted least
recently used, so any call order (sampling without gradients, accumulation) stays correct; the
prefetch order is only what makes it fast.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from ..models.fp8 import Fp8Linear

SLOTS = 2  # GPU buffers for streamed blocks: one computing, one arriving


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls `callback` (a marker for "the gradient reached here")."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class BlockStreamer:
    """Owns the slots, the copy stream and which streamed block sits in which slot."""

    def __init__(self, blocks, streamed: list[int], slots: int = SLOTS):
        self.order = sorted(streamed)
        self.linears = {i: [m for m in blocks[i].modules() if isinstance(m, Fp8Linear)] for i in self.order}
        first = self.linears[self.order[0]]
        device = first[0].weight.device
        self.cuda = device.type == "cuda"  # on the CPU (tests) copies are synchronous: no streams, no events
        self.placeholder = torch.empty(0, dtype=first[0].weight.dtype, device=device)  # between uses
        for i in self.order:
            for m in self.linears[i]:
                host = torch.empty(m.weight.shape, dtype=m.weight.dtype, device="cpu", pin_memory=self.cuda)
                host.copy_(m.weight)
                m.host_weight = host
                m.weight = self.placeholder
        n_slots = min(slots, len(self.order))
        self.slots = [[torch.empty_like(m.host_weight, device=device) for m in first] for _ in range(n_slots)]
        self.holder: list[int | None] = [None] * n_slots  # block index in each slot
        self.last_use = [0] * n_slots
        self.ready = [torch.cuda.Event() for _ in range(n_slots)] if self.cuda else []
        self.free = [torch.cuda.Event() for _ in range(n_slots)] if self.cuda else []
        self.in_use: set[int] = set()
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.clock = 0
        self.copied_bytes = 0

    def _slot_of(self, i: int) -> int | None:
        return self.holder.index(i) if i in self.holder else None

    def _load(self, i: int) -> int | None:
        """Start copying block i into the least recently used slot nobody is computing with."""
        candidates = [k for k, b in enumerate(self.holder) if b not in self.in_use]
        if not candidates:
            return None
        k = min(candidates, key=lambda k: self.last_use[k])
        self.holder[k] = i
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            if self.cuda:
                self.copy_stream.wait_event(self.free[k])
            for dst, m in zip(self.slots[k], self.linears[i]):
                dst.copy_(m.host_weight, non_blocking=True)
                self.copied_bytes += dst.numel() * dst.element_size()
            if self.cuda:
                self.ready[k].record(self.copy_stream)
        return k

    def acquire(self, i: int, backward: bool = False) -> None:
        k = self._slot_of(i)
        if k is None:
            k = self._load(i)
            if k is None:
                raise RuntimeError("block streaming: every slot is busy; this is a wanpair bug")
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.ready[k])
        for m, w in zip(self.linears[i], self.slots[k]):
            m.weight = w
        self.in_use.add(i)
        self.clock += 1
        self.last_use[k] = self.clock
        nxt = self._next_use(i, backward)
        if nxt is not None and self._slot_of(nxt) is None:
            self._load(nxt)

    def release(self, i: int) -> None:
        k = self._slot_of(i)
        self.in_use.discard(i)
        for m in self.linears[i]:
            m.weight = self.placeholder
        if self.cuda:
            self.free[k].record(torch.cuda.current_stream())

    def _next_use(self, i: int, backward: bool) -> int | None:
        pos = self.order.index(i)
        if backward:
            return self.order[pos - 1] if pos > 0 else None
        if pos + 1 < len(self.order):
            return self.order[pos + 1]
        return None if torch.is_grad_enabled() else self.order[0]  # with gradients, backward starts here


class StreamedCall:
    """How a streamed block is called: fetch weights, run (checkpointed when training), let go; in
    backward the two markers fetch again and let go again."""

    def __init__(self, block: torch.nn.Module, streamer: BlockStreamer, index: int):
        self.block, self.streamer, self.index = block, streamer, index

    def __call__(self, hidden_states, *args):
        s, i = self.streamer, self.index
        if not torch.is_grad_enabled():
            s.acquire(i)
            out = self.block(hidden_states, *args)
            s.release(i)
            return out
        hidden_states = _OnBackward.apply(hidden_states, partial(s.release, i))
        s.acquire(i)
        out = checkpoint(self.block, hidden_states, *args, use_reentrant=False)
        s.release(i)
        return _OnBackward.apply(out, partial(s.acquire, i, True))


class StreamingBlockList(torch.nn.ModuleList):
    """`model.blocks` with streamed blocks: iterating (what diffusers' forward does) yields a
    `StreamedCall` for each streamed block. The modules, their names (`blocks.N...`) and so the
    LoRA's names are unchanged."""

    def __init__(self, blocks, calls: dict[int, StreamedCall]):
        super().__init__(blocks)
        self.calls = calls

    def __iter__(self):
        return (self.calls.get(i, block) for i, block in enumerate(self._modules.values()))


def stream_blocks(model, streamed: list[int], slots: int = SLOTS) -> BlockStreamer | None:
    """Move the fp8 weights of `model.blocks[i]` for i in `streamed` to pinned host memory and have
    those blocks fetched as they run. Call after LoRA is attached (the LoRA stays on the GPU)."""
    if not streamed:
        return None
    streamer = BlockStreamer(model.blocks, streamed, slots)
    blocks = list(model.blocks._modules.values())
    model.blocks = StreamingBlockList(blocks, {i: StreamedCall(blocks[i], streamer, i) for i in streamer.order})
    if streamer.cuda:
        torch.cuda.empty_cache()
    return streamer
