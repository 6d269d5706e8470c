"""Where each expert's training unit runs: in the recipe's process, or in worker processes side by side.

- One device (or an external launcher such as `torchrun` / `accelerate launch` that started this process
  on every rank): the experts run one after the other in this process; under a launcher each is
  data-parallel over all ranks.
- Pair-parallel: both experts at once, each in its own worker process (`wanpair.train.worker`) on its
  own GPU, or on its own group of GPUs as a torchrun data-parallel group (4 GPUs: 2 per expert). The
  caches were filled before, once. With one GPU and `experts_parallel = "on"`, both share it, each
  allowed half its memory; on a CPU, two processes.
- Several GPUs, experts one after the other (`experts_parallel = "off"`): each expert in turn as a
  data-parallel group over all of them.

The parent shows one progress line per expert (read from `metrics.jsonl`, which the workers append to),
prints each worker's messages prefixed with its expert, forwards Ctrl-C / SIGTERM (each worker saves
its state and a partial LoRA), and when one worker fails -- a crash, a NaN stop, a full disk -- stops
the other, which saves too. Running the same command again continues both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_text_atomic
from ..errors import StopRequested, WanpairError
from ..models.tasks import expert_name, expert_noun
from .run_lock import add_lock_holders, lock_fd

# The worker's environment names the `wanpair train` process: killed outright (SIGKILL, the OOM killer) it
# cannot pass a stop on, so each worker watches it and stops itself, saving (`wanpair.train.worker`).
PARENT_PID = "WANPAIR_PARENT_PID"
# Below this much free GPU memory a GPU has no room for an expert's plan even in low-memory mode.
ROOM_GIB = 16.0


@dataclass
class Group:
    """Where one expert's unit runs: `processes` processes (one per GPU in `gpus`; CPU processes if None)."""

    expert: str
    processes: int
    gpus: list[int] | None = None
    memory_share: float = 1.0


def launched_by_torchrun() -> bool:
    """This process is one rank of several, started by torchrun / accelerate launch / a cluster launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def choose(experts: list[str], device: torch.device, setting: str, gpus: int | None,
           states: dict[str, int] | None = None) -> list[list[Group]] | None:
    """Waves of groups that run at the same time (None: the experts in turn, in this process).

    `setting` is `experts_parallel` (auto | on | off); `gpus` how many GPUs to use (None: all visible);
    `states`: the number of processes each continuing expert's state was saved by. A step takes micro-batches
    from every process, so an expert continues on the number it started on: `auto` follows the states (both
    at once, or one after the other, whichever keeps them), and a placement that cannot is refused here,
    naming both counts -- when the run is planned, before anything loads."""
    if launched_by_torchrun():
        _same_counts(states, {e: int(os.environ["WORLD_SIZE"]) for e in experts}, "this launch")
        return None
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    n = visible if gpus is None else gpus
    if gpus is not None and (device.type != "cuda" or gpus > visible):
        raise WanpairError(f"--gpus {gpus}: this machine has {visible} visible CUDA GPU(s).")
    if n >= 2:
        k = n // 2
        paired = [[Group(e, k, list(range(i * k, (i + 1) * k))) for i, e in enumerate(experts)]]
    else:  # one device: both share it
        share = 0.5 if device.type == "cuda" else 1.0
        paired = [[Group(e, 1, [0] if device.type == "cuda" else None, share) for e in experts]]
    in_turn = [[Group(e, n, list(range(n)))] for e in experts] if n >= 2 else None
    pair = len(experts) == 2 and (setting == "on" or (setting == "auto" and n >= 2 and _room(range(n))))
    chosen, other = (paired, in_turn) if pair else (in_turn, paired if len(experts) == 2 else in_turn)
    if states and setting == "auto" and not _matches(states, chosen, experts):
        if _matches(states, other, experts):
            chosen = other  # continue each expert on the number of processes its state was saved by
        elif len(experts) == 1 and 1 <= states.get(experts[0], 0) <= max(n, 1):  # the other expert has finished:
            k = states[experts[0]]  # this one alone, on as many GPUs as its pair-parallel state had
            chosen = [[Group(experts[0], k, list(range(k)))]] if k > 1 else None
    _same_counts(states, _counts(chosen, experts), f'experts_parallel = "{setting}" on {max(n, 1)} '
                                                   f'{"GPU" if device.type == "cuda" else "device"}(s)')
    return chosen


def _counts(waves: list[list[Group]] | None, experts: list[str]) -> dict[str, int]:
    return {g.expert: g.processes for wave in waves for g in wave} if waves else dict.fromkeys(experts, 1)


def _matches(states: dict[str, int], waves, experts: list[str]) -> bool:
    counts = _counts(waves, experts)
    return all(counts[e] == n for e, n in states.items() if e in counts)


def _same_counts(states: dict[str, int] | None, counts: dict[str, int], where: str) -> None:
    wrong = [f"{expert_noun(e)}'s state was saved by a run of {n} process(es) (GPUs), and {where} gives it "
             f"{counts[e]}" for e, n in (states or {}).items() if e in counts and counts[e] != n]
    if wrong:
        raise WanpairError("; ".join(wrong) + ". A step there is not a step here: continue on that many GPUs "
                           "(--gpus, experts_parallel), or start the expert over (--overwrite, with --expert for one "
                           "of a pair).")


def _room(gpus) -> bool:
    return all(torch.cuda.mem_get_info(g)[0] / 2**30 >= ROOM_GIB for g in gpus)


def describe(waves: list[list[Group]]) -> str:
    """E.g. "high-noise on GPU 0 and low-noise on GPU 1 at the same time"; experts sharing a device are named
    together: "high-noise and low-noise on GPU 0 at the same time, half its memory each"."""
    def where(g: Group) -> str:
        dp = f" (data-parallel over {g.processes})" if g.processes > 1 else ""
        return (f"on GPU {','.join(map(str, g.gpus))}" if g.gpus else
                f"in {'a CPU process' if g.processes == 1 else f'{g.processes} CPU processes'}") + dp

    def one_wave(wave: list[Group]) -> str:
        if len(wave) > 1 and all(g.memory_share < 1 for g in wave):  # the experts share one GPU
            return (" and ".join(expert_name(g.expert) for g in wave) + f" {where(wave[0])} at the same time, "
                    "half its memory each")
        return " and ".join(f"{expert_name(g.expert)} {where(g)}" for g in wave) + (" at the same time" if len(wave) > 1 else "")

    return "; then ".join(one_wave(wave) for wave in waves)


def worker_command(group: Group, handoff: Path, state: Path | None) -> list[str]:
    args = ["-m", "wanpair.train.worker", str(handoff), "--expert", group.expert]
    if state:
        args += ["--state", str(state)]
    if group.memory_share < 1:
        args += ["--memory-share", str(group.memory_share)]
    if group.processes > 1:  # torch's own launcher: rendezvous, ranks, and the environment DDP reads
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={group.processes}",
                *args]
    return [sys.executable, *args]


def result_path(run_dir: Path, expert: str) -> Path:
    """Where a worker leaves its expert's result (`ExpertResult` as JSON) for the recipe to read once it exited."""
    return run_dir / f".result-{expert}.json"


def run_waves(waves: list[list[Group]], handoff: dict, run_dir: Path, starts: dict[str, tuple[Path | None, int]],
              totals: dict[str, int], lock: Path) -> None:
    """Run every wave's groups side by side; returns when all finished, raises if any did not. `starts`:
    each expert's state to continue from (None: the start) and its step.
    The workers share the run's `lock` (held by this process): a new run is refused while they still save
    after this process was killed."""
    path = run_dir / ".handoff.json"
    write_text_atomic(path, json.dumps(handoff))
    for wave in waves:
        _run_wave(wave, path, run_dir / "metrics.jsonl", starts, totals, lock)


@dataclass
class _Worker:
    group: Group
    proc: subprocess.Popen
    reader: threading.Thread
    signalled: bool = False  # we asked it to stop (a forwarded Ctrl-C / SIGTERM, or the other expert failed)

    @property
    def failed(self) -> bool:
        """Ended with an error of its own, not because it was asked to stop."""
        return self.proc.returncode not in (None, 0) and not self.signalled


def _run_wave(wave: list[Group], handoff: Path, metrics: Path, starts: dict, totals: dict, lock: Path) -> None:
    workers: list[_Worker] = []
    bars = {g.expert: tqdm(total=totals[g.expert], initial=starts[g.expert][1], desc=expert_name(g.expert),
                           unit="step", position=i, dynamic_ncols=True) for i, g in enumerate(wave)}
    tail = _MetricsTail(metrics)
    stopping: list[int] = []
    with _forwarding_signals(lambda signum: (stopping.append(signum), _signal_all(workers, signum, again=True))):
        threads = str(max(1, (os.cpu_count() or 1) // sum(g.processes for g in wave)))
        for group in wave:
            if stopping:  # a Stop while the workers start: the rest are not started (they have nothing to save)
                break
            # each process gets its share of the cores: OpenMP threads of processes that share cores spin
            # against each other (seen: 20x slower steps on a 2-core machine with 2 threads each)
            env = {"OMP_NUM_THREADS": threads, **os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
                   PARENT_PID: str(os.getpid())}
            if group.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in group.gpus)
            proc = subprocess.Popen(worker_command(group, handoff, starts[group.expert][0]), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True,  # our signals reach it only as we forward them
                                    pass_fds=(lock_fd(lock),))  # it holds the run's lock until it exits
            reader = threading.Thread(target=_forward_output, args=(proc, group.expert), daemon=True)
            reader.start()
            workers.append(_Worker(group, proc, reader))
            if stopping:  # it came while this one was being started, before the handler could see it
                _signal_all(workers, stopping[0])
        add_lock_holders(lock, [w.proc.pid for w in workers])
        while any(w.proc.poll() is None for w in workers):
            time.sleep(0.5)
            tail.update(bars)
            if any(w.proc.poll() is not None and w.failed for w in workers):
                _signal_all(workers, signal.SIGTERM)  # a crash or an error: the others save and stop too
        for w in workers:
            w.reader.join()
        tail.update(bars)
    for bar in bars.values():
        bar.close()
    failed = [w for w in workers if w.failed]
    if failed:
        names = " and ".join(expert_noun(w.group.expert) for w in failed)
        others = "".join(f"; {expert_noun(w.group.expert)} {_how_it_ended(w.proc.returncode)}"
                         for w in workers if w not in failed)
        raise WanpairError(
            f"{names} stopped with an error (exit code {', '.join(str(w.proc.returncode) for w in failed)};"
            f" its messages are above){others}. Fix the cause and run the same command again: finished experts "
            "are kept, the others continue from their last state.")
    if any(w.proc.returncode for w in workers) or len(workers) < len(wave):
        raise StopRequested("stopped; the experts saved their state and a partial LoRA. Run the same command "
                            "again (or with --resume) to continue.", stopping[0] if stopping else signal.SIGTERM)


def _how_it_ended(returncode: int) -> str:
    """What a worker that was asked to stop did: a clean stop saves (exit 128 + signal), a worker still
    setting up when the signal came had nothing to save yet, and one may have finished first."""
    if returncode == 0:
        return "had finished"
    if returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        return "saved its state and a partial LoRA and stopped"
    return "was stopped before its first step, with nothing to save yet"


def _signal_all(workers: list[_Worker], signum: int, again: bool = False) -> None:
    """Ask every running worker to stop (once; `again`: a user's second Ctrl-C is passed on too)."""
    for w in workers:
        if w.proc.poll() is None and (again or not w.signalled):
            w.signalled = True
            w.proc.send_signal(signum)  # to the worker, or to torchrun, which passes it to every rank once


def _forward_output(proc: subprocess.Popen, expert: str) -> None:
    for line in proc.stdout:
        tqdm.write(f"[{expert}] {line.rstrip()}")


@contextmanager
def _forwarding_signals(handler):
    previous = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class _MetricsTail:
    """Follows `metrics.jsonl` from where it ends now, moving each expert's bar to its newest step."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, path.stat().st_size if path.exists() else 0, b""

    def update(self, bars: dict[str, tqdm]) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        *lines, self.rest = (self.rest + chunk).split(b"\n")
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            bar = bars.get(row.get("expert"))
            if bar is not None and "step" in row:
                bar.update(row["step"] - bar.n)
                bar.set_postfix(loss=f"{row.get('smoothed_loss', row.get('loss', 0)):.4f}", refresh=False)
