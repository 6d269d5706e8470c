"""What the dashboard shows, read from run folders as training leaves them (read-only, any moment).

A run is a folder `<output_dir>/<name>/` holding `metrics.jsonl`. Its state comes from the lock training
holds (`<output_dir>/.<name>.lock`, probed without taking it from the run), `summary.json` (written at the
end) and saved states or partial LoRAs (a stop that can be resumed). Files may be half-written while they
are read: a metrics line without its newline is left for the next read, a torn JSON line is skipped. A
resume rewrites `metrics.jsonl` as a new, often shorter file (`drop_metrics_after`): a reader following it
by offset is told to start again (`rows_since`).

Runs are found by walking the roots without following links, so a run's folder is where it seems; every
file of it is then read through `paths.open_inside`, checked on the opened descriptor to lie in the run's
folder (its LoRAs: in the output folder): a planted link to a file elsewhere is not read, listed or served.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import WanpairError
from ..models.files import safetensors_metadata
from ..models.tasks import EXPERT_NAMES
from ..train.run_lock import lock_is_held, lock_path
from .paths import PathRefused, list_inside, open_inside, read_text_inside

EXPERTS = tuple(EXPERT_NAMES)  # a pair's experts, or a single model's one ("full": all timesteps)
MEDIA = {".png", ".jpg", ".jpeg", ".webp", ".mp4", ".webm"}
SAMPLE_NAME = re.compile(r"^(high|low|full)-step(\d+)_(\d+)_(.*)_(high(?:Lora|Base)\+low(?:Lora|Base)|full(?:Lora|Base))$")
SEARCH_DEPTH = 4  # metrics.jsonl at most this many folders below a given directory
ACTIVE_S = 120  # an expert that logged within this many seconds is progressing now
# Files under a root may be planted (a shared folder, an archive), sparse and huge at no cost to the planter: the
# page reads each only as far as it needs, in bytes and in lines (a piece of tiny lines would parse into millions of
# objects). Metrics: a bounded piece per read (a step's row is ~250 bytes: the recipe's whole run, ~4 000 rows, is
# one piece; a longer file reaches a poller over several); a run's summary reduces at most SUMMARY_PIECES pieces
# from the start and then the last one; a LoRA's header (a 14B expert's rank-16 LoRA: ~0.15 MB).
METRICS_PIECE = 2 * 2**20
METRICS_LINES = 20_000
SUMMARY_PIECES = 10
LORA_HEADER_LIMIT = 2 * 2**20


@dataclass(frozen=True)
class Run:
    run_dir: Path  # where it physically is (found by a walk that follows no link, or resolved)

    @property
    def id(self) -> str:
        return hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def output_dir(self) -> Path:
        return self.run_dir.parent

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def _folders(roots: list[Path]):
    """(folder, its file names) under the roots, down to SEARCH_DEPTH, past hidden folders and runs' own."""
    for root in roots:
        root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            dirnames[:] = [d for d in dirnames if depth < SEARCH_DEPTH and not d.startswith(".")
                           and d not in ("cache", "state", "samples", "tensorboard", "earlier")]
            yield Path(dirpath), filenames


def find_runs(roots: list[Path]) -> list[Run]:
    runs = {Run(folder) for folder, filenames in _folders(roots) if "metrics.jsonl" in filenames}
    return sorted(runs, key=lambda r: -_mtime(r.metrics))


def _mtime(path: Path) -> float:
    """When `path` itself (not what a link names) changed; 0 when it is gone meanwhile."""
    try:
        return path.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def training_now(roots: list[Path]) -> list[Path]:
    """The run locks under the roots that a training holds now (one still caching has no metrics yet, but
    holds its lock)."""
    return [folder / name for folder, filenames in _folders(roots) for name in filenames
            if name.startswith(".") and name.endswith(".lock") and lock_is_held(folder / name)]


def summary_rows(run: Run) -> Iterator[dict]:
    """The rows a run's summary reduces (`progress`): from the start, piece by piece, at most SUMMARY_PIECES of
    them (a real run's file is one or two), and in a longer file the rows of its last piece (where it is now)."""
    try:
        with open_inside(run.metrics, [run.run_dir]) as f:
            size, offset = os.fstat(f.fileno()).st_size, 0
            for _ in range(SUMMARY_PIECES):
                rows, after = _rows_from(f, offset)
                yield from rows
                if after == offset:  # no whole line more
                    return
                offset = after
            if size - offset > METRICS_PIECE:
                f.seek(size - METRICS_PIECE - 1)
                f.readline(METRICS_PIECE + 1)  # to the start of the first whole line in the last piece
                offset = f.tell()
            yield from _rows_from(f, offset)[0]
    except (OSError, PathRefused):
        return


def rows_since(run: Run, offset: int = 0, file: str = "") -> dict:
    """What a poller of the run's metrics has not seen: the complete rows after its `offset` in the file it read
    (`file`: that file's identity, as this returned it). Once the metrics are another file -- a resume wrote it
    anew -- or shorter than `offset`, all its rows, and `reset`: the poller's rows are no longer the run's."""
    try:
        offset = max(0, offset)
        with open_inside(run.metrics, [run.run_dir]) as f:
            st = os.fstat(f.fileno())
            current = f"{st.st_dev}:{st.st_ino}"
            reset = offset > 0 and (offset > st.st_size or file not in ("", current))
            rows, offset = _rows_from(f, 0 if reset else offset)
    except (OSError, PathRefused):
        return {"rows": [], "offset": offset, "file": file, "reset": False}
    return {"rows": rows, "offset": offset, "file": current, "reset": reset}


def _rows_from(f, offset: int) -> tuple[list[dict], int]:
    """Complete rows from byte `offset` on, in at most METRICS_PIECE bytes and METRICS_LINES lines, and the offset
    after the last line read."""
    f.seek(offset)
    chunk = f.read(METRICS_PIECE)
    end = chunk.rfind(b"\n") + 1  # a last line still being written waits for the next read
    if not end and len(chunk) == METRICS_PIECE:
        return [], offset + METRICS_PIECE  # a "line" longer than a piece is no row of ours: passed over
    rows, pos = [], 0
    for _ in range(METRICS_LINES):
        if pos >= end:
            break
        newline = chunk.index(b"\n", pos)
        line, pos = chunk[pos:newline], newline + 1
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # torn by a killed run; or planted (not UTF-8, nested too deep)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + pos


def read_json(path: Path, within: Path) -> dict:
    """A JSON object file that lies in `within`, or {} while it is missing, half-written, not an object or
    a link out."""
    try:
        value = json.loads(read_text_inside(path, [within]) or "")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def state_of(run: Run) -> str:
    if lock_is_held(lock_path(run.output_dir, run.name)):
        return "running"
    summary = run.run_dir / "summary.json"
    if _mtime(summary) and _mtime(summary) >= _mtime(run.metrics) - 1:
        return "finished"
    if any(n.endswith(".pt") for n in list_inside(run.run_dir / "state", [run.run_dir])) \
            or list(run.output_dir.glob(f"*_{run.name}-partial-step*.safetensors")):
        return "stopped"
    return "failed"


def progress(rows: Iterable[dict], now: float | None = None) -> dict:
    """Per expert (those the run logged; a pair's two before any row): steps done, of how many, median
    s/step of the last 20, ETA; the run's ETA (the experts' remaining times added, or the longest when
    they progress side by side). One pass over `rows`, keeping only that; a field of the wrong type (a
    planted file) is not read."""
    now = now or time.time()
    seen: dict[str, dict] = {}
    started = None
    for r in rows:
        at = r.get("time")
        if _number(at):
            started = at if started is None else min(started, at)
        if r.get("expert") not in EXPERTS:
            continue
        x = seen.setdefault(r["expert"], {"total": None, "done": 0, "recent": deque(maxlen=20), "device": None,
                                         "last": 0.0})
        x["last"] = at if _number(at) else 0.0
        total = r.get("steps_reachable", r.get("total_steps"))  # fewer once updates were skipped in a data-limited run
        if _number(total):
            x["total"] = total
        if "loss" in r and _number(r.get("step")):
            x["done"] = r["step"]
            x["recent"].append(r.get("s_per_step"))
        if isinstance(r.get("device"), str):
            x["device"] = r["device"]
    out, remaining, active = {}, [], 0
    for e in [e for e in EXPERTS if e in seen] or ["high", "low"]:
        x = seen.get(e, {"total": None, "done": 0, "recent": (), "device": None, "last": 0.0})
        recent = [v for v in x["recent"] if _number(v)]
        s = statistics.median(recent) if recent else None
        left = (x["total"] - x["done"]) * s if x["total"] and s is not None else None
        out[e] = {"done": x["done"], "total": x["total"], "s_per_step": s, "eta_s": left, "device": x["device"]}
        if left:
            remaining.append(left)
            active += e in seen and now - x["last"] < ACTIVE_S
    eta = (max(remaining) if active > 1 else sum(remaining)) if remaining else None
    return {"experts": out, "eta_s": eta, "started": started}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summary_of(run: Run) -> dict:
    p = progress(summary_rows(run))
    device = next((x["device"] for x in p["experts"].values() if x["device"]), None) \
        or read_json(run.run_dir / "summary.json", run.run_dir).get("device")
    return {"id": run.id, "name": run.name, "folder": str(run.run_dir), "state": state_of(run), **p, "device": device}


def samples_of(run: Run) -> list[dict]:
    """Images and videos under samples/: expert, step, prompt (from the .json beside, else the name), combination."""
    out, folder = [], run.run_dir / "samples"
    for path in (folder / name for name in list_inside(folder, [run.run_dir])):
        if path.suffix.lower() not in MEDIA or not path.is_file():
            continue
        m = SAMPLE_NAME.match(path.stem)
        prompt = read_json(path.with_suffix(".json"), run.run_dir).get("prompt") \
            or (m.group(4).replace("_", " ") if m else path.stem)
        out.append({"file": f"samples/{path.name}", "video": path.suffix.lower() in (".mp4", ".webm"),
                    "expert": m.group(1) if m else None, "step": int(m.group(2)) if m else None,
                    "prompt": prompt, "combination": m.group(5) if m else ""})
    return out


def loras_of(run: Run) -> list[dict]:
    """The run's final and intermediate LoRAs with what `wanpair inspect` tells of them (header only)."""
    out = []
    for path in sorted({*run.output_dir.glob(f"WAN2.2-*Noise_{run.name}*.safetensors"),
                        *run.output_dir.glob(f"WAN2.1-*_{run.name}*.safetensors")}):
        try:
            with open_inside(path, [run.output_dir]) as f:  # a link out of the output folder is not this run's
                meta = safetensors_metadata(path, f, LORA_HEADER_LIMIT)
                size = os.fstat(f.fileno()).st_size
        except PathRefused:
            continue
        except (OSError, WanpairError):  # damaged: listed without facts
            meta, size = {}, 0
        if meta.get("ss_output_name", f"_{run.name}").split("_", 1)[-1] != run.name:
            continue  # project `<name>-step7`'s LoRA, beside this run's: by its metadata, another run's
        out.append({"file": path.name, "path": str(path), "expert": meta.get("wanpair.expert"),
                    "window": meta.get("wanpair.timestep_window"), "rank": meta.get("ss_network_dim"),
                    "steps": meta.get("ss_steps"), "base": meta.get("wanpair.base_fingerprint"),
                    "val_loss": meta.get("wanpair.validation_loss"), "partial": meta.get("wanpair.partial") == "true",
                    "size_mb": round(size / 2**20, 1)})
    return out


def project_of(run: Run) -> str | None:
    return read_json(run.run_dir / "summary.json", run.run_dir).get("project")


def open_run_file(run: Run, rel: str):
    """A sample (or its .json) of the run, opened, or None: nothing outside the run folder (no `..`, no link
    leading out, checked on the opened file), nothing but media and JSON."""
    if "\0" in rel or ".." in Path(rel).parts or Path(rel).suffix.lower() not in MEDIA | {".json"}:
        return None
    try:
        return open_inside(run.run_dir / rel, [run.run_dir])
    except (OSError, PathRefused):
        return None


def open_lora(run: Run, name: str):
    """One of the run's LoRAs (as `loras_of` lists it), opened, or None; a link out of the output folder is not."""
    if not any(lora["file"] == name for lora in loras_of(run)):
        return None
    try:
        return open_inside(run.output_dir / name, [run.output_dir])
    except (OSError, PathRefused):
        return None
