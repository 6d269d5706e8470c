"""The dashboard's queue: `wanpair` commands it runs one after another, as processes it owns.

A job is a kind of command the page offers and what it acts on: `train` a project file (`train_job`: the
command, its folder and its run lock follow from the project), `caption` a folder (`caption_job`). The
queue lives in a JSON file written atomically at every change, so it survives a dashboard restart -- but
that file is only a record: a job read back is built anew from its kind and inputs, which must lie under
the dashboard's roots (`rebuilt`), never from a command line stored in it, the file must be the user's own
and writable by no one else, and the jobs that were waiting wait for a click ("held") instead of starting
by themselves. So a queue file planted by an archive or another user can start nothing.

A job that was running when the dashboard went away may still run: its run lock is held, or its process
lives -- the same pid with the same start time (`process_start`; pids are reused) running the job's own
command line (a training holds no lock in its first seconds). It is shown as running but not owned, the
queue waits for it, it is never started a second time, and it can be stopped from the new dashboard.

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
import re
import signal
import stat
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
from ..train.run_lock import held_by_run_of, lock_is_held, lock_path
from .paths import PathRefused, Roots, open_inside
from .runs import Run, state_of

ACTIVE = ("running", "stopping")
STATES = ("held", "queued", *ACTIVE, "finished", "stopped", "failed", "interrupted", "cancelled")
# how `wanpair train` ends after a clean stop (130, 143), or a process stopped by the signal itself (early on)
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


@dataclass
class Job:
    argv: list[str]  # the arguments after `wanpair`
    title: str
    cwd: str  # where it runs: the project's folder
    lock: str | None = None  # the run lock it takes (a training)
    run_dir: str | None = None
    project: str | None = None
    kind: str = ""  # "train" or "caption": with `inputs`, all a job read back from the queue file is built from
    inputs: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    state: str = "queued"  # held (after a restart), queued, running, stopping | finished, stopped, failed, ...
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
               str(lock_path(project.output_dir, project.name)), str(project.run_dir.resolve()), str(project.path),
               kind="train", inputs={"project_file": str(project.path), "overwrite": overwrite})


def caption_job(folder: Path, captioner: Path, trigger: str = "") -> Job:
    """`wanpair caption FOLDER`: captions for the media that have none (it never replaces one). It takes the
    GPU, so it waits its turn like a training; run again after a stop, it goes on with the files still bare."""
    return Job(["caption", str(folder), "--captioner", str(captioner), *([f"--trigger={trigger}"] if trigger else [])],
               f"caption {folder.name}", str(folder.parent), kind="caption",
               inputs={"folder": str(folder), "captioner": str(captioner), "trigger": trigger})


BUILDERS = {"train": (train_job, {"project_file": Path, "overwrite": bool}),
            "caption": (caption_job, {"folder": Path, "captioner": Path, "trigger": str})}
RECORDED = {"id": str, "state": str, "pid": int, "pid_started": int, "returncode": int, "reason": str,
            "queued_at": float, "started_at": float, "ended_at": float}  # what a job's record adds to its inputs


def rebuilt(row, roots: Roots) -> Job:
    """A job of the queue file, built anew from its kind and inputs as the page would have made it (paths under
    the roots); the record's own command line, folder and lock are never used. WanpairError says why not."""
    kind, inputs = (row.get("kind"), row.get("inputs")) if isinstance(row, dict) else (None, None)
    if kind is None and isinstance(row, dict):  # a record from before kinds: read its command as the page made it
        kind, inputs = _from_argv(row.get("argv"))
    if kind not in BUILDERS or not isinstance(inputs, dict):
        raise WanpairError(f"a job of kind {kind!r}; the dashboard runs {' and '.join(BUILDERS)} jobs")
    types = BUILDERS[kind][1]
    if set(inputs) != set(types) or not all(isinstance(inputs[k], str if t is Path else t) for k, t in types.items()):
        raise WanpairError(f"a {kind} job whose inputs are not {', '.join(types)}")
    for key in (k for k, t in types.items() if t is Path):
        if roots.locate(Path(inputs[key])) is None:
            raise WanpairError(f"a {kind} job on {inputs[key]}, outside the dashboard's folders")
    if kind == "train" and not Path(inputs["project_file"]).is_file():  # gone, or a FIFO that would hang its reading
        raise WanpairError(f"a train job of {inputs['project_file']}, which is not a project file (any more)")
    job = _build(kind, inputs)
    for key, t in RECORDED.items():
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if t is float else t)):
            raise WanpairError(f"a job whose {key} is {value!r}")
        if value is not None:
            setattr(job, key, value)
    if not re.fullmatch(r"[0-9a-f]{1,32}", job.id) or job.state not in STATES:
        raise WanpairError(f"a job with id {job.id!r} in state {job.state!r}")
    return job


def process_start(pid: int | None) -> int | None:
    """When process `pid` started (clock ticks after boot: /proc/PID/stat field 22, proc(5)), None when it is
    gone: with its pid, it names one process, whatever later reuses the pid."""
    try:  # "pid (name) state ...": the name may hold spaces and parentheses; field 22 is the 20th after it
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) if pid else None
    except (OSError, IndexError, ValueError):
        return None


def _from_argv(argv) -> tuple[str | None, dict | None]:
    """(kind, inputs) of a command line `train_job` or `caption_job` made; (None, None) for any other."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return None, None
    if len(argv) in (2, 3) and argv[0] == "train" and argv[2:] in ([], ["--overwrite"]):
        return "train", {"project_file": argv[1], "overwrite": argv[2:] == ["--overwrite"]}
    if len(argv) in (4, 5) and argv[0] == "caption" and argv[2] == "--captioner" and \
            all(a.startswith("--trigger=") for a in argv[4:]):
        return "caption", {"folder": argv[1], "captioner": argv[3],
                           "trigger": argv[4].removeprefix("--trigger=") if argv[4:] else ""}
    return None, None


def _build(kind: str, inputs: dict) -> Job:
    build, types = BUILDERS[kind]
    return build(**{k: Path(v) if types[k] is Path else v for k, v in inputs.items()})


def its_process_lives(job: Job) -> bool:
    """Is the job's own process alive: its pid, started when it was (pids are reused), running its command?"""
    if job.pid is None or job.pid_started is None or process_start(job.pid) != job.pid_started:
        return False
    try:
        cmdline = [a.decode("utf-8", "surrogateescape") for a in Path(f"/proc/{job.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return False
    return cmdline[-len(job.argv) - 2:] == ["-m", "wanpair.cli", *job.argv]


def still_runs(job: Job) -> bool:
    """Does a job an earlier dashboard started live on? Its run lock is held (a training, or its workers still
    saving), or its process lives (a caption job; a training in its first seconds, before it takes the lock)."""
    return bool(job.lock and lock_is_held(Path(job.lock))) or its_process_lives(job)


class JobQueue:
    """The jobs, their processes and the file that keeps them. `busy()`: the run locks held now under the
    roots; `tick()` (called every second by the dashboard) reaps what ended and starts what is next."""

    def __init__(self, folder: Path, roots: Roots, busy: Callable[[], list[Path]]):
        self.folder = folder
        self.file = folder / "queue.json"
        self.logs = folder / "logs"
        self.roots = roots
        self.busy = busy
        self._mutex = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self.jobs = self._load()

    def _load(self) -> list[Job]:
        for path in (self.folder, self.logs):
            the_users_own(path)
        try:
            fd = open_own(self.file, os.O_RDONLY)
        except FileNotFoundError:
            return []
        except OSError as e:  # ELOOP: a link, named as one
            the_users_own(self.file)
            raise WanpairError(f"{self.file} cannot be opened as the dashboard's queue ({e.strerror}); move it away "
                               "to start with an empty queue.") from None
        with os.fdopen(fd, "rb") as f:
            text = f.read()
        try:
            rows = json.loads(text)["jobs"]
            if not isinstance(rows, list):
                raise TypeError("its jobs are not a list")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise WanpairError(f"{self.file} cannot be read as the dashboard's queue ({e}); move it away to start "
                               "with an empty queue.") from None
        jobs = []
        for i, row in enumerate(rows):
            try:
                jobs.append(rebuilt(row, self.roots))
            except WanpairError as e:
                print(f"wanpair dashboard: job {i + 1} of {self.file} is left out: {e}.", file=sys.stderr)
        for job in jobs:  # the dashboard that started these is gone: do they still run? the waiting ones wait
            if job.state in ACTIVE and not still_runs(job):
                job.state, job.ended_at = "interrupted", time.time()
            elif job.state == "queued":
                job.state = "held"
        return jobs

    def _save(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_text_atomic(self.file, json.dumps({"jobs": [asdict(j) for j in self.jobs]}, indent=1), mode=0o600)

    def get(self, job_id: str) -> Job:
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None:
            raise WanpairError(f"no job {job_id!r} in the queue ({self.file}).")
        return job

    def owned(self, job: Job) -> bool:
        return job.id in self._procs

    def add(self, job: Job) -> Job:
        with self._mutex:
            self._refuse_a_twin(job)
            self.jobs.append(job)
            self._save()
        self.tick()
        return job

    def _refuse_a_twin(self, job: Job) -> None:
        """One job per run (or per captioned folder) waiting or running: two would train one run twice, or the
        second start it over while the first trains."""
        same = [j for j in self.jobs if j is not job and j.state in ("held", "queued", *ACTIVE)
                and ((job.lock and j.lock == job.lock) or (job.kind == "caption" and j.kind == "caption"
                                                           and j.inputs.get("folder") == job.inputs.get("folder")))]
        if same:
            raise WanpairError(f"{job.title}: this run is already {same[0].state}; "
                               f"{'queue or cancel' if same[0].state == 'held' else 'stop'} that one first.")

    def stop(self, job_id: str) -> Job:
        """A running job: Ctrl-C to its process group. A queued (or held) one: taken off the queue."""
        with self._mutex:
            job = self.get(job_id)
            if job.state in ("queued", "held"):
                job.state, job.ended_at = "cancelled", time.time()
            elif job.state == "stopping":
                return job  # asked already: a second SIGINT would stop it at once, without saving
            elif job.state in ACTIVE:
                if not self.owned(job) and not its_process_lives(job):
                    raise WanpairError(f"{job.title} (pid {job.pid}) was started by an earlier dashboard and its "
                                       "process has ended (its workers may still be saving); nothing to stop.")
                with contextlib.suppress(ProcessLookupError):  # it ended just now: the next tick reaps it
                    os.killpg(job.pid, signal.SIGINT)  # its own process group: the command and any workers of it
                    job.state = "stopping"
            else:
                raise WanpairError(f"{job.title} is {job.state}, not running or queued.")
            self._save()
            return job

    def release(self, job_id: str) -> Job:
        """A job held after a restart, queued again: the user clicked it."""
        with self._mutex:
            job = self.get(job_id)
            if job.state != "held":
                raise WanpairError(f"{job.title} is {job.state}, not waiting for a click.")
            self._refuse_a_twin(job)
            job.state = "queued"
            self._save()
        self.tick()
        return job

    def again(self, job_id: str) -> Job:
        """The same command queued anew, never with --overwrite: a training continues from its last state."""
        with self._mutex:  # read and queued at once: a double click queues it once
            old = self.get(job_id)
            if old.state in ("held", "queued", *ACTIVE):
                raise WanpairError(f"{old.title} is {old.state}; continue it once it has stopped.")
            if old.kind not in BUILDERS:
                raise WanpairError(f"{old.title} is not a job the dashboard can run again.")
            job = _build(old.kind, old.inputs | ({"overwrite": False} if old.kind == "train" else {}))
            job.title = old.title.replace(" (start over)", "")
            job.title = job.title if job.title.startswith("continue") else f"continue {job.title}"
            return self.add(job)

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
                if proc.poll() is None or (job.lock and held_by_run_of(Path(job.lock), proc.pid)):
                    continue  # running, or its main process ended while its workers still save (they hold its lock)
                del self._procs[job.id]
                job.returncode = proc.returncode
                job.state = ("finished" if proc.returncode == 0 else  # asked to stop, it ended: stopped, however
                             "stopped" if proc.returncode in STOPPED_CODES or job.state == "stopping" else "failed")
            elif still_runs(job):
                continue  # an earlier dashboard's, still running
            else:  # an earlier dashboard's, ended unseen: stopped if asked to, else the run's files tell how
                run = Run(Path(job.run_dir)) if job.run_dir else None
                job.state = ("stopped" if job.state == "stopping" else
                             state_of(run) if run and run.metrics.exists() else "interrupted")
            job.ended_at = time.time()
            changed = True
        return changed

    def _start(self, job: Job) -> None:
        """Start `job`; one whose process cannot start (its folder gone, the log folder unwritable) fails with
        the reason, so that the queue goes on."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run line by line
        try:
            self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            the_users_own(self.logs)
            with open(open_own(self.log_file(job), os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "wanpair.cli", *job.argv], cwd=job.cwd, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own process group: Ctrl-C reaches all of it
        except (OSError, WanpairError) as e:
            job.state, job.ended_at, job.reason = "failed", time.time(), f"could not start in {job.cwd}: {e}"
            return
        self._procs[job.id] = proc
        job.state, job.pid, job.pid_started, job.started_at = "running", proc.pid, process_start(proc.pid), time.time()

    def log_file(self, job: Job) -> Path:
        return self.logs / f"{job.id}.log"

    def log_tail(self, job: Job, lines: int = 40) -> list[str]:
        """The last lines of the job's output (at most 1 000); progress bars redraw with carriage returns: their
        last state."""
        lines = max(1, min(lines, 1000))
        try:
            with open_inside(self.log_file(job), [self.logs]) as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except (OSError, PathRefused):
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


def the_users_own(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse (by name) a file or folder of the dashboard's own (.wanpair-dashboard/, its queue, lock and logs)
    that is a link, a special file, a second name of another file, not this user's, or writable by others: the
    queue is trusted to say what ran and what waits, so only the user may have written it. `st`: the facts of
    a descriptor already open on it (checked instead of the path, which may have changed since)."""
    try:
        st = st or os.lstat(path)
    except FileNotFoundError:
        return
    kind_ok = stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)
    why = ("is a link" if stat.S_ISLNK(st.st_mode) else
           "is not a plain file or folder (a special file, or a second name of another file)" if not kind_ok else
           f"belongs to user id {st.st_uid}, not to you ({os.getuid()})" if st.st_uid != os.getuid() else
           f"can be written by others (mode {stat.filemode(st.st_mode)})" if _others_can_write(st) else None)
    if why:
        raise WanpairError(f"{path} {why}: it is not one this dashboard wrote for you. Move it away (the "
                           f"dashboard starts with an empty queue), or if it is yours: chmod go-w {path}.")


def open_own(path: Path, flags: int) -> int:
    """A descriptor of one of the dashboard's own files (`the_users_own`, checked on the descriptor): never
    opened through a link (O_NOFOLLOW), never waiting on a FIFO (O_NONBLOCK), created 0600."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        the_users_own(path, os.fstat(fd))
    except WanpairError:
        os.close(fd)
        raise
    return fd


def _others_can_write(st: os.stat_result) -> bool:
    """Writable by another user: by everyone, or by a group other than the user's own private one (umask 002
    systems give every file of a user group write to the group named after the user, which has only them)."""
    if st.st_mode & 0o002:
        return True
    if not st.st_mode & 0o020:
        return False
    import grp
    import pwd

    try:
        group, me = grp.getgrgid(st.st_gid), pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return True
    return st.st_gid != pwd.getpwuid(os.getuid()).pw_gid or any(m != me for m in group.gr_mem)
