"""The dashboard's new run: a folder of media and captions becomes the dataset.toml and project file that
`wanpair init` writes (`scaffold.plan_init`: one path for both), with the form's settings set in [train].

The project goes beside the media folder as `<name>.toml` (in the folder itself when the folder is a root),
so its run writes `output/<name>/` there. Its text is read by the project loader before it is written, and
what the loader refuses is shown instead. The folder's own dataset.toml is replaced by the recipe's only when
the request says `recipe_dataset`, and a file that exists is replaced only when it also says `replace`: the
page asks first, naming exactly those files (together they are `wanpair init --force`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..data.dataset_config import load_dataset_config
from ..data.images import IMAGE_EXTENSIONS
from ..data.items import MAX_CAPTION_BYTES, Report, check_dataset
from ..data.media import caption_path, dataset_media, media_in, media_kind
from ..errors import WanpairError
from ..models.tasks import TASKS, T2V
from ..project import CHOICES, TrainSettings, load_project
from ..setup.scaffold import InitPlan, dataset_toml, model_candidates, model_order, plan_init
from .paths import PathRefused, Roots, write_text_inside

# The settings the form shows (with the recipe's default); every other one stays the recipe's, and is in the
# written file, commented, to change by hand.
FORM_SETTINGS = ("epochs", "learning_rate", "rank", "memory_mode", "validate_every_n_steps")
FORM_EXPERT_SETTINGS = ("learning_rate",)  # also per expert of a pair: [experts.high] / [experts.low]
SKIPPED_FOLDERS = {"cache", "output", "models", "state", "samples", "tensorboard"}
FOLDER_DEPTH = 3
DATASET_TOML_LIMIT = 1 << 20  # bytes: a Musubi dataset.toml is a few hundred
WEIGHT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin"}
MODEL_HINTS = {"high_noise": "high_noise", "low_noise": "low_noise", "vae": "vae", "t5": "t5"}  # files named
# otherwise than the recipe's (the demo's tiny ones, a renamed download): these words in the name come first


class NeedsConfirmation(WanpairError):
    """Files the request would replace: sent again with replace = true once the user agreed (answered 409)."""


def recipe_settings() -> dict[str, dict]:
    """The form's settings: the recipe's value, and the choices where there are some."""
    defaults = TrainSettings()
    return {k: {"default": getattr(defaults, k), "choices": CHOICES.get(k)} for k in FORM_SETTINGS}


def media_of(folder: Path) -> list[Path]:
    """The images or videos directly in `folder` (what a dataset.toml of it would train on), sorted: image files
    make it an image folder; else its videos, where a folder of frames counts as a clip when its caption is
    beside it (a folder of images without one is a dataset folder of its own, not a clip)."""
    images, videos = media_in(folder)
    return images or [v for v in videos if v.is_file() or caption_path(v).is_file()]


def dataset_folders(roots: Roots) -> list[dict]:
    """The folders under the roots that hold media: where a new run can start."""
    out = []
    for i, root in enumerate(roots.paths):
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if depth < FOLDER_DEPTH and not d.startswith(".")
                                 and d not in SKIPPED_FOLDERS and not caption_path(here / d).is_file())
            media = media_of(here)
            if media:
                out.append({"root": i, "path": here.relative_to(root).as_posix() or ".", "items": len(media),
                            "dataset_toml": (here / "dataset.toml").is_file()})
    return out


def captions(folder: Path, roots: Roots) -> list[dict]:
    """Each medium with its caption, for the page to show side by side and edit; a caption that is a link out
    of the roots (checked on the opened file) is not read (None)."""
    out = []
    for media in media_of(folder):
        if roots.locate(media) is None:  # a link out of the roots: not shown
            continue
        cap = caption_path(media)
        preview = media if media.is_file() else next((p for p in sorted(media.iterdir())
                                                      if p.suffix.lower() in IMAGE_EXTENSIONS), None)
        text = roots.read_text(cap, MAX_CAPTION_BYTES)
        out.append({"media": roots.locate(media), "preview": roots.locate(preview) if preview else None,
                    "caption": text.strip() if text is not None else None})
    return out


def write_caption(media: Path, text: str, roots: Roots) -> Path:
    """Replace the caption of `media` (atomically): `media` must be one its folder trains on (`media_of`), not a
    root itself (whose caption would be written beside the root, outside it); the caption is written as a
    regular file of that folder, checked on the opened folder (`Roots.write_text`: never through a link)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CAPTION_BYTES:
        raise WanpairError(f"a caption of {len(text)} characters is refused: at most {MAX_CAPTION_BYTES // 1024} KiB "
                           "(training reads the first 512 umT5 tokens, a few thousand characters).")
    if media in roots.paths:
        raise PathRefused(f"{media} is a folder the dashboard was started on; its caption would be written "
                          "outside it. Name an image or video inside it.")
    if not media.parent.is_dir() or media not in media_of(media.parent):
        raise WanpairError(f"{media} is not an image or video of a dataset folder; captions are written beside one.")
    cap = caption_path(media)
    roots.write_text(cap, text.strip() + "\n")
    return cap


def check_report(folder: Path, force: bool, roots: Roots, task_name: str = "") -> Report:
    """`wanpair check` of what training would read, for the model the form picked (`task_name`: an image dataset
    is nothing an image-to-video pair can learn from): the folder's dataset.toml, or (none, or `force`) the
    recipe's, checked from a scratch copy that names the folder. A dataset.toml that names folders outside the
    roots, or lists its media in a JSONL file (any path), is not read here (a planted one would make the page
    read, name or wait on files elsewhere): the report says to check it with `wanpair check` in a shell. The same
    for a dataset.toml that is a link out of the roots, or larger than any (it is read from a checked descriptor,
    at most `DATASET_TOML_LIMIT` bytes)."""
    task = _task(task_name)
    existing = folder / "dataset.toml"
    if existing.is_file() and not force:
        text = roots.read_text(existing, DATASET_TOML_LIMIT + 1)
        if text is None or len(text.encode("utf-8")) > DATASET_TOML_LIMIT:
            return Report(warnings=[f"{existing} " + ("leads outside the dashboard's folders or cannot be read"
                                                      if text is None else
                                                      f"is over {DATASET_TOML_LIMIT // 1024} KiB")
                                    + f", which the page does not read. Check it in a shell: wanpair check {existing}"])
        specs = load_dataset_config(existing, text)
        elsewhere = [str(s.source) for s in specs if s.from_jsonl or roots.locate(s.source) is None]
        if elsewhere:
            return Report(warnings=[f"{existing} reads {', '.join(elsewhere)}: a JSONL list or a folder outside the "
                                    f"dashboard's folders, which the page does not read. Check it in a shell: "
                                    f"wanpair check {existing}"])
        return _checked(specs, roots, f"wanpair check {existing}", task)
    with tempfile.TemporaryDirectory(prefix="wanpair-check-") as scratch:
        toml = Path(scratch) / "dataset.toml"
        toml.write_text(dataset_toml(media_kind(folder), directory=str(folder)), encoding="utf-8")
        return _checked(load_dataset_config(toml), roots, f"wanpair init {folder} writes its dataset.toml, which "
                                                           "`wanpair check` then reads", task)


def _checked(specs: list, roots: Roots, in_a_shell: str, task) -> Report:
    """`check_dataset` of `specs` (folders inside the roots), unless one of their media, frames or captions is a
    link out of the roots: the check would read it (a planted link to a private file, its errors naming it).
    Looked at before the check opens them: a link swapped in between is not caught here. `in_a_shell`: how to
    check the dataset instead; `task`: the model the form picked."""
    out = []
    for spec in specs:
        if not spec.source.is_dir():
            continue  # the check says it does not exist
        for entry in dataset_media(spec.source, spec.kind):
            paths = [entry, caption_path(entry, spec.caption_extension)]
            if entry.is_dir() and roots.locate(entry) is not None:
                paths += sorted(entry.iterdir())  # a clip's frames
            out += [str(p) for p in paths if roots.locate(p) is None]
    if out:
        return Report(warnings=[f"{out[0]} leads outside the dashboard's folders" + (f" ({len(out)} such)" if
                                len(out) > 1 else "") + f", which the page does not read. Check the dataset in a "
                                f"shell: {in_a_shell}"])
    return check_dataset(specs, task=task)


def model_choices(roots: Roots, task_name: str) -> dict[str, list[dict]]:
    """Per [models] key, the files under each root's `models/` folder to pick from: those named like the
    recipe's first (the one `wanpair init` would take), then every other weight file (or, for the tokenizer,
    folder), so that renamed files can be picked too."""
    task = _task(task_name)
    out: dict[str, list[dict]] = {key: [] for key in model_order(task)}
    for root in roots.paths:
        folder = root / "models"
        if not folder.is_dir() or roots.locate(folder) is None:  # a models/ that leads out is not walked
            continue
        named = model_candidates(folder, task)
        weights = sorted(p for p in folder.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()
                         and "/.cache/" not in p.as_posix())
        tokenizers = sorted({p.parent for p in folder.rglob("tokenizer*.json")} | {p.parent for p in folder.rglob("spiece.model")})
        for key in out:
            others = sorted(tokenizers if key == "tokenizer" else weights,
                            key=lambda p: MODEL_HINTS.get(key, "\0") not in p.name.lower())
            out[key] += [where | {"recipe": p in named.get(key, [])}  # a link out of the roots is not offered
                         for p in dict.fromkeys([*named.get(key, []), *others]) if (where := roots.locate(p))]
    return out


def captioner_in(roots: Roots) -> Path:
    """The captioner `wanpair download --captioner` put under a root's `models/` folder (the first root that has
    one), for the form's "caption the missing ones"."""
    from ..setup.download import CAPTIONER_DIR

    found = next((root / "models" / CAPTIONER_DIR for root in roots.paths
                  if (root / "models" / CAPTIONER_DIR / "config.json").is_file()), None)
    if found is None:
        raise WanpairError(f"no captioner under {', '.join(str(r / 'models') for r in roots.paths)}: run "
                           f"`wanpair download --captioner --dir {roots.paths[0] / 'models'}` first (about 16.6 GB), "
                           "or write the captions here by hand.")
    return found


def _task(name: str):
    task = TASKS.get(name or T2V.name)
    if task is None:
        raise WanpairError(f"model {name!r} is not one wanpair trains; one of {', '.join(TASKS)}.")
    return task


@dataclass
class NewRun:
    """What the form asks for, its paths checked against the roots."""

    root: Path  # the dashboard folder it is in
    folder: Path
    name: str
    task_name: str
    models: dict[str, Path]
    train: dict
    prompts: list[str]
    sample_every_n_epochs: int
    experts: dict | None = None  # {"high": {"learning_rate": 3e-5}}: what the form sets per expert

    @classmethod
    def from_request(cls, data: dict, roots: Roots) -> "NewRun":
        if not isinstance(data, dict):
            raise WanpairError("the request must be a JSON object (the new-run form).")
        folder = roots.resolve(data.get("root"), data.get("folder"))
        if not folder.is_dir():
            raise WanpairError(f"{folder} is not a folder; pick the folder with your images (or videos) and captions.")
        task = _task(data.get("task"))
        for key in ("models", "train", "experts"):
            if not isinstance(data.get(key) or {}, dict):
                raise WanpairError(f"{key} = {data[key]!r} must be an object of {key} keys (the new-run form's "
                                   f"[{key}] table).")
        models = {}
        for key, where in (data.get("models") or {}).items():
            if key not in model_order(task):
                raise WanpairError(f"[models] {key}: {task.name} takes {', '.join(model_order(task))}.")
            if isinstance(where, dict):
                models[key] = roots.resolve(where.get("root"), where.get("path"))
            elif where:
                raise WanpairError(f"[models] {key} = {where!r} must be a picked file: {{\"root\": N, \"path\": \"...\"}}.")
        prompts = [line.strip() for line in str(data.get("prompts") or "").splitlines() if line.strip()]
        experts = {}
        for expert, form in (data.get("experts") or {}).items():
            if expert not in task.experts or not isinstance(form, dict):
                raise WanpairError(f"[experts.{str(expert)[:20]}]: {task.name} has the experts "
                                   f"{', '.join(task.experts)}, each an object of settings.")
            if own := _settings(form, FORM_EXPERT_SETTINGS, f"experts.{expert}"):
                experts[expert] = own
        return cls(roots.paths[data["root"]], folder, str(data.get("name") or "").strip(), task.name, models,
                   _settings(data.get("train") or {}), prompts, _integer(data.get("sample_every_n_epochs") or 0,
                                                                         "sample_every_n_epochs"), experts)

    @property
    def task(self):
        return TASKS[self.task_name]

    @property
    def base(self) -> Path:
        """Where the project goes: beside the media folder, inside the root."""
        return self.folder.parent if self.folder != self.root else self.folder

    def project_file(self) -> Path:
        return self.base / f"{self.name or self.folder.name}.toml"

    def prompts_file(self) -> Path:
        return self.project_file().with_suffix(".prompts.txt")

    def plan(self, recipe_dataset: bool) -> InitPlan:
        """The texts, as `wanpair init` makes them; an existing dataset.toml is kept unless `recipe_dataset`.
        (An existing file is not refused here: `create` asks for the confirmation instead; but one that is not a
        regular file is, before anything reads it: a FIFO would hang the request.)"""
        for path in (self.project_file(), self.prompts_file(), self.folder / "dataset.toml"):
            if path.exists() and not path.is_file():
                raise PathRefused(f"{path} is not a regular file; the dashboard neither reads nor replaces it. Move "
                                  "it away first.")
        sample = {"prompts": self.prompts_file(), "every_n_epochs": self.sample_every_n_epochs} if self.prompts else None
        plan = plan_init(self.folder, self.project_file(), self.name or None, self.base / "models", True, self.task,
                         models=self.models, train=self.train, sample=sample, experts=self.experts)
        if not recipe_dataset and plan.dataset.exists():
            plan.dataset_text = None
        return plan

    def existing(self, plan: InitPlan) -> list[Path]:
        """The files this run would replace (kept unless the request says `replace`)."""
        return [p for p in (plan.project, self.prompts_file() if self.prompts else None,
                            plan.dataset if plan.dataset_text is not None else None) if p and p.exists()]

    def problems(self, plan: InitPlan) -> list[str]:
        """What the project loader refuses in the text, read from a hidden scratch file beside the project
        (so relative paths resolve as they will); the prompts file it names is only written on create."""
        fd, scratch = tempfile.mkstemp(prefix=".wanpair-new-run.", suffix=".check.toml", dir=plan.project.parent)
        try:
            os.write(fd, plan.project_text.encode("utf-8"))
            os.close(fd)
            load_project(scratch)
            return []
        except WanpairError as e:
            prompts_line = f"prompts file {self.prompts_file()} does not exist"
            return [line.replace(scratch, str(plan.project)) for line in str(e).splitlines()
                    if not (self.prompts and prompts_line in line)]
        finally:
            Path(scratch).unlink(missing_ok=True)

    def create(self, recipe_dataset: bool, replace: bool) -> tuple[InitPlan, list[str]]:
        """Write the files (the prompts, the dataset.toml unless kept, the project), after every check; files
        that exist only when `replace`."""
        plan = self.plan(recipe_dataset)
        existing = self.existing(plan)
        if existing and not replace:
            raise NeedsConfirmation(f"{', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}; "
                                    "replace (as `wanpair init --force`)?")
        problems = self.problems(plan)
        if problems:
            raise WanpairError("\n".join(problems))
        done = []
        def write(path: Path, text: str) -> None:  # inside the root, as a file of its folder, never via a link
            write_text_inside(path, text, [self.root])

        if self.prompts:
            write(self.prompts_file(), "\n".join(self.prompts) + "\n")
            done.append(f"wrote {self.prompts_file()}")
        return plan, done + plan.write(write)


def _integer(value, key: str) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit() or len(text) > 18:
        raise WanpairError(f"{key} = {str(value)[:40]!r} must be a whole number (of at most 18 digits).")
    return int(text)


def _settings(form: dict, keys=FORM_SETTINGS, table: str = "train") -> dict:
    """The form's [train] values (or an expert's), typed as the settings are; for [train], those left at the
    recipe's value are not set (an expert's are: they differ from [train]'s)."""
    defaults, out = TrainSettings(), {}
    for key, value in form.items():
        if key not in keys:
            raise WanpairError(f"[{table}] {str(key)[:40]}: the form sets {', '.join(keys)}; change others in the file.")
        if value in (None, ""):
            continue
        default = getattr(defaults, key)
        if isinstance(default, int):
            value = _integer(value, key)
        elif isinstance(default, float):
            try:
                value = float(str(value)[:64])
            except (TypeError, ValueError):
                raise WanpairError(f"[{table}] {key} = {value!r} must be a number (recipe: {default}).") from None
        else:
            value = str(value)
        if value != default or table != "train":
            out[key] = value
    return out
