"""One expert's training in a process of its own: what `wanpair train` starts per expert (or per rank of an
expert's data-parallel group, under torchrun) when the experts train side by side.

    python -m wanpair.train.worker HANDOFF.json --expert high [--state STATE.pt] [--memory-share 0.5]

HANDOFF.json is written by the recipe after its preflight and caches (`wanpair.train.placement`): the
project file, the cached data and the sampling prompts' cache entries. The worker checks and encodes
nothing; it trains its expert, and rank 0 writes the LoRA, states, metrics and `.result-<expert>.json`.
Exit codes: 0 done, 2 an error it explained, 128 + signal after a clean stop (state and partial LoRA saved).
It shares the run's lock, inherited from `wanpair train`, until it exits (`wanpair.train.run_lock`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ..models.tasks import EXPERT_NAMES

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `wanpair train` sets it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wanpair.train.worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("handoff", type=Path)
    ap.add_argument("--expert", choices=tuple(EXPERT_NAMES), required=True)
    ap.add_argument("--state", type=Path, help="continue from this training state")
    ap.add_argument("--memory-share", type=float, default=1.0,
                    help="the fraction of the GPU this process may use (experts sharing one GPU)")
    args = ap.parse_args(argv)

    import torch

    from ..atomic import write_text_atomic
    from ..errors import DISK_ERRNOS, WanpairError
    from ..logs import configure_logging
    from ..models.dit import inspect_dit
    from ..project import load_project
    from ..sample import make_sampler
    from .data import CachedData
    from .expert import ExpertTraining
    from .hub_push import uploads_drained
    from .placement import result_path
    from ..errors import StopRequested
    from .state import load_state

    stop_when_orphaned()  # first: the logging set up next writes through the streams it guards
    configure_logging(verbose=False)
    handoff = json.loads(args.handoff.read_text(encoding="utf-8"))
    project, _ = load_project(handoff["project"])
    device = torch.device(handoff["device"])
    if device.type == "cuda" and args.memory_share < 1.0:
        torch.cuda.set_per_process_memory_fraction(args.memory_share)
    data = CachedData.from_json(handoff["data"])
    sampler = make_sampler(project, handoff["prompts"], [Path(p) for p in handoff["prompt_paths"]], device)
    unit = ExpertTraining(project, args.expert, inspect_dit(project.dit_path(args.expert)), data, device, sampler,
                          handoff["allow_expert_mismatch"], show_bar=False)
    try:
        with uploads_drained():  # [hub]: what is still uploading, at the end of this process's training
            result = unit.run(load_state(args.state) if args.state else None)
    except StopRequested as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except WanpairError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: writing {e.filename or project.output_dir} failed: {e.strerror}", file=sys.stderr, flush=True)
        return 2
    if unit.writes:
        write_text_atomic(result_path(project.run_dir, args.expert),
                          json.dumps(asdict(result) | {"lora": str(result.lora)}))
    return 0


def stop_when_orphaned() -> None:
    """Stop as on Ctrl-C -- state and partial LoRA saved -- once the `wanpair train` that started this worker
    is gone: killed outright (SIGKILL, the OOM killer), it could not pass the stop on itself, and a worker
    left training would hold the GPU and the run's lock until its last step. A thread, not the kernel's
    parent-death signal, because under torchrun the parent is torchrun; every rank watches, and the ranks
    agree on the step to stop at as they do for a forwarded Ctrl-C."""
    from .placement import PARENT_PID
    from .run_lock import pid_alive

    parent = int(os.environ.get(PARENT_PID, "0"))
    if not parent:
        return
    orphaned = threading.Lock()  # taken once, by whichever notices first (a second SIGTERM is a second Ctrl-C)

    def stop() -> None:
        """Our output went to the parent, so the pipe is broken: a print would now raise, not save."""
        if not orphaned.acquire(blocking=False):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.kill(os.getpid(), signal.SIGTERM)

    def watch():
        while pid_alive(parent) and not orphaned.locked():
            time.sleep(1.0)
        stop()

    # A worker that writes a line in the second before the watch notices would die of the broken pipe,
    # saving nothing (seen on an H200: one of two workers did): its streams notice too.
    sys.stdout, sys.stderr = _ToParent(sys.stdout, stop), _ToParent(sys.stderr, stop)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _ToParent:
    """One of a worker's output streams, a pipe to `wanpair train`: when the pipe breaks (the parent was
    killed), `orphaned` is called -- the worker stops as on Ctrl-C -- instead of the write raising."""

    def __init__(self, stream, orphaned):
        self.stream, self.orphaned = stream, orphaned

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.orphaned()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.orphaned()

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.exit(main())
