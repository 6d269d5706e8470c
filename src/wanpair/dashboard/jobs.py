"""The dashboard's queue: `wanpair` commands it runs one after another, as processes it owns.

A job is a wanpair command's arguments and what it acts on: a training's project file and its run lock
(`train_job`). Another command becomes a job in a few lines the same way. The queue lives in a JSON file
written atomically at every change, so it survives a dashboard restart. A job that was running when the
dashboard went away may still run: its run lock tells (`lock_is_held`); it is shown as running but not
owned, and the queue waits for it. It is never started a second time. A job without a lock (a caption job)
is told by its process: the same pid with the same start time (`process_start`; pids are reused).

One training at a time on this machine: the queue starts its next job only while no run under the roots
holds its lock (a training started from a shell counts too), which is how a GPU already training is
accounted for. Stop is Ctrl-C: SIGINT to the job's process group, after which a training saves its state
and partial LoRAs and exits with 130; the same command then continues it. It is sent once: a second Ctrl-C
means "stop at once, without saving".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import write_text_atomic
from ..errors import WanpairError
from ..project import load_project
from ..train.run_lock import lock_holder, lock_is_held, lock_path
from .runs import Run, state_of

ACTIVE = ("running", "stopping")
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # what `wanpair train` exits with after a clean stop


@dataclass
class Job:
    argv: list[str]  # the arguments after `wanpair`
    title: str
    cwd: str  # where it runs: the project's folder
    lock: str | None = None  # the run lock it takes (a training)
    run_dir: str | None = None
    project: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    state: str = "queued"  # queued, running, stopping | finished, stopped, failed, interrupted, cancelled
    pid: int | None = None
    pid_started: int | None = None  # the process's start time (`process_start`): tells it from a reused pid
    returncode: int | None = None
    reason: str | None = None  # why it failed without running (its process could not be started)
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None


def train_job(project_file: Path, overwrite: bool = False) -> Job:
    """`wanpair train PROJECT` (`--overwrite`: start over). Run again after a stop, it continues."""
    project, _ = load_project(project_file)
    return Job(["train", str(project.path), *(["--overwrite"] if overwrite else [])],
               f"train {project.name}" + (" (start over)" if overwrite else ""), str(project.path.parent),
               str(lock_path(project.output_dir, project.name)), str(project.run_dir), str(project.path))


def caption_job(folder: Path, captioner: Path, trigger: str = "") -> Job:
    """`wanpair caption FOLDER`: captions for the media that have none (it never replaces one). It takes the
    GPU, so it waits its turn like a training; run again after a stop, it goes on with the files still bare."""
    return Job(["caption", str(folder), "--captioner", str(captioner), *([f"--trigger={trigger}"] if trigger else [])],
               f"caption {folder.name}", str(folder.parent))


def process_start(pid: int | None) -> int | None:
    """When process `pid` started (clock ticks after boot: /proc/PID/stat field 22, proc(5)), None when it is
    gone: with its pid, it names one process, whatever later reuses the pid."""
    try:  # "pid (name) state ...": the name may hold spaces and parentheses; field 22 is the 20th after it
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) if pid else None
    except (OSError, IndexError, ValueError):
        return None


def still_runs(job: Job) -> bool:
    """Does the process of a job an earlier dashboard started live on? A training holds its run lock; another
    job's process is the one with its pid and start time."""
    if job.lock:
        return lock_is_held(Path(job.lock))
    return job.pid_started is not None and process_start(job.pid) == job.pid_started


class JobQueue:
    """The jobs, their processes and the file that keeps them. `busy()`: the run locks held now under the
    roots; `tick()` (called every second by the dashboard) reaps what ended and starts what is next."""

    def __init__(self, folder: Path, busy: Callable[[], list[Path]]):
        self.file = folder / "queue.json"
        self.logs = folder / "logs"
        self.busy = busy
        self._mutex = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self.jobs = self._load()

    def _load(self) -> list[Job]:
        try:
            rows = json.loads(self.file.read_text(encoding="utf-8"))["jobs"]
            jobs = [Job(**row) for row in rows]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WanpairError(f"{self.file} cannot be read as the dashboard's queue ({e}); move it away to start "
                               "with an empty queue.") from None
        for job in jobs:  # the dashboard that started these is gone: do they still run?
            if job.state in ACTIVE and not still_runs(job):
                job.state, job.ended_at = "interrupted", time.time()
        return jobs

    def _save(self) -> None:
        write_text_atomic(self.file, json.dumps({"jobs": [asdict(j) for j in self.jobs]}, indent=1))

    def get(self, job_id: str) -> Job:
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None:
            raise WanpairError(f"no job {job_id!r} in the queue ({self.file}).")
        return job

    def owned(self, job: Job) -> bool:
        return job.id in self._procs

    def add(self, job: Job) -> Job:
        with self._mutex:
            if job.lock and any(j.lock == job.lock and j.state in ("queued", *ACTIVE) for j in self.jobs):
                raise WanpairError(f"{job.title}: this run is already queued or running; stop it first.")
            self.jobs.append(job)
            self._save()
        self.tick()
        return job

    def stop(self, job_id: str) -> Job:
        """A running job: Ctrl-C to its process group. A queued one: taken off the queue."""
        with self._mutex:
            job = self.get(job_id)
            if job.state == "queued":
                job.state, job.ended_at = "cancelled", time.time()
            elif job.state == "stopping":
                return job  # asked already: a second SIGINT would stop it at once, without saving
            elif job.state in ACTIVE:
                if not self.owned(job) and not (job.lock and lock_holder(Path(job.lock)) == job.pid):
                    raise WanpairError(f"{job.title} (pid {job.pid}) was started by an earlier dashboard and no "
                                       "longer holds its run; nothing to stop.")
                with contextlib.suppress(ProcessLookupError):  # it ended just now: the next tick reaps it
                    os.killpg(job.pid, signal.SIGINT)  # its own process group: the command and any workers of it
                    job.state = "stopping"
            else:
                raise WanpairError(f"{job.title} is {job.state}, not running or queued.")
            self._save()
            return job

    def again(self, job_id: str) -> Job:
        """The same command queued anew, never with --overwrite: a training continues from its last state."""
        old = self.get(job_id)
        if old.state in ("queued", *ACTIVE):
            raise WanpairError(f"{old.title} is {old.state}; continue it once it has stopped.")
        argv = [a for a in old.argv if a != "--overwrite"]
        title = old.title.replace(" (start over)", "")
        return self.add(Job(argv, title if title.startswith("continue") else f"continue {title}", old.cwd,
                            old.lock, old.run_dir, old.project))

    def tick(self) -> None:
        with self._mutex:
            changed = self._reap()
            if not any(j.state in ACTIVE for j in self.jobs):
                waiting = next((j for j in self.jobs if j.state == "queued"), None)
                if waiting is not None and not self.busy():
                    self._start(waiting)
                    changed = True
            if changed:
                self._save()

    def _reap(self) -> bool:
        changed = False
        for job in self.jobs:
            if job.state not in ACTIVE:
                continue
            proc = self._procs.get(job.id)
            if proc is not None:
                if proc.poll() is None:
                    continue
                del self._procs[job.id]
                job.returncode = proc.returncode
                job.state = ("finished" if proc.returncode == 0 else
                             "stopped" if proc.returncode in STOPPED_CODES else "failed")
            elif still_runs(job):
                continue  # an earlier dashboard's, still running
            else:  # an earlier dashboard's, ended unseen: the run's files tell how
                run = Run(Path(job.run_dir)) if job.run_dir else None
                job.state = state_of(run) if run and run.metrics.exists() else "interrupted"
            job.ended_at = time.time()
            changed = True
        return changed

    def _start(self, job: Job) -> None:
        """Start `job`; one whose process cannot start (its folder gone, the log folder unwritable) fails with
        the reason, so that the queue goes on."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run line by line
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.log_file(job), "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "wanpair.cli", *job.argv], cwd=job.cwd, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own process group: Ctrl-C reaches all of it
        except OSError as e:
            job.state, job.ended_at, job.reason = "failed", time.time(), f"could not start in {job.cwd}: {e}"
            return
        self._procs[job.id] = proc
        job.state, job.pid, job.pid_started, job.started_at = "running", proc.pid, process_start(proc.pid), time.time()

    def log_file(self, job: Job) -> Path:
        return self.logs / f"{job.id}.log"

    def log_tail(self, job: Job, lines: int = 40) -> list[str]:
        """The last lines of the job's output; progress bars redraw with carriage returns: their last state."""
        try:
            with open(self.log_file(job), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return list(deque((line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")
                           if line.strip("\r ")), maxlen=lines))

    def run_forever(self, every_s: float = 1.0) -> threading.Thread:
        def loop():
            while True:
                try:
                    self.tick()
                except Exception as e:  # a full disk, a vanished folder: said, and tried again
                    print(f"wanpair dashboard: the queue could not be updated: {e}", file=sys.stderr)
                time.sleep(every_s)

        thread = threading.Thread(target=loop, name="wanpair-queue", daemon=True)
        thread.start()
        return thread
