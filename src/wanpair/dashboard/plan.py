"""The new-run form's plan: `wanpair doctor PROJECT`, in a process of its own, one at a time.

In the dashboard's process the doctor would hold a CUDA context on every GPU for as long as the dashboard
lives, so it runs as `python -m wanpair.cli doctor`. A doctor takes seconds and queries every GPU (beside a
training that may be running), so a page asking again and again must not start a process each time: one
doctor runs at a time, and a request for a project whose doctor is already running gets that run's answer.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class Doctor:
    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanpair-doctor")  # one at a time
        self._running: dict[Path, Future] = {}
        self._mutex = threading.RLock()  # a callback on a future already done runs at once, in `ask`

    def ask(self, project: Path) -> subprocess.CompletedProcess:
        """The doctor's verdict on `project`: a new run, or the one running for it now."""
        with self._mutex:
            future = self._running.get(project)
            if future is None:
                future = self._running[project] = self._pool.submit(_doctor, project)
                future.add_done_callback(lambda _, p=project: self._forget(p))
        return future.result()

    def _forget(self, project: Path) -> None:
        with self._mutex:
            self._running.pop(project, None)


TIMEOUT_S = 600  # a doctor takes seconds; one that hangs (a GPU driver in trouble) must not block every later plan


def _doctor(project: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "wanpair.cli", "doctor", str(project)]
    try:
        return subprocess.run(argv, cwd=project.parent, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 1, "", f"✗ wanpair doctor gave no answer in {TIMEOUT_S} s; run it in "
                                                       f"a shell to see where it waits: wanpair doctor {project}\n")
