"""Blocks that borrow GPU memory from the host: streamed weights and offloaded inputs -- how a 14B expert
trains in 16 GiB, and on 81-frame clips in 24.

Streaming. A 14B expert's blocks are 40 x 351 MB in fp8. A streamed block's Linear weights live in page-locked
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
prefetch order is only what makes it fast. A block checkpointed around itself (not compiled) reads its
weights from the module again when it recomputes; one checkpointed inside its compiled graph has saved
the slot it ran in, so what it saves goes through saved-tensor hooks (`BlockCall`): a slot's weight is
saved as "this block's Linear j" and found in whichever slot the block sits in when its backward runs.

Offloading. A checkpointed block still keeps its input (tokens x dim in bf16: 0.31 GiB per block on an
81-frame 832x480 clip, 12.5 GiB for 40 blocks) and what its recompute policy saves. With inputs
offloaded, the same hooks copy what the block saves -- but its weights, its LoRA and the inputs it
shares with the other blocks -- to pinned host memory on a side stream as the forward leaves the block,
and copy it back as the backward reaches it, the next block's copy starting while this one computes.
This needs the block checkpointed inside its graph (around it, checkpoint holds the input itself).
The idea is activation offloading through saved-tensor hooks, as in torchtune's `OffloadActivations`
and torch's own `torch.autograd.graph.save_on_cpu`; the per-block prefetch is ours.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ..models.fp8 import Fp8Linear

SLOTS = 2  # GPU buffers for streamed blocks: one computing, one arriving
OFFLOAD_MIN_BYTES = 2**20  # smaller saved tensors stay on the GPU (a copy costs more than they take)


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
        # a slot's weights by storage: what a block's compiled graph saves of them is found again by Linear (`pack`)
        self.slot_weights = {w.untyped_storage().data_ptr(): j for slot in self.slots for j, w in enumerate(slot)}
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

    def pack(self, t: torch.Tensor) -> "_SlotWeight | None":
        """A slot's weight (or a view of it) saved for backward, as its Linear and view; None: not a slot's."""
        j = self.slot_weights.get(t.untyped_storage().data_ptr()) if t.device == self.placeholder.device else None
        return None if j is None else _SlotWeight(j, t.dtype, t.size(), t.stride(), t.storage_offset())

    def unpack(self, i: int, saved: "_SlotWeight") -> torch.Tensor:
        """Block i's weight as saved, from the slot it holds now (its backward marker has fetched it)."""
        k = self._slot_of(i)
        if k is None or i not in self.in_use:
            raise RuntimeError(f"block streaming: block {i}'s backward runs without its weights; this is a wanpair bug")
        w = self.slots[k][saved.linear]
        return w.view(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)

    def _next_use(self, i: int, backward: bool) -> int | None:
        pos = self.order.index(i)
        if backward:
            return self.order[pos - 1] if pos > 0 else None
        if pos + 1 < len(self.order):
            return self.order[pos + 1]
        return None if torch.is_grad_enabled() else self.order[0]  # with gradients, backward starts here


class _SlotWeight(NamedTuple):
    """A streamed weight as a compiled block saved it: which of the block's Linears, and the view taken."""

    linear: int
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Offloaded:
    """One tensor a block saved, in pinned host memory; `back` is it on the GPU again (usable after `event`)."""

    __slots__ = ("block", "host", "back", "event", "__weakref__")

    def __init__(self, block: int, host: torch.Tensor):
        self.block, self.host, self.back, self.event = block, host, None, None


class InputOffloader:
    """Moves what checkpointed blocks save for backward to pinned host memory and back, one block ahead.

    Copies run on a side stream: out after the block's forward (the GPU tensor's memory is kept from
    reuse until the copy has read it), back when the backward reaches the block after it (in forward
    order), so that each arrives while the block before it computes. Each block keeps one pinned byte
    buffer per tensor it saves, grown to the largest such tensor seen, so batches of several sizes share
    it; the next step's copies reuse it (same stream: overwritten only after it was copied back)."""

    def __init__(self, device: torch.device, min_bytes: int = OFFLOAD_MIN_BYTES):
        self.device, self.min_bytes = device, min_bytes
        self.cuda = device.type == "cuda"  # on the CPU (tests) copies are synchronous: no streams, no events
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: dict[int, list[torch.Tensor]] = {}  # per block: the k-th tensor it saves goes to the k-th
        self.used: dict[int, int] = {}  # per block, buffers taken since its saved tensors were last fetched back
        self.waiting: dict[int, list[weakref.ref]] = {}  # per block, saved tensors not fetched back yet
        self.ahead: set[int] = set()  # blocks whose backward has already started the next block's fetch
        self.copied_bytes = 0

    @property
    def host_bytes(self) -> int:
        """Pinned host memory held for offloaded tensors."""
        return sum(b.numel() for bufs in self.buffers.values() for b in bufs)

    def takes(self, t: torch.Tensor) -> bool:
        """Worth a copy, and of a layout a byte buffer holds (dense in order: what a block's input is)."""
        return t.device == self.device and t.is_contiguous() and t.numel() * t.element_size() >= self.min_bytes

    def pack(self, block: int, t: torch.Tensor) -> _Offloaded:
        nbytes = t.numel() * t.element_size()
        k = self.used.get(block, 0)
        self.used[block] = k + 1
        buffers = self.buffers.setdefault(block, [])
        if k == len(buffers) or buffers[k].numel() < nbytes:
            raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
            buffers[k:k + 1] = [raw]  # a smaller one it replaces goes back to torch's pinned cache after its copies
        host = buffers[k][:nbytes].view(t.dtype).view(t.shape)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory goes to no other tensor before the copy has read it
        else:
            host.copy_(t)
        self.copied_bytes += nbytes
        self.ahead.discard(block)
        saved = _Offloaded(block, host)
        self.waiting.setdefault(block, []).append(weakref.ref(saved))  # dropped with an unused graph
        return saved

    def unpack(self, saved: _Offloaded) -> torch.Tensor:
        if saved.back is None:
            self._fetch(saved.block)
        if saved.block not in self.ahead:  # once per block: the block whose backward comes next starts arriving
            self.ahead.add(saved.block)
            earlier = [b for b in self.waiting if b < saved.block]
            if earlier:
                self._fetch(max(earlier))
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(saved.event)
        return saved.back  # freed with `saved`, which autograd lets go of once the block's backward ran

    def _fetch(self, block: int) -> None:
        """Start copying everything `block` saved back to the GPU."""
        self.used[block] = 0  # its buffers are free for the next forward (whose copies queue behind these)
        for ref in self.waiting.pop(block, []):
            saved = ref()
            if saved is None:
                continue
            # allocated on the compute stream, which also frees it after the backward used it
            saved.back = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=self.device)
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory's last use is done
                with torch.cuda.stream(self.stream):
                    saved.back.copy_(saved.host, non_blocking=True)
                    saved.event = torch.cuda.Event()
                    saved.event.record(self.stream)
                saved.back.record_stream(self.stream)
            else:
                saved.back.copy_(saved.host)
            self.copied_bytes += saved.host.numel() * saved.host.element_size()


def _tensors(args) -> list[torch.Tensor]:
    if isinstance(args, torch.Tensor):
        return [args]
    if isinstance(args, (tuple, list)):
        return [t for a in args for t in _tensors(a)]
    return []


class BlockCall:
    """How a block that borrows host memory is called: fetch its weights, run, let go (streamed); in
    backward the two markers fetch again and let go again. Checkpointed inside its compiled graph
    (`in_graph`), what it saves goes through saved-tensor hooks: slot weights as "Linear j of this block",
    and, offloaded, the rest to the host; otherwise it is checkpointed around (streamed only)."""

    def __init__(self, block: torch.nn.Module, index: int, streamer: BlockStreamer | None,
                 offloader: InputOffloader | None, in_graph: bool):
        if offloader is not None and not in_graph:
            raise ValueError("offloading a block's inputs needs it checkpointed inside its compiled graph")
        self.block, self.index, self.streamer, self.offloader, self.in_graph = block, index, streamer, offloader, in_graph
        # what the block holds anyway (LoRA, norms, resident weights and W^T), by storage, once: not per call
        kept_transposed = [m.weight_t for m in block.modules() if getattr(m, "weight_t", None) is not None]
        self.own = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers(), *kept_transposed)}

    def __call__(self, hidden_states, *args):
        s, i = self.streamer, self.index
        if not torch.is_grad_enabled():
            if s:
                s.acquire(i)
            out = self.block(hidden_states, *args)
            if s:
                s.release(i)
            return out
        if s:
            hidden_states = _OnBackward.apply(hidden_states, partial(s.release, i))
            s.acquire(i)
        if self.in_graph:
            with torch.autograd.graph.saved_tensors_hooks(*self._hooks(args)):
                out = self.block(hidden_states, *args)
        else:
            out = checkpoint(self.block, hidden_states, *args, use_reentrant=False)
        if s:
            s.release(i)
            out = _OnBackward.apply(out, partial(s.acquire, i, True))
        return out

    def _hooks(self, shared_args):
        """The saved-tensor hooks for one call. What stays: the block's own parameters and buffers (weights,
        LoRA) and the inputs all blocks share (text, time, positions), held anyway; small tensors."""
        s, o, i = self.streamer, self.offloader, self.index
        shared = {t.untyped_storage().data_ptr() for t in _tensors(shared_args)} if o is not None else set()

        def pack(t):
            weight = s.pack(t) if s else None
            if weight is not None:
                return weight
            if o is not None and o.takes(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.own and ptr not in shared:
                    return o.pack(i, t)
            return t

        def unpack(saved):
            if isinstance(saved, _SlotWeight):
                return s.unpack(i, saved)
            if isinstance(saved, _Offloaded):
                return o.unpack(saved)
            return saved

        return pack, unpack


class HostBlockList(torch.nn.ModuleList):
    """`model.blocks` with blocks that borrow host memory: iterating (what diffusers' forward does) yields a
    `BlockCall` for each of them. The modules, their names (`blocks.N...`) and so the LoRA's names are unchanged."""

    def __init__(self, blocks, calls: dict[int, BlockCall]):
        super().__init__(blocks)
        self.calls = calls

    def __iter__(self):
        return (self.calls.get(i, block) for i, block in enumerate(self._modules.values()))


@dataclass
class HostMemory:
    """What a model borrows from the host: streamed blocks' weights, offloaded blocks' saved tensors."""

    streamer: BlockStreamer | None = None
    offloader: InputOffloader | None = None


def use_host_memory(model, streamed: list[int], offloaded: list[int] = (), in_graph: bool = False,
                    slots: int = SLOTS) -> HostMemory:
    """Move the fp8 weights of `model.blocks[i]` for i in `streamed` to pinned host memory and have those
    blocks fetched as they run; have the blocks in `offloaded` keep what they save for backward on the host.
    `in_graph`: the blocks are checkpointed inside their compiled graph (`wanpair.train.speed`), as offloading
    needs. Call after LoRA is attached (the LoRA stays on the GPU)."""
    if not streamed and not offloaded:
        return HostMemory()
    blocks = list(model.blocks._modules.values())
    streamer = BlockStreamer(model.blocks, streamed, slots) if streamed else None
    offloader = InputOffloader(next(model.parameters()).device) if offloaded else None
    calls = {i: BlockCall(blocks[i], i, streamer if i in streamed else None, offloader if i in offloaded else None,
                          in_graph) for i in sorted({*streamed, *offloaded})}
    model.blocks = HostBlockList(blocks, calls)
    if streamer and streamer.cuda:
        torch.cuda.empty_cache()
    return HostMemory(streamer, offloader)
