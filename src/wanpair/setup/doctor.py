"""`wanpair doctor`: will a training start on this machine, and how fast will it go? A checklist.

Each line is ✓ (fine), ✗ (training would not start, or would fail: the fix is printed) or · (worth
knowing, not a failure). The project's own checks are the training's preflight (models, dataset,
tokenizer, output folder, disk), so the doctor cannot pass a project that `train` would refuse.
Nothing is loaded but file headers, the dataset's images and the tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import math
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WanpairError
from ..models.tasks import expert_name
from ..sizes import human_seconds

GIB = 2**30
# s/step of the 14B expert at 960x960 (3 600 tokens), rank 16, FlashAttention-4 for self-attention, on an H100 80GB
# (docs/benchmarks.md, 2026-12-06, sixth and eighth rounds): every block resident (0.347), `memory_mode = "low"`
# (12 blocks streamed, 0.482), the 24 GiB plan (37 blocks recomputing in their graph and keeping their attention
# outputs, 0.446: 0.454 for all 40). Every block recomputing all: the H200's ratio to it (fourth round: 0.490
# against 0.466) applied, not measured on an H100. An H200 runs these at about the same speed. Other sizes
# (clips, other resolutions) are scaled by the step's useful FLOPs: 81-frame 832x480 clips (32 760 tokens, all 40
# blocks streamed) are then 10.3 s/step against 9.46 measured (sixth round), 9.30 with FA4 and 10.37 with SDPA at a
# 24 or 32 GiB budget (twelfth round). Streamed blocks now recompute inside their graph: 1.6 % faster than around
# themselves on another H100 (0.486 against 0.494, twelfth round); 0.482 is kept, that being within machine spread.
MEASURED_TOKENS = 3600
S_PER_STEP_RESIDENT, S_PER_STEP_STREAMED = 0.347, 0.482
S_PER_STEP_ALL_RECOMPUTING, S_PER_STEP_ALL_KEEPING_ATTENTION = 0.477, 0.454
# The figures above are the benchmark's medians; a real run's loop spends more a step (its data, metrics and
# progress, the pipeline drained at each validation, FlashAttention-4 not installed). The pair trained through
# `wanpair train` on two H100s (rehearsal stage `runtime`, 160 steps per expert, torch's SDPA, docs/benchmarks.md
# thirteenth and fourteenth rounds): 0.3925 s a step on average on the first (states written by the loop), 0.375
# on the second (states in the background; the steps beside their writes not counted here); their mean, less the
# bench's figure, is added to each optimizer step -- a time per step, not scaled by FLOPs. The second, sampled, ran
# at its 700 W power cap, the SM clock ~1 800 MHz instead of 1 980; machines of one kind differ by ~5 % a step.
LOOP_EXTRA_S = (0.3925 + 0.375) / 2 - S_PER_STEP_RESIDENT
# With FlashAttention-4 and the steps replayed as CUDA graphs the host no longer paces the loop: its steady mean on
# an H100 was 0.3532 / 0.3516 s a step (eighteenth round, 150 steps an expert, the states' neighbours not counted),
# 5 ms over the bench's step, where eagerly on the same machine it was 0.3799 (near the runs the extra above comes
# from). With torch's attention the graphs took 1 % off the loop's median (sixteenth round), within the machines'
# spread: those runs keep the extra above.
LOOP_EXTRA_GRAPHED_FA4_S = (0.3532 + 0.3516) / 2 - S_PER_STEP_RESIDENT
# The same runs' other stages, at the figures of the code as it is now: a validation pass (one of 16 in an
# evaluation at 960x960) 0.144 s (2.29-2.30 s an evaluation, its inputs copied without a host sync; 2.40-2.53 on
# the first machine before that); the first validation compiling its no-grad graph 12.2 and 18.6 s more (a cold
# compile cache; ~5 s warm); a training state of a rank-16 LoRA (921 MB: the LoRA in fp32, AdamW's moments), written
# in the background, 0.29 s of the loop's wait and 0.37 s more on the step beside its write (0.66 s; 2.0-2.6 s when
# the loop wrote them itself); and besides all these 57.7 and 87.9 s: starting Python, checking the dataset, the
# caches, loading both experts, the first step compiling (22.4 and 39.3 s cold), the final saves. Where two machines
# measured a stage, their mean. A third H100 checked them with the steps replayed as CUDA graphs (sixteenth round:
# the graphs took 1 % off the loop's median step): 1.02 of a 120-step run, 0.95 of the recipe projected from it.
S_PER_FORWARD = 0.144
FIRST_VALIDATION_S = (12.2 + 18.6) / 2
S_PER_STATE_RANK_16 = 0.66
OTHER_S = (57.7 + 87.9) / 2
MEASURED_GPUS = ("H100", "H200")
CPU_PARAMS_LIMIT = 2e9  # above this an expert is not for training on the CPU (the demo's tiny models are far below)
HOST_RAM_SPARE_GIB = 8  # besides the pinned blocks: the interpreter, the data, the OS


@dataclass
class Check:
    ok: bool | None  # None: information
    what: str
    fix: str = ""

    def render(self) -> str:
        mark = {True: "✓", False: "✗", None: "·"}[self.ok]
        fix = self.fix.replace("\n", "\n    ")  # a list of problems stays under its line
        return f"{mark} {self.what}" + (f"\n    fix: {fix}" if self.fix and self.ok is False else "")


def machine_checks() -> list[Check]:
    checks = [Check(sys.version_info >= (3, 10), f"Python {platform.python_version()}",
                    "wanpair needs Python 3.10 or newer.")]
    cuda = torch.version.cuda
    nvidia = Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None
    checks.append(Check(bool(cuda) or not nvidia,
                        f"torch {torch.__version__}" + (f", built for CUDA {cuda}" if cuda else ", a CPU build"),
                        "this machine has an NVIDIA GPU but torch cannot use it: install the CUDA build of torch for "
                        "your driver, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu128`, "
                        "then `pip install -e .` again."))
    if not torch.cuda.is_available():
        if cuda or nvidia:
            checks.append(Check(False, "no CUDA GPU visible to torch",
                                "check `nvidia-smi`, the driver and CUDA_VISIBLE_DEVICES."))
        return checks
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        checks.append(Check(True, f"GPU {i}: {props.name}, {total / GIB:.1f} GiB ({free / GIB:.1f} GiB free), "
                                  f"compute capability {props.major}.{props.minor}"))
    return checks


def _ram_available_gib() -> float | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux: the check is left out
        return None
    return next((int(x.split()[1]) * 1024 / GIB for x in lines if x.startswith("MemAvailable:")), None)


def _linear_and_attention(config: dict, tokens: int) -> tuple[float, float]:
    """FLOPs of one forward pass on a sample of `tokens` tokens (counted, not measured): the linear layers (per block:
    self-attention q, k, v, o, cross-attention q, o and the feed-forward pair over the tokens, cross-attention k, v
    over the text) and attention (QK^T and PV, over the tokens for self-attention, over the text for cross)."""
    from ..models.text_encoder import TEXT_LEN as text_tokens  # Wan's text is padded to 512 tokens

    d, ffn, layers = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], config["num_layers"]
    linear = 2 * layers * (tokens * (6 * d * d + 2 * d * ffn) + text_tokens * 2 * d * d)
    attention = 2 * layers * (2 * tokens * tokens * d + 2 * tokens * text_tokens * d)
    return linear, attention


def useful_flops(config: dict, tokens: int) -> float:
    """Useful FLOPs of one training step on one sample: the frozen base's linear layers as forward plus the
    input-gradient half of backward (2 x forward), attention as forward plus a 2.5 x forward backward
    (FlashAttention's convention). Attention grows with the square of the tokens: an 81-frame clip has 9.1 times an
    image's tokens and 21.5 times its FLOPs."""
    linear, attention = _linear_and_attention(config, tokens)
    return 2 * linear + 3.5 * attention


def forward_flops(config: dict, tokens: int) -> float:
    """FLOPs of one forward pass without gradients on one sample (a validation pass)."""
    return sum(_linear_and_attention(config, tokens))


def measured_s_per_step(plan) -> float:
    """The benchmark's H100 step at 960x960 for this plan (resident blocks interpolated between the measured plans);
    a real run's loop adds `LOOP_EXTRA_S`."""
    if plan.streamed:
        return S_PER_STEP_STREAMED
    return (S_PER_STEP_RESIDENT + (S_PER_STEP_ALL_RECOMPUTING - S_PER_STEP_RESIDENT) * plan.checkpointed / plan.blocks
            - (S_PER_STEP_ALL_RECOMPUTING - S_PER_STEP_ALL_KEEPING_ATTENTION) * plan.keep_attention / plan.blocks)


def loop_extra_s(graphed: bool, fa4: bool) -> float:
    """What a real run's loop adds to each optimizer step over the benchmark's: less where FlashAttention-4's steps
    are replayed as CUDA graphs."""
    return LOOP_EXTRA_GRAPHED_FA4_S if graphed and fa4 else LOOP_EXTRA_S


def expected_s_per_step(plan, config: dict, flops: float, gpu: str, fourteen_b: bool = True,
                        extra: float = LOOP_EXTRA_S) -> str:
    """What the benchmark table says this plan costs, scaled by the step's useful FLOPs (`flops`, its largest
    batch's) against the measured image step's, plus what a real run's loop adds to each step (`extra`,
    `loop_extra_s`); only for the GPUs and the model size (14B) it was measured on."""
    if not fourteen_b:
        return "speed: the table in docs/benchmarks.md is of the 14B models"
    if not any(g in gpu for g in MEASURED_GPUS):
        return f"speed on {gpu}: not measured (H100/H200: docs/benchmarks.md)"
    scale = flops / useful_flops(config, MEASURED_TOKENS)
    return (f"expected ≈ {measured_s_per_step(plan) * scale + extra:.2f} s/step (measured on an H100 at 960×960"
            + (f", scaled by the step's FLOPs: {scale:.2f}×)" if abs(scale - 1) > 0.005 else ")"))


def item_tokens(it) -> int:
    """The DiT's tokens for one sample: the latent is 4x smaller in time (the first frame alone) and 8x in space,
    and the DiT's patches are 2x2."""
    return ((it.frames - 1) // 4 + 1) * (it.bucket[0] // 16) * (it.bucket[1] // 16)


def batch_sizes(recipe) -> set[tuple[int, int]]:
    """(DiT tokens per sample, samples per batch) of the batches training makes, as the run plans for them: held-out
    validation items are not trained on, and a bucket holds fewer items than a batch at most. `recipe`: checked,
    its validation items chosen."""
    data = recipe.cached_data(paths=False)
    return {(item_tokens(recipe.items[idx[0]]), min(data.batch_sizes[ds], len(idx)))
            for (ds, _, _), idx in data.buckets().items()}


@dataclass
class ExpertTime:
    steps: int
    steps_s: float
    validations: int
    validation_s: float
    states: int = 0  # training states written (a cadence, or the crash states)
    states_s: float = 0.0


@dataclass
class RunTime:
    experts: dict[str, ExpertTime]
    other_s: float
    samples: bool  # samples are drawn during training (not counted)

    @property
    def total_s(self) -> float:
        return self.other_s + sum(e.steps_s + e.validation_s + e.states_s for e in self.experts.values())

    def describe(self) -> str:
        parts = [f"{expert_name(e)} {x.steps} steps {human_seconds(x.steps_s)}"
                 + (f" + {x.validations} validations {human_seconds(x.validation_s)}" if x.validations else "")
                 + (f" + {x.states} states {human_seconds(x.states_s)}" if x.states else "")
                 for e, x in self.experts.items()]
        return (f"the run at an H100's measured speed, one expert after the other: about "
                f"{human_seconds(self.total_s)} — "
                + "; ".join(parts) + f"; starting, caching, loading and compiling ~{human_seconds(self.other_s)}"
                + ("; samples during training not counted" if self.samples else ""))


def run_time(recipe, plan, config: dict, extra: float = LOOP_EXTRA_S) -> RunTime:
    """The whole run's time on one GPU from the benchmark's H100 figures: each expert's micro-batches (its optimizer
    steps, `step_counts`, each of up to gradient_accumulation_steps micro-batches) at the plan's measured step scaled
    by the mean micro-batch's useful FLOPs, its validations (step 0's and those `validates_after` schedules) at the
    measured validation forward scaled by each item's forward FLOPs, its training states (`states_after`) at the
    measured write scaled by the rank, and what a measured run spent besides; `extra`: the loop's per step
    (`loop_extra_s`). `recipe`: checked, its validation items chosen."""
    from ..train.data import step_counts
    from ..train.expert import states_after, validates_after

    data = recipe.cached_data(paths=False)
    buckets = data.buckets()  # a batch holds one bucket's samples: the epoch's FLOPs are its samples' FLOPs
    epoch_flops = sum(len(idx) * useful_flops(config, item_tokens(recipe.items[idx[0]])) for idx in buckets.values())
    micro_s = measured_s_per_step(plan) * epoch_flops / max(1, data.batches_per_epoch) / useful_flops(
        config, MEASURED_TOKENS)  # the mean micro-batch
    one_pass = sum(S_PER_FORWARD * forward_flops(config, item_tokens(recipe.items[i]))
                   / forward_flops(config, MEASURED_TOKENS) for i in data.validation)
    experts = {}
    for e in recipe.p.task.experts:
        t = recipe.p.settings(e)
        per_step, total, _ = step_counts(data.batches_per_epoch, t.gradient_accumulation_steps, 1, t.epochs,
                                         t.max_steps)
        per_epoch = math.ceil(data.batches_per_epoch / per_step)  # an epoch's last step takes what is left
        full, rest = divmod(total, per_epoch)
        micro = full * data.batches_per_epoch + min(rest * per_step, data.batches_per_epoch)
        after = [(k, total, math.ceil(k / per_epoch), k % per_epoch == 0 or k == total) for k in range(1, total + 1)]
        evals = 0
        if t.validate_every_n_steps and data.validation:
            evals = 1 + sum(validates_after(t, *a) for a in after)
        states = sum(sum(states_after(t, *a)) for a in after)
        experts[e] = ExpertTime(total, micro * micro_s + total * extra,
                                evals, evals * t.validation_timesteps * one_pass,
                                states, states * S_PER_STATE_RANK_16 * t.rank / 16)
    sample = recipe.p.sample
    compile_validation = FIRST_VALIDATION_S if any(x.validations for x in experts.values()) else 0.0
    return RunTime(experts, OTHER_S + compile_validation, bool(sample.every_n_steps or sample.every_n_epochs))


def step_graph_check(recipe, plan) -> tuple[Check, bool]:
    """Whether a run in one process replays its steps as CUDA graphs (the check, and that), and if not why: the
    loop's own rule (`wanpair.train.step_graph.why_not`) on this plan and dataset, in the words its log uses. On a
    CUDA GPU."""
    from ..train.step_graph import why_not

    t = recipe.p.train
    shapes = len(recipe.cached_data(paths=False).batch_shapes())
    why = why_not(torch.device("cuda"), t.cuda_graph, 1, plan, t.gradient_accumulation_steps, t.module_dropout,
                  shapes)
    return Check(None, f"training steps replayed as CUDA graphs ({shapes} batch shape{'s' if shapes > 1 else ''}; "
                       "with --gpus 2 or more they run without)" if why is None else
                 f"training steps run without CUDA graphs: {why}"), why is None


def speed_checks(recipe, plan, config: dict, gpu: str, sizes: set[tuple[int, int]], fa4: bool = False) -> list[Check]:
    """The plan with its expected s/step, whether steps replay as CUDA graphs, and on a GPU the figures were
    measured on, the whole run's time. `recipe`: checked, its validation items chosen; `sizes`: its `batch_sizes`;
    `fa4`: self-attention runs on FlashAttention-4."""
    fourteen_b = recipe.p.task.size_word == "14B"
    flops = max(b * useful_flops(config, n) for n, b in sizes)
    graphs, graphed = step_graph_check(recipe, plan)
    extra = loop_extra_s(graphed, fa4)
    checks = [Check(True, f"{plan.describe()} (estimated before loading); "
                          + expected_s_per_step(plan, config, flops, gpu, fourteen_b, extra)), graphs]
    if fourteen_b and any(g in gpu for g in MEASURED_GPUS):
        checks.append(Check(None, run_time(recipe, plan, config, extra).describe()))
    return checks


def project_checks(project_path: Path) -> list[Check]:
    from ..models.attention import attention_problem, describe_attention, wants_fa4
    from ..models.fp8 import fp8_matmul_available
    from ..project import load_project
    from ..train.memory_plan import (LOW_MODE_BUDGET_GIB, block_linear_params, offloaded_block_host_bytes,
                                     plan_from_config, streamed_block_host_bytes)
    from ..train.preflight import preflight
    from ..train.recipe import LoraPairRecipe

    try:
        project, _ = load_project(project_path)
    except WanpairError as e:
        return [Check(False, f"project {project_path}", str(e))]
    checks = [Check(True, f"project {project.path} (run {project.name!r})")]
    recipe = LoraPairRecipe(project)
    device = recipe.device
    t = project.train
    gpu = device.type == "cuda" and torch.cuda.is_available()  # else preflight names the device, with the rest
    fa4 = False
    if gpu and t.mixed_precision == "bf16":
        checks.append(Check(torch.cuda.is_bf16_supported(), "bf16 on this GPU",
                            'set [train] mixed_precision = "fp16" (the Musubi recipe\'s setting) for this GPU.'))
    if gpu:
        fp8 = fp8_matmul_available(device)
        checks.append(Check(None, "fp8 tensor cores: " + ("yes, fp8 matmuls for the frozen base" if fp8 else
                                                          "no (fp8 storage only; matmuls in bf16, slower)")))
        fa4 = wants_fa4(t.attention, device, t.compute_dtype) and not attention_problem(t.attention, device,
                                                                                      t.compute_dtype)
        checks.append(Check(None, describe_attention(fa4, device, t.compute_dtype, t.attention)))
    try:
        recipe.checked = preflight(project, project.task.experts, device, quiet=True)
    except WanpairError as e:
        return checks + [Check(False, "models, dataset, tokenizer, output folder and disk", str(e))]
    recipe.choose_validation()
    checks.append(earlier_work_check(recipe))
    checks.append(Check(True, f"models: {', '.join(f'{k} {d.path.name}' for k, d in recipe.dits.items())}; VAE, "
                              "text encoder and tokenizer of the right kinds"))
    checks.append(Check(True, f"dataset: {len(recipe.items)} items, clean; output folder writable with room"))
    own = {e: w.overrides for e, w in project.experts.items() if w.overrides}
    if own:
        checks.append(Check(None, "set per expert: " + "; ".join(
            f"{expert_name(e)} " + ", ".join(f"{k} {v:g}" for k, v in o.items()) for e, o in own.items())
            + " (the rest from [train])"))
    cplan = recipe.plan_caches()
    todo = len(cplan.missing_latents) + len(cplan.missing_texts)
    entries = len(cplan.latent_paths) + len(cplan.text_paths) + len(cplan.prompt_paths)
    checks.append(Check(None if todo else True, f"caches: {entries - todo} of {entries} entries up to date"
                        + (f"; {len(cplan.missing_latents)} latents and {len(cplan.missing_texts)} captions will be "
                           "encoded when training starts" if todo else "")))
    if device.type != "cuda":
        config = recipe.dits[project.task.experts[0]].config
        params = config["num_layers"] * block_linear_params(config)[0]
        checks.append(Check(params < CPU_PARAMS_LIMIT, f"no GPU: training runs on the CPU ({params / 1e6:,.1f} M "
                                                         "block parameters per model)",
                            "a 14B expert takes days per epoch on a CPU: run on a machine with a CUDA GPU."))
        return checks
    sizes = batch_sizes(recipe)
    tokens = max(n * batch for n, batch in sizes)
    free, _ = torch.cuda.mem_get_info(device)
    budget = t.memory_budget_gb or (min(free / GIB, LOW_MODE_BUDGET_GIB) if t.memory_mode == "low" else free / GIB)
    config = recipe.dits[project.task.experts[0]].config
    try:
        widest = max((project.settings(e) for e in project.task.experts), key=lambda e: e.rank)  # the most LoRA memory
        plan = plan_from_config(config, tokens, widest, budget, fp8_matmul_available(device),
                                compiled=t.compile != "off")
    except WanpairError as e:
        return checks + [Check(False, f"memory plan for {tokens} tokens per batch", f"{project.path}: {e}")]
    checks += speed_checks(recipe, plan, config, torch.cuda.get_device_name(device), sizes, fa4)
    if plan.streamed or plan.offloaded:  # streamed weights and offloaded inputs live in pinned host memory
        pinned = (len(plan.streamed) * streamed_block_host_bytes(config)
                  + len(plan.offloaded) * offloaded_block_host_bytes(config, tokens)) / GIB
        what = " and ".join(w for w, n in (("streamed blocks", plan.streamed),
                                           ("offloaded block inputs", plan.offloaded)) if n)
        ram = _ram_available_gib()
        if ram is not None:
            checks.append(Check(ram >= pinned + HOST_RAM_SPARE_GIB,
                                f"host RAM: {ram:.1f} GiB available for {pinned:.1f} GiB of {what} (pinned)",
                                "free host memory, or give the run more GPU memory (memory_budget_gb) so fewer "
                                "blocks stream or offload."))
    return checks


def earlier_work_check(recipe) -> Check:
    """What `wanpair train` would do with this run's earlier work (keep a finished LoRA, continue from a state,
    refuse a changed setting by name), decided as training decides it, from the files alone."""
    try:
        with contextlib.redirect_stdout(io.StringIO()) as said:  # its "keeping ..." / "continuing ..." lines
            recipe.plan_experts(recipe.p.task.experts, None)
    except WanpairError as e:
        return Check(False, "this run's earlier work: `wanpair train` would refuse to start", str(e))
    lines = said.getvalue().split("\n")
    return Check(None, "this run's earlier work: " + ("; ".join(x for x in lines if x) or "none, training starts anew"))


def doctor(project: Path | None) -> tuple[list[Check], bool]:
    checks = machine_checks()
    if project is not None:
        checks += project_checks(project)
    return checks, all(c.ok is not False for c in checks)
