"""The experiment trackers a run reports to besides `metrics.jsonl`: `[train] log_with`.

accelerate's tracker classes do the talking (`accelerate.tracking`: TensorBoard, Weights & Biases, Trackio;
Musubi-Tuner's `--log_with` takes the same names). One expert's training is one tracker run: the two
experts of a pair are a *group of two* runs, `<name>-high` and `<name>-low` in group `<name>`, in the
project `[train] tracker_project` (pair-parallel training runs each expert in its own process, so one
run holding both would need the processes to share it). Each run gets the expert's settings as its
config, and logs loss, smoothed loss, validation loss, learning rate, timestep, s/step, samples/s and GPU
memory per step, and the samples drawn during training (TensorBoard keeps no config).

- TensorBoard: `<output_dir>/<name>/tensorboard/<expert>/` (`tensorboard --logdir output/<name>/tensorboard`).
- Weights & Biases: its files under `<output_dir>/<name>/wandb/`; `wandb login` first, or `WANDB_MODE=offline`
  and `wandb sync` later.
- Trackio (local-first, no account): its own store (`~/.cache/huggingface/trackio`, or `TRACKIO_DIR`);
  `trackio show` opens its dashboard.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import threading
from dataclasses import asdict
from pathlib import Path

from ..models.tasks import expert_name

# What a metrics row holds that a tracker plots (the rest of the row is bookkeeping).
SCALARS = ("loss", "smoothed_loss", "val_loss", "lr", "timestep", "s_per_step", "samples_per_s", "gpu_mem_gib",
           "keys_scaled", "average_key_norm", "max_key_norm")


def tracker_problems(log_with: list[str], project_path: Path) -> list[str]:
    """Before any model loads: each tracker's package is installed, and Weights & Biases can log in (else
    wandb would stop the run to ask for a key, or fail minutes in)."""
    problems = []
    for name in log_with:  # each tracker's package has its name
        if importlib.util.find_spec(name) is None:
            install = "tensorboard" if name == "tensorboard" else f"\"wanpair[{name}]\""  # tensorboard: a dependency
            problems.append(f"{project_path}: [train] log_with names {name}, which is not installed here: "
                            f"pip install {install} (or remove it from log_with).")
    if "trackio" in log_with:
        import accelerate.tracking

        if not hasattr(accelerate.tracking, "TrackioTracker"):  # accelerate 1.9 added it
            problems.append(f"{project_path}: [train] log_with names trackio, which needs accelerate 1.9 or later "
                            f"(this is {accelerate.__version__}): pip install -U \"accelerate>=1.9\".")
    if "wandb" in log_with and not _wandb_can_log_in():
        problems.append(f"{project_path}: [train] log_with names wandb, and no Weights & Biases key was found "
                        "(WANDB_API_KEY, or `wandb login`): log in, or set WANDB_MODE=offline to keep the run on this "
                        "machine (`wandb sync` uploads it later).")
    return problems


def _wandb_can_log_in() -> bool:
    """WANDB_MODE offline/disabled needs no key; otherwise WANDB_API_KEY or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_trackers(project, expert: str, resumed_at: int = 0) -> list:
    """Start `expert`'s run in each tracker of `log_with`, its settings as the config (TensorBoard keeps no config).
    `resumed_at`: the step a continued run resumes from (TensorBoard hides the killed run's events after it)."""
    settings = project.settings(expert)
    run = f"{project.name}-{expert}"
    window = project.experts[expert]
    config = {**{k: _plain(v) for k, v in asdict(settings).items()}, "expert": expert_name(expert),
              "timestep_window": f"{window.min_timestep}-{window.max_timestep}", "model": project.task.name,
              "dit": project.dit_path(expert).name, "project": project.path.name}  # names: no local paths leave
    trackers = []
    try:
        for name in settings.log_with:  # each class imported when named (TrackioTracker: accelerate 1.9+)
            if name == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                _quiet_writer_thread_errors()
                tracker = TensorBoardTracker(expert, project.run_dir / "tensorboard",
                                             **({"purge_step": resumed_at + 1} if resumed_at else {}))
            elif name == "wandb":
                from accelerate.tracking import WandBTracker

                folder = project.run_dir / "wandb"
                folder.mkdir(parents=True, exist_ok=True)
                tracker = WandBTracker(settings.tracker_project, name=run, group=project.name, dir=str(folder),
                                       config=config)
            else:
                from accelerate.tracking import TrackioTracker

                tracker = TrackioTracker(settings.tracker_project, name=run, group=project.name, config=config)
            tracker.start()
            trackers.append(tracker)
    except BaseException:
        close_trackers(trackers)
        raise
    return trackers


def _plain(value):
    """A config value as every tracker takes it (numbers, strings, booleans)."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _each(trackers: list, call) -> None:
    """`call(tracker)` for each tracker. A remote tracker's failure (its service, its client) never stops training:
    it is said once and that tracker is dropped; an OSError (a full disk under TensorBoard) is the run's to report."""
    for tracker in list(trackers):
        try:
            call(tracker)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 -- any error of a tracker's client
            trackers.remove(tracker)
            print(f"warning: the {tracker.name} tracker failed ({type(e).__name__}: {str(e)[:200]}); training goes "
                  "on without it (metrics.jsonl has every row).", flush=True)


def log_row(trackers: list, row: dict, step: int) -> None:
    values = {k: row[k] for k in SCALARS if k in row}
    if values:
        _each(trackers, lambda tracker: tracker.log(values, step=step))


def log_samples(trackers: list, expert: str, paths: list[Path], step: int) -> None:
    """The samples drawn at `step`: pictures in every tracker; clips in those that show videos."""
    if paths:
        _each(trackers, lambda tracker: _log_media(tracker, expert, paths, step))


def _log_media(tracker, expert: str, paths: list[Path], step: int) -> None:
    import numpy as np
    from PIL import Image

    pictures = [p for p in paths if p.suffix == ".png"]
    clips = [p for p in paths if p.suffix in (".mp4", ".webm", ".gif")]
    key = f"samples/{expert}"
    if tracker.name == "tensorboard":
        for i, path in enumerate(pictures):
            tracker.writer.add_image(f"{key}/{i:02d}", np.asarray(Image.open(path).convert("RGB")), step,
                                     dataformats="HWC")
    elif tracker.name == "wandb":
        import wandb

        media = [wandb.Image(str(p), caption=p.stem) for p in pictures]
        media += [wandb.Video(str(p), caption=p.stem) for p in clips]
        tracker.log({key: media}, step=step)
    elif tracker.name == "trackio":
        import trackio

        media = [trackio.Image(str(p), caption=p.stem) for p in pictures]
        media += [trackio.Video(str(p), caption=p.stem) for p in clips]
        for i, m in enumerate(media):
            tracker.log({f"{key}/{i:02d}": m}, step=step)


def close_trackers(trackers: list) -> None:
    """Finish every tracker's run: a remote tracker's failure is said and passed over (`_each`); the first OSError
    (a full disk under TensorBoard) is raised after all are closed."""
    error = None

    def finish(tracker):
        nonlocal error
        try:
            tracker.finish()
        except OSError as e:
            error = error or e

    _each(list(trackers), finish)
    if error is not None:
        raise error


def _quiet_writer_thread_errors() -> None:
    """TensorBoard writes events from a thread of its own; an OSError there (a full disk) would print a raw
    traceback, and the same exception is raised again at the writer's next call in the training thread
    (tensorboard `summary/writer/event_file_writer.py`, `_AsyncWriter._check_worker_status`), where the
    run turns it into one clear message. So the thread's copy is not printed."""
    previous = threading.excepthook
    if getattr(previous, "wanpair", False):
        return

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    hook.wanpair = True
    threading.excepthook = hook
