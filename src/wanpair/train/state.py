"""Resumable training state, the run lock, and stopping cleanly on Ctrl-C / SIGTERM.

A state is everything the next step depends on: LoRA weights, optimizer and scheduler state,
step / epoch / position in the epoch's (seeded) order, and every random generator (Python, NumPy,
torch CPU and CUDA, and the generator that draws noise and timesteps). Resuming from it on a CPU
continues bit for bit as if the run had never stopped. States live in
`<output_dir>/<name>/state/<expert>-step<N>.pt`, are written atomically, and the last
`keep_states` of each expert are kept.

States hold only tensors and plain Python values (the generators' states are converted to them), so
they load with `torch.load(weights_only=True)`: `--resume PATH` accepts files from elsewhere, and
unpickling one must not be able to run code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..errors import WanpairError
from ..models.tasks import EXPERT_NAMES


class StopRequested(Exception):
    """Raised after a clean stop (Ctrl-C, SIGTERM): state and a partial LoRA have been saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def capture_rngs(gen: torch.Generator) -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "gen": gen.get_state()}


def restore_rngs(rngs: dict, gen: torch.Generator) -> None:
    version, internal, gauss = rngs["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rngs["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rngs["torch"])
    if rngs["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])
    gen.set_state(rngs["gen"])


def state_dir(run_dir: Path) -> Path:
    return run_dir / "state"


def save_state(run_dir: Path, expert: str, state: dict, keep: int) -> Path:
    folder = state_dir(run_dir)
    path = folder / f"{expert}-step{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep > 0:
        for old in list_states(run_dir, expert)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_states(run_dir: Path, expert: str | None = None) -> list[Path]:
    """The states of one expert (or all: high-noise before low-noise), oldest first."""
    order = {e: i for i, e in enumerate(EXPERT_NAMES)}

    def key(p: Path):
        m = re.match(rf"({'|'.join(EXPERT_NAMES)})-step(\d+)\.pt$", p.name)
        return (order[m[1]], int(m[2])) if m else (9, 0)

    return sorted((p for p in state_dir(run_dir).glob(f"{expert or '*'}-step*.pt")), key=key)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain values
        raise WanpairError(f"{path} is not a wanpair training state: it holds Python objects that wanpair's "
                           f"states never contain, so it was not loaded ({str(e).splitlines()[0]}).") from None
    except Exception as e:  # a truncated or foreign file
        raise WanpairError(f"training state {path} cannot be read ({e}); resume from an older one or start over.") from None
    if not isinstance(state, dict) or "expert" not in state or "lora" not in state:
        raise WanpairError(f"{path} is not a wanpair training state.")
    return state


def lock_path(output_dir: Path, name: str) -> Path:
    return output_dir / f".{name}.lock"


def lock_holder(lock: Path) -> int:
    """A still-running process of the run whose lock this is (0 if none): the lock file lists the run's own
    pid first, then the pids of its worker processes (`add_lock_holders`), which may outlive it for the
    seconds they take to save after it was killed."""
    try:
        pids = [int(x) for x in lock.read_text().split()]
    except (OSError, ValueError):
        return 0
    return next((pid for pid in pids if pid_alive(pid)), 0)


def add_lock_holders(lock: Path, pids: list[int]) -> None:
    """Worker processes write for the run too: while one of them lives, the run counts as running."""
    write_text_atomic(lock, " ".join(lock.read_text().split() + [str(p) for p in pids]))


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


@contextmanager
def run_lock(output_dir: Path, name: str):
    """One writer per output name: a second run refuses to start while the first is alive."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_path(output_dir, name)
    if lock.exists():
        pid = lock_holder(lock)
        if pid and pid != os.getpid():
            raise WanpairError(f"another wanpair run (pid {pid}) is writing {output_dir}/{name}; wait for it, or "
                               f"give this run another name. (Lock file: {lock})")
        print(f"note: removing a stale lock {lock} left by an earlier run that is no longer running")
    write_text_atomic(lock, str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


class StopFlag:
    """Turns SIGINT / SIGTERM into a flag the training loop checks after each optimizer step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop right away
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving state and the LoRA so far")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
