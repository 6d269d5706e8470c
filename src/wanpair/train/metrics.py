"""What a run shows: one metrics line per optimizer step (JSON lines + TensorBoard) and a loss plot.

`<output_dir>/<name>/metrics.jsonl` gets {expert, time, step, epoch, loss, smoothed_loss, lr, timestep,
s_per_step, samples_per_s, gpu_mem_gib} (the first row of each training process also total_steps and
device), and at validation steps val_loss, val_kind ("held-out" or "fit") and val_seconds (the
evaluation's time, kept out of s_per_step); a row of step 0 holds the validation loss before training. The
trackers of `[train] log_with` get the same values (`wanpair.train.trackers`); `loss.png` plots loss and validation loss against
step and loss against timestep for each expert at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..models.tasks import expert_name
from .trackers import close_trackers, log_row, log_samples


class MetricsLog:
    """Appends one JSON line per step. Each line is one `write()` on a file opened for appending, so the
    two experts' processes can log into the same file side by side without tearing each other's lines.
    The same values go to the run's trackers (`wanpair.train.trackers`: TensorBoard, W&B, Trackio)."""

    def __init__(self, run_dir: Path, expert: str, header: dict | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.expert = expert
        self.header = header or {}  # goes into the first row only: what a reader needs once (total steps, device)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.trackers: list = []  # started after the log opened (`ExpertTraining.train`), closed with it

    def log(self, row: dict) -> None:
        if torch.cuda.is_available():
            row["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        line = {"expert": self.expert, "time": round(time.time(), 3), **self.header, **row}
        self.header = {}
        os.write(self.fd, (json.dumps(line) + "\n").encode())
        log_row(self.trackers, row, row["step"])

    def log_samples(self, paths: list[Path], step: int) -> None:
        log_samples(self.trackers, self.expert, paths, step)

    def close(self) -> None:
        os.close(self.fd)
        trackers, self.trackers = self.trackers, []
        close_trackers(trackers)


def read_metrics(path: Path) -> list[dict]:
    """Every complete row; a last line cut short by a killed run is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def best_validation(rows: list[dict], expert: str) -> tuple[int, float, str] | None:
    """(step, lowest validation loss, kind) of one expert's logged rows, if any were validated."""
    v = [r for r in rows if r.get("expert") == expert and "val_loss" in r]
    if not v:
        return None
    best = min(v, key=lambda r: (r["val_loss"], r["step"]))
    return best["step"], best["val_loss"], best.get("val_kind", "fit")


def drop_metrics_after(path: Path, expert: str, step: int) -> None:
    """Forget one expert's rows after `step` (a killed run's, after the state it resumes from; all of them
    for -1), and any torn line."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if not (r["expert"] == expert and r["step"] > step)]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def plot_loss(metrics_path: Path, out: Path) -> Path:
    """loss.png: smoothed loss against step, and every step's loss against its timestep, per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for expert, color in (("high", "tab:red"), ("low", "tab:blue"), ("full", "tab:purple")):
        r = [x for x in rows if x.get("expert") == expert and "loss" in x]
        v = [x for x in rows if x.get("expert") == expert and "val_loss" in x]
        if r:
            a.plot([x["step"] for x in r], [x["smoothed_loss"] for x in r], color=color, label=expert_name(expert))
            b.scatter([x["timestep"] for x in r], [x["loss"] for x in r], s=4, color=color, label=expert_name(expert))
        if v:
            what = "held-out" if v[-1].get("val_kind") == "held-out" else "fit: training items"
            a.plot([x["step"] for x in v], [x["val_loss"] for x in v], color=color, ls="--", marker="o", ms=3,
                   label=f"{expert_name(expert)} validation ({what})")
    a.set(xlabel="step", ylabel="loss (smoothed)", title="loss against step")
    b.set(xlabel="timestep (0-1000)", ylabel="loss", title="loss against timestep")
    a.legend()
    b.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
