"""More than one process: both experts side by side (pair-parallel), one expert data-parallel over ranks,
and a run that loses one process ending cleanly and continuing with the same command.

On a CPU the workers are CPU processes (one thread each: the machine's cores are shared) and the ranks
talk over gloo; the same code places them on GPUs and NCCL. Results on a CPU depend on the thread count
(it changes the order of float sums, and oneDNN keeps kernels chosen under an earlier count), so each
reference runs as a fresh `wanpair train` process with one thread too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import PATIENCE_S, set_train
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe

SETTINGS = dict(learning_rate=2e-3, save_dtype="fp32", tensorboard=False)
# the module's reference run, which the pair-parallel, data-parallel and interrupted runs must each equal:
# 36 optimizer steps of 2 micro-batches per expert, long enough that both workers are still training when
# their first states (step 4) appear and a stop reaches them (idle, a tiny worker takes ~0.03 s a step); two
# data-parallel ranks of one micro-batch make the same steps
REFERENCE = dict(epochs=4, save_state_every_n_steps=4, gradient_accumulation_steps=2)


def _train(project, *args):
    """`wanpair train` in a fresh process with one thread, as each worker has."""
    done = subprocess.run([sys.executable, "-m", "wanpair.cli", "train", str(project.path), *args],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _copy(demo, tmp_path, name, **settings):
    """A copy of the demo, its cache filled once for all copies: latents encoded with another thread count
    differ in their last bits, and the comparisons here are of training alone."""
    if not (demo / "dataset" / "cache").is_dir():
        assert main(["cache", str(demo / "wanpair.toml")]) == 0
    root = tmp_path / name
    shutil.copytree(demo, root)
    set_train(root / "wanpair.toml", **{**SETTINGS, **settings})
    project, _ = load_project(root / "wanpair.toml")
    return project


def _tensors(project, expert):
    return load_file(str(project.lora_path(expert)))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pair_parallel_gives_the_same_loras_as_one_expert_after_the_other(shared_demo, tmp_path, reference):
    project = _copy(shared_demo, tmp_path, "parallel", **REFERENCE, experts_parallel="on")
    results = LoraPairRecipe(project).run()
    assert [r.expert for r in results] == ["high", "low"] and all(r.steps == 36 for r in results)
    for expert in ("high", "low"):  # the reference trained them one after the other, in one process
        assert _same(_tensors(project, expert), _tensors(reference, expert)), expert
    rows = (project.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 * (1 + 36)  # a validation row at step 0 and 36 steps each; both workers appended to the one metrics file, no line lost or torn


def test_data_parallel_over_two_processes_equals_one_process_with_twice_the_accumulation(shared_demo, tmp_path,
                                                                                        reference):
    project = _copy(shared_demo, tmp_path, "two", **{**REFERENCE, "gradient_accumulation_steps": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "wanpair.cli", "train", str(project.path), "--expert", "high"],
                          env=env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = _tensors(reference, "high"), _tensors(project, "high")
    # the same gradients, averaged by DDP across ranks instead of summed over micro-batches in one process:
    # only the order of float32 additions differs
    for k in a:
        assert ((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item() < 1e-5, k
    rows = (project.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 + 36  # validation at step 0; 18 micro-batches per epoch, 2 per optimizer step, 4 epochs; only rank 0 logs
    assert not list(project.output_dir.glob("*partial*"))


def _worker(parent: subprocess.Popen, expert: str) -> psutil.Process:
    end = time.time() + 60
    while time.time() < end:
        for p in psutil.Process(parent.pid).children(recursive=True):
            try:
                cmdline = p.cmdline()
            except psutil.NoSuchProcess:  # a short-lived child (a helper the launch runs) gone since it was listed
                continue
            if "wanpair.train.worker" in cmdline and expert in cmdline:
                return p
        time.sleep(0.05)
    raise AssertionError(f"no {expert}-noise worker appeared")


def _state_steps(project, expert) -> list[int]:
    return [int(p.stem.rsplit("step", 1)[1]) for p in (project.run_dir / "state").glob(f"{expert}-step*.pt")]


def _wait_for_state(project, expert, parent, after: int = 0, timeout=PATIENCE_S, or_finished: bool = False):
    """Until the expert has saved a state later than step `after` (or, `or_finished`, its final LoRA: an expert
    continued a few steps before its end may finish before its next state is due)."""
    end = time.time() + timeout
    while time.time() < end:
        finished = or_finished and project.lora_path(expert).exists()
        if max(_state_steps(project, expert), default=0) > after or finished:
            return
        assert parent.poll() is None, parent.stdout.read()
        time.sleep(0.02)
    raise AssertionError(f"no {expert}-noise state after step {after} appeared")


@pytest.fixture(scope="module")
def shared_demo(demo_root, tmp_path_factory):
    """One demo copy (and so one cache) for the module: `_copy` only reads it, and the references of the
    interruption tests below are the same run, trained once."""
    dst = tmp_path_factory.mktemp("parallel") / "demo"
    shutil.copytree(demo_root, dst)
    return dst


@pytest.fixture(scope="module")
def reference(shared_demo, tmp_path_factory):
    project = _copy(shared_demo, tmp_path_factory.mktemp("reference"), "reference", **REFERENCE)
    _train(project, "--experts-parallel", "off")
    return project


def _start(project):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "wanpair.cli", "train", str(project.path), "--experts-parallel",
                             "on"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_expert_stops_the_other_which_saves_then_ctrl_c_stops_both_and_the_run_continues(
        shared_demo, tmp_path, reference):
    """A worker killed (a crash, the out-of-memory killer): the other saves and stops, and the same command
    continues both; Ctrl-C during that run stops both (an expert already at its end finishes), each saving;
    `--resume` then ends with the LoRAs of a run never stopped."""
    project = _copy(shared_demo, tmp_path, "interrupted", **REFERENCE, experts_parallel="on")
    parent = _start(project)
    low = _worker(parent, "low")
    _wait_for_state(project, "low", parent)
    _wait_for_state(project, "high", parent)  # both in their loops (a worker still setting up has nothing to save)
    low.kill()  # SIGKILL
    out, _ = parent.communicate(timeout=PATIENCE_S)
    assert parent.returncode == 2, out
    assert "[low] low-noise:" not in out and "[high] high-noise:" not in out, out  # workers draw no bars: the parent does
    assert "the low-noise expert stopped with an error" in out
    assert "the high-noise expert saved its state and a partial LoRA" in out
    assert list(project.output_dir.glob("WAN2.2-HighNoise_*-partial-step*.safetensors"))
    assert not project.lora_path("low").exists()
    before = {e: max(_state_steps(project, e)) for e in ("high", "low")}
    parent = _start(project)  # the same command: both continue from their states
    for expert in ("low", "high"):
        _wait_for_state(project, expert, parent, after=before[expert], or_finished=True)
    parent.send_signal(signal.SIGINT)
    out, _ = parent.communicate(timeout=PATIENCE_S)
    assert parent.returncode == 130, out
    stopped = 0
    for expert in ("High", "Low"):
        steps = [int(p.stem.rsplit("step", 1)[1]) for p in
                 project.output_dir.glob(f"WAN2.2-{expert}Noise_*-partial-step*.safetensors")]
        # saved again, later -- unless its last steps were done before the Ctrl-C reached it (a loaded machine
        # runs the two workers at different speeds): then its final LoRA is there
        later = max(steps, default=0) > before[expert.lower()]
        assert later or project.lora_path(expert.lower()).exists(), out
        stopped += later
    assert stopped, out  # the Ctrl-C stopped at least one of them mid-run
    assert main(["train", str(project.path), "--resume"]) == 0
    for expert in ("high", "low"):
        assert _same(_tensors(project, expert), _tensors(reference, expert)), expert


def test_killing_wanpair_train_outright_stops_both_workers_which_save_and_a_new_run_waits_for_them(
        shared_demo, tmp_path):
    """SIGKILL (the OOM killer, `kill -9`) of the parent cannot be forwarded: the workers notice it is gone,
    save like on Ctrl-C and exit; until then the run's lock names them, so a new run does not race them.
    (Continuing from such a save is the killed-expert test's, after its Ctrl-C.)"""
    from wanpair.train.run_lock import lock_holder, lock_path

    # more epochs than the reference: neither worker may finish its run while the other reaches its first state
    project = _copy(shared_demo, tmp_path, "orphaned", **{**REFERENCE, "epochs": 20}, experts_parallel="on")
    parent = _start(project)
    workers = [_worker(parent, "high"), _worker(parent, "low")]
    _wait_for_state(project, "low", parent)
    _wait_for_state(project, "high", parent)
    parent.kill()
    parent.wait()
    lock = lock_path(project.output_dir, project.name)
    assert lock_holder(lock) in {w.pid for w in workers}  # the run still counts as running while they save
    with pytest.raises(WanpairError, match="another wanpair run"):
        LoraPairRecipe(project).run()
    _, alive = psutil.wait_procs(workers, timeout=PATIENCE_S)
    assert not alive
    assert lock_holder(lock) == 0
    for expert in ("High", "Low"):  # each stopped cleanly: its partial LoRA and state were written
        assert list(project.output_dir.glob(f"WAN2.2-{expert}Noise_*-partial-step*.safetensors"))
    partial_steps = {p.stem.rsplit("step", 1)[1] for p in project.output_dir.glob("*-partial-step*.safetensors")}
    state_steps = {p.stem.rsplit("step", 1)[1].lstrip("0") for p in (project.run_dir / "state").glob("*.pt")}
    assert {s.lstrip("0") for s in partial_steps} <= state_steps  # a state at each partial LoRA's step


def test_the_other_expert_is_described_as_it_really_ended():
    """When one expert fails, the message says what the other did: saved (a clean stop), finished first, or
    was still setting up (killed by the signal with nothing to save) -- never 'saved' when it did not."""
    from wanpair.train.placement import _how_it_ended

    assert _how_it_ended(128 + signal.SIGTERM) == "saved its state and a partial LoRA and stopped"
    assert _how_it_ended(0) == "had finished"
    assert _how_it_ended(-signal.SIGTERM) == "was stopped before its first step, with nothing to save yet"


def test_the_placement_line_names_where_each_expert_runs():
    from wanpair.train.placement import Group, describe

    assert describe([[Group("high", 1, [0], 0.5), Group("low", 1, [0], 0.5)]]) == \
        "high-noise and low-noise on GPU 0 at the same time, half its memory each"
    assert describe([[Group("high", 2, [0, 1]), Group("low", 2, [2, 3])]]) == \
        "high-noise on GPU 0,1 (data-parallel over 2) and low-noise on GPU 2,3 (data-parallel over 2) at the same time"
    assert describe([[Group("high", 2, [0, 1])], [Group("low", 2, [0, 1])]]) == \
        "high-noise on GPU 0,1 (data-parallel over 2); then low-noise on GPU 0,1 (data-parallel over 2)"


def test_a_worker_whose_parent_pipe_breaks_stops_as_on_ctrl_c_instead_of_dying_of_the_write():
    """`wanpair train` killed outright: a worker writing a line before its watch notices must not die of the
    broken pipe (it would save nothing); its stream asks for the stop instead."""
    import io
    import os

    from wanpair.train.worker import _ToParent

    read, write = os.pipe()
    os.close(read)  # the parent is gone
    calls = []
    stream = _ToParent(io.TextIOWrapper(io.FileIO(write, "w"), line_buffering=True), lambda: calls.append(1))
    assert stream.write("step 12\n") == len("step 12\n")
    stream.flush()
    assert calls  # the worker was told to stop, and nothing was raised


def test_a_stop_while_the_workers_start_reaches_them_all(tmp_path, monkeypatch):
    """Ctrl-C arrives after the high-noise worker started and before the low-noise one: the started one is
    stopped, the other is never started (it would have trained to its end), and the run ends as a stop."""
    from wanpair.errors import StopRequested
    from wanpair.train import placement
    from wanpair.train.run_lock import lock_path, run_lock

    code = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); "
            "print('ready', flush=True); time.sleep(60)")
    monkeypatch.setattr(placement, "worker_command", lambda group, handoff, state: [sys.executable, "-c", code])
    started, real = [], subprocess.Popen

    def popen(*args, **kwargs):
        proc = real(*args, **kwargs)
        started.append(proc)
        proc.stdout.readline()  # its handler is in place
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the workers start
        return proc

    monkeypatch.setattr(placement.subprocess, "Popen", popen)
    wave = [placement.Group("high", 1), placement.Group("low", 1)]
    with run_lock(tmp_path, "run"), pytest.raises(StopRequested):
        placement._run_wave(wave, tmp_path / "handoff.json", tmp_path / "metrics.jsonl", {"high": (None, 0),
                            "low": (None, 0)}, {"high": 10, "low": 10}, lock_path(tmp_path, "run"))
    assert len(started) == 1 and started[0].wait(PATIENCE_S) == 130
