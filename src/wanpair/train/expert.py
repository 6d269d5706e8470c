"""One expert's LoRA, start to finish: the unit of work that a process, or a group of GPUs, owns.

`ExpertTraining(...).run()` goes through its stages in order:
- `setup_data`: the cached latents and text embeddings, the batches, the step count;
- `setup_model`: load the expert and make it trainable and fast (`wanpair.train.model_setup`; its steps
  replayed as CUDA graphs where safe, `wanpair.train.step_graph`), or start from an existing LoRA (`init_lora`);
- `setup_optimizer`: AdamW (or another), the learning-rate schedule, accelerate (precision, DDP);
- `resume`: continue from a saved state, bit for bit;
- `setup_validation`: the items, fixed timesteps and fixed noise of the validation loss;
- `train`: the loop -- one optimizer step per group of micro-batches (`step`), then what falls due at
  that step: the validation loss (`validate`), intermediate saves (`save_intermediate`, `save_state`),
  samples (`sample`);
- `finish`: the final LoRA.
Where it runs is the caller's choice: in the recipe's own process, or in a worker process (pair-
parallel: one expert per GPU), or on every rank of a data-parallel group, where each rank takes
every W-th micro-batch of a step, DDP averages the gradients, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from ..errors import StopRequested, WanpairError
from ..export.formats import read_lora
from ..export.merge import check_expert
from ..models.dit import DitInfo, load_dit
from ..models.tasks import expert_name, expert_noun
from ..project import Project
from ..sizes import human_seconds
from .data import CachedData, step_counts
from .flow_matching import flow_matching_loss, pad_text
from .hub_push import shared_pusher
from .lora import DTYPES, apply_max_norm, load_initial_lora, lora_pairs, lora_state_dict, save_lora
from .metadata import lora_metadata, run_identity
from .metrics import MetricsLog
from .model_setup import prepare_expert
from .optim import build_optimizer, build_scheduler
from .state import Progress, StateWriter, StopFlag, capture_rngs, host_copy, list_states, lora_params, restore_rngs
from .step import APPLIED, SCALER_SKIPPED, Verdict, finish, forward_backward, update
from .step_graph import StepGraphs, why_not
from .timesteps import sample_timesteps
from .trackers import open_trackers

log = logging.getLogger(__name__)

VALIDATION_SEED = 20_000_003  # the validation noise's own seed: the same whatever the training seed

# fp16: skips of the loss scaler in a row that are its scale settling, not a failure. accelerate's GradScaler
# (torch.amp.GradScaler defaults) starts at 2**16 and halves at each skip, so 16 skips bring it to 1 (no
# scaling); a step that still overflows then has gradients fp16 cannot hold, and counts as a bad step.
SCALER_SETTLING_SKIPS = 16

STATE_WAIT_SHOWN_S = 0.1  # the time line names the states' wait for a write from here (shorter: '0.0 s')


def every(n: int, k: int) -> bool:
    return bool(n) and k % n == 0


def intermediate_loras(t, step: int, total: int, epoch: int, epoch_end: bool) -> tuple[bool, bool]:
    """Whether an intermediate LoRA is saved after optimizer step `step` of `total`: by steps, by epochs."""
    last = step >= total
    return (every(t.save_every_n_steps, step) and not last,
            epoch_end and every(t.save_every_n_epochs, epoch) and not last)


def states_asked(t) -> bool:
    """States are written when asked for (a cadence), and then also at every intermediate LoRA save."""
    return bool(t.save_state_every_n_steps or t.save_state_every_n_epochs)


def crash_state_every(t, total: int) -> int:
    """Steps between the crash states (`crash_state`: one state, kept only while the expert trains, when no
    cadence is set): a tenth of the run, so a run killed any time loses at most ~10 % of it; 0 = none."""
    return 0 if states_asked(t) or not t.crash_state else max(1, math.ceil(total / 10))


def states_after(t, step: int, total: int, epoch: int, epoch_end: bool) -> tuple[bool, bool]:
    """Whether a training state is saved after optimizer step `step` of `total`: by steps (its cadence, beside an
    intermediate LoRA, or a crash state), at the epoch's end (its cadence, or beside that epoch's LoRA). Never
    after the last step: the final LoRA follows."""
    if step >= total:
        return False, False
    lora, epoch_lora = intermediate_loras(t, step, total, epoch, epoch_end)
    asked = states_asked(t)
    return (every(t.save_state_every_n_steps, step) or (lora and asked) or every(crash_state_every(t, total), step),
            epoch_end and (every(t.save_state_every_n_epochs, epoch) or (epoch_lora and asked)))


def validates_after(t, step: int, total: int, epoch: int, epoch_end: bool) -> bool:
    """Whether the validation loss is measured after optimizer step `step` of `total` (besides step 0's, before
    training): at its interval, at the last step, and with every intermediate LoRA (its metadata carries it)."""
    return every(t.validate_every_n_steps, step) or step >= total or any(intermediate_loras(t, step, total, epoch,
                                                                                             epoch_end))


@dataclass
class ExpertTimings:
    """Where one expert's time went in this process, from its own clocks: what a user needs to tell
    loading, compiling (the first step), training and validating apart, and to project a longer run."""

    wall_s: float = 0.0  # from the unit's start to its LoRA saved
    setup_s: float = 0.0  # reading the caches, loading the expert, preparing it, until the loop starts
    first_step_s: float = 0.0  # this process's first step, compiling included
    steps: int = 0  # the steps after it
    steps_s: float = 0.0
    validations: int = 0
    validation_s: float = 0.0
    states: int = 0  # training states saved (crash states included), and the time the loop waited for them
    states_s: float = 0.0
    state_wait_s: float = 0.0  # of states_s: for the last state's write to end (a disk slower than the cadence)
    state_bytes: int = 0  # the size of one

    def describe(self) -> str:
        parts = [f"loading {human_seconds(self.setup_s)}", f"first step {human_seconds(self.first_step_s)}"]
        if self.steps:
            parts.append(f"{self.steps} more steps {human_seconds(self.steps_s)} at {self.steps_s / self.steps:.3f} s")
        if self.validations:
            parts.append(f"{self.validations} validations {human_seconds(self.validation_s)}")
        if self.states:
            waited = (f" of which {human_seconds(self.state_wait_s)} waiting for the last write"
                      if self.state_wait_s >= STATE_WAIT_SHOWN_S else "")
            parts.append(f"{self.states} states of {self.state_bytes / 2**20:.0f} MiB {human_seconds(self.states_s)}{waited}")
        return f"{human_seconds(self.wall_s)} ({', '.join(parts)})"


@dataclass
class ExpertResult:
    expert: str
    lora: Path
    steps: int
    seconds: float
    first_epoch_loss: float
    last_epoch_loss: float
    epoch_losses: list[float]
    timings: ExpertTimings | None = None  # None: a finished LoRA kept from before
    skipped_updates: int = 0  # steps whose update was skipped (fp16 loss scale settling, non-finite): not counted

    @classmethod
    def from_json(cls, d: dict) -> "ExpertResult":
        """Back from `asdict` + JSON (a worker process's result file)."""
        timings = ExpertTimings(**d["timings"]) if d.get("timings") else None
        return cls(**{**d, "lora": Path(d["lora"]), "timings": timings})


class ExpertTraining:
    def __init__(self, project: Project, expert: str, dit: DitInfo, data: CachedData, device: torch.device,
                 sampler=None, allow_expert_mismatch: bool = False, show_bar: bool = True):
        self.p, self.t, self.expert, self.dit, self.data = project, project.settings(expert), expert, dit, data
        self.window = project.experts[expert]
        self.sampler = sampler
        self.allow_expert_mismatch = allow_expert_mismatch
        self.show_bar = show_bar  # a worker's bar would reach its parent's console as lines: the parent draws it
        self.device = device
        # accelerate keeps one process-wide state; a second unit in the same process (the next expert,
        # tests) may use another precision, so every unit starts from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # the frozen base is never sent anywhere
        self.accelerator = Accelerator(mixed_precision=self.t.mixed_precision, cpu=device.type == "cpu",
                                       kwargs_handlers=[ddp])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.writes = self.accelerator.is_main_process  # only rank 0 writes LoRAs, states, metrics, samples
        self.hub = shared_pusher(project, enabled=self.writes)  # [hub]: saved files to the Hub, in the background
        self.states = StateWriter()  # training states, written in the background

    # ---------------------------------------------------------------- stages
    def setup_data(self) -> None:
        t = self.t
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.latents, self.texts, self.conds = self.data.load()
        # The most tokens a step's batch carries (the same in every epoch: one bucket's items have one shape), and
        # how many batch shapes there are (a CUDA graph each, `wanpair.train.step_graph`)
        self.tokens = max(CachedData.tokens([self.latents[i].shape for i in idx])
                          for idx in self.data.batches(1, t.seed))
        self.n_shapes = len(self.data.batch_shapes())
        self.per_step, self.total_steps, self.epochs = step_counts(self.data.batches_per_epoch,
                                                                   t.gradient_accumulation_steps, self.world,
                                                                   t.epochs, t.max_steps)

    def setup_model(self) -> None:
        t = self.t
        self.model = load_dit(self.dit.path, dtype=t.compute_dtype, device=self.accelerator.device, info=self.dit,
                              fp8=t.fp8_base)
        try:
            self.params, self.plan = prepare_expert(self.model, t, t.compute_dtype, self.tokens)
        except WanpairError as e:  # the memory plan's verdicts are about this project's [train] settings
            raise WanpairError(f"{self.p.path}: {e}") from None
        # Queue each step before reading the last (`train`), unless blocks stream from the host (as they do
        # wherever inputs are offloaded too): then it was slower (0.558 instead of 0.489 s on an H200,
        # docs/benchmarks.md). All ranks decide alike.
        self.queue_ahead = not self.plan.streamed
        why = why_not(self.accelerator.device, t.cuda_graph, self.world, self.plan, t.gradient_accumulation_steps,
                      t.module_dropout, self.n_shapes)
        self.graphs = StepGraphs(self.params, self.n_shapes, self.say) if why is None else None
        if why and self.accelerator.device.type == "cuda":
            self.say(f"training steps run without CUDA graphs: {why}")
        if self.world > 1:
            flag = torch.tensor([float(self.queue_ahead)], device=self.accelerator.device)
            self.queue_ahead = bool(self.accelerator.reduce(flag, reduction="sum").item() == self.world)
            # every rank built the same LoRA from the seed; from here on, per-rank randomness
            torch.manual_seed(t.seed + 1_000_003 * self.rank)  # (LoRA / rank / module dropout)
            frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.model.named_buffers()]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, frozen)

    def start_from_init_lora(self) -> None:
        lora = read_lora(self.window.init_lora)
        check_expert(lora, self.expert, f"{expert_noun(self.expert)} being trained", self.allow_expert_mismatch)
        n = load_initial_lora(self.model, lora, self.t.rank, self.t.alpha)
        self.say(f"continuing from {self.window.init_lora} ({n} modules)")

    def setup_optimizer(self) -> None:
        t = self.t
        self.model.train()
        self.lora_pairs = lora_pairs(self.model)
        optimizer = build_optimizer(self.params, t, up=[up for _, up in self.lora_pairs])
        # The schedule is stepped here once per optimizer step, so accelerate does not wrap it (it would
        # step it once per process).
        self.scheduler = build_scheduler(optimizer, t, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.gen = torch.Generator().manual_seed(t.seed)  # noise and timesteps, the same stream on every rank
        self.progress = Progress()
        self.rngs_after_step: dict | None = None  # set while a step completes after the next one drew (`complete`)

    def resume(self, state: dict) -> None:
        if state.get("processes", 1) != self.world:  # each step takes micro-batches from every process
            raise WanpairError(f"{expert_noun(self.expert)}: its state was saved by a run of {state.get('processes', 1)} "
                               f"processes (GPUs), and this one has {self.world}: a step there is not a step here, so "
                               "it cannot continue. Run it on as many (the same --gpus and experts_parallel as before).")
        self.progress = Progress.from_state(state)
        named = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        restore_rngs(state["rngs"], self.gen)
        if self.world > 1:
            torch.manual_seed(self.t.seed + 1_000_003 * self.rank + state["step"])
        self.say(f"resuming {expert_noun(self.expert)} at step {self.progress.step} (epoch {self.progress.epoch})")

    def setup_validation(self) -> None:
        """Fixed timesteps spread evenly over the window and fixed noise per item (its own generator, the
        same at every evaluation and independent of training's), so the loss moves only with the LoRA."""
        t, w = self.t, self.window
        self.val_items = self.data.validation if t.validate_every_n_steps and self.writes else []
        k = t.validation_timesteps
        self.val_t = torch.tensor([(w.min_timestep + (j + 0.5) * (w.max_timestep - w.min_timestep) / k) / 1000
                                   for j in range(k)])
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        self.val_noise = [torch.randn((k, *self.latents[i].shape), generator=gen) for i in self.val_items]

    @torch.no_grad()
    def validate(self) -> float:
        """Mean flow-matching loss over the validation items x the fixed timesteps, LoRA as it is now (eval
        mode: no dropout). Forwards carry at most a training step's tokens. Compiled blocks stay compiled: their
        graph without gradients compiles once, at the first evaluation, and makes each one about 3x faster than
        running the blocks eagerly (docs/benchmarks.md, "Compiled validation")."""
        model, dev, cd = self.unwrapped, self.accelerator.device, self.t.compute_dtype
        was_training = model.training
        model.eval()
        total, n = torch.zeros((), device=dev), 0  # summed on the device: one host sync per evaluation
        with self.accelerator.autocast():
            for i, noise in zip(self.val_items, self.val_noise):
                x0, text, cond = self.latents[i].float(), pad_text([self.texts[i].float()])[0], self.conds[i]
                cond = None if cond is None else cond.float()
                chunk = max(1, self.tokens // CachedData.tokens([x0.shape]))
                for a in range(0, len(self.val_t), chunk):
                    t = self.val_t[a:a + chunk]
                    m = len(t)
                    # through pinned memory (`_on`), so that the host queues the next pass instead of waiting for
                    # this one's kernels as a copy from pageable memory would (docs/benchmarks.md, fourteenth round)
                    batch = _on(dev, (x0.expand(m, *x0.shape), noise[a:a + chunk], t, text.expand(m, *text.shape),
                                      None if cond is None else cond.expand(m, *cond.shape)))
                    loss = flow_matching_loss(model, *batch[:4], cd, cond=batch[4])
                    total += loss.float() * m  # every sample has the item's size: the batch mean is their mean
                    n += m
        model.train(was_training)
        mean = total.item() / n
        self.progress.last_val = (self.progress.step, mean)
        return mean

    def validation_row(self) -> dict:
        """The validation loss for the metrics, with the seconds it took (its share of the run's time)."""
        start = time.perf_counter()
        loss = self.validate()
        seconds = time.perf_counter() - start
        self.timings.validations += 1
        self.timings.validation_s += seconds
        return {"val_loss": loss, "val_kind": self.data.validation_kind, "val_seconds": round(seconds, 3)}

    # ---------------------------------------------------------------- the loop
    def micro_batches(self, group: list[list[int]]) -> tuple[list, torch.Tensor, tuple]:
        """This rank's micro-batches of one optimizer step (on the device), the first one's timesteps, and
        the first one itself (on the host).

        Noise and timesteps are drawn for every micro-batch of the step in order, on every rank, so the
        stream is the same whether one process runs them all or W processes share them."""
        t, w, dev = self.t, self.window, self.accelerator.device
        mine, first = [], None
        for j, idx in enumerate(group):
            x0 = torch.stack([self.latents[i] for i in idx]).float()
            text = pad_text([self.texts[i].float() for i in idx])
            cond = torch.stack([self.conds[i] for i in idx]).float() if self.data.conditioned else None
            noise = torch.randn(x0.shape, generator=self.gen)
            tt = sample_timesteps(len(idx), t.timestep_sampling, (w.min_timestep, w.max_timestep),
                                  shift=t.discrete_flow_shift, sigmoid_scale=t.sigmoid_scale, logit_mean=t.logit_mean,
                                  logit_std=t.logit_std, preserve_shape=t.preserve_distribution_shape,
                                  generator=self.gen)
            first = first or (x0, noise, tt, text, cond)
            if j % self.world == self.rank:
                mine.append(_on(dev, (x0, noise, tt, text, cond)))
        return mine, first[2], first

    def queue(self, epoch: int, g: int, groups: list[list[list[int]]]) -> "_Queued":
        """Queue the forward and backward passes of the epoch's `g`-th optimizer step on the device."""
        started = time.perf_counter()
        rngs = capture_rngs(self.gen)  # as they are before this step draws: what a state saved before it holds
        mine, first_t, first = self.micro_batches(groups[g])
        weight = self.world / len(groups[g])
        if not mine:  # fewer micro-batches than ranks at the end of an epoch: join the all-reduce with nothing
            mine, weight = [_on(self.accelerator.device, first)], 0.0
        eager = functools.partial(forward_backward, self.model, self.accelerator, compute_dtype=self.t.compute_dtype,
                                  weighting=self.t.loss_weighting, loss_weight=weight)
        local = self.graphs.forward_backward(eager, mine, weight) if self.graphs else eager(mine)
        loss = local
        if self.world > 1:
            loss = self.accelerator.reduce(local * weight * len(mine) / self.world, reduction="sum")
        samples = sum(len(idx) for idx in groups[g])
        return _Queued(epoch, g, len(groups), samples, float(1000 * first_t[0]), local, loss, rngs, started)

    def groups(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps: its batches (drawn anew each epoch, `CachedData.batches`) in groups
        of `per_step` (the last may be short)."""
        batches = self.data.batches(epoch, self.t.seed)
        return [batches[k:k + self.per_step] for k in range(0, len(batches), self.per_step)]

    def remaining_steps(self):
        """(epoch, g, groups) of every optimizer step still to run, in order; g is None for an epoch resumed
        at its very end, which has only its end left."""
        start_epoch, start_pos = self.progress.epoch, self.progress.pos  # where the loop starts
        for epoch in range(start_epoch, self.epochs + 1):
            groups = self.groups(epoch)
            first = start_pos // self.per_step if epoch == start_epoch else 0
            if first >= len(groups):
                yield epoch, None, groups
            for g in range(first, len(groups)):
                yield epoch, g, groups

    def train(self) -> None:
        """The loop, one step ahead: step k+1's forward and backward are queued on the device before step k's
        verdict is read (`wanpair.train.step`), so the GPU never waits while the host logs, saves or draws
        the next batch; step k's update was queued before them, so they see its weights. The results are
        those of the plain order, bit for bit."""
        t, expert = self.t, self.expert
        self.say(f"training {expert_noun(expert)} ({self.dit.path.name}) on timesteps {self.window.min_timestep}-"
                 f"{self.window.max_timestep}: {len(self.data.trained)} items, {self.epochs} epochs, {self.total_steps} steps"
                 + (f", data-parallel over {self.world} processes" if self.world > 1 else ""))
        self.reach(self.progress.epoch, self.progress.pos // self.per_step)  # a continued run's skips
        dev = self.accelerator.device
        header = {"total_steps": self.total_steps,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type}
        self.metrics = MetricsLog(self.p.run_dir, expert, header=header) if self.writes else None
        if self.metrics:  # opened after the log, so that an error starting one is closed with it (`run`)
            self.metrics.trackers = open_trackers(self.p, expert, self.progress.step)
        self.bar = tqdm(total=self.total_steps, initial=self.progress.step, desc=expert_name(expert), unit="step",
                        disable=not (self.writes and self.show_bar))
        if self.val_items and self.progress.step == 0 and self.metrics:
            self.metrics.log({"step": 0, **self.validation_row()})
        self.bad, self.scaler_skips, self.skipped, self.start = 0, 0, 0, time.perf_counter()
        pending: _Queued | None = None  # queued on the device, verdict not read yet
        with StopFlag() as stop:
            for epoch, g, groups in self.remaining_steps():
                if g is None:
                    self.end_epoch(epoch, self.due(self.progress.step, epoch, epoch_end=True))
                    continue
                if pending and not self.overlappable(pending):
                    self.complete(pending, stop.signum)
                    pending = None
                if self.progress.step >= self.total_steps:
                    break
                queued = self.queue(epoch, g, groups)
                if pending:
                    self.complete(pending, stop.signum, rngs=queued.rngs, next_started=queued.started)
                queued.verdict = update(self.optimizer, self.accelerator, self.params, queued.local_loss,
                                        t.max_grad_norm)
                if t.scale_weight_norms:
                    queued.norms = apply_max_norm(self.lora_pairs, t.scale_weight_norms, t.alpha / t.rank)
                pending = queued
            if pending:
                self.complete(pending, stop.signum)
        self.bar.close()

    def reach(self, epoch: int, g: int) -> None:
        """The run ends with its data (or at max_steps): when skipped updates leave fewer step positions from
        step `g` of `epoch` on than steps still to count, its last step is the last position's, and the total
        (the bar's, the dashboard's) says so. Its schedule keeps its planned length."""
        per_epoch = math.ceil(self.data.batches_per_epoch / self.per_step)  # step positions in an epoch
        reachable = self.progress.step + (self.epochs - epoch) * per_epoch + (per_epoch - g)
        if reachable < self.total_steps:
            self.total_steps = reachable
            if getattr(self, "bar", None) is not None:
                self.bar.total = reachable
                self.bar.refresh()
            if getattr(self, "metrics", None) is not None:
                self.metrics.log({"step": self.progress.step, "steps_reachable": reachable})  # total_steps: the plan

    def overlappable(self, q: "_Queued") -> bool:
        """May the next step be queued before step `q` is read? Only when nothing but its metrics falls due
        after it (`due`, assuming the step succeeds): validation, saves, samples and the run's last step wait
        for the GPU to finish first, so that their time is theirs and not counted as a step's."""
        return self.queue_ahead and not self.due(self.progress.step + 1, q.epoch, q.epoch_end).anything

    def due(self, step: int, epoch: int, epoch_end: bool) -> "Due":
        """What falls due after optimizer step `step` of `epoch` (`epoch_end`: the epoch's last step). From
        the settings alone, never from what this rank does (only rank 0 validates and samples): the loop
        asks before queueing the next step and again when this one completes, and every rank of a
        data-parallel group must queue its collectives in the same order."""
        t, last = self.t, step >= self.total_steps
        lora, epoch_lora = intermediate_loras(t, step, self.total_steps, epoch, epoch_end)
        state, epoch_state = states_after(t, step, self.total_steps, epoch, epoch_end)
        return Due(lora=lora, state=state,
                   sample=every(self.p.sample.every_n_steps, step),
                   validation=validates_after(t, step, self.total_steps, epoch, epoch_end),
                   epoch_lora=epoch_lora, epoch_state=epoch_state,
                   epoch_sample=(epoch_end or last) and every(self.p.sample.every_n_epochs, epoch),
                   last=last)

    def complete(self, q: "_Queued", signum: int, rngs: dict | None = None, next_started: float | None = None) -> None:
        """Read a queued step's verdict and do what falls due after it: metrics, validation, saves, samples,
        a requested stop, the end of its epoch. `rngs`: the generators as they were right after it (the
        next step has drawn from them since), for any state saved now. A step's time runs from its start to
        the next one's (`next_started`: queued already) or to its verdict, what the GPU took for it either way."""
        self.rngs_after_step = rngs
        lr = self.scheduler.get_last_lr()[0]  # what this step's update used: `finish` steps the schedule past it
        outcome = finish(q.verdict, self.scheduler)
        ok = outcome == APPLIED
        loss = q.loss.item()
        seconds = (next_started or time.perf_counter()) - q.started
        if self.timings.first_step_s:
            self.timings.steps += 1
            self.timings.steps_s += seconds
        else:
            self.timings.first_step_s = seconds
        if outcome == SCALER_SKIPPED:
            self.scaler_skips += 1
            if self.scaler_skips > SCALER_SETTLING_SKIPS:
                self.bad += 1
                self.say(f"step {self.progress.step + 1}: fp16 gradients overflow even at loss scale "
                         f"{self.accelerator.scaler.get_scale():g}; update skipped ({self.bad} such in a row)")
        elif not ok:
            self.bad += 1
            self.say(f"step {self.progress.step + 1}: non-finite loss or gradients ({loss}); update skipped "
                     f"({self.bad} in a row)")
        if self.bad and self.bad >= self.t.max_bad_steps:
            raise WanpairError(self.nan_diagnosis(self.bad))
        if not ok:
            self.skipped += 1
            self.reach(q.epoch, q.g + 1)
        if ok:
            self.bad = self.scaler_skips = 0
            self.progress.losses.append(loss)
            self.progress.step += 1
            self.progress.epoch, self.progress.pos = q.epoch, (q.g + 1) * self.per_step
        due = self.due(self.progress.step, q.epoch, q.epoch_end)
        if ok:
            smoothed = self.progress.smoothed
            self.progress.smoothed = smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            row = {"step": self.progress.step, "epoch": q.epoch, "loss": loss, "smoothed_loss": smoothed,
                   "lr": lr, "timestep": q.timestep, "s_per_step": round(seconds, 4),
                   "samples_per_s": round(q.samples / seconds, 3)}
            if q.norms is not None:  # logged under Musubi-Tuner's names for them
                scaled, mean, biggest = q.norms.tolist()
                row |= {"keys_scaled": int(scaled), "average_key_norm": mean, "max_key_norm": biggest}
            if due.validation and self.val_items:
                row |= self.validation_row()
            if self.metrics:
                self.metrics.log(row)
            self.bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}")
            self.bar.update()
            self.after_step(due, q.epoch)
            if self.agree(signum):
                self.bar.close()
                self.stop(signum)
        if due.last or q.epoch_end:
            self.end_epoch(q.epoch, due)
        self.rngs_after_step = None

    def end_epoch(self, epoch: int, due: "Due") -> None:
        """An epoch's last step is done, or the run's: its mean loss, the per-epoch sample and saves."""
        p = self.progress
        p.epoch_losses.append(float(np.mean(p.losses)) if p.losses else float("nan"))
        if due.epoch_sample:
            self.sample()
        if due.last:
            return
        p.losses, p.epoch, p.pos = [], epoch + 1, 0
        if due.epoch_lora:
            self.save_intermediate(epoch)
        if due.epoch_state:
            self.save_state()

    def after_step(self, due: "Due", epoch: int) -> None:
        """What falls due after an optimizer step: intermediate LoRA, state, sample; and a state that the background
        finished writing since, taken in."""
        self.state_written(block=False)
        if due.lora:
            self.save_intermediate(epoch)
        if due.state:
            self.save_state()
        if due.sample:
            self.sample()

    def agree(self, signum: int) -> bool:
        """Stop now? On several ranks all must stop at the same step, or the others would wait forever."""
        if self.world == 1:
            return bool(signum)
        flag = torch.tensor([float(bool(signum))], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def nan_diagnosis(self, bad: int) -> str:
        return (f"{bad} consecutive non-finite steps on {expert_noun(self.expert)}; stopped without saving "
                f"a broken LoRA. {self.nan_causes()}")

    def nan_causes(self) -> str:
        t = self.t
        return (f"Likely causes: learning_rate {t.learning_rate} too high (try a third), "
                + ("fp16 overflow (use mixed_precision = \"bf16\"), " if t.mixed_precision == "fp16" else "")
                + "or a corrupt cache entry (delete the cache folder and run again).")

    # ---------------------------------------------------------------- saving, sampling, stopping
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def saves_states(self) -> bool:
        return states_asked(self.t)

    def save_lora(self, out: Path, extra: dict[str, str] | None = None) -> int:
        """Write the LoRA as it is now (rank 0); returns how many modules it has."""
        if not self.writes:
            return 0
        sd = lora_state_dict(self.unwrapped, self.t.alpha, DTYPES[self.t.save_dtype])
        meta = lora_metadata(self.p, self.expert, self.dit, self.data.training_items, self.data.batch_sizes,
                             self.progress.step, len(self.progress.epoch_losses))
        if self.progress.last_val is not None:
            step, loss = self.progress.last_val
            meta |= {"wanpair.validation_loss": f"{loss:.6g}", "wanpair.validation_step": str(step),
                     "wanpair.validation_kind": self.data.validation_kind}
        save_lora(out, sd, {**meta, **(extra or {})})
        self.hub.push(out)
        return len(sd) // 3

    def save_intermediate(self, epoch: int) -> None:
        final = self.p.lora_path(self.expert)
        out = final.with_name(f"{final.stem}-step{self.progress.step:06d}{final.suffix}")
        self.save_lora(out)
        kept = self.progress.kept
        kept.append(str(out))
        while self.t.keep_last and len(kept) > self.t.keep_last:
            old = Path(kept.pop(0))
            if self.writes:
                old.unlink(missing_ok=True)

    def snapshot(self) -> dict:
        """A training state: the progress, and all else the next step depends on (`wanpair.train.state`), in host
        memory as it is now."""
        return {"expert": self.expert, "settings": asdict(self.t), "processes": self.world,
                "identity": run_identity(self.p, self.expert, self.dit, self.data.training_items, self.data.batch_sizes),
                **self.progress.to_state(),
                "lora": lora_params(self.unwrapped), "optimizer": host_copy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                "rngs": self.rngs_after_step or capture_rngs(self.gen)}

    def save_state(self, wait: bool = False) -> Path | None:
        """Snapshot a training state and write it in the background (`wait`: before returning, with its path); the
        time counted as the state's is what the loop waited (the snapshot, and the last state's write if not done)."""
        if not self.writes:
            return None
        started = time.perf_counter()
        self.state_written(block=True)  # one at a time
        self.timings.state_wait_s += time.perf_counter() - started
        self.states.start(self.p.run_dir, self.expert, self.snapshot(), self.t.keep_states if self.saves_states else 1)
        path = self.state_written(block=True) if wait else None
        self.timings.states += 1
        self.timings.states_s += time.perf_counter() - started
        return path

    def state_written(self, block: bool) -> Path | None:
        """A state the background finished writing since the last call (`block`: wait for it): its size for the
        timings, and to the Hub with `push_states`."""
        path = self.states.done(block)
        if path is not None:
            self.timings.state_bytes = path.stat().st_size
            self.hub.push_state(path)
        return path

    def sample(self) -> None:
        if self.sampler and self.writes:
            if self.graphs:
                self.graphs.release()  # sampling needs the memory the graphs keep the step's activations in
            written = self.sampler(self.unwrapped, self.expert, self.progress.step, self.accelerator.autocast,
                                   run_identity(self.p, self.expert, self.dit, self.data.training_items,
                                                self.data.batch_sizes))
            if self.metrics:
                self.metrics.log_samples(written, self.progress.step)

    def close_metrics(self, quiet: bool = False) -> None:
        """Close the metrics log once (`quiet`: a disk error while closing is not raised again)."""
        metrics, self.metrics = getattr(self, "metrics", None), None
        if metrics is not None:
            try:
                metrics.close()
            except OSError:
                if not quiet:
                    raise

    def stop(self, signum: int) -> None:
        """Ctrl-C / SIGTERM: save the state and the LoRA so far (marked partial), then stop."""
        self.close_metrics()
        path = self.save_state(wait=True)
        final = self.p.lora_path(self.expert)
        partial = final.with_name(f"{final.stem}-partial-step{self.progress.step:06d}{final.suffix}")
        self.save_lora(partial, {"wanpair.partial": "true"})
        raise StopRequested(
            f"stopped at step {self.progress.step} of {expert_noun(self.expert)}; saved {partial.name} and the "
            f"training state {path}.\nResume with:  wanpair train {self.p.path} --resume", signum or 15)

    def finish(self) -> ExpertResult:
        if self.progress.step == 0:  # every step skipped, too few in a row to stop the run: nothing was trained
            raise WanpairError(f"no update of {expert_noun(self.expert)} was applied: all its steps were skipped as "
                               f"non-finite; no LoRA saved. {self.nan_causes()}")
        self.close_metrics()
        seconds = time.perf_counter() - self.start
        out = self.p.lora_path(self.expert)
        if self.saves_states:
            self.state_written(block=True)  # a state asked for must be written (and pushed) before the run ends
        else:
            with contextlib.suppress(OSError):  # a crash state, deleted below: not pushed, not worth failing for
                self.states.done(block=True)
        modules = self.save_lora(out)
        if self.writes and not self.saves_states:  # no cadence asked for: a crash (or Ctrl-C) state has served
            for state in list_states(self.p.run_dir, self.expert):
                state.unlink(missing_ok=True)
        losses = self.progress.epoch_losses
        skipped = f", {self.skipped} updates skipped" if self.skipped else ""
        self.say(f"saved {out}  ({modules} LoRA modules, {self.progress.step} steps{skipped}, {seconds:.1f} s; mean loss "
                 f"epoch 1 {losses[0]:.4f} -> epoch {len(losses)} {losses[-1]:.4f})")
        self.timings.wall_s = time.perf_counter() - self.run_started
        return ExpertResult(self.expert, out, self.progress.step, seconds, losses[0], losses[-1], losses, self.timings,
                            self.skipped)

    def say(self, message: str) -> None:
        if self.writes:
            print(message, flush=True)

    # ---------------------------------------------------------------- all stages
    def run(self, state: dict | None = None) -> ExpertResult:
        self.run_started, self.timings = time.perf_counter(), ExpertTimings()
        self.setup_data()
        self.setup_model()
        if self.window.init_lora and state is None:
            self.start_from_init_lora()
        self.setup_optimizer()
        if state is not None:
            self.resume(state)
        self.setup_validation()
        self.timings.setup_s = time.perf_counter() - self.run_started
        try:
            self.train()
            return self.finish()
        except BaseException:
            self.close_metrics(quiet=True)  # the error that stopped the run is the one to report
            with contextlib.suppress(Exception):
                self.state_written(block=True)  # a state being written is finished (and pushed), not cut off
            raise
        finally:
            if self.graphs:  # their memory pool, before the next expert loads in this process; after a CUDA error
                with contextlib.suppress(Exception):  # its device sync fails too: that error is the one to report
                    self.graphs.release()


@dataclass(frozen=True)
class Due:
    """What falls due after an optimizer step (`ExpertTraining.due`): by step count, and at an epoch's end."""

    lora: bool  # an intermediate LoRA (save_every_n_steps)
    state: bool  # a training state (save_state_every_n_steps, or beside that LoRA)
    sample: bool  # samples (every_n_steps)
    validation: bool  # the validation loss (its interval, the last step, and every intermediate LoRA)
    epoch_lora: bool  # at the epoch's end: an intermediate LoRA (save_every_n_epochs)
    epoch_state: bool  # ... a training state (save_state_every_n_epochs, or beside that LoRA)
    epoch_sample: bool  # ... samples (every_n_epochs; also at the run's last step)
    last: bool  # the run's last step: the final LoRA follows, no intermediate saves

    @property
    def anything(self) -> bool:
        return any(astuple(self))


@dataclass
class _Queued:
    """An optimizer step whose forward and backward passes (and then its update) are queued on the device."""

    epoch: int
    g: int  # its place among the epoch's `n_groups` steps
    n_groups: int
    samples: int
    timestep: float  # the first micro-batch's, for the metrics
    local_loss: torch.Tensor  # this process's mean loss (what the update checks)
    loss: torch.Tensor  # the mean over all processes (what is logged)
    rngs: dict  # the generators before it drew its noise and timesteps
    started: float  # perf_counter when the host began it
    verdict: Verdict | None = None
    norms: torch.Tensor | None = None  # scale_weight_norms: [modules scaled, mean norm, max norm] after the update

    @property
    def epoch_end(self) -> bool:
        return self.g + 1 == self.n_groups


def _on(device: torch.device, batch: tuple) -> tuple:
    """A micro-batch moved to the device (its conditioning is None for the text-to-video pair). On a GPU
    through pinned memory, asynchronously: a plain copy from pageable memory would wait for the GPU to
    finish all queued work, and the loop queues the next step while the current one still runs. Made contiguous
    first, so that what is pinned and copied is one dense block (a validation item repeated for its timesteps is an
    expanded view)."""
    if device.type != "cuda":
        return tuple(None if x is None else x.to(device) for x in batch)
    return tuple(None if x is None else x.contiguous().pin_memory().to(device, non_blocking=True) for x in batch)
