"""Resumable training state, and stopping cleanly on Ctrl-C / SIGTERM.

A state is everything the next step depends on: LoRA weights, optimizer and scheduler state,
step / epoch / position in the epoch's (seeded) order, and every random generator (Python, NumPy,
torch CPU and CUDA, and the generator that draws noise and timesteps). Resuming from it on a CPU
continues bit for bit as if the run had never stopped. States live in
`<output_dir>/<name>/state/<expert>-step<N>.pt`, are written atomically, and the last
`keep_states` of each expert are kept. They are written in the background (`StateWriter`) from a copy in host
memory, so training goes on while one is written.

States hold only tensors and plain Python values (the generators' states are converted to them), so
they load with `torch.load(weights_only=True)`: `--resume PATH` accepts files from elsewhere, and
unpickling one must not be able to run code.
"""

from __future__ import annotations

import pickle
import random
import re
import signal
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import WanpairError
from ..models.tasks import EXPERT_NAMES


@dataclass
class Progress:
    """Where one expert's run stands, apart from its weights, optimizer, schedule and generators: what the
    loop advances, and what a training state holds beside those (under these same keys)."""

    step: int = 0  # optimizer steps applied
    epoch: int = 1  # the epoch the next step belongs to
    pos: int = 0  # micro-batches of that epoch already trained
    epoch_losses: list[float] = field(default_factory=list)  # the mean loss of each epoch done
    losses: list[float] = field(default_factory=list)  # this epoch's step losses so far
    smoothed: float | None = None  # the moving average the progress bar and metrics show
    kept: list[str] = field(default_factory=list)  # intermediate LoRAs kept so far (keep_last)
    last_val: tuple[int, float] | None = None  # (step, loss) of the newest validation

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        progress = cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
        progress.last_val = tuple(progress.last_val) if progress.last_val else None
        return progress

    def to_state(self) -> dict:
        return asdict(self)


def host_copy(obj):
    """`obj` (nested dicts, lists and tuples: an optimizer's `state_dict`) with every tensor copied to host memory,
    as it is now: the live tensors are changed in place by the next update, on a CPU too."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def lora_params(model) -> dict[str, torch.Tensor]:
    return host_copy({n: p for n, p in model.named_parameters() if p.requires_grad})


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


class StateWriter:
    """Training states written in a background thread, one at a time. Writing one takes seconds (a rank-16 LoRA of
    a 14B expert with AdamW's moments is 0.9 GB: 2.0-2.6 s through torch.save and fsync on an H100 machine), while
    copying it to host memory first (`host_copy`) takes 0.36 s; the loop trains on meanwhile, its steps beside the
    write 0.54 s slower in all (docs/benchmarks.md, thirteenth round). A kill mid-write leaves only the temporary
    file (`atomic_path`) and the previous state, which is pruned only once the new one is in place. The state
    written, or the error writing it (a full disk), comes back to the training thread through `done`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._result: Path | BaseException | None = None

    def start(self, run_dir: Path, expert: str, state: dict, keep: int) -> None:
        """Write `state` (host tensors only: a snapshot) as `save_state` does; the last write must be `done`."""
        assert self._thread is None, "one state at a time: collect the last with done(block=True)"

        def write():
            try:
                self._result = save_state(run_dir, expert, state, keep)
            except BaseException as e:  # raised in the training thread by `done`
                self._result = e

        self._thread = threading.Thread(target=write, name="wanpair-state", daemon=False)
        self._thread.start()

    def done(self, block: bool) -> Path | None:
        """The path of the state written since the last call, once (None: nothing written, or still writing and not
        `block`); raises what writing it raised."""
        if self._thread is None or (not block and self._thread.is_alive()):
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        if isinstance(result, BaseException):
            raise result
        return result


def state_step(path: Path) -> int:
    """The step in a state's file name as `save_state` writes it (`high-step00000400.pt`; another name: -1)."""
    m = re.match(rf"(?:{'|'.join(EXPERT_NAMES)})-step(\d+)\.pt$", path.name)
    return int(m[1]) if m else -1


def list_states(run_dir: Path, expert: str | None = None) -> list[Path]:
    """The states of one expert (or all: high-noise before low-noise), oldest first: only the files named as
    `save_state` names them, so that a copy a user put aside (`high-step00000010-backup.pt`) is never taken
    for one, pruned or removed."""
    order = {e: i for i, e in enumerate(EXPERT_NAMES)}

    def key(p: Path):
        return order.get(p.name.split("-step", 1)[0], 9), state_step(p)

    return sorted((p for p in state_dir(run_dir).glob(f"{expert or '*'}-step*.pt") if state_step(p) >= 0), key=key)


def load_state(path: Path, mapped: bool = False) -> dict:
    """A training state, checked to be one. `mapped`: the tensors stay in the file until read (a private mapping,
    nothing written back) -- for a run's plan, the doctor and the Hub's checks, which need only its identity and
    step, not the ~0.9 GB of a 14B expert's optimizer (0.44 -> 0.03 s from a warm page cache). A run that
    continues from it reads it whole: its optimizer would keep the mapped pages (and a pruned file's disk blocks)
    for the rest of the run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain values
        raise WanpairError(f"{path} is not a wanpair training state: it holds Python objects that wanpair's "
                           f"states never contain, so it was not loaded ({str(e).splitlines()[0]}).") from None
    except Exception as e:  # a truncated or foreign file
        raise WanpairError(f"training state {path} cannot be read ({e}); resume from an older one or start over.") from None
    if not isinstance(state, dict) or "expert" not in state or "lora" not in state:
        raise WanpairError(f"{path} is not a wanpair training state.")
    return state


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
