"""The project-file and dataset.toml reference of the user guide, written from the code that reads them.

docs/reference.md holds its tables between `<!-- reference: TABLE -->` and `<!-- /reference: TABLE -->`
lines, so that the page reads whole in the repository; `python docs/gen_reference.py` writes them anew.
Keys, defaults, choices and ranges come from the dataclasses and tables that read the files --
`TrainSettings`, `TRAIN_BOUNDS`, `CHOICES`, `SIDE_SETTINGS` ... in `wanpair.project`, the key schemas and
`DatasetSpec` in `wanpair.data.dataset_config` -- and defaults are written as `wanpair init` writes them
(`wanpair.setup.scaffold.toml_value`). What a key means is the comment beside its field in the code, or
else is written here once (`MEANING`); a key of the code with neither, or a meaning here for a key the
code no longer has, is an error naming it.

It is also a MkDocs hook (mkdocs.yml `hooks:`): the site always shows the tables as the code is now, and a
page whose checked-in tables differ is a warning, which `mkdocs build --strict` (CI) turns into a failure.
tests/test_docs.py checks the same without building the site.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import re
import tokenize
from pathlib import Path

from wanpair.atomic import write_text_atomic
from wanpair.data import dataset_config as dc
from wanpair.models.tasks import TASKS
from wanpair.project import (CHOICES, ON_OFF, OUTPUT_SETTINGS, PER_EXPERT_KEYS, SAMPLE_BOUNDS, SIDE_SETTINGS, TOP_KEYS,
                             TRAIN_BOUNDS, Description, ExpertWindow, HubSettings, Models, SampleDuringTraining,
                             TrainSettings, default_windows)
from wanpair.setup.scaffold import toml_value

# A generated table: its opening line, what was generated, and its closing line.
BLOCK = re.compile(r"^<!-- reference: (?P<name>[\w-]+) -->\n(?:.*?\n)??<!-- /reference: (?P=name) -->$",
                   re.MULTILINE | re.DOTALL)
GUIDE = Path(__file__).parent

# What each key means, where the comment beside its field in the code does not say it all. Tables of
# their own (`[models]`, `[train]`, ...) are described by their sections of reference.md.
MEANING = {
    "top": {
        "name": "run name (letters, digits, `_ . -`); output files are `WAN2.2-HighNoise_<name>.safetensors` and "
                "`WAN2.2-LowNoise_<name>.safetensors` (Wan 2.1: `WAN2.1-14B_<name>.safetensors` / "
                "`WAN2.1-1.3B_<name>.safetensors`)",
        "model": "which model is trained (see [Supported models](models.md)); a file of another model is refused "
                 "naming this line",
        "author": "written into the LoRA metadata (`modelspec.author`)",
        "output_dir": "where the LoRAs go; metrics and run summary go to `<output_dir>/<name>/`",
    },
    "models": {
        "vae": "the Wan 2.1 VAE: `wan_2.1_vae.safetensors` (or a diffusers `vae/` folder); all four models use it",
        "t5": "the umT5 text encoder in Wan's own format, `models_t5_umt5-xxl-enc-bf16.pth` (or a transformers "
              "`text_encoder/` folder)",
        "tokenizer": "the umT5 tokenizer folder (`tokenizer.json` and/or `spiece.model`, e.g. the diffusers "
                     "`tokenizer/`)",
        "high_noise": "the pair's high-noise expert, e.g. `wan2.2_t2v_high_noise_14B_fp16.safetensors` (the "
                      "diffusers `transformer/` folder also works)",
        "low_noise": "the pair's low-noise expert, e.g. `wan2.2_t2v_low_noise_14B_fp16.safetensors` (or "
                     "`transformer_2/`)",
        "dit": "a Wan 2.1 project's one model, e.g. `wan2.1_t2v_14B_fp16.safetensors`",
        "captioner": "the Qwen2.5-VL-7B-Instruct folder that `wanpair caption` uses (default: "
                     "`models/Qwen2.5-VL-7B-Instruct`, where `wanpair download --captioner` puts it); see "
                     "[Captioning](captioning.md)",
    },
    "train": {
        "rank": "LoRA rank (`network_dim`)",
        "alpha": "LoRA alpha; the LoRA is scaled by alpha / rank",
        "learning_rate": "AdamW learning rate",
        "weight_decay": "AdamW weight decay",
        "max_grad_norm": "gradient clipping; 0 = none",
        "lr_scheduler": "the learning-rate schedule",
        "lr_scheduler_power": "polynomial power",
        "lr_warmup_steps": "warm-up steps",
        "lr_scheduler_num_cycles": "restarts of `cosine_with_restarts`",
        "optimizer": "`adamw8bit` needs bitsandbytes, `prodigy` prodigyopt",
        "optimizer_args": "extra optimizer arguments, e.g. `[\"betas=(0.9, 0.99)\", \"eps=1e-8\"]`",
        "lora_dropout": "dropout on the LoRA input",
        "include_modules": "regexes on original Wan module names (`blocks.3.cross_attn.k`, `ffn.0`, ...) narrowing "
                           "the LoRA targets",
        "exclude_modules": "regexes on the same names, taking modules out of the LoRA targets",
        "loss_weighting": "per-timestep loss weights (SD3-style): `sigma_sqrt` (1/t²), `cosmap`",
        "save_every_n_epochs": "intermediate LoRAs `...-step000123.safetensors` every N epochs (0 = final only)",
        "save_every_n_steps": "intermediate LoRAs every N steps (0 = final only)",
        "log_with": "where the run reports besides `metrics.jsonl`: `\"tensorboard\"` (`<output_dir>/<name>/tensorboard/<expert>/`), `\"wandb\"`, `\"trackio\"`, a list of them, or `[]`; each expert is one run of a group of two named `<name>-high` / `<name>-low` ([Training runs](training.md#experiment-trackers)). The older `tensorboard = false` still reads as `log_with = []`",
        "save_state_every_n_steps": "resumable training state in `<output_dir>/<name>/state/` every N steps "
                                    "(`wanpair train --resume`)",
        "save_state_every_n_epochs": "the same, every N epochs",
        "epochs": "epochs per expert",
        "max_steps": "stop after this many optimizer steps (0 = run all epochs)",
        "seed": "seed for LoRA init, noise, timesteps and data order; same seed + data → same LoRA on CPU",
        "timestep_sampling": "how each step's timestep is drawn",
        "discrete_flow_shift": "shift for `shift` sampling",
        "sigmoid_scale": "scale s in t = sigmoid(s·z)",
        "logit_mean": "mean of the normal distribution of `logit_normal` sampling",
        "logit_std": "standard deviation of that distribution",
        "preserve_distribution_shape": "draw t from the distribution conditioned on the expert's window (rejection "
                                       "sampling) instead of squeezing it linearly into the window",
        "mixed_precision": "compute precision; `fp16` is GPU only (and uses a loss scaler)",
        "fp8_base": "store the frozen base's block weights as fp8 (e4m3) with one scale per row, quantised as the "
                    "file is read (a 14B expert takes 13.6 GiB, never 27)",
        "fp8_matmul": "multiply by those weights in fp8 (`torch._scaled_mm`; the LoRA stays bf16/fp32): `auto` = on "
                      "GPUs with fp8 tensor cores (Ada, Hopper and newer), `off` = dequantise and use bf16 matmuls",
        "gradient_checkpointing": "allow recomputing block activations in backward; `false` = never (more memory)",
        "checkpoint_blocks": "how many blocks recompute their activations: -1 = as few as the memory plan needs "
                             "(CPU: all); N forces N",
        "compile": "`torch.compile` the transformer block: `auto` = on with a GPU (the first step takes ~45 s longer)",
        "attention": "the self-attention kernel: `auto` = FlashAttention-4 on H100/H200/B200 when installed "
                     "(`pip install \"wanpair[fa4]\"`), torch's SDPA elsewhere; `sdpa` = always torch's; `fa4` = "
                     "FA4 or refuse to start. Cross-attention always uses SDPA",
        "cuda_graph": "replay each training step as one CUDA graph (captured once per batch shape, after every shape "
                      "ran once): `auto` = where it is safe -- one process on a CUDA GPU, every block resident, "
                      "`gradient_accumulation_steps = 1`, no `module_dropout`, at most 8 batch shapes and 2 GiB spare "
                      "in the memory plan; the log says which, and why not; `off` = every step launched kernel by "
                      "kernel",
        "memory_mode": "`auto`: fit the GPU, fastest first (keep activations, then checkpoint, then stream blocks "
                       "from host memory only if still needed); `fast`: never stream (error if it cannot fit); "
                       "`low`: plan for 16 GiB, streaming fp8 blocks from pinned host memory",
        "memory_budget_gb": "GPU memory the run may use (0 = what the GPU has free; `low`: 16)",
        "gradient_accumulation_steps": "batches per optimizer step",
        "save_dtype": "dtype of the saved LoRA",
        "device": "`auto` = CUDA if present",
        "experts_parallel": "train both experts at the same time, one GPU (group) each: `auto` = with 2+ GPUs that "
                            "have room; `on` (with one GPU: both on it, half its memory each); `off`",
        "validate_every_n_steps": "validation loss per expert every N steps, before the first step, at every LoRA "
                                  "save and at the end; 0 = off",
        "validation_items": "training items measured when there is no `[[validation]]` dataset and no split (then "
                            "it measures fit, and says so)",
        "validation_split": "hold out this fraction of the media (chosen by the seed, whole media) for validation "
                            "instead",
    },
    "metadata": {
        "title": "the pair's name in the LoRA files (`modelspec.title`, with the expert: \"Shapes (high-noise "
                 "expert)\") and the model card's heading; `\"\"` = the file's name",
        "description": "what the pair does, in the files (`modelspec.description`) and at the top of the model card",
        "license": "the Hub's license identifier, e.g. `\"apache-2.0\"`: the files' `modelspec.license` and the "
                   "card's `license:`",
        "tags": "extra tags for the files (`modelspec.tags`) and the card (which has `lora`, `text-to-video` or "
                "`image-to-video`, `wan2.2` or `wan2.1`, `diffusers` and `wanpair` anyway)",
        "trigger_words": "the words the captions use for the subject: `modelspec.trigger_phrase`, the card's "
                         "*Trigger words* and `instance_prompt`",
        "training_comment": "a note kept in the files (`ss_training_comment`)",
    },
    "hub": {
        "repo": "a Hugging Face model repository, `\"USER/NAME\"`: each LoRA the run saves (and with "
                "`push_states` each state) is pushed to it in the background; `\"\"` = no pushing while training "
                "(`wanpair push` uploads a finished pair). A token is needed: `HF_TOKEN` or `hf auth login`",
    },
    "experts": {
        "min_timestep": "start of the expert's window (0–1000 scale)",
        "max_timestep": "end of the window; a pair's windows that do not meet at its boundary are warned about",
        "init_lora": "continue training from an existing LoRA (wanpair, Musubi-Tuner or ai-toolkit layout); one "
                     "made for the other expert is refused",
    },
    "sample": {
        "prompts": "a text file, one prompt per line, for samples during training (text to video only)",
        "every_n_epochs": "sample while training: the expert being trained with its LoRA so far, the other expert "
                          "as it is (or with its LoRA once this run trained it); 0 = never",
        "every_n_steps": "the same, every N steps; files in `<output_dir>/<name>/samples/` named "
                         "`high-step000120_00_<prompt>_highLora+lowBase.png`, and in TensorBoard",
        "width": "width of those samples",
        "height": "height of those samples",
        "frames": "length: 1 (a picture) or 4k+1 (a clip)",
        "steps": "denoising steps",
        "seed": "seed of those samples",
    },
    "dataset": {
        "resolution": "`[width, height]` (or one number for a square): with buckets, their area; without, the "
                      "exact size every item is trained at (then multiples of 16)",
        "caption_extension": "the caption file beside each image or video: same name, this extension",
        "batch_size": "items per batch (one bucket at a time)",
        "num_repeats": "how often each item is seen per epoch",
        "enable_bucket": "group items into buckets of the resolution's area by aspect ratio (see Bucketing); "
                         "`false`: every item at exactly `resolution`",
        "bucket_no_upscale": "an image smaller than the area keeps its size rounded down to 16",
        "image_directory": "a folder of images (png, jpg, jpeg, webp, bmp; not its subfolders) with same-name captions",
        "image_jsonl_file": "a file with one `{\"image_path\": ..., \"caption\": ...}` per line",
        "video_directory": "a folder of videos (mp4, webm, mov, avi, mkv, or folders of frame images) with "
                           "same-name captions",
        "video_jsonl_file": "a file with one `{\"video_path\": ..., \"caption\": ...}` per line",
        "cache_directory": "where the entry's latents and caption embeddings are cached",
        "control_directory": "accepted, as Musubi's format has it; not used for Wan",
        "target_frames": "clip lengths to cut, each 4k+1 (1, 5, 9, ... 81)",
        "frame_extraction": "`head`: the first N frames, for each N in `target_frames`; `chunk`: consecutive "
                            "non-overlapping N-frame pieces; `slide`: N-frame windows every `frame_stride` frames; "
                            "`uniform`: `frame_sample` N-frame windows with evenly spaced starts; `full`: the whole "
                            "video up to `max_frames`, rounded down to 4k+1",
        "frame_stride": "`slide`: frames between window starts",
        "frame_sample": "`uniform`: windows per video",
        "max_frames": "`full`: the longest clip",
        "source_fps": "the videos' frame rate; frames are dropped to play at Wan's 16 fps (unset: taken as they are)",
    },
}
TABLE_KEYS = {"models", "dataset", "train", "experts", "sample", "metadata", "hub"}  # tables: sections of their own
DATASET_DEFAULTS = {"cache_directory": "`cache/` beside the images (or the jsonl file)", "resolution": "(required)",
                    "source_fps": "(unset)", "control_directory": "(unset)"}


def field_comments(cls) -> dict[str, str]:
    """The comment written beside each field of a dataclass, `name: type = value  # comment`."""
    comments, names = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in names:
            names[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in names:
            comments[names[tok.start[0]]] = tok.string.lstrip("# ")
    return comments


def meaning(table: str, key: str, comments: dict[str, str]) -> str:
    text = MEANING[table].get(key) or comments.get(key)
    if not text:
        raise ValueError(f"docs/gen_reference.py: {table} key {key!r} has no meaning: write one in MEANING[{table!r}] "
                         "or as a comment beside its field")
    return text


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def shown(value) -> str:
    return f"`{toml_value(value)}`"


def bounds_text(bounds) -> str:
    if bounds is None:
        return ""
    return f"{bounds}" + (f": {bounds.why}" if bounds.why else "")


def cell(text: str) -> str:
    """One line, and a `|` of the text escaped so that it is no column border. GitHub and MkDocs read an
    escaped `|` inside a code span differently, so there it is refused."""
    parts = text.replace("\n", " ").split("`")
    if any("|" in code for code in parts[1::2]):
        raise ValueError(f"docs/gen_reference.py: a `|` inside code in a table cell renders differently on GitHub "
                         f"and in MkDocs; write it another way: {text}")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def check_covered(table_name: str, keys) -> None:
    """A meaning written here for a key the code no longer reads is as wrong as a key without one."""
    stale = sorted(set(MEANING[table_name]) - set(keys))
    if stale:
        raise ValueError(f"docs/gen_reference.py: MEANING[{table_name!r}] describes {', '.join(stale)}, which the "
                         "code no longer reads; remove or rename them")


def top_table() -> str:
    scalars = TOP_KEYS - TABLE_KEYS
    check_covered("top", scalars)
    order = list(MEANING["top"])
    keys = sorted(scalars, key=lambda k: (order.index(k) if k in order else len(order), k))
    defaults = {"name": "(required)", "model": "what the `[models]` files are (else `\"t2v-A14B\"`)",
                "author": shown(""), "output_dir": shown("output")}
    values = {"model": ", ".join(shown(name) for name in TASKS)}
    return table(("key", "default", "meaning", "values"),
                 ((f"`{k}`", defaults.get(k, ""), meaning("top", k, {}), values.get(k, "")) for k in keys))


def models_table() -> str:
    fields = dataclasses.fields(Models)
    check_covered("models", [f.name for f in fields])
    comments = field_comments(Models)
    used_by = {f.name: [t for t in TASKS if f.name in (*TASKS[t].dit_keys, "vae", "t5", "tokenizer")] for f in fields}
    return table(("key", "needed by", "meaning"),
                 ((f"`{f.name}`", "every model" if len(used_by[f.name]) == len(TASKS) else
                   ", ".join(f"`{t}`" for t in used_by[f.name]) or "no training (optional)",
                   meaning("models", f.name, comments)) for f in fields))


def allowed(key: str, bounds: dict) -> str:
    default = getattr(TrainSettings(), key)
    if isinstance(default, bool):
        return "`true` or `false`"
    if isinstance(default, list):
        return "a list of strings"
    if isinstance(default, float) and key not in bounds:
        return "any finite number"
    if key in CHOICES:
        return ", ".join(f"`{c}`" for c in CHOICES[key]) + (" (or `true` = `on`, `false` = `off`)" if key in ON_OFF else "")
    return bounds_text(bounds.get(key))


def rerun(key: str) -> str:
    """What a rerun does when this setting changed (what-happens-if.md)."""
    if key in SIDE_SETTINGS:
        return "continues"
    if key in OUTPUT_SETTINGS:
        return "continues a saved state"
    return "refused"


def train_table() -> str:
    fields = dataclasses.fields(TrainSettings)
    check_covered("train", [f.name for f in fields])
    comments = field_comments(TrainSettings)
    return table(("key", "default", "meaning", "values", "changed on a rerun"),
                 ((f"<span id=\"{f.name}\"></span>`{f.name}`", shown(default_of(f)), meaning("train", f.name, comments),
                   allowed(f.name, TRAIN_BOUNDS), rerun(f.name)) for f in fields))


def experts_table() -> str:
    fields = [f for f in dataclasses.fields(ExpertWindow) if f.name != "overrides"]  # its keys: PER_EXPERT_KEYS
    check_covered("experts", [f.name for f in fields])
    comments = field_comments(ExpertWindow)
    keys = table(("key", "meaning", "values"),
                 [*((f"`{f.name}`", meaning("experts", f.name, comments),
                     "an integer in 0..1000" if f.name != "init_lora" else "a LoRA file (none by default)")
                    for f in fields),
                  *((f"`{k}`", f"this expert's own [`{k}`](#{k}) (default: `[train]`'s); the other expert keeps "
                               "the shared one", allowed(k, TRAIN_BOUNDS)) for k in PER_EXPERT_KEYS)])
    windows = table(("`model`", "table", "default window", "boundary"),
                    ((f"`{name}`", f"`[experts.{expert}]`", f"{w.min_timestep}–{w.max_timestep}",
                      str(task.boundary) if task.paired else "none: one model")
                     for name, task in TASKS.items() for expert, w in default_windows(task).items()))
    return keys + "\n\n" + windows


def sample_table() -> str:
    fields = dataclasses.fields(SampleDuringTraining)
    check_covered("sample", [f.name for f in fields])
    comments = field_comments(SampleDuringTraining)
    return table(("key", "default", "meaning", "values"),
                 ((f"`{f.name}`", "(none)" if default_of(f) is None else shown(default_of(f)),
                   meaning("sample", f.name, comments), bounds_text(SAMPLE_BOUNDS.get(f.name))) for f in fields))


def dataset_table() -> str:
    keys = [*dc.GENERAL_KEYS, *(k for k in dc.IMAGE_KEYS if k not in dc.GENERAL_KEYS),
            *(k for k in dc.VIDEO_KEYS if k not in dc.IMAGE_KEYS)]
    check_covered("dataset", keys)
    spec = {f.name: f for f in dataclasses.fields(dc.DatasetSpec)}

    def where(key: str) -> str:
        if key in dc.GENERAL_KEYS:
            return "`[general]`, any entry"
        return {(True, True): "any entry", (True, False): "image entries", (False, True): "video entries"}[
            (key in dc.IMAGE_KEYS, key in dc.VIDEO_KEYS)]

    def default(key: str) -> str:
        if key in DATASET_DEFAULTS:
            return DATASET_DEFAULTS[key]
        if key in spec:
            value = default_of(spec[key])
            return shown(list(value) if isinstance(value, tuple) else value)
        return "one of these four per entry" if key.endswith(("_directory", "_jsonl_file")) else ""

    def kind(key: str) -> str:
        types = dc.VIDEO_KEYS.get(key) or dc.IMAGE_KEYS[key]
        return " or ".join({"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "list"}[t.__name__]
                           for t in (types if isinstance(types, tuple) else (types,)))

    def values(key: str) -> str:
        return ", ".join(f"`{v}`" for v in dc.FRAME_EXTRACTIONS) if key == "frame_extraction" else kind(key)

    return table(("key", "where", "default", "meaning", "values"),
                 ((f"`{k}`", where(k), default(k), meaning("dataset", k, {}), values(k)) for k in keys))


def plain_table(cls, name: str) -> str:
    """[metadata] and [hub]: strings, booleans and lists, no ranges."""
    fields = dataclasses.fields(cls)
    check_covered(name, [f.name for f in fields])
    comments = field_comments(cls)
    return table(("key", "default", "meaning"),
                 ((f"`{f.name}`", shown(default_of(f)), meaning(name, f.name, comments)) for f in fields))


TABLES = {"top": top_table, "models": models_table, "train": train_table, "experts": experts_table,
          "sample": sample_table, "dataset": dataset_table,
          "metadata": lambda: plain_table(Description, "metadata"), "hub": lambda: plain_table(HubSettings, "hub")}


def render(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"<!-- reference: {name} -->: no such table; the tables are {', '.join(TABLES)}")
    return TABLES[name]()


def expand(markdown: str) -> str:
    """A page with each generated table written anew from the code."""
    return BLOCK.sub(lambda m: f"<!-- reference: {m['name']} -->\n{render(m['name'])}\n<!-- /reference: {m['name']} -->",
                     markdown)


def stale_pages() -> list[Path]:
    """The guide's pages whose checked-in tables are not what the code makes now."""
    return [p for p in sorted(GUIDE.glob("*.md")) if expand(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs hook: show the tables as the code makes them; a key without a meaning fails the build, and a
    stale checked-in table is a warning (under --strict, a failure)."""
    from mkdocs.exceptions import PluginError

    try:
        fresh = expand(markdown)
    except ValueError as e:
        raise PluginError(str(e)) from e
    if fresh != markdown:
        logging.getLogger("mkdocs.hooks.gen_reference").warning(
            f"docs/{page.file.src_uri}: its generated tables differ from what the code makes now; "
            "run `python docs/gen_reference.py` to write them anew")
    return fresh


def main() -> None:
    """Write the generated tables of every page anew."""
    for path in stale_pages():
        write_text_atomic(path, expand(path.read_text(encoding="utf-8")))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
