"""Everything checked before any model loads, with every problem reported at once.

The project's settings against the device; the weight files (kinds, the expert order, one file for
both experts, I2V/TI2V files); `init_lora`s made for the other expert; the dataset (via `wanpair
check`); a warm-up shorter than the run (its steps follow from the dataset); a writable output folder
with room for caches, LoRAs and states. A run that would fail after an hour of training fails here, in
seconds, with the file and the fix named.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import torch

from ..atomic import writable_from
from ..data.dataset_config import DatasetSpec, load_dataset_config
from ..data.items import Item, check_dataset, require_clean, stills_problem
from ..errors import WanpairError
from ..export.formats import read_lora
from ..export.merge import check_expert, check_pair
from ..hub import hub_problems
from ..models.attention import attention_problem
from ..models.dit import DitInfo, dit_problems
from ..models.kinds import other_model_problems
from ..models.tasks import expert_noun
from ..models.text_encoder import TEXT_LEN, load_tokenizer
from ..project import Project
from ..sizes import human_bytes
from .data import CachedData, step_counts, validation_set
from .lora import check_initial_lora
from .memory_plan import block_linear_params
from .optim import build_optimizer, warmup_steps
from .trackers import tracker_problems


@dataclass
class Checked:
    """What the preflight learned on the way: the dataset's specs and items, and both experts' files."""

    specs: list[DatasetSpec] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    dits: dict[str, DitInfo] = field(default_factory=dict)


def no_cuda_problem() -> str:
    """`device = "cuda"` where torch sees no CUDA GPU: what to do, for a CPU build of torch or a hidden GPU."""
    why = ("this torch is a CPU build" if torch.version.cuda is None else
           f"torch (built for CUDA {torch.version.cuda}) sees no GPU: check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    return (f"[train] device = \"cuda\" but {why}; install the CUDA build of torch for your driver (README, "
            "\"On a fresh GPU machine\"), or set device = \"auto\" to use what there is.")


def preflight(project: Project, experts: tuple[str, ...], device: torch.device,
              allow_expert_mismatch: bool = False, quiet: bool = False) -> Checked:
    t, found, problems = project.train, Checked(), []
    no_gpu = device.type == "cuda" and not torch.cuda.is_available()
    if no_gpu:
        problems.append(no_cuda_problem())
    if device.type == "cpu" and t.mixed_precision == "fp16":
        problems.append("[train] mixed_precision = \"fp16\" needs a GPU; use \"bf16\" on the CPU.")
    if device.type == "cuda" and not no_gpu and t.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        problems.append(f"[train] mixed_precision = \"bf16\" but {torch.cuda.get_device_name()} has no bf16; "
                        "use \"fp16\" (the Musubi recipe's setting) on this GPU.")
    if not no_gpu and (problem := attention_problem(t.attention, device, t.compute_dtype)):
        problems.append(problem)
    problems += other_model_problems(project.models)
    try:
        tokenizer = load_tokenizer(project.models.tokenizer)
    except WanpairError as e:
        problems.append(f"[models] tokenizer: {e}")
        tokenizer = None
    dit_found, found.dits = dit_problems(project.task, {e: project.dit_path(e) for e in project.task.experts})
    problems += dit_found
    for expert in experts:
        init = project.experts[expert].init_lora
        if init:
            try:
                lora, what = read_lora(init), f"{expert_noun(expert)} being trained"
                check_expert(lora, expert, what, allow_expert_mismatch)
                check_pair(lora, project.task, what, allow_expert_mismatch)
                check_initial_lora(lora, project.settings(expert).rank)
            except WanpairError as e:
                problems.append(f"[experts.{expert}] init_lora {init}: {e}")
    try:
        found.specs = load_dataset_config(project.dataset_config)
        report = check_dataset(found.specs, tokenizer)
        if not quiet:
            print(report.render())
        found.items = require_clean(report, shown=not quiet)
    except WanpairError as e:
        problems.append(str(e))
    if problem := stills_problem(project.task, found.items):
        problems.append(problem)
    problems += check_warmup(project, found, experts)
    problems += check_optimizer(project)
    problems += tracker_problems(t.log_with, project.path)
    problems += hub_problems(project) if experts else []  # [hub] repo: a token, before hours of training
    problems += check_disk(project, experts, found, quiet)
    if problems:
        raise WanpairError("cannot start training:\n" + "\n".join(f"- {p}" for p in problems))
    return found


def check_warmup(project: Project, found: Checked, experts: tuple[str, ...]) -> list[str]:
    """A warm-up as long as the run never reaches the learning rate it was given. The run's optimizer steps
    are known only once the dataset is read: the items trained on (not those held out for validation), in
    batches as the training unit cuts them, counted for one process (data-parallel runs take fewer). Each
    expert counts its own steps ([experts.<expert>] epochs / max_steps)."""
    t = project.train
    if t.lr_scheduler == "constant" or not found.items:  # "constant" has no warm-up
        return []
    held_out = {s.index for s in found.specs if s.validation}
    validation = validation_set(found.items, held_out, t.validation_split, t.validation_items, t.seed)
    data = CachedData(found.items, [], [], {s.index: s.batch_size for s in found.specs}, *validation)
    batches = data.batches_per_epoch
    problems = []
    for expert in experts:
        e = project.settings(expert)
        _, total, _ = step_counts(batches, t.gradient_accumulation_steps, 1, e.epochs, e.max_steps)
        warmup = warmup_steps(e, total)
        if warmup < total:
            continue
        key = "lr_warmup_steps" if t.lr_warmup_steps else "lr_warmup_ratio"
        accumulated = f" / gradient_accumulation_steps {t.gradient_accumulation_steps}" \
            if t.gradient_accumulation_steps > 1 else ""
        run = f"max_steps = {e.max_steps}" if e.max_steps and total == e.max_steps else \
            f"{batches} batches per epoch{accumulated} x {e.epochs} epoch{'s' if e.epochs > 1 else ''}"
        whose = f"{expert_noun(expert)}'s run has" if project.experts[expert].overrides.keys() & {"epochs", "max_steps"} \
            else "the run has"
        problem = (f"{project.path}: [train] {key} = {getattr(t, key)!r} warms up over {warmup} steps, but {whose} "
                   f"{total} optimizer steps ({run}): the learning rate would still be rising when training ends. "
                   f"Warm up over fewer than {total} steps, or train longer.")
        if problem not in problems:
            problems.append(problem)
    return problems


def check_optimizer(project: Project) -> list[str]:
    """The optimizer with its `optimizer_args`, built once for a throwaway parameter: a misspelt argument, an
    impossible value or a missing package is named now, not after the expert has loaded."""
    try:
        down, up = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))  # as LoRA+ groups them
        for expert in project.task.experts:
            build_optimizer([down, up], project.settings(expert), up=[up])
    except WanpairError as e:
        return [f"{project.path}: [train] {e}"]
    return []


def check_disk(project: Project, experts: tuple[str, ...], found: Checked, quiet: bool = False) -> list[str]:
    """Is the output folder writable, and is there room for caches, LoRAs and states? (an estimate) Nothing is
    written: a check (`wanpair doctor`, the dashboard's plan) leaves no folder behind; a folder not made yet is
    judged by the nearest one that exists (access(2) also says no on a read-only mount)."""
    t, out = project.train, project.output_dir
    existing, writable = writable_from(out)
    if not writable:
        return [f"output_dir {out} is not writable ({existing} is not a folder you can write to); choose another "
                "output_dir."]
    if not found.items or not found.dits:
        return []
    cfg = next(iter(found.dits.values())).config
    cadence = t.save_state_every_n_steps or t.save_state_every_n_epochs
    states = (t.keep_states or 10) + 1 if cadence else 2 if t.crash_state else 0  # +1: a new one before the oldest goes
    channels = 32 if project.task.conditioned else 16  # I2V entries also hold the first frame's latent
    need = sum(channels * ((it.frames - 1) // 4 + 1) * (it.bucket[0] // 8) * (it.bucket[1] // 8) * 4
               + TEXT_LEN * cfg["text_dim"] * 2 for it in found.items)  # the caches
    # steps per epoch at most one per item and repeat (batch size 1, one process); max_steps bounds the run
    per_epoch = sum(it.num_repeats for it in found.items)
    for expert in experts:
        e = project.settings(expert)
        lora_params = cfg["num_layers"] * e.rank * block_linear_params(cfg)[1]
        lora_bytes = lora_params * (4 if t.save_dtype == "fp32" else 2)
        steps = min(e.max_steps, e.epochs * per_epoch) if e.max_steps else e.epochs * per_epoch
        epochs = -(-steps // per_epoch)
        made = (epochs // t.save_every_n_epochs if t.save_every_n_epochs else 0) + \
            (steps // t.save_every_n_steps if t.save_every_n_steps else 0)  # intermediate LoRAs
        saves = 1 + min(made, t.keep_last or made)
        need += saves * lora_bytes + states * lora_params * 4 * 3
    free = shutil.disk_usage(existing).free
    if not quiet:
        print(f"disk: about {human_bytes(need)} needed for caches, LoRAs and states; {human_bytes(free)} free in {out}")
    if need > free:
        return [f"not enough disk space in {out}: about {human_bytes(need)} needed, {human_bytes(free)} free."]
    return []
