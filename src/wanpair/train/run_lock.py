"""The run lock: one `wanpair train` at a time writes an output name.

`<output_dir>/.<name>.lock` is held with an OS lock (flock(2)) for as long as the run lives. Taking it is
atomic -- of two runs started together exactly one gets it -- and the kernel lets go of it when its holders
are gone, however they ended (kill -9 included), so a lock file left behind blocks nobody, whatever pid it
names (pids are reused). The file records the run's pid, then its worker processes' (`add_lock_holders`),
for the message a second run gets; a run that ends removes it.

Worker processes share the lock: they inherit its descriptor (`lock_fd`, `subprocess.Popen(pass_fds=...)`).
A flock belongs to the open file, which every process holding a descriptor of it shares, so it is let go only
when the last of them exits: after `wanpair train` was killed its workers still save, and the run counts as
running until they are done. (Under torchrun, torchrun holds it: it outlives its ranks.)
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import WanpairError

# The dashboard probes the lock by taking it shared for microseconds: a starting run tries this long before it
# refuses, and a refused one this long for the holder's pid, which the holder writes just after it locks. (Not
# longer: a run must not slip in behind a killed run's workers as they finish saving.)
PATIENCE_S = 0.25
_held: dict[Path, int] = {}  # the run locks this process holds: their descriptors


def lock_path(output_dir: Path, name: str) -> Path:
    return output_dir / f".{name}.lock"


@contextmanager
def run_lock(output_dir: Path, name: str):
    """One writer per output name: a second run refuses to start while the first, or a worker of it, lives."""
    lock = lock_path(output_dir, name)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = _take(lock, PATIENCE_S)
    except OSError as e:  # a read-only mount, a folder of another user: before anything loads
        raise WanpairError(f"cannot write {e.filename or output_dir} ({e.strerror}); make output_dir {output_dir} "
                           "writable, or set output_dir to another folder.") from None
    if fd is None:
        pid = lock_holder(lock)
        raise WanpairError(f"another wanpair run{f' (pid {pid})' if pid else ''} is writing {output_dir}/{name}; "
                           f"wait for it, or give this run another name. (Lock file: {lock})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[lock] = fd
    try:
        yield
    finally:
        del _held[lock]
        os.close(fd)  # lets go of the lock, unless worker processes still share it
        _remove_if_free(lock)


def lock_fd(lock: Path) -> int:
    """The descriptor of `lock` this process holds, for worker processes to inherit (`Popen(pass_fds=...)`):
    while one of them lives, the run stays locked."""
    return _held[lock]


def add_lock_holders(lock: Path, pids: list[int]) -> None:
    """Record the worker processes that share the run's lock: the pids a second run is told of once the run's
    own process was killed and they still save."""
    fd = _held[lock]
    os.pwrite(fd, "".join(f" {pid}" for pid in pids).encode(), os.fstat(fd).st_size)


def lock_is_held(lock: Path) -> bool:
    """Does a process hold `lock` now? A probe that leaves the file as it is: a shared lock taken for an instant.
    A run's lock is never a link nor a FIFO: one planted in its place is not held (and cannot block the probe)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no flock on this file system: no run can hold it either (taking it says so)
        return False
    finally:
        os.close(fd)  # lets go of the probe's shared lock


def held_by_run_of(lock: Path, pid: int) -> bool:
    """Is `lock` held by the run whose own process is or was `pid`: by it, or by its workers still saving once it
    ended (the run wrote its pid first)? Not when another run holds it (the one `pid` was refused by)."""
    return lock_is_held(lock) and _recorded_pids(lock)[:1] == [pid]


def _recorded_pids(lock: Path) -> list[int]:
    """The pids a run wrote into its lock file: its own first, then its workers' ([] if unreadable). Read without
    following a link and at most a page: a lock file planted where a run's would be is not read whole."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        return [int(x) for x in os.read(fd, 4096).split() if x.isdigit()]
    except OSError:
        return []
    finally:
        os.close(fd)


def lock_holder(lock: Path) -> int:
    """A live process of the run holding `lock` (0 if no process holds it): the run's own pid, or once it was
    killed, the pid of a worker of it still saving. (If none recorded lives, the run's pid: the lock is held
    by a process it started that is not recorded.)"""
    deadline = time.monotonic() + PATIENCE_S
    while lock_is_held(lock):
        pids = _recorded_pids(lock)
        if pids:
            return next((pid for pid in pids if pid_alive(pid)), pids[0])
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)  # its holder has locked it and not yet written its pid
    return 0


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (one of another user's counts: it exists)? A killed process that its parent
    has not reaped yet (a zombie, state Z in /proc on Linux) is not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # /proc/PID/stat: "pid (name) state ..."; the name may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _take(lock: Path, patience: float) -> int | None:
    """A descriptor holding `lock` alone, or None if other processes held it for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: a file system without flock
            os.close(fd)
            raise WanpairError(
                f"the file system of {lock.parent} does not support file locks (flock: {e.strerror}); wanpair locks "
                f"{lock.name} so that two runs never write one output. Set output_dir to a folder on a local disk, "
                "or mount this one with locks (Lustre: the `flock` mount option; NFS: without `nolock`).") from None
        except BaseException:
            os.close(fd)
            raise
        if _is_at(lock, fd):
            return fd
        os.close(fd)  # its holder removed this file as it finished: take the one at the path now


def _is_at(lock: Path, fd: int) -> bool:
    try:
        here, ours = os.stat(lock), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)


def _remove_if_free(lock: Path) -> None:
    """Remove the lock file, but only while holding it: one that another run, a worker still saving, or a
    dashboard's probe holds stays (a free one left behind blocks nobody). A run waiting to take this file
    finds, once it has, that it is no longer at the path, and takes the one there (`_take`)."""
    fd = _take(lock, 0)
    if fd is not None:
        lock.unlink()
        os.close(fd)
