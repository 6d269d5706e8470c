"""Nothing lost: resume after SIGKILL is bit-identical, SIGTERM saves, NaN steps are skipped, one writer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import PATIENCE_S, set_train
from test_run_lock import hold_run_lock
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe

SETTINGS = dict(epochs=1, learning_rate=2e-3, save_state_every_n_steps=4, keep_states=2, tensorboard=False,
                validate_every_n_steps=12)  # 18 steps per expert, validated at 0, 12, 18: before and after the stops at 4-8


def _start(project):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "wanpair.cli", "train", str(project)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_states(run_dir, expert, n, proc, timeout=PATIENCE_S):
    end = time.time() + timeout
    while time.time() < end:
        if len(list((run_dir / "state").glob(f"{expert}-step*.pt"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError("training ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("no training state appeared")


def _tensors(path):
    return load_file(str(path))


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    """The same run, uninterrupted, in another copy of the demo (trained once for the module; do not modify)."""
    ref = tmp_path_factory.mktemp("reliability") / "reference"
    shutil.copytree(demo_root, ref)
    set_train(ref / "wanpair.toml", **SETTINGS)
    project, _ = load_project(ref / "wanpair.toml")
    LoraPairRecipe(project).run()
    return project


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigkill_then_resume_gives_bit_identical_loras(demo, reference):
    set_train(demo / "wanpair.toml", **SETTINGS)
    project, _ = load_project(demo / "wanpair.toml")
    proc = _start(demo / "wanpair.toml")
    _wait_for_states(project.run_dir, "high", 2, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not project.lora_path("high").exists()
    with open(project.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"expert": "high", "st')  # a line torn by the kill
    assert main(["train", str(demo / "wanpair.toml"), "--resume"]) == 0
    for expert in ("high", "low"):
        assert _same(project.lora_path(expert), reference.lora_path(expert)), expert
    assert not list(project.output_dir.glob(".*.tmp")) and not list((project.run_dir / "state").glob(".*.tmp"))


def test_a_default_run_killed_anywhere_is_finished_by_the_same_command(demo, reference):
    """No state settings: one crash state, renewed every tenth of the run (every 2 of 18 steps here), so a run
    killed at any step loses at most a tenth of it; the same command (no --resume) continues it, to the same
    LoRAs as the uninterrupted run, and the finished expert leaves no state behind."""
    from wanpair.train.state import list_states, state_step

    set_train(demo / "wanpair.toml", **{**SETTINGS, "save_state_every_n_steps": 0})
    project, _ = load_project(demo / "wanpair.toml")
    proc = _start(demo / "wanpair.toml")
    end = time.time() + PATIENCE_S
    while not any(state_step(s) >= 6 for s in list_states(project.run_dir, "high")):
        assert proc.poll() is None and time.time() < end, "no crash state at step 6 or later"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not project.lora_path("high").exists()
    assert len(list_states(project.run_dir, "high")) <= 2  # one, and its successor while the older one goes
    assert main(["train", str(demo / "wanpair.toml")]) == 0
    for expert in ("high", "low"):
        assert _same(project.lora_path(expert), reference.lora_path(expert)), expert
    assert list_states(project.run_dir) == []


def test_sigterm_saves_a_partial_lora_and_state_and_resume_finishes_the_same(demo, reference):
    set_train(demo / "wanpair.toml", **SETTINGS)
    project, _ = load_project(demo / "wanpair.toml")
    proc = _start(demo / "wanpair.toml")
    _wait_for_states(project.run_dir, "high", 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "--resume" in out
    (partial,) = project.output_dir.glob("WAN2.2-HighNoise_demo_shapes_v1-partial-step*.safetensors")
    with safe_open(str(partial), "pt") as f:
        assert f.metadata()["wanpair.partial"] == "true"
    assert main(["train", str(demo / "wanpair.toml"), "--resume"]) == 0
    assert _same(project.lora_path("high"), reference.lora_path("high"))
    assert _same(project.lora_path("low"), reference.lora_path("low"))


def test_nan_steps_are_skipped_and_a_nan_run_stops_without_saving(demo, monkeypatch):
    import wanpair.train.step as step_mod

    real = step_mod.flow_matching_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] % 3 == 0 else loss

    monkeypatch.setattr(step_mod, "flow_matching_loss", sometimes_nan)
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False)
    project, _ = load_project(demo / "wanpair.toml")
    (r,) = LoraPairRecipe(project, overwrite=True).run(("high",))
    assert r.steps == 12  # 18 batches, every third skipped
    assert all(torch.isfinite(v.float()).all() for v in _tensors(r.lora).values())

    monkeypatch.setattr(step_mod, "flow_matching_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(WanpairError, match="5 consecutive non-finite steps.*learning_rate"):
        LoraPairRecipe(project, overwrite=True).run(("low",))
    assert not project.lora_path("low").exists()


def test_a_second_writer_is_refused_and_a_stale_lock_is_cleared(demo, capsys):
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False)
    project, _ = load_project(demo / "wanpair.toml")
    lock = project.output_dir / ".demo_shapes_v1.lock"
    holder, _ = hold_run_lock(project.output_dir, project.name)  # another `wanpair train` of this project
    try:
        assert main(["train", str(demo / "wanpair.toml"), "--expert", "high"]) == 2
        assert (f"another wanpair run (pid {holder.pid}) is writing {project.output_dir}/{project.name}; wait for it, "
                f"or give this run another name. (Lock file: {lock})") in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, naming it
        holder.wait()
    assert main(["train", str(demo / "wanpair.toml"), "--expert", "high"]) == 0  # the lock file blocks nothing now
    assert not lock.exists()


def test_a_state_file_that_would_run_code_is_refused_not_unpickled(tmp_path):
    """`--resume PATH` takes files from anywhere: loading one must not execute what it holds."""
    import pickle

    from wanpair.train.state import load_state

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "high-step00000004.pt"
    torch.save({"expert": "high", "lora": {}, "x": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(WanpairError, match="not a wanpair training state.*not loaded"):
        load_state(evil)
    assert not marker.exists()


def test_states_hold_only_tensors_and_plain_values(trained):
    """A real state round-trips through weights_only loading (generators included)."""
    import random

    import numpy as np

    from wanpair.train.state import capture_rngs, load_state, restore_rngs, save_state

    gen = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    path = save_state(trained.parent / "run", "high", {"expert": "high", "step": 1, "lora": {}, "rngs": capture_rngs(gen)}, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1, generator=gen))
    restore_rngs(load_state(path)["rngs"], gen)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1, generator=gen), expected[2])


# pytest turns a thread's unhandled exception (a traceback on a user's terminal) into this warning: fail on it
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_mid_pair_gives_one_clear_error_and_the_same_command_finishes_the_pair(demo, monkeypatch, capfd):
    """The disk fills right after the high-noise LoRA is saved; TensorBoard's writer thread is the first to
    hit it. One message (no traceback) names the folder and what is saved; the same command then keeps
    the finished LoRA and trains the other."""
    import errno

    import tensorboard.summary.writer.record_writer as record_writer

    import wanpair.train.expert as expert_mod

    set_train(demo / "wanpair.toml", epochs=1, tensorboard=True)
    project, _ = load_project(demo / "wanpair.toml")
    disk = {"full": False}
    real_write, real_save = record_writer.RecordWriter.write, expert_mod.save_lora

    def write(self, data):
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(project.run_dir / "tensorboard" / "low" / "events"))
        return real_write(self, data)

    def save(path, sd, metadata):
        real_save(path, sd, metadata)
        disk["full"] = disk["full"] or path == project.lora_path("high")

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    monkeypatch.setattr(expert_mod, "save_lora", save)
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("No space left on device") == 1
    assert f"writing to {project.run_dir / 'tensorboard' / 'low'} failed: No space left on device" in err
    assert "Saved: WAN2.2-HighNoise_demo_shapes_v1.safetensors (finished)" in err and "run the same command again" in err
    assert not project.lora_path("low").exists() and not list(project.output_dir.glob(".*.tmp"))

    monkeypatch.undo()  # space freed
    high_made = project.lora_path("high").stat().st_mtime_ns
    assert main(["train", str(demo / "wanpair.toml")]) == 0
    assert "keeping WAN2.2-HighNoise_demo_shapes_v1.safetensors" in capfd.readouterr().out
    assert project.lora_path("high").stat().st_mtime_ns == high_made and project.lora_path("low").exists()
    rows = [r for r in _metrics(project) if r["expert"] == "low"]
    assert [r["step"] for r in rows] == list(range(0, 19))  # the stopped run's rows are gone, not doubled


def test_a_plain_rerun_continues_from_this_runs_last_state(demo, reference):
    """Killed without --resume in mind: the same command continues, and ends as the uninterrupted run."""
    set_train(demo / "wanpair.toml", **SETTINGS)
    project, _ = load_project(demo / "wanpair.toml")
    proc = _start(demo / "wanpair.toml")
    _wait_for_states(project.run_dir, "high", 2, proc)
    proc.kill()
    proc.wait()
    assert main(["train", str(demo / "wanpair.toml")]) == 0
    for expert in ("high", "low"):
        assert _same(project.lora_path(expert), reference.lora_path(expert)), expert
    # the validation loss continues too: the same steps, the same values (one computation, bit-equal)
    validated = [[(r["expert"], r["step"], r["val_loss"]) for r in _metrics(p) if "val_loss" in r] for p in (project, reference)]
    assert validated[0] == validated[1] and len(validated[0]) == 2 * 3  # steps 0, 12 and the last, 18


def _metrics(project):
    import json

    return [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_the_disk_estimate_counts_the_saves_the_run_can_make(demo, capsys):
    """20 steps saving every 3 make 6 intermediate LoRAs, not `epochs` (100) of them; the crash state counts."""
    import re

    from wanpair.train.preflight import preflight

    def estimate(**settings) -> float:
        set_train(demo / "wanpair.toml", **settings)
        preflight(load_project(demo / "wanpair.toml")[0], ("high", "low"), torch.device("cpu"))
        value, unit = re.search(r"disk: about ([\d.]+) (\w+) needed", capsys.readouterr().out).groups()
        return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]

    few = estimate(epochs=100, max_steps=20, save_every_n_steps=3)
    many = estimate(epochs=100, save_every_n_steps=3)  # 100 epochs of 18 steps: 600 saves
    without_state = estimate(epochs=100, max_steps=20, save_every_n_steps=3, crash_state=False)
    assert many > 20 * few and without_state < few


def test_a_state_written_in_the_background_is_its_steps_state_while_training_goes_on(demo, reference, monkeypatch):
    """States are written in a background thread while training goes on: the state of step 4, held back until
    the loop has applied two more updates (which change the optimizer's moments in place), still resumes to the
    uninterrupted run's LoRA bit for bit -- it was copied as it was at its step."""
    import threading

    from wanpair.train import state as state_module
    from wanpair.train.expert import ExpertTraining

    moved_on, real_save, real_after = threading.Event(), state_module.save_state, ExpertTraining.after_step
    written = []

    def held_back(run_dir, expert, state, keep):
        if state["step"] == 4:
            assert moved_on.wait(60), "the loop did not go on while the state was being written"
        written.append(state["step"])
        return real_save(run_dir, expert, state, keep)

    def after_step(self, due, epoch):
        if self.progress.step >= 6:
            moved_on.set()
        real_after(self, due, epoch)

    monkeypatch.setattr(state_module, "save_state", held_back)
    monkeypatch.setattr(ExpertTraining, "after_step", after_step)
    set_train(demo / "wanpair.toml", **{**SETTINGS, "keep_states": 10})
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project).run(("high",))
    assert written[:2] == [4, 8] and moved_on.is_set()
    monkeypatch.undo()
    step4 = project.run_dir / "state" / "high-step00000004.pt"
    project.lora_path("high").rename(project.lora_path("high").with_suffix(".first"))  # as the refusals ask:
    for newer in (project.run_dir / "state").glob("high-step*.pt"):  # the finished LoRA and newer states away
        if newer != step4:
            newer.unlink()
    assert main(["train", str(demo / "wanpair.toml"), "--expert", "high", "--resume", str(step4)]) == 0
    assert _same(project.lora_path("high"), reference.lora_path("high"))


def test_the_time_line_says_how_long_states_waited_for_a_slow_write(demo, monkeypatch, capsys):
    """A state's write still running when the next state falls due (a disk slower than the cadence) makes the loop
    wait: the time line and summary.json say how long, apart from the states' own copies."""
    import json
    import threading

    from wanpair.train import state as state_module
    from wanpair.train.expert import ExpertTraining

    second_due, real_save, real_written = threading.Event(), state_module.save_state, ExpertTraining.state_written
    slow_s = 0.5

    def slow_disk(run_dir, expert, state, keep):
        if state["step"] == 4:  # still writing when the state of step 8 falls due, and slow_s after
            assert second_due.wait(60), "the state of step 8 never fell due"
            time.sleep(slow_s)
        return real_save(run_dir, expert, state, keep)

    def state_written(self, block):
        if block and self.progress.step == 8:
            second_due.set()
        return real_written(self, block)

    monkeypatch.setattr(state_module, "save_state", slow_disk)
    monkeypatch.setattr(ExpertTraining, "state_written", state_written)
    set_train(demo / "wanpair.toml", **SETTINGS)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project).run(("high",))
    (expert,) = json.loads((project.run_dir / "summary.json").read_text())["experts"]
    timings = expert["timings"]
    # the join began before the sleep did; 10 ms is the clocks' and the thread switch's margin
    assert slow_s - 0.01 <= timings["state_wait_s"] <= timings["states_s"], timings
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time: "))
    assert "waiting for the last write" in line, line


def test_a_state_that_cannot_be_written_in_the_background_stops_the_run_with_the_disk_message(demo, monkeypatch):
    """A full disk while a state is written in the background is not lost in its thread: the run stops with the
    disk's message, naming what is saved."""
    import errno

    from wanpair.train import state as state_module

    def full(run_dir, expert, state, keep):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "state" / f"{expert}.pt"))

    monkeypatch.setattr(state_module, "save_state", full)
    set_train(demo / "wanpair.toml", **SETTINGS)
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match="No space left on device.*Free space"):
        LoraPairRecipe(project).run(("high",))
    assert not project.lora_path("high").exists()
