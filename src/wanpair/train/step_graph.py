"""A training step's forward and backward passes replayed as one CUDA graph per batch shape.

Eagerly, a step of the 14B expert launches ~8 700 kernels; the host launches them only a little ahead of the
GPU (the launch queue is short), so every gap in the host's work -- a Python detour, the next batch's
preparation at the step's start -- leaves the GPU idle. Captured once (`torch.cuda.CUDAGraph`, as torch's
"CUDA Graphs" notes describe), a step is one launch, and the host is free as soon as it is queued: 0.356 -> 0.337 s
a step on an H100 with FlashAttention-4, 0.375 -> 0.346 in the loop's order (docs/benchmarks.md, fifteenth round).
The real loop already queues each step before reading the last, so it gains less with torch's attention (0.367 ->
0.363 s, the median on an H100, sixteenth round) and as much with FlashAttention-4, whose shorter kernels leave
the GPU waiting on the host (the steady mean 0.366 -> 0.343 s on an H200, seventeenth round; 0.380 -> 0.353 on
an H100, eighteenth).

A graph replays the kernels on the memory it captured them with, so:
- each step's micro-batches are copied into the graph's own input tensors, and its gradients land in tensors
  that every graph shares (allocated outside the graphs' memory pool, zeroed by each graph as it starts);
- all graphs share one memory pool: they never run at once, and a graph's outputs (the loss, cloned before
  the next replay) are read before the next one runs;
- the pool holds the step's activations for the whole run, where the eager step gives them back to the
  allocator between steps. Nothing that needs them may run eagerly once a graph exists: every batch shape
  first runs eagerly (where its blocks compile), and the graphs are captured only once all have; samples,
  which need memory of their own, run after `release` (the next step captures again).

Used only where that is safe and pays (`why_not`): one process on a CUDA GPU, every block resident (a streamed
block's copies are scheduled by the host as the step runs), one micro-batch per step, no module dropout (it
decides on the host, per step), and room in the memory plan for validation beside the pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Spare memory the plan must leave for a graph (GiB): validation's passes and the allocator's slack run beside the
# pool that keeps the step's activations (a validation pass at 3 600 tokens takes 0.48 GiB, docs/benchmarks.md).
HEADROOM_GIB = 2.0
# A graph per batch shape, each with its own inputs and a pause to capture it, and none before every shape ran once:
# a dataset of more buckets than this runs eagerly (a judgement, not a measurement)
MAX_SHAPES = 8


def why_not(device: torch.device, setting: str, processes: int, plan, accumulation: int, module_dropout: float,
            n_shapes: int) -> str | None:
    """Why the steps run eagerly, or None where they are replayed as graphs. `plan`: the expert's MemoryPlan;
    `n_shapes`: how many distinct batch shapes an epoch has."""
    if setting == "off":
        return "cuda_graph = \"off\""
    if device.type != "cuda":
        return "not on a CUDA GPU"
    if processes > 1:
        return "several processes (their gradients are all-reduced between kernels)"
    if plan.streamed or plan.offloaded:
        return "blocks stream from host memory"
    if plan.checkpointed and not plan.in_graph:
        return "blocks checkpoint outside a compiled graph"
    if plan.budget_gib and plan.budget_gib - plan.estimate_gib < HEADROOM_GIB:
        return f"the memory plan leaves less than {HEADROOM_GIB:g} GiB spare"
    if accumulation > 1:
        return "gradient_accumulation_steps > 1"
    if module_dropout:
        return "module_dropout decides on the host, per step"
    if n_shapes > MAX_SHAPES:
        return f"{n_shapes} batch shapes (more than {MAX_SHAPES})"
    return None


def shape_key(micro_batches: list[tuple], weight: float) -> tuple:
    """What a captured step is specific to: every input's shape and dtype, and the loss weight."""
    return (weight, *(tuple(None if x is None else (tuple(x.shape), x.dtype) for x in mb) for mb in micro_batches))


class StepGraphs:
    """The step's passes, per batch shape: eager until every shape of the epoch has run, then captured and
    replayed. `forward_backward` stands in for `wanpair.train.step.forward_backward` and returns the same."""

    def __init__(self, params: list[torch.nn.Parameter], n_shapes: int, say: Callable[[str], None]):
        self.params, self.n_shapes, self.say = params, n_shapes, say
        self.seen: set[tuple] = set()  # shapes run eagerly (their blocks compiled)
        self.graphs: dict[tuple, tuple[list[tuple], torch.cuda.CUDAGraph, torch.Tensor]] = {}  # inputs, graph, loss
        self.grads: list[torch.Tensor] | None = None
        self.pool = None
        self.failed = False
        self.announced = False

    def forward_backward(self, eager: Callable[[list], torch.Tensor], micro_batches: list[tuple],
                         weight: float) -> torch.Tensor:
        """Queue the passes of `micro_batches` (on the device); `eager(micro_batches)` queues them without a
        graph and returns their mean loss."""
        key = shape_key(micro_batches, weight)
        if key not in self.graphs:
            if self.failed or key not in self.seen or len(self.seen) < self.n_shapes:
                self.seen.add(key)
                return eager(micro_batches)
            if not self.capture(key, eager, micro_batches):
                return eager(micro_batches)
        inputs, graph, loss = self.graphs[key]
        for static, mb in zip(inputs, micro_batches):
            for dst, src in zip(static, mb):
                if dst is not None:
                    dst.copy_(src)
        graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g  # the update reads them; it sets .grad to None after
        return loss.clone()  # the loop reads a step's loss after the next step replayed the graph

    def capture(self, key: tuple, eager: Callable[[list], torch.Tensor], micro_batches: list[tuple]) -> bool:
        """Capture the passes of batches shaped as `micro_batches` into the shared pool; False (and eager steps from
        here on, said once) where an op cannot be captured, which should not happen to the ops wanpair runs but
        would to a hook that reads a value on the host."""
        static = [tuple(None if x is None else x.clone() for x in mb) for mb in micro_batches]
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for p, g in zip(self.params, self.grads):
            p.grad = g  # the captured backward adds into them: zeroed first, inside the graph
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()  # a failed capture can leave torch's capture stream current
        try:
            with torch.cuda.graph(graph, pool=self.pool):  # synchronizes, and empties the allocator's cache first
                torch._foreach_zero_(self.grads)
                loss = eager(static)
        except RuntimeError as e:  # an op that cannot be captured: the run goes on eagerly
            torch.cuda.set_stream(stream)
            self.failed = True
            self.release()
            self.say(f"the training step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                     "its steps run without one")
            return False
        finally:
            for p in self.params:
                p.grad = None
        self.graphs[key] = (static, graph, loss)
        if not self.announced:
            self.announced = True
            self.say(f"training steps replayed as CUDA graphs ({self.n_shapes} batch shape"
                     f"{'s' if self.n_shapes > 1 else ''})")
        return True

    def release(self) -> None:
        """Free the graphs and their memory pool (before samples, and at the end); the next step captures
        again."""
        if self.graphs or self.pool is not None:
            torch.cuda.synchronize()  # a replay may still be running (an error can end the run with one queued)
            self.graphs, self.pool, self.grads = {}, None, None
            torch.cuda.empty_cache()
