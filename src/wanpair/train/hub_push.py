"""The Hugging Face Hub while training: `[hub]` pushes every LoRA the run saves -- intermediate, partial and
final -- and, with push_states, every training state, in the background, as Musubi-Tuner's
`--huggingface_repo_id` does; `--resume-from-hub` (`fetch_states`) brings a run's newest states back.

One daemon thread per training process, shared by the experts that process trains one after the other
(`shared_pusher`; side-by-side experts train in processes of their own, each with its thread), takes the files
from a queue and commits each, so that saving a file costs the loop nothing but a queue entry, and the next
expert starts while the last one's files still upload. A network error or a refused token is one line naming
the file, and never reaches the loop; after a refused token (or a client that cannot start) the thread stops
trying. The repository keeps what the run keeps: a file this thread pushed and the run has since removed (older
states beyond keep_states, intermediate LoRAs beyond keep_last, the crash state of a finished expert) is deleted
with the next commit; one already gone from the repository is forgotten, never in the way of the next push.

When the process's training ends (`close_shared`: the end of the recipe's `train_here`, of a worker) the uploads
still queued get `DRAIN_S` to finish; a stop (Ctrl-C, SIGTERM) or a second Ctrl-C gives them `STOP_S`. What is
not on the hub then is named, with the `wanpair push` command that uploads the finished pair. The hub's address,
folders and error wording: `wanpair.hub`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..atomic import sync_folder
from ..errors import StopRequested, WanpairError
from ..hub import INTERMEDIATE, STATES, endpoint, hub_error, parse_repo, short_reason
from ..models.tasks import expert_noun
from ..project import Project
from ..sizes import human_seconds
from .metadata import differences
from .state import list_states, load_state, state_dir, state_step

# How long the end of training waits for uploads still running: a 14B expert's state at rank 16 (~0.9 GiB,
# project.py's HubSettings) at 3 MB/s. Ctrl-C stops the wait.
DRAIN_S = 300.0
STOP_S = 5.0  # ... and the end of a stopped run: a stop is asked to be quick, and the pusher names what is left
_CLOSE = None  # the queue's last entry: mirror the removals, then stop
_shared: HubPusher | None = None  # this process's pusher (`shared_pusher`)


def shared_pusher(project: Project, enabled: bool = True) -> HubPusher:
    """This process's pusher for `project`, shared by the experts it trains (a disabled one: a rank that writes
    nothing)."""
    global _shared
    if not enabled:
        return HubPusher(project, enabled=False)
    if _shared is None or _shared.project is not project:
        _shared = HubPusher(project)
    return _shared


def close_shared(wait_s: float = DRAIN_S) -> None:
    """The end of this process's training: drain its pusher (`HubPusher.close`), if it has one."""
    global _shared
    pusher, _shared = _shared, None
    if pusher is not None:
        pusher.close(wait_s)


@contextlib.contextmanager
def uploads_drained():
    """Around a process's training (its owner, the only one that closes the shared pusher): what is still
    uploading at the end gets `DRAIN_S`; after a stop (`StopRequested`, Ctrl-C) `STOP_S`, enough for the
    partial save's upload."""
    try:
        yield
    except (StopRequested, KeyboardInterrupt):
        close_shared(STOP_S)
        raise
    finally:
        close_shared()


class HubPusher:
    """The background pusher of one process's training; without `[hub] repo` (or on a rank that writes nothing)
    every method does nothing."""

    def __init__(self, project: Project, enabled: bool = True):
        self.project = project
        self.repo = project.hub.repo if enabled else ""
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.pending: list[Path] = []  # queued or uploading
        self.failed: list[Path] = []
        self.pushed: dict[str, Path] = {}  # in the repository -> the local file
        self.refused = ""  # the token's refusal (or the client's failure to start): nothing more is tried
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def push(self, path: Path) -> None:
        """Queue a saved LoRA (or state) for the Hub; returns at once."""
        if not self.repo:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
            self.thread.start()
        with self.lock:
            self.pending.append(path)
        self.queue.put(path)

    def push_state(self, path: Path | None) -> None:
        if path is not None and self.project.hub.push_states:
            self.push(path)

    def in_repo(self, path: Path) -> str:
        """The finished LoRAs at the repository's top, other LoRAs under intermediate/, states under state/."""
        if path.suffix == ".pt":
            return f"{STATES}/{path.name}"
        finished = {self.project.lora_path(e) for e in self.project.task.experts}
        return path.name if path in finished else f"{INTERMEDIATE}/{path.name}"

    def say(self, message: str) -> None:
        tqdm.write(f"hub: {message}")  # above the progress bar, not through it

    def _work(self) -> None:
        api, created = None, False
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.utils import disable_progress_bars
            from huggingface_hub.utils import logging as hub_logging

            disable_progress_bars()  # the training's own bar is the one on the console,
            hub_logging.set_verbosity_error()  # and a failure one line of ours, not the client's retries as well
            api = HfApi(endpoint=endpoint())
        except Exception as e:  # a broken install or HF_ENDPOINT: said once; every file is then a failed one
            self.refused = short_reason(e)
            self.say(f"cannot push to {self.repo}: {self.refused}; training goes on, with no pushes this run")
        while True:
            path = self.queue.get()
            try:
                if not self.refused:
                    if not created:
                        api.create_repo(self.repo, private=True if self.project.hub.private else None, exist_ok=True)
                        created = True
                    self._commit(api, path)
                elif path is not _CLOSE:
                    self.failed.append(path)
            except Exception as e:  # the hub's errors and the network's: said, never raised into training
                if path is not _CLOSE:
                    self.failed.append(path)
                reason = short_reason(e)
                if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
                    self.refused = reason
                if path is _CLOSE:
                    self.say(f"what the run removed is still on {self.repo} ({reason})")
                else:
                    self.say(f"{path.name} not pushed to {self.repo}: {reason}; training goes on"
                             + (", with no more pushes this run" if self.refused else ""))
            finally:
                with self.lock:
                    if path in self.pending:
                        self.pending.remove(path)
            if path is _CLOSE:
                self.done.set()
                return

    def _commit(self, api, path: Path | None) -> None:
        """One commit: `path` (None: nothing), and the removal of what this thread pushed and the run has removed
        since. A removal of a file already gone from the repository (deleted there, or by a commit whose answer
        was lost) fails the whole commit: the removals are then forgotten, and `path` is committed alone."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import EntryNotFoundError

        adds = [] if path is None or not path.exists() else [CommitOperationAdd(self.in_repo(path), str(path))]
        gone = [p for p, local in self.pushed.items() if not local.exists() and not (adds and p == adds[0].path_in_repo)]
        if not adds and not gone:
            return  # removed by the run before its turn (keep_last, keep_states): nothing to push
        message = (path.name if adds else "removed what the run removed") + " (wanpair train)"
        try:
            api.create_commit(self.repo, adds + [CommitOperationDelete(p) for p in gone], commit_message=message)
        except EntryNotFoundError:  # a removal of a file already gone from the repository
            if not gone:
                raise
            for p in gone:  # which one, the hub does not say: none is tried again
                del self.pushed[p]
            gone = []
            if adds:
                api.create_commit(self.repo, adds, commit_message=message)
        for p in gone:
            del self.pushed[p]
        if adds:
            self.pushed[adds[0].path_in_repo] = path
            self.say(f"pushed {adds[0].path_in_repo} to {self.repo}")

    def close(self, wait_s: float = DRAIN_S) -> None:
        """The end of training in this process: give the uploads still queued up to `wait_s`, then say what is
        not on the hub. Closed once: a second close returns at once."""
        if self.thread is None:
            return
        self.queue.put(_CLOSE)
        with self.lock:
            waiting = list(self.pending)
        if waiting:
            self.say(f"waiting up to {human_seconds(wait_s)} for {len(waiting)} upload(s) to {self.repo} "
                     "(Ctrl-C stops waiting)")
        try:
            self.done.wait(wait_s)
        except KeyboardInterrupt:
            self.say("stopped waiting")
        self.thread = None
        with self.lock:  # a file the run has removed since (keep_last, keep_states) is not missed
            failed = [p.name for p in dict.fromkeys(self.failed) if p.exists()]
            running = [p.name for p in self.pending if p.exists()]
        if not failed and not running:
            self.say(f"the files this run saved are on {endpoint()}/{self.repo}")
            return
        left = ([f"failed: {', '.join(failed)}"] if failed else []) + \
            ([f"still uploading after {human_seconds(wait_s)}: {', '.join(running)}"] if running else [])
        states = " --states" if self.project.hub.push_states else ""
        self.say(f"not on {self.repo} ({'; '.join(left)}); the run is not affected. Push the finished pair with "
                 f"`wanpair push {self.project.path} --repo {self.repo}{states}`.")


# ---------------------------------------------------------------- wanpair train --resume-from-hub
def fetch_states(project: Project, value: str, experts: tuple[str, ...], identity) -> list[Path]:
    """Bring each expert's newest training state in `value` (`USER/NAME[@REVISION]`, its `state/` folder) into the
    run's state folder, unless the run has one as new; returns the files fetched. A state is downloaded beside the
    state folder (`.hub-download/`, where a broken transfer resumes) and moved in only once it is known to be this
    run's (`identity(expert)`: the identity `wanpair.train.metadata.run_identity` gives): a state of another run
    never lands among this run's, where it would stand in the way of continuing from them. Refused when the
    repository has no state of these experts, or its newest is another run's."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    repo, revision = parse_repo(value, "--resume-from-hub", revision=True)
    api = HfApi(endpoint=endpoint())
    try:
        remote = [f.path for f in api.list_repo_tree(repo, path_in_repo=STATES, revision=revision)]
    except (EntryNotFoundError, RemoteEntryNotFoundError):
        remote = []
    except Exception as e:  # the hub's errors, and the network's
        raise hub_error(e, repo, f"reading the training states in {value}", writes=False) from None
    download = project.run_dir / ".hub-download"
    fetched, found, problems = [], False, []
    for expert in experts:
        theirs = sorted((PurePosixPath(p) for p in remote if p.startswith(f"{STATES}/{expert}-")
                         and state_step(Path(p)) >= 0), key=lambda p: state_step(Path(p)))
        if not theirs:
            continue
        found, newest = True, theirs[-1]
        mine = list_states(project.run_dir, expert)
        if mine and state_step(mine[-1]) >= state_step(Path(newest.name)):
            print(f"{expert_noun(expert)}: {mine[-1].name} here is as new as {value}'s {newest.name}; keeping it")
            continue
        print(f"fetching {newest} from {value}", flush=True)
        try:
            got = Path(hf_hub_download(repo, str(newest), revision=revision, local_dir=download, endpoint=endpoint()))
        except Exception as e:  # the hub's errors, and the network's
            raise hub_error(e, repo, f"fetching {newest} from {value}", writes=False) from None
        try:
            changed = differences(load_state(got, mapped=True).get("identity") or {}, identity(expert), outputs=False)
        except WanpairError as e:  # not a state, or a damaged one: said as the hub's file, not the download's path
            got.unlink()
            problems.append(f"{value}'s {newest} cannot be read as a training state ({e}). Push a good one "
                            "(`wanpair push PROJECT --repo ... --states` on the machine that trained it), or leave out "
                            "--resume-from-hub.")
            continue
        if changed:
            got.unlink()
            problems.append(f"{value}'s {newest} is from a run with a different {', '.join(changed)} than this "
                            f"project's {expert_noun(expert)}, so it was not kept. To continue that run, restore "
                            f"{'them' if len(changed) > 1 else 'it'} in {project.path}; or leave out "
                            "--resume-from-hub to train from this machine's states (`--resume`) or from the start.")
            continue
        state_dir(project.run_dir).mkdir(parents=True, exist_ok=True)
        os.replace(got, state_dir(project.run_dir) / newest.name)
        sync_folder(state_dir(project.run_dir))  # the rename outlives a crash
        fetched.append(state_dir(project.run_dir) / newest.name)
    shutil.rmtree(download, ignore_errors=True)  # every download got to its end: nothing to resume
    if not found:
        raise WanpairError(f"--resume-from-hub {value}: it holds no training state of "
                           f"{' or '.join(expert_noun(e) for e in experts)} ({STATES}/<expert>-step<N>.pt). A run pushes "
                           "its states with [hub] push_states = true; `wanpair push PROJECT --repo ... --states` pushes "
                           "a run's newest.")
    if problems:
        raise WanpairError("cannot resume from the hub:\n" + "\n".join(f"- {p}" for p in problems))
    return fetched
