"""`[train] log_with`: what is refused before a model loads, and how a tracker's local store is read back (the
run that logs to all three is in test_per_expert.py, whose per-expert learning rates it shows)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import set_train
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.preflight import preflight
from wanpair.train.recipe import LoraPairRecipe

pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("trackio") and importlib.util.find_spec("wandb")),
                                reason="the test extras (trackio, wandb) are not installed")


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header (":W&B", magic, version), then
    LevelDB's log format -- 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)
    -- each record a `wandb_internal_pb2.Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_a_missing_tracker_or_wandb_key_is_named_before_any_model_loads(demo, monkeypatch):
    set_train(demo / "wanpair.toml", epochs=1, log_with="trackio")
    project, _ = load_project(demo / "wanpair.toml")
    assert project.train.log_with == ["trackio"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(WanpairError, match=r'log_with names trackio, which is not installed here: pip install "wanpair\[trackio\]"'):
        preflight(project, ("high", "low"), LoraPairRecipe(project).device, quiet=True)
    monkeypatch.undo()

    set_train(demo / "wanpair.toml", epochs=1, log_with=["wandb"])
    project, _ = load_project(demo / "wanpair.toml")
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(demo / "no-netrc"))
    with pytest.raises(WanpairError, match="no Weights & Biases key was found.*WANDB_MODE=offline"):
        preflight(project, ("high", "low"), LoraPairRecipe(project).device, quiet=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    preflight(project, ("high", "low"), LoraPairRecipe(project).device, quiet=True)


def test_log_with_names_and_the_older_tensorboard_switch(demo):
    set_train(demo / "wanpair.toml", log_with="mlflow")
    with pytest.raises(WanpairError, match="log_with names 'mlflow'; the trackers are tensorboard, wandb, trackio"):
        load_project(demo / "wanpair.toml")
    set_train(demo / "wanpair.toml", tensorboard=False)
    assert load_project(demo / "wanpair.toml")[0].train.log_with == []
    set_train(demo / "wanpair.toml", log_with="")
    assert load_project(demo / "wanpair.toml")[0].train.log_with == []
    set_train(demo / "wanpair.toml")
    assert load_project(demo / "wanpair.toml")[0].train.log_with == ["tensorboard"]
    for settings, said in ((dict(tensorboard=True, log_with=[]), "sets both tensorboard and log_with"),
                           (dict(log_with=["wandb", "wandb"]), "names a tracker twice"),
                           (dict(tracker_project="me/shapes"), "tracker_project = 'me/shapes' must be a name"),
                           (dict(tracker_project=""), "tracker_project = '' must be a name")):
        set_train(demo / "wanpair.toml", **settings)
        with pytest.raises(WanpairError, match=said):
            load_project(demo / "wanpair.toml")
    set_train(demo / "wanpair.toml")
    assert main(["check", str(demo / "wanpair.toml")]) == 0


def test_a_failing_remote_tracker_is_dropped_and_a_full_disk_is_not(capsys):
    from wanpair.train.trackers import close_trackers, log_row

    class Flaky:
        name = "wandb"

        def log(self, values, step=None):
            raise RuntimeError("503 from the service")

        def finish(self):
            raise RuntimeError("never")

    class Full:
        name = "tensorboard"

        def log(self, values, step=None):
            raise OSError(28, "No space left on device")

        def finish(self):
            """Nothing buffered to close."""

    trackers = [Flaky()]
    log_row(trackers, {"step": 1, "loss": 0.5}, 1)
    assert trackers == [] and "the wandb tracker failed (RuntimeError: 503 from the service); training goes on" in \
        capsys.readouterr().out
    close_trackers([Flaky()])  # said, not raised: the LoRA is saved after this
    with pytest.raises(OSError, match="No space left"):
        log_row([Full()], {"step": 1, "loss": 0.5}, 1)
