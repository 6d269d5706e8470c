"""The run lock is an OS lock: of runs started together one holds it at a time, a lock file left behind blocks
nobody (whatever pid it names), the kernel lets go of it when its holder exits or is killed, and worker
processes that inherited it keep it held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wanpair.errors import WanpairError
from wanpair.train.run_lock import held_by_run_of, lock_holder, lock_is_held, lock_path, run_lock

# Takes the lock of argv[1]/argv[2]; with argv[3] == "child", starts a sleeping process that inherits it (as
# `wanpair train` starts its workers) and prints its pid; says "held", then sleeps until killed.
HOLDER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from wanpair.train.run_lock import add_lock_holders, lock_fd, lock_path, run_lock

    out, name = Path(sys.argv[1]), sys.argv[2]
    with run_lock(out, name):
        if sys.argv[3] == "child":
            lock = lock_path(out, name)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock_fd(lock),))
            add_lock_holders(lock, [child.pid])
            print(child.pid)
        print("held", flush=True)
        time.sleep(60)
""")


def hold_run_lock(output_dir: Path, name: str, with_child: bool = False) -> tuple[subprocess.Popen, int | None]:
    """A process holding the run lock of `output_dir`/`name` (and the pid of its child sharing it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir), name, "child" if with_child else "-"],
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline()) if with_child else None
    assert proc.stdout.readline().strip() == "held"
    return proc, child


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_of_runs_started_together_one_holds_the_lock_at_a_time(tmp_path):
    """Each racer that gets the lock writes `enter`, holds it a moment, writes `exit`: the log must alternate
    enter/exit of one process. (The check-then-write lock let all of them in at once.)"""
    racer = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from wanpair.errors import WanpairError
        from wanpair.train.run_lock import run_lock

        out, log, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
        def note(what):
            with open(log, "a") as f:
                f.write(f"{what} {os.getpid()}\\n")
        time.sleep(max(0.0, start - time.time()))  # all start together
        try:
            with run_lock(out, "race"):
                note("enter")
                time.sleep(0.2)
                note("exit")
        except WanpairError:
            note("refused")
    """)
    log = tmp_path / "log"
    start = time.time() + 1.5  # after every racer's interpreter has started
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path / "out"), str(log), str(start)])
              for _ in range(6)]
    for p in racers:
        assert p.wait(timeout=30) == 0
    events = [line.split() for line in log.read_text().splitlines()]
    turns = [e for e in events if e[0] != "refused"]
    assert turns and len(turns) % 2 == 0
    for (enter, pid_in), (leave, pid_out) in zip(turns[::2], turns[1::2]):
        assert (enter, leave) == ("enter", "exit") and pid_in == pid_out, events  # no one entered in between
    assert sorted(int(pid) for what, pid in events if what != "exit") == sorted(p.pid for p in racers)  # each once
    assert not lock_path(tmp_path / "out", "race").exists()  # the last one out removed it


def test_a_lock_file_naming_a_live_process_that_does_not_hold_it_blocks_nothing(tmp_path):
    """The pid in a lock file left by a killed run may belong to another process by now (pids are reused)."""
    lock = lock_path(tmp_path, "demo")
    lock.write_text(f"{os.getppid()} 1")  # live processes, neither holding the lock
    assert not lock_is_held(lock) and lock_holder(lock) == 0
    with run_lock(tmp_path, "demo"):
        assert lock_is_held(lock) and lock_holder(lock) == os.getpid()
    assert not lock.exists()


def test_the_lock_is_let_go_when_its_holder_exits_or_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr("wanpair.train.run_lock.PATIENCE_S", 0.2)  # refused sooner
    with run_lock(tmp_path, "demo"):
        pass
    lock = lock_path(tmp_path, "demo")
    assert not lock.exists() and not lock_is_held(lock)
    holder, _ = hold_run_lock(tmp_path, "demo")
    try:
        assert lock_is_held(lock) and lock_holder(lock) == holder.pid
        with pytest.raises(WanpairError) as refused:
            with run_lock(tmp_path, "demo"):
                pass
        assert str(refused.value) == (f"another wanpair run (pid {holder.pid}) is writing {tmp_path}/demo; wait for "
                                      f"it, or give this run another name. (Lock file: {lock})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists() and not lock_is_held(lock) and lock_holder(lock) == 0  # its file stays, blocking nobody
    with run_lock(tmp_path, "demo"):
        assert lock_holder(lock) == os.getpid()
    assert not lock.exists()


def test_children_that_inherited_the_lock_keep_it_held_after_their_parent_was_killed(tmp_path, monkeypatch):
    """As `wanpair train`'s workers do while they save after it was killed -9: the run still counts as running."""
    monkeypatch.setattr("wanpair.train.run_lock.PATIENCE_S", 0.2)
    lock = lock_path(tmp_path, "demo")
    holder, child = hold_run_lock(tmp_path, "demo", with_child=True)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert lock_is_held(lock) and lock_holder(lock) == child  # the killed parent's pid is listed first
        with pytest.raises(WanpairError, match=f"another wanpair run \\(pid {child}\\)"):
            with run_lock(tmp_path, "demo"):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
    assert _until(lambda: not lock_is_held(lock))
    with run_lock(tmp_path, "demo"):
        pass


def test_a_file_system_without_flock_is_named_before_anything_runs(demo, monkeypatch, capsys):
    """Lustre mounted `noflock`, some NFS: flock fails with ENOLCK / EOPNOTSUPP. Said in words, with what to do,
    instead of a traceback; the dashboard's probe of such a lock reads it as not held."""
    import errno

    from wanpair.cli import main
    from wanpair.train import run_lock as rl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rl.fcntl, "flock", no_locks)
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    err = capsys.readouterr().err
    assert "does not support file locks (flock: No locks available)" in err and "local disk" in err
    assert "Traceback" not in err and not rl.lock_is_held(demo / "output" / ".demo_shapes_v1.lock")


def test_an_output_folder_that_cannot_be_written_is_named_before_anything_runs(demo, monkeypatch, capsys):
    """A read-only mount (EROFS: root too is refused there) where the lock file would go: said in words, naming
    output_dir, before anything loads; and any other refusal of the file system reaches the user without a
    traceback."""
    import errno

    from wanpair.cli import main
    from wanpair.train import run_lock as rl

    real_open = os.open

    def read_only(path, flags, *mode):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(rl.os, "open", read_only)
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {demo / 'output' / '.demo_shapes_v1.lock'} (Read-only file system)" in err
    assert f"make output_dir {demo / 'output'} writable" in err and "Traceback" not in err
    monkeypatch.undo()

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(demo / "dataset" / "cache"))

    monkeypatch.setattr("wanpair.cli.cmd_cache", full)
    assert main(["cache", str(demo / "wanpair.toml")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "The disk is full: free space" in err and "Traceback" not in err


def test_a_run_is_known_by_the_first_pid_of_its_lock_file_read_a_page_at_most(tmp_path):
    """`held_by_run_of` (the dashboard: is this job's run still saving?) is true for the run that wrote its pid
    first and holds the lock, false for any other pid and once it is free; a lock file grown to a gigabyte (sparse,
    planted) is read a page at most, and the holder is still named."""
    import tracemalloc

    lock = lock_path(tmp_path, "r")
    with run_lock(tmp_path, "r"):
        assert held_by_run_of(lock, os.getpid()) and not held_by_run_of(lock, os.getpid() + 1)
        with open(lock, "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(b" ")
            f.truncate(1 << 30)
        tracemalloc.start()
        try:
            assert held_by_run_of(lock, os.getpid()) and lock_holder(lock) == os.getpid()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2**20, f"{peak / 2**20:.0f} MiB held at once"
    assert not held_by_run_of(lock, os.getpid())
