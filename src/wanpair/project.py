"""`wanpair.toml`: one plain file that describes a run, with the proven recipe as every default.

A minimal project is the model paths, the dataset and a name:

    name = "my_character_v1"
    [models]
    high_noise = "models/wan2.2_t2v_high_noise_14B_fp16.safetensors"
    low_noise  = "models/wan2.2_t2v_low_noise_14B_fp16.safetensors"
    vae        = "models/wan_2.1_vae.safetensors"
    t5         = "models/models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer  = "models/umt5-xxl-tokenizer"
    [dataset]
    config = "dataset/dataset.toml"

Wan 2.1's single models (`model = "t2v-14B"` or `"t2v-1.3B"`) name one `dit = "..."` file instead of
the two experts, and train one LoRA over all timesteps.

Relative paths are relative to the project file. Every other setting is in `[train]` and
`[experts.high]` / `[experts.low]` (`[experts.full]` for one model); the defaults are the community
recipe (Musubi-Tuner flags in shared/reference/wan22-lora-recipe.md) except where docs/fidelity.md says why we differ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WanpairError
from .hub import repo_problem
from .models.tasks import T2V, TASKS, Task, by_name, detect_task
from .tomlfile import did_you_mean, read_toml


@dataclass
class Models:
    vae: Path | None  # None only from `load_project(require_models=False)` (`check`), where init left them unset
    t5: Path | None
    tokenizer: Path | None
    high_noise: Path | None = None  # a Wan 2.2 pair's experts
    low_noise: Path | None = None
    dit: Path | None = None  # a Wan 2.1 single model
    captioner: Path | None = None  # optional, not for training: the Qwen2.5-VL folder `wanpair caption` uses


@dataclass
class TrainSettings:
    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    max_grad_norm: float = 0.0  # 0 = no clipping
    lr_scheduler: str = "polynomial"
    lr_scheduler_power: float = 8.0
    min_lr_ratio: float = 5e-5  # polynomial lr_end = min_lr_ratio * learning_rate
    lr_warmup_steps: int = 0
    lr_warmup_ratio: float = 0.0  # warm-up as a fraction of all steps (used when lr_warmup_steps = 0)
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts
    optimizer: str = "adamw"
    optimizer_args: list = field(default_factory=list)  # ["betas=(0.9, 0.99)", "eps=1e-8"]
    loraplus_lr_ratio: float = 0.0  # LoRA+: the up matrices learn this many times faster (0 = off; 4-16 usual)
    scale_weight_norms: float = 0.0  # max-norm: each module's weight change scaled back to this norm (0 = off)
    lora_dropout: float = 0.0
    rank_dropout: float = 0.0  # drop LoRA rank components per step (kohya/Musubi rank_dropout)
    module_dropout: float = 0.0  # skip a whole LoRA module per step (kohya/Musubi module_dropout)
    include_modules: list = field(default_factory=list)  # regexes on original Wan module names, e.g. "ffn"
    exclude_modules: list = field(default_factory=list)
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (SD3-style per-timestep weights)
    save_every_n_epochs: int = 0  # 0 = only the final save
    save_every_n_steps: int = 0
    keep_last: int = 0  # intermediate LoRAs kept per expert (0 = all)
    log_with: list = field(default_factory=lambda: ["tensorboard"])  # trackers: tensorboard, wandb, trackio ([] = none)
    tracker_project: str = "wanpair"  # the wandb / trackio project; each run is a group of two runs, <name>-high and -low
    save_state_every_n_steps: int = 0  # resumable training state (wanpair train --resume)
    save_state_every_n_epochs: int = 0
    keep_states: int = 2  # states kept (0 = all)
    crash_state: bool = True  # without a state cadence: one state per tenth of the run, so the same command continues a killed run
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops with a diagnosis
    epochs: int = 100
    max_steps: int = 0  # 0 = run all epochs
    seed: int = 5
    timestep_sampling: str = "shift"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0  # logit_normal sampling
    logit_std: float = 1.0
    preserve_distribution_shape: bool = True
    mixed_precision: str = "bf16"
    fp8_base: bool = True  # block weights stored as fp8 (e4m3) with a scale per row
    fp8_matmul: str = "auto"  # fp8 tensor-core matmuls for the frozen base (auto: GPUs that have them)
    gradient_checkpointing: bool = True
    checkpoint_blocks: int = -1  # how many blocks recompute activations (-1 = as many as memory needs; CPU: all)
    compile: str = "auto"  # torch.compile the transformer block (auto: on a GPU; the first step is slower)
    attention: str = "auto"  # self-attention kernel: auto (FlashAttention-4 where installed and measured) | sdpa | fa4
    cuda_graph: str = "auto"  # replay each step as one CUDA graph where that is safe (wanpair.train.step_graph) | off
    memory_mode: str = "auto"  # auto | fast (never stream blocks) | low (fit in 16 GiB, streaming blocks)
    memory_budget_gb: float = 0.0  # GPU memory the run may use (0 = what the GPU has free)
    gradient_accumulation_steps: int = 1
    save_dtype: str = "bf16"
    device: str = "auto"
    experts_parallel: str = "auto"  # both experts at once, one per GPU (group): auto = with 2+ GPUs that have room
    # validation loss per expert (also before the first step and at the end); 0 = off. 400: six evaluations in
    # the recipe's 1 800 steps, ~4 % of its time (an evaluation of 4 items x 4 timesteps took 5-6 s on an H200)
    validate_every_n_steps: int = 400
    validation_timesteps: int = 4  # fixed timesteps spread over each expert's window
    validation_items: int = 4  # training items measured when dataset.toml has no [[validation]] (then: fit)
    validation_split: float = 0.0  # hold out this fraction of the training media for validation instead

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen base computes in (and the experts load in)."""
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision]


@dataclass
class ExpertWindow:
    """One expert's own part of the project: its timestep window, its starting LoRA, and the [train] values it
    sets for itself (`PER_EXPERT_KEYS`: the high-noise expert often wants a lower learning rate)."""

    min_timestep: int
    max_timestep: int
    init_lora: Path | None = None  # continue training from this LoRA (wanpair, Musubi-Tuner, ai-toolkit, ...)
    overrides: dict = field(default_factory=dict)  # e.g. {"learning_rate": 3e-5}: over [train] for this expert only


@dataclass
class SampleDuringTraining:
    """[sample]: pictures while training, from a prompts file (one prompt per line)."""

    prompts: Path | None = None
    every_n_epochs: int = 0
    every_n_steps: int = 0
    width: int = 832
    height: int = 480
    frames: int = 1
    steps: int = 40
    seed: int = 42


def read_prompts(path: Path) -> list[str]:
    """A prompts file's prompts: one per non-empty line, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WanpairError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8, one prompt per line.") from None
    except OSError as e:
        raise WanpairError(f"cannot read the prompts file {path} ({e.strerror or e}): check the path "
                           "(one prompt per line, UTF-8).") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class Description:
    """[metadata]: what the LoRA files and the model card say about the pair, written into the modelspec keys
    that ComfyUI and the Hub show (Musubi-Tuner's --metadata_* options). Changing them trains nothing again."""

    title: str = ""  # "" = the LoRA's file name
    description: str = ""
    license: str = ""  # e.g. "apache-2.0" (the Hub's license identifiers)
    tags: list = field(default_factory=list)
    trigger_words: list = field(default_factory=list)  # the words the captions use for the subject
    training_comment: str = ""


@dataclass
class HubSettings:
    """[hub]: push each saved LoRA to a Hugging Face model repository while training (in the background: a
    network error is reported, never stops the run). Token: HF_TOKEN or `hf auth login`, never written."""

    repo: str = ""  # "USER/NAME"; "" = no pushing during training (`wanpair push` pushes a finished pair)
    private: bool = False  # for a repository wanpair creates
    push_states: bool = False  # also the training states (large: ~0.9 GiB each for a 14B expert at rank 16)


@dataclass
class Project:
    path: Path
    name: str
    models: Models
    dataset_config: Path
    output_dir: Path
    author: str = ""
    train: TrainSettings = field(default_factory=TrainSettings)
    experts: dict[str, ExpertWindow] = field(default_factory=lambda: default_windows(T2V))
    sample: SampleDuringTraining = field(default_factory=SampleDuringTraining)
    metadata: Description = field(default_factory=Description)
    hub: HubSettings = field(default_factory=HubSettings)
    task: Task = T2V  # which model: `model = "i2v-A14B"`, or what the [models] files are

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def lora_path(self, expert: str) -> Path:
        """`WAN2.2-HighNoise_<name>.safetensors` / `WAN2.2-LowNoise_<name>.safetensors`, as the recipe names them."""
        return self.output_dir / self.task.lora_file(expert, self.name)

    def dit_path(self, expert: str) -> Path:
        return getattr(self.models, self.task.dit_key(expert))

    def settings(self, expert: str) -> TrainSettings:
        """What trains `expert`: [train], with what its [experts.<expert>] table sets for itself."""
        return dataclasses.replace(self.train, **self.experts[expert].overrides)


TOP_KEYS = {"name", "model", "author", "output_dir", "models", "dataset", "train", "experts", "sample", "metadata", "hub"}
MODEL_KEYS = {f.name for f in dataclasses.fields(Models)}
OPTIONAL_MODEL_KEYS = {"captioner"}  # "" = not set, and no training needs them
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings)}
CHOICES = {
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "timestep_sampling": ("uniform", "sigmoid", "shift", "logit_normal"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "save_dtype": ("bf16", "fp16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "optimizer": ("adamw", "adamw8bit", "adafactor", "prodigy"),
    "loss_weighting": ("none", "sigma_sqrt", "cosmap"),
    "fp8_matmul": ("auto", "on", "off"),
    "compile": ("auto", "on", "off"),
    "attention": ("auto", "sdpa", "fa4"),
    "cuda_graph": ("auto", "off"),
    "memory_mode": ("auto", "fast", "low"),
    "experts_parallel": ("auto", "on", "off"),
}
TRACKERS = ("tensorboard", "wandb", "trackio")  # accelerate's names for them
ON_OFF = {"fp8_matmul", "compile", "experts_parallel"}  # also accept true / false
# Settings that decide where and how fast the work runs, what is measured and what is saved along the way --
# not what is trained. A LoRA or a state made under other values of these is still this run's: a rerun after
# changing them (memory_mode = "low" after running out of memory, a new save cadence) continues it. How the
# same math is computed (compile, the attention kernel, CUDA graphs, checkpointing, streaming) moves the last bits
# of a number at most, as another GPU would. fp8_matmul is not one of them: it quantises the activations and
# gradients the frozen base multiplies, which changes what is trained.
# What an [experts.high] / [experts.low] table may set for its expert alone (diffusion-pipe#372: users lower the
# high-noise expert's learning rate, ~3e-5, as it overtrains at the shared one); everything else is shared.
PER_EXPERT_KEYS = ("learning_rate", "epochs", "max_steps", "rank", "alpha")
SIDE_SETTINGS = {
    "experts_parallel", "device", "compile", "attention", "cuda_graph", "memory_mode", "memory_budget_gb",
    "gradient_checkpointing", "checkpoint_blocks",
    "validate_every_n_steps", "validation_timesteps", "validation_items", "log_with", "tracker_project", "max_bad_steps",
    "save_every_n_epochs", "save_every_n_steps", "keep_last", "save_state_every_n_steps", "save_state_every_n_epochs",
    "keep_states", "crash_state",
}
# How the finished LoRA is written: a state continues under a new value; a finished file in another is not the
# one asked for.
OUTPUT_SETTINGS = {"save_dtype"}


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting can work with, and why no other can: a value outside them is refused when
    the project is read, naming the value, the range and the reason (not an hour later, mid-run)."""

    low: float
    high: float = math.inf
    above_low: bool = False  # `low` itself is outside
    below_high: bool = False  # `high` itself is outside
    why: str = ""

    def holds(self, value: float) -> bool:
        return ((value > self.low if self.above_low else value >= self.low)
                and (value < self.high if self.below_high else value <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"above {self.low}" if self.above_low else f"at least {self.low}"
        return f"in {'(' if self.above_low else '['}{self.low}, {self.high}{')' if self.below_high else ']'}"


FRACTION = dict(low=0, high=1, below_high=True)
INTERVAL = Bounds(0, why="it is an interval (0 = never)")
SEED = Bounds(0, 2**32 - 1, why="seeds are 32-bit: numpy's generator takes 0 to 2**32 - 1")
# Every numeric [train] setting (tests/test_refusals.py checks that none is left out). logit_mean takes any
# finite value; no float setting takes nan or inf.
TRAIN_BOUNDS = {
    "rank": Bounds(1, why="a LoRA needs at least one rank component"),
    "alpha": Bounds(0, above_low=True, why="the LoRA's output is scaled by alpha / rank: at 0 it does nothing, "
                                            "below 0 it works against its own training"),
    "learning_rate": Bounds(0, above_low=True, why="each step moves the LoRA by it against the gradient: 0 learns "
                                                    "nothing, a negative rate climbs the loss"),
    "weight_decay": Bounds(0, why="it pulls the LoRA's weights toward zero; a negative decay pushes them away, "
                                  "further every step"),
    "max_grad_norm": Bounds(0, why="gradients are clipped to this norm, and a norm is never negative (0 = no "
                                   "clipping)"),
    "lr_scheduler_power": Bounds(0, above_low=True, why="the polynomial schedule decays as (1 - progress)^power: a "
                                                         "power of 0 or less makes the learning rate rise instead, and "
                                                         "divides by zero at the last step"),
    "min_lr_ratio": Bounds(**FRACTION, why="the polynomial schedule ends at min_lr_ratio x learning_rate: below 0 "
                                           "that is a negative learning rate (gradient ascent), at 1 or above "
                                           "there is nothing to decay (for that, lr_scheduler = \"constant\")"),
    "lr_warmup_steps": Bounds(0, why="the learning rate rises over this many first steps (0 = no warm-up)"),
    "lr_warmup_ratio": Bounds(**FRACTION, why="the warm-up as a fraction of the run's steps (when lr_warmup_steps "
                                              "= 0); a warm-up of the whole run never reaches the learning rate"),
    "lr_scheduler_num_cycles": Bounds(1, why="cosine_with_restarts decays the learning rate this many times; 0 "
                                             "cycles never decay it"),
    "loraplus_lr_ratio": Bounds(0, why="the up matrices' learning rate is this times learning_rate (LoRA+, Hayou et "
                                       "al. 2024); 0 turns it off, below 0 they would climb the loss"),
    "scale_weight_norms": Bounds(0, why="it is the largest norm a module's weight change may keep (0 = no limit)"),
    **dict.fromkeys(("lora_dropout", "rank_dropout", "module_dropout"),
                    Bounds(**FRACTION, why="a probability of dropping; at 1 everything is dropped and nothing trains")),
    **dict.fromkeys(("save_every_n_epochs", "save_every_n_steps", "save_state_every_n_steps",
                     "save_state_every_n_epochs", "validate_every_n_steps"), INTERVAL),
    **dict.fromkeys(("keep_last", "keep_states"), Bounds(0, why="it counts the files kept (0 = all)")),
    "max_bad_steps": Bounds(1, why="the run stops at this many non-finite steps in a row; there is no 'never' (a "
                                   "run whose every step is skipped learns nothing), and 0 would stop at the first"),
    "epochs": Bounds(1, why="training makes this many passes over the dataset"),
    "max_steps": Bounds(0, why="it caps the optimizer steps (0 = run all epochs)"),
    "seed": SEED,
    "discrete_flow_shift": Bounds(0, above_low=True, why="shift sampling maps t to shift*t / (1 + (shift - 1)*t), a "
                                                          "timestep in [0, 1] only for a shift above 0"),
    "sigmoid_scale": Bounds(0, above_low=True, why="timesteps are sigmoid(sigmoid_scale * z) with z ~ N(0, 1): at 0 "
                                                    "every timestep is 0.5"),
    "logit_std": Bounds(0, above_low=True, why="the spread of logit_normal timesteps: at 0 every timestep is the same"),
    "checkpoint_blocks": Bounds(-1, why="it counts the blocks that recompute their activations (-1 = as many as "
                                         "memory needs)"),
    "memory_budget_gb": Bounds(0, why="it is the GPU memory the run may use (0 = what the GPU has free)"),
    "gradient_accumulation_steps": Bounds(1, why="each optimizer step adds up this many micro-batches"),
    **dict.fromkeys(("validation_timesteps", "validation_items"),
                    Bounds(1, why="a validation loss needs at least one (validate_every_n_steps = 0 turns it off)")),
    "validation_split": Bounds(**FRACTION, why="the fraction of the media held out for validation; all of it would "
                                               "leave nothing to train on"),
}
SAMPLE_BOUNDS = {
    "every_n_epochs": INTERVAL,
    "every_n_steps": INTERVAL,
    **dict.fromkeys(("width", "height"), Bounds(16, why="Wan works in steps of 16 pixels (the VAE's stride 8 x the "
                                                        "DiT's patch 2)")),
    "frames": Bounds(1, why="a sample is 1 frame (a picture) or 4k+1 (a clip)"),
    "steps": Bounds(1, why="a sample is denoised in this many steps"),
    "seed": SEED,
}


def _out_of_bounds(table: str, key: str, value: float, bounds: Bounds | None, path: Path) -> str | None:
    """The problem with `value` for `key` of `[table]`, or None when it is finite and in bounds."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}: [{table}] {key} = {value!r} must be a finite number."
    if bounds is None or bounds.holds(value):
        return None
    return f"{path}: [{table}] {key} = {value!r}: {key} must be {bounds}; {bounds.why}."


def _unknown(key: str, valid, where: str, path: Path) -> str:
    return f"{path}: unknown key {key!r} in {where}.{did_you_mean(key, valid)}"


def _train_value(table: str, key: str, value, path: Path, problems: list[str]):
    """`value` for the [train] setting `key` (written in `[table]`) as the setting holds it, or None with the
    problem added: its type, its choices, its bounds, its regexes."""
    default = getattr(_TRAIN_DEFAULTS, key)
    if key == "log_with" and isinstance(value, str):  # one tracker, or "" for none
        value = [value] if value.strip() else []
    if key in ON_OFF and isinstance(value, bool):
        value = "on" if value else "off"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        kind = "list of strings" if isinstance(default, list) else type(default).__name__
        problems.append(f"{path}: [{table}] {key} = {value!r} should be a {kind}.")
        return None
    if key in CHOICES and value not in CHOICES[key]:
        problems.append(f"{path}: [{table}] {key} = {value!r} must be one of {', '.join(CHOICES[key])}.")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = _out_of_bounds(table, key, value, TRAIN_BOUNDS.get(key), path)
        if problem:
            problems.append(problem)
            return None
    if key == "log_with" and (unknown := [v for v in value if v not in TRACKERS]):
        problems.append(f"{path}: [{table}] log_with names {', '.join(map(repr, unknown))}; the trackers are "
                        f"{', '.join(TRACKERS)} (a list for several, [] for none).")
        return None
    if key == "log_with" and len(set(value)) < len(value):
        problems.append(f"{path}: [{table}] log_with = {value!r} names a tracker twice; name each once.")
        return None
    # W&B refuses project names that are empty, longer than 128 characters or hold / \ # ? % : (and Trackio keeps
    # them as folder names): said here, not after the expert has loaded
    if key == "tracker_project" and (not value.strip() or len(value) > 128 or any(c in value for c in "/\\#?%:")):
        problems.append(f"{path}: [{table}] tracker_project = {value!r} must be a name of 1 to 128 characters "
                        "without / \\ # ? % : (the W&B / Trackio project).")
        return None
    if key in ("include_modules", "exclude_modules"):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"{path}: [{table}] {key} pattern {pattern!r} is not a valid regex ({e}).")
    return value


_TRAIN_DEFAULTS = TrainSettings()


def _train_settings(raw: dict, path: Path, problems: list[str]) -> TrainSettings:
    values = {}
    legacy = raw.get("tensorboard")  # before log_with: tensorboard = true / false
    if "tensorboard" in raw:
        raw = {k: v for k, v in raw.items() if k != "tensorboard"}
        if not isinstance(legacy, bool):
            problems.append(f"{path}: [train] tensorboard = {legacy!r} should be true or false (or use log_with).")
        elif "log_with" in raw:
            problems.append(f"{path}: [train] sets both tensorboard and log_with; tensorboard is log_with's older "
                            "form: keep log_with only.")
        else:
            raw["log_with"] = ["tensorboard"] if legacy else []
    for key, value in raw.items():
        if key not in TRAIN_FIELDS:
            problems.append(_unknown(key, TRAIN_FIELDS, "[train]", path))
            continue
        value = _train_value("train", key, value, path, problems)
        if value is not None:
            values[key] = value
    t = TrainSettings(**values)
    if t.fp8_matmul == "on" and not t.fp8_base:
        problems.append(f"{path}: [train] fp8_matmul = \"on\" needs fp8_base = true (the weights it multiplies).")
    if t.memory_mode == "low" and not (t.fp8_base and t.gradient_checkpointing):
        problems.append(f"{path}: [train] memory_mode = \"low\" streams fp8 blocks with checkpointing; "
                        "it needs fp8_base = true and gradient_checkpointing = true.")
    if t.fp8_base and t.mixed_precision == "no":
        problems.append(f"{path}: [train] fp8_base = true needs mixed_precision = \"bf16\" or \"fp16\" for compute.")
    return t


def default_windows(task: Task) -> dict[str, ExpertWindow]:
    """The timestep windows each expert is trained on: its side of the pair's boundary (one model: all)."""
    return {e: ExpertWindow(*task.window(e)) for e in task.experts}


def _experts(raw: dict, path: Path, problems: list[str], warnings: list[str], resolve,
             task: Task) -> dict[str, ExpertWindow]:
    experts = default_windows(task)
    boundary = task.boundary
    for name, table in raw.items():
        if name not in experts:
            problems.append(f"{path}: [experts.{name}]: {task.name} is one model trained over all timesteps; its one "
                            "LoRA's settings go in [experts.full]." if name in ("high", "low") and not task.paired
                            else _unknown(name, experts, "[experts]", path))
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: [experts] {name} = {table!r} must be a table: [experts.{name}] on a line of its "
                            "own, its keys below.")
            continue
        for key, value in table.items():
            if key == "init_lora":
                if not isinstance(value, str):
                    problems.append(f"{path}: [experts.{name}] init_lora = {value!r} should be the path of a LoRA file.")
                elif value.strip():  # "" is "not set", never the project's folder
                    experts[name].init_lora = resolve(value)
                    if not experts[name].init_lora.is_file():
                        problems.append(f"{path}: [experts.{name}] init_lora {experts[name].init_lora} is not a file.")
            elif key in PER_EXPERT_KEYS:
                value = _train_value(f"experts.{name}", key, value, path, problems)
                if value is not None:
                    experts[name].overrides[key] = value
            elif key not in ("min_timestep", "max_timestep"):
                problems.append(_unknown(key, ("min_timestep", "max_timestep", "init_lora", *PER_EXPERT_KEYS),
                                         f"[experts.{name}]", path)
                                + (f" Only {', '.join(PER_EXPERT_KEYS)} can differ between the experts; {key} is "
                                   "shared: set it in [train]." if key in TRAIN_FIELDS else ""))
            elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
                problems.append(f"{path}: [experts.{name}] {key} = {value!r} must be an integer in 0..1000.")
            else:
                setattr(experts[name], key, value)
    for name, w in experts.items():
        if w.min_timestep >= w.max_timestep:
            problems.append(f"{path}: [experts.{name}] min_timestep {w.min_timestep} must be below max_timestep {w.max_timestep}.")
    hi, lo = experts.get("high"), experts.get("low")
    if task.paired and (hi.min_timestep != boundary or lo.max_timestep != boundary):
        warnings.append(
            f"expert windows high {hi.min_timestep}-{hi.max_timestep}, low {lo.min_timestep}-{lo.max_timestep} do not meet "
            f"at the {task.name} boundary {boundary}: at inference each expert runs on its own side of {boundary}."
        )
    return experts


def _sample(raw: dict, path: Path, problems: list[str], resolve) -> SampleDuringTraining:
    out = SampleDuringTraining()
    fields = {f.name for f in dataclasses.fields(SampleDuringTraining)}
    for key, value in raw.items():
        if key not in fields:
            problems.append(_unknown(key, fields, "[sample]", path))
        elif key == "prompts":
            out.prompts = resolve(value)
            if not out.prompts.is_file():
                problems.append(f"{path}: [sample] prompts file {out.prompts} does not exist (one prompt per line).")
        elif not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{path}: [sample] {key} = {value!r} should be an integer.")
        elif problem := _out_of_bounds("sample", key, value, SAMPLE_BOUNDS[key], path):
            problems.append(problem)
        else:
            setattr(out, key, value)
    if (out.every_n_epochs or out.every_n_steps) and out.prompts is None:
        problems.append(f"{path}: [sample] every_n_epochs/every_n_steps need prompts = \"prompts.txt\".")
    for key in ("width", "height"):
        if getattr(out, key) % 16:
            problems.append(f"{path}: [sample] {key} = {getattr(out, key)}: {key} must be a multiple of 16; "
                            f"{SAMPLE_BOUNDS[key].why}.")
    if (out.frames - 1) % 4:
        problems.append(f"{path}: [sample] frames = {out.frames}: frames must be 4k+1 (1, 5, 9, ... 81); the VAE "
                        "packs 4 frames per latent after the first.")
    return out


def _plain_table(raw: dict, cls, table: str, path: Path, problems: list[str]):
    """A table of strings, booleans and lists of strings ([metadata], [hub]) read into `cls`."""
    out = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        default = getattr(out, key, None)
        if key not in fields:
            problems.append(_unknown(key, fields, f"[{table}]", path))
        elif isinstance(default, list) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            problems.append(f"{path}: [{table}] {key} = {value!r} should be a list of strings, e.g. [\"a\", \"b\"].")
        elif not isinstance(default, list) and type(value) is not type(default):
            problems.append(f"{path}: [{table}] {key} = {value!r} should be a {type(default).__name__}.")
        else:
            setattr(out, key, value)
    return out


def _hub(raw: dict, path: Path, problems: list[str]) -> HubSettings:
    hub = _plain_table(raw, HubSettings, "hub", path, problems)
    if hub.repo and (reason := repo_problem(hub.repo)):  # huggingface_hub is imported only for a [hub] repo
        problems.append(f"{path}: [hub] repo = {hub.repo!r} should be USER/NAME (or ORG/NAME) of a model "
                        f"repository ({reason}).")
    return hub


def _task(value, models_raw: dict, path: Path, problems: list[str], resolve) -> Task:
    """`model = "t2v-A14B" | "i2v-A14B" | "t2v-14B" | "t2v-1.3B"`; unset, what the [models] files are (read
    from their headers), else T2V A14B."""
    if value is None:
        return detect_task(models_raw, resolve) or T2V
    task = by_name(value)
    if task is None:
        problems.append(f"{path}: model = {value!r} is not one wanpair trains; use one of "
                        f"{', '.join(repr(t) for t in TASKS)}.")
        return T2V
    return task


def _model_keys(models_raw: dict, task: Task, path: Path, problems: list[str], require: bool = True) -> None:
    """[models]: the VAE, umT5 and tokenizer, and the task's DiT file(s) -- the two experts of a pair, or one
    `dit` -- each named once."""
    for key in models_raw:
        if key not in MODEL_KEYS:
            problems.append(_unknown(key, MODEL_KEYS, "[models]", path))
    wrong = [k for k in ("high_noise", "low_noise", "dit") if k in models_raw and k not in task.dit_keys]
    if wrong:
        problems.append(
            f"{path}: [models] {' and '.join(wrong)} do not belong to {task.name} ({task.title}), which takes "
            f"{' and '.join(task.dit_keys)}. " + ("A Wan 2.2 pair has two experts: high_noise and low_noise."
                                                  if task.paired else "Wan 2.1 is one model: dit = \"...\"."))
    for key in ("vae", "t5", "tokenizer", *task.dit_keys):
        if key not in models_raw:
            what = "DiT" if key == "dit" else key.replace("_", "-")
            problems.append(f"{path}: [models] {key} is missing (path to the {what} file).")
    for key, value in models_raw.items():
        if not isinstance(value, str):
            problems.append(f"{path}: [models] {key} = {value!r} should be a path (a string).")
    unset = [k for k, v in models_raw.items() if k in MODEL_KEYS - OPTIONAL_MODEL_KEYS and _unset(v)]
    if unset and require:
        keys = " and ".join([", ".join(unset[:-1]), unset[-1]] if len(unset) > 1 else unset)
        problems.append(
            f"{path}: [models] {keys} {'is' if len(unset) == 1 else 'are'} not set (\"\"): run "
            f"`wanpair download --model {task.name} --project {path}` to fetch the recipe's files and fill "
            f"{'it' if len(unset) == 1 else 'them'} in, or set the path to your own file.")


def _unset(value) -> bool:
    """`key = ""`, what `wanpair init` writes for a model it did not find: not set, never the project's folder."""
    return isinstance(value, str) and not value.strip()


def load_project(path: str | Path, require_models: bool = True) -> tuple[Project, list[str]]:
    """Parse and validate a project file. Returns the project and non-fatal warnings; all errors at once.
    `require_models=False` (`wanpair check`, which reads the dataset alone): a model `wanpair init` left unset
    ("") is None instead of a problem, so the dataset can be checked before the weights are downloaded."""
    path, raw = read_toml(path, "Write a project file (`wanpair demo` writes an example to copy).")
    problems: list[str] = []
    warnings: list[str] = []
    base = path.parent

    def resolve(value) -> Path:
        return (base / Path(str(value)).expanduser()).resolve()

    for key in raw:
        if key not in TOP_KEYS:
            problems.append(_unknown(key, TOP_KEYS, "the project file", path))
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name or ""):
        problems.append(f"{path}: name = {name!r} must be set to a file-name-safe string, e.g. name = \"my_character_v1\".")

    def table(key: str) -> dict:
        """A table of the file ([models], [train], ...): one written as a plain value is named, and read as empty."""
        value = raw.get(key, {})
        if isinstance(value, dict):
            return value
        problems.append(f"{path}: {key} = {value!r} must be a table: [{key}] on a line of its own, its keys below.")
        return {}

    models_raw = table("models")
    dataset_raw = table("dataset")
    for key in dataset_raw:
        if key != "config":
            problems.append(_unknown(key, ["config"], "[dataset]", path))
    if "config" not in dataset_raw or _unset(dataset_raw["config"]):
        problems.append(f"{path}: [dataset] config is {'missing' if 'config' not in dataset_raw else 'not set'} "
                        "(path to your Musubi-style dataset.toml).")
    train = _train_settings(table("train"), path, problems)
    task = _task(raw.get("model"), {k: v for k, v in models_raw.items() if not _unset(v)}, path, problems, resolve)
    _model_keys(models_raw, task, path, problems, require_models)
    experts = _experts(table("experts"), path, problems, warnings, resolve, task)
    sample = _sample(table("sample"), path, problems, resolve)
    metadata = _plain_table(table("metadata"), Description, "metadata", path, problems)
    hub = _hub(table("hub"), path, problems)
    if task.conditioned and (sample.every_n_epochs or sample.every_n_steps):
        problems.append(f"{path}: [sample] during training is for text-to-video; an {task.name} sample needs a first "
                        "frame. Remove every_n_epochs/every_n_steps and run `wanpair sample --image FRAME.png` "
                        "after training.")
    if problems:
        raise WanpairError("\n".join(problems))
    models = Models(**{k: None if _unset(v) else resolve(v) for k, v in models_raw.items()})
    project = Project(
        path=path, name=name, models=models, dataset_config=resolve(dataset_raw["config"]),
        output_dir=resolve(raw.get("output_dir", "output")), author=str(raw.get("author", "")),
        train=train, experts=experts, sample=sample, metadata=metadata, hub=hub, task=task,
    )
    return project, warnings
