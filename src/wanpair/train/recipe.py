"""The LoRA-pair recipe: check -> cache -> train the high-noise expert and the low-noise expert -> save
(a Wan 2.1 single model: its one LoRA over all timesteps, through the same stages).

- `preflight` (`wanpair.train.preflight`): every input validated before any model loads.
- `prepare_caches`: VAE latents and umT5 embeddings of captions and sampling prompts, content-keyed
  (`wanpair.cache`); the VAE and text encoder are freed before training.
- `plan_experts`: per expert, keep a finished LoRA that this very run made (same settings, data, base,
  window), continue from its newest state of this run, or start; a disk-full or killed run is finished
  by running the same command again.
- `train_experts`: one `ExpertTraining` unit per expert (`wanpair.train.expert`), here one after the
  other in this process, or in worker processes side by side (`wanpair.train.placement`). Same data,
  caches and settings for both experts; only the base file and the timestep window differ.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from ..atomic import write_text_atomic
from ..cache import CachePlan, CacheStats, fill, folder_fingerprint, plan
from ..errors import DISK_ERRNOS, WanpairError
from ..export.workflow import write_workflow
from ..models.text_encoder import load_text_encoder
from ..models.vae import load_vae
from ..models.tasks import expert_name, expert_noun
from ..project import Project, read_prompts
from ..sizes import human_seconds
from . import hub_push, placement
from .data import CachedData, step_counts, validation_set
from .expert import ExpertResult, ExpertTraining
from .metadata import differences, finished_lora_differences, run_identity, side_differences
from .metrics import best_validation, plot_loss, read_metrics
from .outputs import ExpertOutputs, describe
from .preflight import Checked, preflight
from .run_lock import lock_path, run_lock
from .state import list_states, load_state, state_step


@dataclass
class ExpertJob:
    """One expert to train, and the state it continues from (None: from the start)."""

    expert: str
    state: Path | None = None
    step: int = 0  # the state's
    start_over: bool = False  # --overwrite: what an earlier run of this expert made goes first
    set_aside: bool = False  # a killed run's files without a state to continue from: moved aside, then from the start
    processes: int = 0  # how many processes the state was saved by (0: no state)


class LoraPairRecipe:
    def __init__(self, project: Project, overwrite: bool = False, allow_expert_mismatch: bool = False,
                 gpus: int | None = None):
        self.p = project
        self.t = project.train
        self.overwrite = overwrite
        self.allow_expert_mismatch = allow_expert_mismatch
        self.gpus = gpus
        self.waves: list | None = None  # where the experts train, chosen by `choose_placement`
        self.checked = Checked()
        self.device = torch.device("cuda" if self.t.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if self.t.device == "auto" else self.t.device)

    @property
    def items(self):
        return self.checked.items

    @property
    def dits(self):
        return self.checked.dits

    def preflight(self, experts: tuple[str, ...]) -> None:
        self.checked = preflight(self.p, experts, self.device, self.allow_expert_mismatch)
        task, t = self.p.task, self.t
        if experts:
            print(f"model: {task.title}: " + (
                f"a LoRA per expert, high-noise on {self.p.experts['high'].min_timestep}-1000 and low-noise below"
                if task.paired else "one LoRA over all timesteps")
                  + f" -> {', '.join(self.p.lora_path(e).name for e in experts)}")
        self.choose_validation()
        if t.validate_every_n_steps:
            print(f"validation: {len(self.validation)} " + (
                "held-out items" if self.validation_kind == "held-out" else
                "training items, so it measures fit, not generalisation (add [[validation]] to dataset.toml or set "
                "validation_split)"))

    def choose_validation(self) -> None:
        """The items each expert's validation loss is measured on (`validation_set`), from the checked dataset."""
        t = self.t
        held_out = {s.index for s in self.checked.specs if s.validation}
        self.validation, self.validation_kind = validation_set(self.items, held_out, t.validation_split,
                                                               t.validation_items, t.seed)

    # ---------------------------------------------------------------- caches
    def sample_prompts(self) -> list[str]:
        cfg = self.p.sample
        if not (cfg.every_n_epochs or cfg.every_n_steps):
            return []
        return read_prompts(cfg.prompts)

    def plan_caches(self) -> CachePlan:
        """Which cache entries the checked items (and sampling prompts) need, and which are missing."""
        from ..sample import WAN_NEGATIVE_PROMPT

        m, specs = self.p.models, self.checked.specs
        vae_fp, t5_fp, tok_fp = folder_fingerprint(m.vae), folder_fingerprint(m.t5), folder_fingerprint(m.tokenizer)
        prompts = self.sample_prompts()
        self.cache_plan = plan(self.items, {s.index: s.cache_dir for s in specs}, vae_fp, t5_fp, tok_fp,
                               prompts + [WAN_NEGATIVE_PROMPT] if prompts else [], specs[0].cache_dir,
                               conditioned=self.p.task.conditioned)
        return self.cache_plan

    def prepare_caches(self) -> CacheStats:
        m = self.p.models
        self.plan_caches()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        stats = fill(
            self.items, self.cache_plan,
            load_vae_fn=lambda: load_vae(m.vae, dtype=dtype, device=self.device),
            load_text_fn=lambda: load_text_encoder(m.t5, m.tokenizer, dtype=dtype, device=self.device),
        )
        print(f"cache: {stats}")
        return stats

    def cached_data(self, paths: bool = True) -> CachedData:
        return CachedData(self.items, self.cache_plan.latent_paths if paths else [],
                          self.cache_plan.text_paths if paths else [], {s.index: s.batch_size for s in self.checked.specs},
                          self.validation, self.validation_kind, self.p.task.conditioned)

    def sampler(self):
        from ..sample import make_sampler

        return make_sampler(self.p, self.sample_prompts(), self.cache_plan.prompt_paths, self.device)

    # ---------------------------------------------------------------- which experts, from where
    def plan_experts(self, experts: tuple[str, ...], resume: str | None) -> tuple[list[ExpertJob], list[str]]:
        """(experts to train, each from its state or the start; experts whose finished LoRA is kept).

        Nothing is removed here, and nothing an earlier run made is ever replaced without `--overwrite`: each
        expert keeps its finished LoRA of this very run, or continues from its newest state (or the one
        `--resume` names) when that state trains the same thing -- settings that only change how or where the
        work runs (`SIDE_SETTINGS`) may differ --, or starts when it has no earlier work. Anything else is
        refused, all experts' problems at once, naming what changed and the two ways on."""
        if self.overwrite and resume:
            raise WanpairError("--resume continues a run and --overwrite starts it over: pass one of them.")
        explicit = Path(resume).expanduser().resolve() if resume not in (None, "latest") else None
        if explicit is not None and not explicit.is_file():
            raise WanpairError(f"--resume {explicit}: no such training state file.")
        named = load_state(explicit, mapped=True) if explicit is not None else None
        if named is not None and named["expert"] not in experts:
            raise WanpairError(f"--resume {explicit}: that state is of the {expert_noun(named['expert'])}, which this "
                               f"command does not train ({', '.join(experts)}).")
        jobs, kept, problems = [], [], []
        for e in experts:
            if self.overwrite:
                jobs.append(ExpertJob(e, start_over=True))
                continue
            identity = self.identity(e)
            outputs = ExpertOutputs(self.p, e)
            if outputs.final.exists():
                changed = finished_lora_differences(outputs.final, identity)
                if changed is None:
                    kept.append(e)
                    print(f"keeping {outputs.final.name}: this project already trained it with these settings and "
                          "data (--overwrite trains it again)")
                    if named is not None and named["expert"] == e:
                        problems.append(f"--resume {explicit}: {outputs.final.name} is already finished; to train it "
                                        f"again from that state, move {outputs.final.name} away first.")
                else:
                    problems.append(f"{outputs.final} already exists, made with a different {', '.join(changed)}. "
                                    f"Restore {'them' if len(changed) > 1 else 'it'} to keep it, train it again with "
                                    f"{self.overwrite_flags(e)} (removes it and that run's states, intermediate LoRAs, "
                                    "metrics and samples), or change `name`.")
                continue
            path = explicit if named is not None and named["expert"] == e else (outputs.states() or [None])[-1]
            saved = (named if path == explicit else load_state(path, mapped=True)) if path is not None else None
            newer = [s for s in outputs.states() if s != path and state_step(s) > saved["step"]] if saved else []
            if newer:  # they would outlive this continuation, and a later rerun would take them for its own
                problems.append(f"--resume {path.name}: {expert_noun(e)} has newer states ({', '.join(s.name for s in newer)}) "
                                f"of the run it would leave. Move them out of {newer[0].parent} to continue from the "
                                "older one, or resume from the newest.")
                continue
            if saved is None:  # a run killed before its first state (or without them): it starts again
                jobs.append(ExpertJob(e, set_aside=bool(outputs.earlier_work())))
                continue
            changed = differences(saved.get("identity") or {}, identity, outputs=False)
            if changed:
                problems.append(f"{expert_noun(e)}: its saved state {path.name} (step {saved['step']}) is from a run with "
                                f"a different {', '.join(changed)}. To continue it, restore "
                                f"{'them' if len(changed) > 1 else 'it'}; to start over, pass {self.overwrite_flags(e)} "
                                "(removes that run's states, intermediate LoRAs, metrics and samples).")
                continue
            side = side_differences(saved.get("settings", {}), self.p)
            print(f"continuing {expert_noun(e)} from {path.name} (step {saved['step']})"
                  + (f"; changed since, without changing what is trained: {', '.join(side)}" if side else ""))
            jobs.append(ExpertJob(e, path, saved["step"], processes=saved.get("processes", 1)))
        if resume and not problems and not kept and not any(j.state for j in jobs):
            problems.append(f"no saved training state in {self.p.run_dir / 'state'}; set save_state_every_n_steps "
                            "(or _epochs) in [train] so a run can be resumed.")
        if problems:
            raise WanpairError("cannot start training:\n" + "\n".join(f"- {p}" for p in problems))
        return jobs, kept

    def choose_placement(self, jobs: list[ExpertJob]) -> None:
        """Where the planned experts train (`placement.choose`: this command's --gpus, the states' process counts
        kept), before anything of an earlier run is tidied away: a refusal here leaves it all as it was."""
        self.waves = placement.choose([j.expert for j in jobs], self.device, self.t.experts_parallel, self.gpus,
                                      {j.expert: j.processes for j in jobs if j.processes}) if jobs else None

    def identity(self, expert: str) -> dict[str, str]:
        """What makes a LoRA or state this expert's run's (`run_identity`): known after the preflight, before the
        caches."""
        data = self.cached_data(paths=False)
        return run_identity(self.p, expert, self.dits[expert], data.training_items, data.batch_sizes)

    def overwrite_flags(self, expert: str) -> str:
        """How to start one expert over: `--overwrite` removes the work of every expert the command trains."""
        return f"--overwrite --expert {expert}" if self.p.task.paired else "--overwrite"

    def forget_replaced_runs(self, jobs: list[ExpertJob]) -> None:
        """What the planned jobs replace: with --overwrite, everything an expert's earlier run made; when
        continuing, the metrics rows a killed run logged after its state; when starting without earlier work,
        stray rows of a run that saved nothing."""
        for job in jobs:
            outputs = ExpertOutputs(self.p, job.expert)
            if job.start_over:
                n = outputs.remove_all()
                if n:
                    print(f"--overwrite: removed {n} files an earlier run of {expert_noun(job.expert)} made")
            elif job.set_aside:
                folder, moved = outputs.set_aside()
                print(f"{expert_noun(job.expert)}: an earlier run left {describe(moved, self.p.run_dir)} and no training state "
                      f"to continue from; they are set aside in {folder} (nothing deleted), and it trains from the "
                      "start")
            outputs.forget_metrics_after(job.step, including_start=job.state is None)

    # ---------------------------------------------------------------- training
    def train_experts(self, jobs: list[ExpertJob]) -> list[ExpertResult]:
        """Run each job's unit where `placement` says: here, one after the other, or in worker processes."""
        if not jobs:
            return []
        waves = self.waves  # chosen when the run was planned (`choose_placement`): the states' process counts kept
        if waves is None:
            return self.train_here(jobs)
        print(f"placement: {placement.describe(waves)}")
        data = self.cached_data()
        handoff = {"project": str(self.p.path), "device": self.device.type, "data": data.to_json(),
                   "prompts": self.sample_prompts(), "prompt_paths": [str(p) for p in self.cache_plan.prompt_paths],
                   "allow_expert_mismatch": self.allow_expert_mismatch}
        starts = {j.expert: (j.state, j.step) for j in jobs}
        totals = {g.expert: step_counts(data.batches_per_epoch, self.t.gradient_accumulation_steps, g.processes,
                                        self.p.settings(g.expert).epochs, self.p.settings(g.expert).max_steps)[1]
                  for wave in waves for g in wave}
        for job in jobs:
            placement.result_path(self.p.run_dir, job.expert).unlink(missing_ok=True)
        lock = lock_path(self.p.output_dir, self.p.name)
        placement.run_waves(waves, handoff, self.p.run_dir, starts, totals, lock)
        return [ExpertResult.from_json(json.loads(placement.result_path(self.p.run_dir, j.expert).read_text()))
                for j in jobs]

    def train_here(self, jobs: list[ExpertJob]) -> list[ExpertResult]:
        """Each expert in turn, in this process (on every rank, under a launcher)."""
        data, sampler, results = self.cached_data(), self.sampler(), []
        with hub_push.uploads_drained():  # [hub]: the experts' uploads, which went on while the next one trained
            for job in jobs:
                unit = ExpertTraining(self.p, job.expert, self.dits[job.expert], data, self.device, sampler,
                                      self.allow_expert_mismatch)
                results.append(unit.run(load_state(job.state) if job.state else None))
                del unit
                gc.collect()  # the expert just trained is garbage now: free its memory before the next loads
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return results

    def kept_result(self, expert: str) -> ExpertResult:
        """A finished LoRA that is kept, described from the metrics its run logged."""
        rows = [r for r in read_metrics(self.p.run_dir / "metrics.jsonl") if r.get("expert") == expert and "loss" in r] \
            if (self.p.run_dir / "metrics.jsonl").exists() else []
        epochs = sorted({r["epoch"] for r in rows})
        losses = [float(np.mean([r["loss"] for r in rows if r["epoch"] == ep])) for ep in epochs] or [float("nan")]
        return ExpertResult(expert, self.p.lora_path(expert), max((r["step"] for r in rows), default=0), 0.0,
                            losses[0], losses[-1], losses)

    def run(self, experts: tuple[str, ...] | None = None, resume: str | None = None,
            resume_from_hub: str | None = None) -> list[ExpertResult]:
        """The whole recipe (for `experts`, default: all the model has). `resume`: a state file, or "latest"
        for each expert's newest state of this run; `resume_from_hub`: a repository whose newest states of this
        run are fetched first (`hub_push.fetch_states`), then "latest".

        Started by torchrun / accelerate launch on several ranks, every rank runs it: all check and plan
        alike, rank 0 holds the lock and writes, each node's first rank fills the caches before the others
        read them, and each expert trains data-parallel over all ranks."""
        ranks = PartialState(cpu=self.device.type == "cpu") if placement.launched_by_torchrun() else None
        if ranks is not None:
            self.device = ranks.device
        first = ranks is None or ranks.is_main_process
        experts = experts or self.p.task.experts
        clock = {"start": time.perf_counter()}
        with run_lock(self.p.output_dir, self.p.name) if first else contextlib.nullcontext():
            self.preflight(experts)
            clock["checked"] = time.perf_counter()
            if resume_from_hub:
                if first:
                    hub_push.fetch_states(self.p, resume_from_hub, experts, self.identity)
                if ranks is not None:
                    ranks.wait_for_everyone()  # the states are in place before any rank plans from them
                resume = "latest"
            jobs, kept = self.plan_experts(experts, resume)
            self.choose_placement(jobs)
            if ranks is not None:
                ranks.wait_for_everyone()  # every rank has read the states before rank 0 tidies them
            try:
                if first:
                    self.forget_replaced_runs(jobs)
                with ranks.local_main_process_first() if ranks is not None else contextlib.nullcontext():
                    self.prepare_caches()
                clock["cached"] = time.perf_counter()
                trained = {r.expert: r for r in self.train_experts(jobs)}
                results = [trained[e] if e in trained else self.kept_result(e) for e in experts]
                if first:
                    print(f"loss plot: {plot_loss(self.p.run_dir / 'metrics.jsonl', self.p.run_dir / 'loss.png')}")
                    seconds = {"total": time.perf_counter() - clock["start"],
                               "check": clock["checked"] - clock["start"], "cache": clock["cached"] - clock["checked"]}
                    print(time_line(seconds, [r for r in results if r.timings]))
                    summary = {"project": str(self.p.path), "name": self.p.name, "device": str(self.device),
                               "seconds": seconds,
                               "experts": [asdict(r) | {"lora": str(r.lora)} | self.validation_summary(r.expert)
                                           for r in results]}
                    write_text_atomic(self.p.run_dir / "summary.json", json.dumps(summary, indent=2))
                    if all(self.p.lora_path(e).exists() for e in self.p.task.experts):  # the pair is there
                        print(f"ComfyUI workflow (each LoRA on its expert): {write_workflow(self.p)}")
            except OSError as e:
                if e.errno not in DISK_ERRNOS:
                    raise
                raise WanpairError(self.disk_error(e, experts)) from None
        return results

    def validation_summary(self, expert: str) -> dict:
        """The step with the lowest validation loss, and the saved LoRA nearest to it (printed, and kept in
        summary.json): which of the intermediate saves to use."""
        metrics = self.p.run_dir / "metrics.jsonl"
        best = best_validation(read_metrics(metrics), expert) if metrics.exists() else None
        if best is None:
            return {}
        step, value, kind = best
        final = self.p.lora_path(expert)
        saved = {int(p.stem.rsplit("-step", 1)[1]): p for p in ExpertOutputs(self.p, expert).intermediate_loras()}
        rows = [r for r in read_metrics(metrics) if r.get("expert") == expert and "loss" in r]
        saved[max((r["step"] for r in rows), default=0)] = final
        nearest = min(saved, key=lambda s: (abs(s - step), -s))
        print(f"{expert_name(expert)}: lowest validation loss {value:.4f} ({kind}) at step {step}; nearest saved LoRA: "
              f"{saved[nearest].name}" + ("" if kind == "held-out" else
                                          " (no held-out data: add [[validation]] to measure generalisation)"))
        return {"best_validation_step": step, "best_validation_loss": value, "validation_kind": kind,
                "nearest_saved_lora": str(saved[nearest])}

    def disk_error(self, e: OSError, experts: tuple[str, ...]) -> str:
        """One clear message for a full or failing disk: where, what is saved, and how to finish."""
        where = Path(e.filename).parent if e.filename else self.p.output_dir
        saved = [self.p.lora_path(x).name + " (finished)" for x in experts if self.p.lora_path(x).exists()]
        saved += [f"{s.name} (state)" for x in experts for s in list_states(self.p.run_dir, x)[-1:]]
        return (f"writing to {where} failed: {e.strerror}. Nothing half-written was left under a final name. "
                f"Saved: {', '.join(saved) or 'no LoRA or state yet'}. Free space (or fix the disk) and run the same "
                "command again: finished experts are kept and the others continue from their last state or start again.")


def time_line(seconds: dict[str, float], trained: list[ExpertResult]) -> str:
    """Where the run's time went, from its own clocks (each expert's in its own process when they train
    side by side, so their times overlap then)."""
    experts = "".join(f"; {expert_name(r.expert)} {r.timings.describe()}" for r in trained)
    return (f"time: {human_seconds(seconds['total'])} — check {human_seconds(seconds['check'])}, "
            f"cache {human_seconds(seconds['cache'])}{experts}")
