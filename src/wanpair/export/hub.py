"""`wanpair push` (`push_pair`): the finished pair, its model card (`wanpair.export.model_card`), the samples and
the project's ComfyUI workflow, in one commit to a Hugging Face model repository (created when missing).
Everything that would stop it is checked before the first byte: a LoRA missing, partial or not this project's,
two LoRAs that are not one run's pair, no token.

The hub's address, repository names, folders and errors: `wanpair.hub`, which training uses too (`[hub]` and
`--resume-from-hub`: `wanpair.train.hub_push`).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from ..atomic import write_text_atomic
from ..errors import WanpairError
from ..hub import NO_TOKEN, SAMPLES, STATES, endpoint, has_token, hub_error
from ..models.files import safetensors_metadata
from ..models.tasks import expert_name, expert_noun
from ..project import Project
from ..sizes import human_bytes
from .workflow import workflow_path
from .model_card import Sample, model_card

MEDIA = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4", ".webm")
GALLERY = 12  # samples shown at the top of the card (all of them are uploaded)
PRIVATE_TEXT = ("wanpair.project", "wanpair.loras")  # a sample PNG's text chunks that name local paths


@dataclass(frozen=True)
class Upload:
    """One file of a push: where it goes in the repository, and its bytes (a local file, or made here)."""

    path: str
    source: Path | bytes
    what: str

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


# ---------------------------------------------------------------- wanpair push
def finished_lora_problem(project: Project, expert: str) -> str | None:
    """Why `expert`'s LoRA is not this project's finished file, with the fix; None when it is. The run knows its
    files by their metadata, as `wanpair.train.outputs` does: `ss_output_name` is the final file's name, and a save
    of a stopped run says `wanpair.partial`."""
    path, train = project.lora_path(expert), f"wanpair train {project.path}"
    if not path.is_file():
        return f"{path} does not exist: {expert_noun(expert)}'s LoRA is not trained yet. Run `{train}`."
    try:
        meta = safetensors_metadata(path)
    except (OSError, WanpairError) as e:
        return f"{path} cannot be read ({e}). Train it again: `{train} --overwrite`."
    if meta.get("wanpair.partial") == "true":
        return f"{path} is the partial save of a stopped run, not a finished LoRA. Finish it: `{train}`."
    if meta.get("ss_output_name") != path.stem:
        return (f"{path} was not written by this project's run: it says it is "
                f"{meta.get('ss_output_name') or 'nothing (no ss_output_name)'!r}, renamed or copied from another run. "
                f"Move it away and train this project's: `{train}`.")
    return None


def pair_problem(project: Project, loras: dict[str, dict[str, str]]) -> str | None:
    """Why the finished high- and low-noise LoRAs (their metadata) are not one run's pair -- one was trained
    again since on other data or settings (`wanpair train --expert high --overwrite`) -- naming the file to train
    again; None when they are, and for a single model (one LoRA)."""
    if not project.task.paired:
        return None
    from ..train.metadata import same_run

    try:
        paired = same_run(loras["low"], loras["high"])
    except KeyError:  # written by a wanpair from before the keys that say which run a LoRA is of
        paired = False
    if paired:
        return None
    older = min(("high", "low"), key=lambda e: loras[e].get("modelspec.date", ""))
    return (f"{project.lora_path('high')} and {project.lora_path('low')} are not one run's pair: they were trained "
            "on different data or settings (one expert was trained again since). The older one, "
            f"{project.lora_path(older).name}, is {expert_noun(older)}'s: train it again with this project's data and "
            f"settings, `wanpair train {project.path} --overwrite --expert {older}`, then push.")


def workflow_files(project: Project) -> list[Path]:
    """This project's ComfyUI workflow (`wanpair.export.workflow.workflow_path`), if training or `export
    --workflow` wrote it (several projects may share an output folder: only this one's)."""
    path = workflow_path(project)
    return [path] if path.is_file() else []


def _prompt(media: Path) -> str:
    """The prompt a sample was made from (its .json, written beside it by `wanpair sample`)."""
    try:
        return str(json.loads(media.with_suffix(".json").read_text(encoding="utf-8"))["prompt"])
    except (OSError, ValueError, KeyError, TypeError):
        return media.stem.replace("_", " ")


def _shared_text(texts: dict[str, str]) -> dict[str, str]:
    """A sample PNG's text chunks as they go up: those naming local paths (the project file, the LoRAs' folders)
    left out, and the settings' first frame (`image`, image-to-video) named by its file name only; settings that
    cannot be read are left out too."""
    shared = {k: v for k, v in texts.items() if k not in PRIVATE_TEXT}
    if "wanpair.settings" in shared:
        try:
            settings = json.loads(shared["wanpair.settings"])
        except ValueError:
            settings = None
        if not isinstance(settings, dict):
            del shared["wanpair.settings"]
        elif settings.get("image"):
            name = PureWindowsPath(str(settings["image"])).name  # the name after the last / or \ (a path of any system)
            shared["wanpair.settings"] = json.dumps({**settings, "image": name})
    return shared


def _shareable(media: Path) -> Path | bytes:
    """A sample as it goes up: a PNG without local paths in its text chunks (`_shared_text`), its pixels kept;
    any other file as it is."""
    if media.suffix != ".png":
        return media
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    with Image.open(media) as image:
        texts = dict(getattr(image, "text", {}))
        shared = _shared_text(texts)
        if shared == texts:
            return media
        info = PngInfo()
        for k, v in shared.items():
            info.add_text(k, v)
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def sample_uploads(project: Project) -> tuple[list[Upload], list[Sample]]:
    """The run's samples (`<run_dir>/samples`), and the ones the card shows: those `wanpair sample` made with the
    finished pair, else the newest step's from training."""
    folder = project.run_dir / SAMPLES
    media = sorted(p for p in folder.glob("*") if p.suffix.lower() in MEDIA and p.is_file()) if folder.is_dir() else []
    uploads = [Upload(f"{SAMPLES}/{p.name}", _shareable(p), "sample") for p in media]
    training = re.compile(r"(high|low|full)-step(\d+)_")
    shown = [p for p in media if not training.match(p.name)]
    if not shown and media:
        newest = max(int(training.match(p.name)[2]) for p in media)
        shown = [p for p in media if int(training.match(p.name)[2]) == newest]
    return uploads, [Sample(f"{SAMPLES}/{p.name}", _prompt(p)) for p in shown[:GALLERY]]


def plan_push(project: Project, repo: str, states: bool = False) -> tuple[list[Upload], str]:
    """What `wanpair push` uploads, in order (refused, naming each problem and its fix, when a LoRA is not this
    project's finished file, or the two are not one run's pair), and the model card's text."""
    experts = project.task.experts
    problems = [p for e in experts if (p := finished_lora_problem(project, e))]
    if problems:
        raise WanpairError("cannot push:\n" + "\n".join(f"- {p}" for p in problems))
    loras = {e: safetensors_metadata(project.lora_path(e)) for e in experts}
    problem = pair_problem(project, loras)
    if problem:
        raise WanpairError(f"cannot push:\n- {problem}")
    samples, gallery = sample_uploads(project)
    workflows = workflow_files(project)
    card = model_card(project, repo, loras, gallery, [p.name for p in workflows])
    uploads = [Upload(project.lora_path(e).name, project.lora_path(e),
                      f"the {expert_name(e)} LoRA" if project.task.paired else "the LoRA") for e in experts]
    uploads.append(Upload("README.md", card.encode(), "model card"))
    uploads += [Upload(p.name, p, "ComfyUI workflow") for p in workflows]
    uploads += samples
    if states:
        from ..train.state import list_states

        newest = [s for e in experts for s in list_states(project.run_dir, e)[-1:]]
        if not newest:
            raise WanpairError(f"--states: {project.run_dir / STATES} holds no training state (a finished run keeps "
                               "them only with save_state_every_n_steps or _epochs set). Push without --states.")
        uploads += [Upload(f"{STATES}/{s.name}", s, "training state") for s in newest]
    return uploads, card


def card_path(project: Project) -> Path:
    """Where the model card is kept beside the LoRAs: `<output_dir>/<name>_README.md`."""
    return project.output_dir / f"{project.name}_README.md"


def push_pair(project: Project, repo: str, private: bool = False, states: bool = False, dry_run: bool = False) -> None:
    """`wanpair push`: the pair, its card, workflow and samples (and with `states`, each expert's newest state) in
    one commit. The card is also written beside the LoRAs; `dry_run` writes it and lists the files, nothing more."""
    uploads, card = plan_push(project, repo, states)
    if not dry_run and not has_token():
        raise WanpairError(f"pushing to {repo} {NO_TOKEN}. Nothing was uploaded.")
    write_text_atomic(card_path(project), card)
    total = sum(u.size for u in uploads)
    print(f"{'would upload' if dry_run else 'uploading'} {len(uploads)} files ({human_bytes(total)}) to "
          f"{endpoint()}/{repo} in one commit:")
    for u in uploads:
        print(f"  {u.path:<60} {human_bytes(u.size):>10}  {u.what}")
    print(f"model card: {card_path(project)}")
    if dry_run:
        print("dry run: nothing was uploaded. Read the card, then run the same command without --dry-run.")
        return
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint())
    operations = [CommitOperationAdd(u.path, u.source if isinstance(u.source, bytes) else str(u.source))
                  for u in uploads]
    what = "LoRA pair" if project.task.paired else "LoRA"
    try:
        api.create_repo(repo, private=True if private else None, exist_ok=True)
        info = api.create_commit(repo, operations,
                                 commit_message=f"{project.name}: {what}, model card and samples (wanpair push)")
    except Exception as e:  # the hub's errors, and the network's (httpx, OS errors)
        error = hub_error(e, repo, f"pushing to {repo}")
        raise WanpairError(f"{error} A commit is applied whole or not at all, so {repo} has all of these files or "
                           "none; a rerun sends only what did not arrive.") from None
    print(f"pushed: {endpoint()}/{repo} (commit {info.oid[:12]})")
