"""What a LoRA file (and a training state) says about the run that made it, and whether it is this run's.

The identity of one expert's run is its settings, its data, its base file and its window. A finished
LoRA or a saved state whose identity equals the current project's is this run's work: a rerun keeps
the one and continues from the other instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from safetensors import safe_open

from .. import __version__
from ..data.items import Item
from ..models.dit import DitInfo
from ..models.tasks import expert_name
from ..project import OUTPUT_SETTINGS, PER_EXPERT_KEYS, SIDE_SETTINGS, Project, TrainSettings


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def dataset_fingerprint(items: list[Item]) -> str:
    return hashlib.sha256("".join(f"{it.content_hash}:{it.caption}" for it in items).encode()).hexdigest()[:16]


def media_fingerprint(items: list[Item]) -> str:
    """The media alone, without their captions: whether a changed dataset has other images or only other words."""
    return hashlib.sha256("".join(it.content_hash for it in items).encode()).hexdigest()[:16]


def batch_order(items: list[Item], batch_sizes: dict[int, int]) -> dict[str, str]:
    """What decides the order of the micro-batches a saved state's position counts into: each item's bucket,
    frames and repeats, and each dataset's batch size (dataset.toml). One key per dataset.toml concept, so
    a refusal can name what changed."""
    return {
        "wanpair.batch_size": json.dumps({str(d): batch_sizes[d] for d in sorted({it.dataset for it in items})}),
        "wanpair.num_repeats": _digest([[it.content_hash, it.num_repeats] for it in items]),
        "wanpair.buckets": _digest([[it.content_hash, *it.bucket] for it in items]),
        "wanpair.frames": _digest([[it.content_hash, it.start, it.frames] for it in items]),
    }


def run_identity(project: Project, expert: str, dit: DitInfo, items: list[Item],
                 batch_sizes: dict[int, int]) -> dict[str, str]:
    """The metadata keys that decide whether a LoRA or state belongs to this expert's run: what is trained
    (settings other than the SIDE_SETTINGS, data and its order, base, window, starting LoRA) and the
    dtype the LoRA is saved in."""
    window = project.experts[expert]
    settings = asdict(project.settings(expert))
    return {
        "wanpair.expert": expert,
        "wanpair.timestep_window": f"{window.min_timestep},{window.max_timestep}",
        "wanpair.base_fingerprint": dit.fingerprint,
        "wanpair.dataset_fingerprint": dataset_fingerprint(items),
        "wanpair.media_fingerprint": media_fingerprint(items),  # not compared itself: it says what the above is
        **batch_order(items, batch_sizes),
        "wanpair.settings": json.dumps({k: v for k, v in settings.items() if k not in SIDE_SETTINGS | OUTPUT_SETTINGS},
                                       sort_keys=True),
        "wanpair.output_settings": json.dumps({k: settings[k] for k in sorted(OUTPUT_SETTINGS)}),
        "wanpair.init_lora": str(window.init_lora or ""),
        # what each expert of this project trains with where experts may differ: how the other expert's LoRA is
        # recognised as this run's partner (`same_run`)
        "wanpair.pair_settings": json.dumps({e: {k: getattr(project.settings(e), k) for k in PER_EXPERT_KEYS}
                                             for e in project.task.experts}, sort_keys=True),
    }


def lora_metadata(project: Project, expert: str, dit: DitInfo, items: list[Item], batch_sizes: dict[int, int],
                  steps: int, epochs: int) -> dict[str, str]:
    t = project.settings(expert)
    identity = run_identity(project, expert, dit, items, batch_sizes)
    timestep_range = identity["wanpair.timestep_window"]
    window = project.experts[expert]
    m = project.metadata
    title = f"{m.title} ({expert_name(expert)} expert)" if m.title and project.task.paired else m.title
    return {
        # modelspec.* / ss_* are the keys ComfyUI, A1111-style tools and Musubi-Tuner display (the SAI model
        # spec 1.0.0: title, author, description, license, tags as one comma-separated string, trigger_phrase).
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{project.task.architecture}/lora",
        "modelspec.implementation": f"https://github.com/Wan-Video/Wan{project.task.version}",
        "modelspec.title": title or project.lora_path(expert).stem,
        "modelspec.author": project.author,
        **({"modelspec.description": m.description} if m.description else {}),
        **({"modelspec.license": m.license} if m.license else {}),
        **({"modelspec.tags": ", ".join(m.tags)} if m.tags else {}),
        **({"modelspec.trigger_phrase": ", ".join(m.trigger_words)} if m.trigger_words else {}),
        **({"ss_training_comment": m.training_comment} if m.training_comment else {}),
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.timestep_range": timestep_range,
        "ss_network_module": "networks.lora_wan",
        "ss_network_dim": str(t.rank),
        "ss_network_alpha": str(t.alpha),
        "ss_base_model_version": project.task.architecture.replace("-", "_"),
        "ss_output_name": project.lora_path(expert).stem,
        "ss_learning_rate": str(t.learning_rate),
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_seed": str(t.seed),
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_num_train_images": str(len(items)),
        "ss_mixed_precision": t.mixed_precision,
        "ss_min_timestep": str(window.min_timestep),
        "ss_max_timestep": str(window.max_timestep),
        "wanpair.version": __version__,
        "wanpair.architecture": project.task.architecture,
        "wanpair.base_model": dit.path.name,
        **identity,
    }


# What each identity key is, in a user's words; settings are named key by key.
_IDENTITY_NAMES = {
    "wanpair.expert": "expert", "wanpair.timestep_window": "timestep window",
    "wanpair.base_fingerprint": "base model file", "wanpair.dataset_fingerprint": "set of images or captions",
    "wanpair.batch_size": "dataset.toml batch_size", "wanpair.num_repeats": "dataset.toml num_repeats",
    "wanpair.buckets": "training sizes (dataset.toml resolution, enable_bucket, bucket_no_upscale)",
    "wanpair.frames": "clip frames (dataset.toml target_frames, frame_extraction, frame_stride, frame_sample, "
                      "max_frames, source_fps)",
    "wanpair.init_lora": "init_lora",
}
_SETTINGS_KEYS = ("wanpair.settings", "wanpair.output_settings")
# Digests over every item's repeats, size and frames: an added, removed or replaced image changes them all, so
# beside a changed set of images they tell nothing (whether dataset.toml changed too shows once the images match).
_PER_ITEM = ("wanpair.num_repeats", "wanpair.buckets", "wanpair.frames")


def _media_changed(found: dict, identity: dict[str, str]) -> bool:
    """Whether the images or clips themselves differ, not only their captions (a file from before the media's
    own record: whether the dataset as a whole does)."""
    key = "wanpair.media_fingerprint" if "wanpair.media_fingerprint" in found else "wanpair.dataset_fingerprint"
    return found.get(key) != identity[key]


def _toml_value(settings: dict, key: str) -> str:
    """A setting's value as it would be written in wanpair.toml (JSON's literals are TOML's for these)."""
    return json.dumps(settings[key]) if key in settings else "unset"


def differences(found: dict, identity: dict[str, str], outputs: bool = True) -> list[str]:
    """Which parts of the identity differ, in words (empty: it is this run's). `outputs=False` leaves out
    how the LoRA is saved (a state continues under a new save_dtype)."""
    unrecorded = [k for k in _IDENTITY_NAMES if k not in found]
    if unrecorded and "wanpair.settings" in found:  # saved by a wanpair from before these keys: they are unknown
        return ["wanpair version (an earlier one, which did not record the "
                f"{', '.join(_IDENTITY_NAMES[k] for k in unrecorded)})"]
    media = _media_changed(found, identity)
    changed = [name if media or k != "wanpair.dataset_fingerprint" else "set of captions"
               for k, name in _IDENTITY_NAMES.items() if found.get(k) != identity[k] and not (media and k in _PER_ITEM)]
    for key in ("wanpair.settings", "wanpair.output_settings") if outputs else ("wanpair.settings",):
        new = json.loads(identity[key])
        old = _settings(found, key, new)
        if old is None:  # a file from before this key existed: which setting differs is unknown
            changed.append("[train] settings")
        else:
            changed += [f"[train] {k} ({_toml_value(old, k)} then, {_toml_value(new, k)} now)"
                        for k in sorted(new) if old.get(k) != new[k]]  # the old value: what "restore" means
    return changed


# The identity keys both experts of one run share (the rest say which expert, window, base and init_lora).
_SHARED = ("wanpair.dataset_fingerprint", "wanpair.batch_size", "wanpair.num_repeats", "wanpair.buckets",
           "wanpair.frames", *_SETTINGS_KEYS)


def same_run(found: dict, identity: dict[str, str]) -> bool:
    """Is a finished LoRA (its metadata `found`) the other expert's of the run whose identity this is? Its
    shared settings equal this expert's, and the settings an expert may have for itself (`PER_EXPERT_KEYS`)
    equal what this project gives that expert."""
    def shared(settings: dict | None) -> dict | None:
        return None if settings is None else {k: v for k, v in settings.items() if k not in PER_EXPERT_KEYS}

    if found.get("wanpair.partial") == "true":
        return False
    for key in _SHARED:
        if key in _SETTINGS_KEYS:
            if shared(_settings(found, key, json.loads(identity[key]))) != shared(_settings(identity, key)):
                return False
        elif found.get(key) != identity[key]:
            return False
    settings, pair = _settings(found, "wanpair.settings"), json.loads(identity["wanpair.pair_settings"])
    own = pair.get(found.get("wanpair.expert"))
    return own is None or all(settings.get(k) == v for k, v in own.items())


def side_differences(saved_settings: dict, project: Project) -> list[str]:
    """The SIDE_SETTINGS a state was saved under that differ now (a rerun continues under the new ones)."""
    now, saved = (json.loads(json.dumps(x)) for x in (asdict(project.train), saved_settings))  # tuples as lists
    return [f"[train] {k}" for k in sorted(SIDE_SETTINGS) if saved.get(k, _DEFAULTS[k]) != now[k]]


def _settings(found: dict, key: str, now: dict | None = None) -> dict | None:
    """The [train] settings a file recorded under `key`; a setting it does not name (a file from a release
    before that setting existed) reads as its default: a new setting left at its default changes nothing. A
    setting recorded only since it counts as trained (`LATE_KEYS`) was unknown before, not the default: it
    reads as its value `now`."""
    try:
        recorded = json.loads(found[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    if not isinstance(recorded, dict):
        return None
    late = {k: now[k] for k in LATE_KEYS if now and k in now and k not in recorded}
    return {**_DEFAULTS, **late, **recorded}


_DEFAULTS = json.loads(json.dumps(asdict(TrainSettings())))  # as a record holds them (tuples as lists)
LATE_KEYS = ("fp8_matmul",)  # a side setting until 2026-12-06: earlier records do not say which value they had


def finished_lora_differences(path: Path, identity: dict[str, str]) -> list[str] | None:
    """None if `path` is a finished LoRA of this very run; else what differs (a partial save differs)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
    except Exception:  # safetensors raises several types for damaged files
        return ["the file is unreadable"]
    changed = differences(found, identity)
    if found.get("wanpair.partial") == "true":
        changed.append("it is a partial save")
    return changed or None
