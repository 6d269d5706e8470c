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
from ..project import SIDE_SETTINGS, Project


def dataset_fingerprint(items: list[Item]) -> str:
    return hashlib.sha256("".join(f"{it.content_hash}:{it.caption}" for it in items).encode()).hexdigest()[:16]


def run_identity(project: Project, expert: str, dit: DitInfo, items: list[Item]) -> dict[str, str]:
    """The metadata keys that decide whether a LoRA or state belongs to this expert's run."""
    window = project.experts[expert]
    return {
        "wanpair.expert": expert,
        "wanpair.timestep_window": f"{window.min_timestep},{window.max_timestep}",
        "wanpair.base_fingerprint": dit.fingerprint,
        "wanpair.dataset_fingerprint": dataset_fingerprint(items),
        "wanpair.settings": json.dumps({k: v for k, v in asdict(project.train).items() if k not in SIDE_SETTINGS},
                                       sort_keys=True),
        "wanpair.init_lora": str(window.init_lora or ""),
    }


def lora_metadata(project: Project, expert: str, dit: DitInfo, items: list[Item], steps: int,
                  epochs: int) -> dict[str, str]:
    t = project.train
    identity = run_identity(project, expert, dit, items)
    timestep_range = identity["wanpair.timestep_window"]
    window = project.experts[expert]
    return {
        # modelspec.* / ss_* are the keys ComfyUI, A1111-style tools and Musubi-Tuner display.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{project.task.architecture}/lora",
        "modelspec.implementation": f"https://github.com/Wan-Video/Wan{project.task.version}",
        "modelspec.title": project.lora_path(expert).stem,
        "modelspec.author": project.author,
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


def differences(found: dict, identity: dict[str, str]) -> list[str]:
    """Which parts of the identity differ, in words (empty: it is this run's)."""
    names = {"wanpair.expert": "expert", "wanpair.timestep_window": "timestep window",
             "wanpair.base_fingerprint": "base model file", "wanpair.dataset_fingerprint": "images or captions",
             "wanpair.init_lora": "init_lora"}
    changed = [names[k] for k in names if found.get(k) != identity[k]]
    if found.get("wanpair.settings") != identity["wanpair.settings"]:
        try:
            old = json.loads(found.get("wanpair.settings") or "{}")
        except json.JSONDecodeError:
            old = {}
        new = json.loads(identity["wanpair.settings"])
        changed += [f"[train] {k}" for k in sorted(new) if old.get(k) != new[k]] or ["[train] settings"]
    return changed


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
