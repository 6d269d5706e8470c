"""`wanpair init`: the recipe's `dataset.toml` and a commented `wanpair.toml` for a folder of media.

The project file is written from the settings' own defaults (`TrainSettings`), so what it shows as
the recipe is what training does. Model paths come from an existing `[models]` table (the one
`wanpair download` writes), else from the recipe's file names found under the models folder.
Nothing a user wrote is replaced without `--force`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..caption import project_captioner
from ..data.media import media_kind
from ..errors import WanpairError
from ..models.tasks import T2V, Task
from ..project import MODEL_KEYS, PER_EXPERT_KEYS, TrainSettings
from ..tomlfile import read_toml

def model_patterns(task: Task) -> dict[str, list[str]]:
    """What each [models] key looks like on disk (the Comfy-Org / Wan-AI names of the recipe), best first."""
    return {
        **{task.dit_key(e): [task.dit_file(e, "fp16"), task.dit_file(e, "bf16"), task.dit_file(e, "fp8*"),
                             f"*{task.kind_word}*{e}_noise*.safetensors" if task.paired else
                             f"*wan2[._]1*{task.kind_word}*.safetensors"]
           for e in task.experts},
        "vae": ["wan_2.1_vae.safetensors", "Wan2.1_VAE.pth"],
        "t5": ["models_t5_umt5-xxl-enc-bf16.pth"],
        "tokenizer": ["spiece.model", "tokenizer.json"],  # the folder holding it
    }


def model_order(task: Task) -> tuple[str, ...]:
    """The [models] keys of `task`, in the project's order: its DiT file(s) first."""
    return (*task.dit_keys, "vae", "t5", "tokenizer")


MODELS_ONLY_HEADER = "# written by `wanpair download`; `wanpair init DATASET_DIR` adds the rest\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def relative(path: Path, base: Path) -> str:
    """A path as the project file writes it: relative to the project's folder when inside it."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def models_table(paths: dict[str, Path | None], base: Path, task: Task = T2V) -> str:
    lines = ["[models]"]
    for key in model_order(task):
        path = paths.get(key)
        lines.append(f"{key:<10} = {toml_value(relative(path, base))}" if path else
                     f'{key:<10} = ""  # not found: `wanpair download`, or the path to your file')
    if paths.get("captioner"):  # optional: `wanpair caption`'s model
        lines.append(f"{'captioner':<10} = {toml_value(relative(paths['captioner'], base))}")
    return "\n".join(lines) + "\n"


def set_models_table(project: Path, paths: dict[str, Path], task: Task = T2V) -> str:
    """Write `paths` as the [models] table of `project`: replace the table in an existing file (the rest
    of it kept as written, its `captioner` too), or start a file holding just that table. Returns what was done."""
    base = project.parent
    if project.exists():  # (a file that is not valid TOML is refused here, not edited)
        paths = {"captioner": project_captioner(project), **paths}
    table = models_table(paths, base, task)
    if not project.exists():
        write_text_atomic(project, MODELS_ONLY_HEADER + table)
        return f"wrote {project} ([models] only; `wanpair init DATASET_DIR` adds the dataset and settings)"
    lines = project.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next((i for i, x in enumerate(lines) if x.strip() == "[models]"), None)
    if start is None:
        if any(re.match(r"\s*models\s*=", x) or x.strip().startswith("[models.") for x in lines):
            raise WanpairError(f"{project} writes its models in a form this command does not edit; set these under "
                               f"[models] yourself:\n{table}")
        text = "".join(lines).rstrip("\n") + "\n\n" + table
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1  # blank lines and comments before the next table belong to it
        text = "".join(lines[:start]) + table + "".join(lines[end:])
    write_text_atomic(project, text)
    return f"updated [models] in {project}"


def model_candidates(folder: Path, task: Task = T2V) -> dict[str, list[Path]]:
    """Every file under `folder` (any depth) named like the recipe's file of each [models] key, best first
    (the tokenizer: the folders holding one); the dashboard offers them to pick from."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    patterns = model_patterns(task)
    for key in model_order(task):
        hits = [p.parent if key == "tokenizer" else p for pattern in patterns[key]
                for p in sorted(folder.rglob(pattern)) if p.is_file() and "/.cache/" not in p.as_posix()]
        if hits:
            found[key] = list(dict.fromkeys(hits))
    return found


def find_models(folder: Path, task: Task = T2V) -> dict[str, Path]:
    """The recipe's files for `task` under `folder` (any depth), by their usual names."""
    return {key: paths[0] for key, paths in model_candidates(folder, task).items()}


def dataset_toml(kind: str, resolution: tuple[int, int] | None = None, frames: int = 81, directory: str = ".") -> str:
    """The recipe's dataset.toml (section 1 of the recipe): 960x960 area buckets for images; for videos
    Wan's 81-frame clips at 832x480. The demo writes the same file at its toy size. `directory`: where the
    media are, from the file (the dashboard checks the text from elsewhere before it writes it)."""
    if kind == "image":
        w, h = resolution or (960, 960)
        return (f'# The recipe\'s dataset (Musubi-Tuner format): {w}x{h} area buckets, one .txt caption per image\n'
                f'[general]\nresolution = [{w}, {h}]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n'
                f'bucket_no_upscale = false\n\n[[datasets]]\nimage_directory = {toml_value(directory)}\ncache_directory = "cache"\n'
                'num_repeats = 1\n')
    w, h = resolution or (832, 480)
    return (f'# Video clips (Musubi-Tuner format): {frames} frames at 16 fps, {w}x{h} area buckets\n'
            f'[general]\nresolution = [{w}, {h}]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n'
            f'bucket_no_upscale = false\n\n[[datasets]]\nvideo_directory = {toml_value(directory)}\ncache_directory = "cache"\n'
            f'target_frames = [{frames}]\nframe_extraction = "head"\nnum_repeats = 1\n')


def train_defaults(chosen: dict | None = None) -> str:
    """Every [train] setting with its default, commented out: the recipe, visible and editable. The `chosen`
    settings (the dashboard's form) are written as set, with the recipe's value beside them."""
    chosen = chosen or {}
    lines = ["[train]", "# The recipe's settings are the defaults; uncomment a line to change it (docs/reference.md: every key)."]
    for f in dataclasses.fields(TrainSettings):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name} = {toml_value(chosen[f.name])}  # recipe: {toml_value(value)}" if f.name in chosen
                     else f"# {f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def experts_tables(task: Task, chosen: dict | None = None) -> str:
    """[experts.<expert>] tables with what is set per expert, or (none set) a commented example: the settings
    each expert of a pair may have for itself."""
    chosen = {e: v for e, v in (chosen or {}).items() if v}
    if chosen:
        return "".join(f"\n[experts.{e}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in own.items())
                       for e, own in chosen.items())
    if not task.paired:
        return ""
    return (f"\n# Per expert ({', '.join(PER_EXPERT_KEYS)}; the rest is shared), e.g. a lower rate for the high-noise one:\n"
            "# [experts.high]\n# learning_rate = 3e-5\n")


def project_text(name: str, models: str, dataset: Path, project: Path, task: Task = T2V,
                 train: dict | None = None, sample: dict | None = None, experts: dict | None = None) -> str:
    """The project file; `train`, `experts` and `sample`: settings written as set ([sample]: only when given)."""
    sample_table = "".join(f"{k} = {toml_value(relative(v, project.parent) if isinstance(v, Path) else v)}\n"
                           for k, v in (sample or {}).items())
    return (f"# wanpair project: `wanpair doctor {project.name}` checks it, `wanpair train {project.name}` runs it\n"
            f"name = {toml_value(name)}  # LoRA{'s' if task.paired else ''}: "
            f"{', '.join(task.lora_file(e, name) for e in task.experts)}\n"
            f"model = {toml_value(task.name)}  # {task.title}\n"
            f'author = ""\noutput_dir = "output"\n\n{models}\n[dataset]\n'
            f"config = {toml_value(relative(dataset, project.parent))}\n\n{train_defaults(train)}"
            + experts_tables(task, experts) + (f"\n[sample]\n{sample_table}" if sample_table else ""))


def _existing_models(project: Path) -> dict[str, Path] | None:
    """The [models] of a file `wanpair download` started (models only); None if it is a whole project."""
    path, raw = read_toml(project, "")
    if set(raw) - {"models"}:
        return None
    return {k: (path.parent / v).resolve() for k, v in raw.get("models", {}).items() if k in MODEL_KEYS and v}


@dataclass
class InitPlan:
    """What `wanpair init` (or the dashboard's new run) writes, made before anything is written: each file's
    text (`dataset_text` None: the existing dataset.toml is kept), and the lines that tell what was done."""

    dataset: Path
    dataset_text: str | None
    project: Path
    project_text: str
    name: str
    notes: list[str]

    def write(self, write_text=write_text_atomic) -> list[str]:
        """Write the files (`write_text`: how; the dashboard's writes only inside its roots, never via a link)."""
        if self.dataset_text is not None:
            write_text(self.dataset, self.dataset_text)
        write_text(self.project, self.project_text)
        return [f"kept {self.dataset} (it exists; --force writes the recipe's instead)" if self.dataset_text is None
                else f"wrote {self.dataset}", f"wrote {self.project} (name = {self.name!r})", *self.notes]


def plan_init(dataset_dir: Path, project: Path, name: str | None, models_dir: Path, force: bool, task: Task = T2V,
              models: dict[str, Path] | None = None, train: dict | None = None,
              sample: dict | None = None, experts: dict | None = None) -> InitPlan:
    """The texts of dataset.toml (unless there is one and not `force`) and the project; `models`: the files
    chosen (else those of a models-only project file, else those found under `models_dir`)."""
    dataset_dir = dataset_dir.resolve()
    if not dataset_dir.is_dir():
        raise WanpairError(f"{dataset_dir} is not a folder; give the folder with your images (or videos) and captions.")
    dataset = dataset_dir / "dataset.toml"
    dataset_text = None if dataset.exists() and not force else dataset_toml(media_kind(dataset_dir))
    existing = _existing_models(project) if project.exists() else {}
    if existing is None and not force:
        raise WanpairError(f"{project} already exists; pass --force to replace it, or --project to write another file.")
    found = models if models is not None else existing or find_models(models_dir, task)
    name = name or re.sub(r"[^\w.\-]+", "_", dataset_dir.name).strip("_") or "my_lora"
    if not re.fullmatch(r"[\w.\-]+", name):
        raise WanpairError(f"--name {name!r} must be file-name safe (letters, digits, _ . -).")
    text = project_text(name, models_table(found, project.parent, task), dataset, project, task, train, sample, experts)
    missing = [k for k in model_order(task) if k not in found]
    notes = [f"not found under {models_dir}: {', '.join(missing)}; run `wanpair download --project {project}` "
             "or set the paths under [models]"] if missing else []
    return InitPlan(dataset, dataset_text, project, text, name, notes)
