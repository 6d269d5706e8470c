"""A rerun never loses saved progress: it continues what trains the same thing, refuses by name what does
not, and only --overwrite removes an earlier run's work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import set_train
from wanpair.cli import main
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe

# 18 steps per expert; states at 4, 8, 12, 16 (the last two kept)
SETTINGS = dict(epochs=1, learning_rate=2e-3, save_state_every_n_steps=4, keep_states=2, tensorboard=False,
                validate_every_n_steps=0)


@pytest.fixture(scope="module")
def stopped(trained, tmp_path_factory):
    """Both experts trained with states, then their final LoRAs removed: a run killed after its last state
    (step 16 of 18), with the killed run's last metrics rows still in metrics.jsonl. Also the finished LoRAs,
    to compare with (the uninterrupted run). Do not modify: copy it."""
    root = tmp_path_factory.mktemp("rerun") / "demo"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("output"))  # its caches, nothing trained
    set_train(root / "wanpair.toml", **SETTINGS)
    project, _ = load_project(root / "wanpair.toml")
    LoraPairRecipe(project).run()
    finished = root.parent / "finished"
    finished.mkdir()
    for e in ("high", "low"):
        shutil.move(project.lora_path(e), finished / f"{e}.safetensors")
    return root


@pytest.fixture
def run(stopped, tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(stopped, dst)
    return dst


def _project(root):
    return load_project(root / "wanpair.toml")[0]


def _same_lora(a, b) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def _rows(project, expert):
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["expert"] == expert]


def _states(project):
    return sorted(p.name for p in (project.run_dir / "state").glob("*.pt"))


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["rerun", "--resume"])
def test_a_change_of_how_the_run_works_continues_from_the_newest_state(run, stopped, resume, capsys):
    """After an out-of-memory error users set memory_mode = "low"; with other cadences too, the run
    continues where it stopped and ends as the uninterrupted run did, bit for bit."""
    set_train(run / "wanpair.toml", **{**SETTINGS, "memory_mode": "low", "keep_states": 3, "compile": "off",
                                       "save_every_n_steps": 9, "max_bad_steps": 3})
    assert main(["train", str(run / "wanpair.toml"), *resume]) == 0
    out = capsys.readouterr().out
    assert "continuing the high-noise expert from high-step00000016.pt (step 16); changed since, without changing what " \
           "is trained: [train] compile, [train] keep_states, [train] max_bad_steps, [train] memory_mode, " \
           "[train] save_every_n_steps" in out
    project = _project(run)
    for e in ("high", "low"):
        assert _same_lora(project.lora_path(e), stopped.parent / "finished" / f"{e}.safetensors"), e
        assert [r["step"] for r in _rows(project, e)] == list(range(1, 19))  # the killed run's 17, 18 not doubled


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["rerun", "--resume"])
def test_a_change_of_what_is_trained_is_refused_by_name_and_deletes_nothing(run, resume, capsys):
    project = _project(run)
    before = _states(project)
    set_train(run / "wanpair.toml", **{**SETTINGS, "learning_rate": 1e-3, "rank": 8})
    assert main(["train", str(run / "wanpair.toml"), *resume]) == 2
    err = capsys.readouterr().err
    assert "the high-noise expert: its saved state high-step00000016.pt (step 16) is from a run with a different " \
           "[train] learning_rate (0.002 then, 0.001 now), [train] rank (16 then, 8 now). To continue it, restore " \
           "them; to start over, pass --overwrite --expert high" in err
    assert "the low-noise expert: its saved state low-step00000016.pt" in err
    assert _states(project) == before == ["high-step00000012.pt", "high-step00000016.pt", "low-step00000012.pt",
                                          "low-step00000016.pt"]


def test_a_dataset_change_that_moves_the_batch_order_is_refused_by_name(run, capsys):
    """A state's position counts batches of the old order: with batch_size 3 it would 'resume' at step 16 of a
    6-step plan and save an untrained LoRA as finished."""
    config = run / "dataset" / "dataset.toml"
    original = config.read_text()
    config.write_text(original.replace("batch_size = 1", "batch_size = 3"))
    assert main(["train", str(run / "wanpair.toml"), "--resume"]) == 2
    assert "is from a run with a different dataset.toml batch_size." in capsys.readouterr().err
    config.write_text(original.replace("num_repeats = 1", "num_repeats = 2"))
    assert main(["train", str(run / "wanpair.toml")]) == 2
    assert "is from a run with a different dataset.toml num_repeats." in capsys.readouterr().err
    config.write_text(original)  # an image added: its repeats, size and frames are new, not the others' changed
    ImageOps.mirror(Image.open(config.parent / "img_01.png")).save(config.parent / "img_19.png")
    (config.parent / "img_19.txt").write_text("a mirrored shape\n")
    assert main(["train", str(run / "wanpair.toml")]) == 2
    assert "is from a run with a different set of images or captions. To continue it" in capsys.readouterr().err
    for added in ("img_19.png", "img_19.txt"):  # the same images, a caption and dataset.toml changed: both named
        (config.parent / added).unlink()
    (config.parent / "img_01.txt").write_text("a red circle, edited\n")
    config.write_text(original.replace("num_repeats = 1", "num_repeats = 2"))
    assert main(["train", str(run / "wanpair.toml")]) == 2
    assert "is from a run with a different set of captions, dataset.toml num_repeats. To" in capsys.readouterr().err


def test_resume_of_one_experts_state_continues_the_other_from_its_own(run, stopped, capsys):
    """--resume of high's state under another name (the step is read from the state): high continues from it,
    low from its own newest state; nothing of low's is deleted. An older state while newer ones exist is refused:
    they would outlive the continuation and pass for its own."""
    project = _project(run)
    older = project.run_dir / "state" / "high-step00000012.pt"
    assert main(["train", str(run / "wanpair.toml"), "--resume", str(older)]) == 2
    assert "--resume high-step00000012.pt: the high-noise expert has newer states (high-step00000016.pt)" in \
        capsys.readouterr().err
    backup = project.run_dir.parent / "high-backup.pt"
    shutil.move(project.run_dir / "state" / "high-step00000016.pt", backup)
    older.unlink()
    assert main(["train", str(run / "wanpair.toml"), "--resume", str(backup)]) == 0
    out = capsys.readouterr().out
    assert "continuing the high-noise expert from high-backup.pt (step 16)" in out
    assert "continuing the low-noise expert from low-step00000016.pt (step 16)" in out
    for e in ("high", "low"):
        assert _same_lora(project.lora_path(e), stopped.parent / "finished" / f"{e}.safetensors"), e
        assert [r["step"] for r in _rows(project, e)] == list(range(1, 19))


def _earlier_files(project, output_name: str | None = None) -> list:
    """What a killed run of the high-noise expert left: an intermediate and a partial LoRA (their metadata naming
    the run's final LoRA, as wanpair writes it), a sample and TensorBoard events."""
    final = project.lora_path("high")
    old = [final.with_name(f"{final.stem}-step000006{final.suffix}"),
           final.with_name(f"{final.stem}-partial-step000007{final.suffix}"),
           project.run_dir / "samples" / "high-step000006_00_a_red_circle_highLora+lowBase.png",
           project.run_dir / "tensorboard" / "high" / "events.out.tfevents.1.host"]
    for path in old:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({"x": torch.zeros(1)}, str(path), {"ss_output_name": output_name or final.stem})
        else:
            path.write_bytes(b"earlier run")
    return old


def test_a_run_killed_before_its_first_state_starts_again_and_sets_the_earlier_files_aside(run, capsys):
    """The same command always finishes a killed run: without a state to continue from, the earlier run's files
    are moved aside (named, listed), never deleted, and the expert trains from the start."""
    project = _project(run)
    old = _earlier_files(project)
    for state in (project.run_dir / "state").glob("high-*.pt"):
        state.unlink()
    assert main(["train", str(run / "wanpair.toml"), "--expert", "high"]) == 0
    out = capsys.readouterr().out
    (aside,) = (project.run_dir / "earlier").iterdir()
    assert aside.name.startswith("high-") and f"the high-noise expert: an earlier run left 1 intermediate LoRA, 1 " \
        f"partial LoRA, 1 sample and no training state to continue from; they are set aside in {aside} (nothing " \
        "deleted), and it trains from the start" in out
    assert sorted(p.relative_to(aside).as_posix() for p in aside.rglob("*") if p.is_file()) == sorted(
        [old[0].name, old[1].name, f"samples/{old[2].name}", f"tensorboard/high/{old[3].name}", "metrics-rows.jsonl"])
    assert [r["step"] for r in _rows(project, "high")] == list(range(1, 19)) and project.lora_path("high").exists()


def test_overwrite_removes_everything_of_the_earlier_run_and_nothing_else_does(run, capsys):
    project = _project(run)
    final = project.lora_path("high")
    old = _earlier_files(project)
    # project "demo_shapes_v1-step7" beside it: a name like an intermediate's, a run of its own (by its metadata)
    neighbour = final.with_name(f"{final.stem}-step7{final.suffix}")
    save_file({"x": torch.zeros(1)}, str(neighbour), {"ss_output_name": neighbour.stem})
    backup = project.run_dir / "state" / "high-step00000016-backup.pt"  # a state the user copied aside
    shutil.copy(project.run_dir / "state" / "high-step00000016.pt", backup)
    set_train(run / "wanpair.toml", **{**SETTINGS, "learning_rate": 1e-3, "tensorboard": True, "save_every_n_steps": 9,
                                       "validate_every_n_steps": 9, "lr_scheduler": "linear"})
    assert main(["train", str(run / "wanpair.toml"), "--expert", "high", "--overwrite"]) == 0
    assert neighbour.exists() and backup.exists()  # not this run's: neither removed nor pruned
    assert not any(p.exists() for p in old)
    assert sorted(p.name for p in final.parent.glob(f"{final.stem}-*")) == [f"{final.stem}-step000009{final.suffix}",
                                                                           neighbour.name]
    rows = _rows(project, "high")
    assert [r["step"] for r in rows] == list(range(0, 19))  # one step-0 validation row: the new run's
    # the logged learning rate is the one each step's update used: linear decay over 18 steps gives step k
    # lr * (1 - (k - 1) / 18) (the same formula computed two ways, torch's LambdaLR and here: equal to 1e-12)
    assert [r["lr"] for r in rows[1:]] == pytest.approx([1e-3 * (1 - (k - 1) / 18) for k in range(1, 19)], rel=1e-12)
    assert len(list((project.run_dir / "tensorboard" / "high").iterdir())) == 1
    assert _states(project)[:3] == ["high-step00000012.pt", "high-step00000016-backup.pt", "high-step00000016.pt"]
    assert _states(project)[-2:] == ["low-step00000012.pt", "low-step00000016.pt"]  # the other expert's: untouched


def test_resume_and_overwrite_together_are_refused(run, capsys):
    assert main(["train", str(run / "wanpair.toml"), "--resume", "--overwrite"]) == 2
    assert "--resume continues a run and --overwrite starts it over: pass one of them." in capsys.readouterr().err


def test_a_state_from_another_number_of_processes_is_refused_before_anything_loads(run, capsys, monkeypatch):
    """A step takes micro-batches from every process: a state of a 2-GPU run is not a position in a 1-GPU run.
    Refused when the run is planned, before the caches (and the text encoder) or the expert load."""
    import wanpair.train.recipe as recipe_mod

    path = _project(run).run_dir / "state" / "high-step00000016.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "processes": 2}, path)
    monkeypatch.setattr(recipe_mod.LoraPairRecipe, "prepare_caches", lambda self: pytest.fail("loaded first"))
    assert main(["train", str(run / "wanpair.toml"), "--expert", "high"]) == 2
    assert "the high-noise expert's state was saved by a run of 2 process(es) (GPUs), and experts_parallel = " \
           "\"auto\" on 1 device(s) gives it 1" in capsys.readouterr().err


@pytest.mark.parametrize("room, states, setting, placed", [
    (True, {"high": 4, "low": 4}, "auto", [4, 4]),  # room for both at once, but the states were one after the other
    (False, {"high": 2}, "auto", [2, 2]),  # no room now, but the state was saved pair-parallel: kept pair-parallel
    (True, {"high": 2, "low": 2}, "auto", [2, 2]),
    (True, {"high": 2}, "off", None),  # told to run one after the other, on 4: refused, naming both counts
])
def test_auto_placement_follows_the_states_process_counts(monkeypatch, room, states, setting, placed):
    from wanpair.errors import WanpairError
    from wanpair.train import placement

    monkeypatch.setattr(placement.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(placement, "_room", lambda gpus: room)
    if placed is None:
        with pytest.raises(WanpairError, match=r"high-noise expert's state was saved by a run of 2 process\(es\) "
                                               r"\(GPUs\), and experts_parallel = \"off\" on 4 GPU\(s\) gives it 4"):
            placement.choose(["high", "low"], torch.device("cuda"), setting, None, states)
        return
    waves = placement.choose(["high", "low"], torch.device("cuda"), setting, None, states)
    assert [g.processes for wave in waves for g in wave] == placed


@pytest.fixture
def finished(trained, tmp_path):
    dst = tmp_path / "finished"
    shutil.copytree(trained, dst)
    return dst


def _drop_setting(lora, key: str) -> None:
    """Rewrite `lora` as a release before setting `key` existed wrote it: its record does not name `key`."""
    with safe_open(str(lora), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    recorded = json.loads(meta["wanpair.settings"])
    del recorded[key]
    save_file(tensors, str(lora), {**meta, "wanpair.settings": json.dumps(recorded, sort_keys=True)})


def test_a_setting_a_record_does_not_name_reads_as_its_default(finished, capsys):
    """Forward compatibility: a release that adds a [train] setting must not call every earlier LoRA "made with a
    different [train] <new key>". A key missing from the record compares as its default."""
    project = _project(finished)
    for e in ("high", "low"):
        _drop_setting(project.lora_path(e), "loss_weighting")
    assert main(["train", str(finished / "wanpair.toml")]) == 0
    assert capsys.readouterr().out.count("keeping WAN2.2-") == 2
    set_train(finished / "wanpair.toml", learning_rate=5e-3, epochs=1, lr_scheduler="constant", loss_weighting="cosmap")
    assert main(["train", str(finished / "wanpair.toml")]) == 2  # at another value than the default: another run
    assert "made with a different [train] loss_weighting" in capsys.readouterr().err


def test_fp8_matmul_changes_what_is_trained(finished, capsys):
    """fp8 matmuls quantise the activations and gradients of the frozen base: switching them off after a finished
    run trains again (with --overwrite), instead of keeping a LoRA trained with them as if it were the same."""
    set_train(finished / "wanpair.toml", learning_rate=5e-3, epochs=1, lr_scheduler="constant", fp8_matmul="off")
    assert main(["train", str(finished / "wanpair.toml")]) == 2
    assert "made with a different [train] fp8_matmul" in capsys.readouterr().err


def test_one_expert_left_continues_on_the_count_its_pair_parallel_state_had(monkeypatch):
    """The low-noise expert of a pair-parallel run on 2 GPUs, killed after high finished: alone, on 1 GPU."""
    from wanpair.train import placement

    monkeypatch.setattr(placement.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(placement, "_room", lambda gpus: True)
    assert placement.choose(["low"], torch.device("cuda"), "auto", None, {"low": 1}) is None  # here: one process
    assert placement.choose(["low"], torch.device("cuda"), "auto", None) == [[placement.Group("low", 2, [0, 1])]]


def test_a_record_from_before_fp8_matmul_counted_is_not_refused_for_it(finished, capsys):
    """fp8_matmul was a side setting before: older LoRAs do not record it, and their value is unknown, not the
    default -- such a LoRA is kept whatever fp8_matmul says now."""
    project = _project(finished)
    for e in ("high", "low"):
        _drop_setting(project.lora_path(e), "fp8_matmul")
    set_train(finished / "wanpair.toml", learning_rate=5e-3, epochs=1, lr_scheduler="constant", fp8_matmul="off")
    assert main(["train", str(finished / "wanpair.toml")]) == 0
    assert capsys.readouterr().out.count("keeping WAN2.2-") == 2


def test_a_state_from_before_the_media_record_names_a_changed_dataset_as_images_or_captions(stopped):
    """Whether only captions changed is unknown for a file without `wanpair.media_fingerprint`: both are named,
    and the per-item digests (which any added image changes) are not."""
    from wanpair.train.metadata import differences
    from wanpair.train.state import load_state

    now = dict(load_state(_project(stopped).run_dir / "state" / "high-step00000016.pt", mapped=True)["identity"])
    old = {**now, "wanpair.dataset_fingerprint": "0" * 16, "wanpair.num_repeats": "0" * 16}
    assert differences(old, now, outputs=False) == ["set of captions", "dataset.toml num_repeats"]
    del old["wanpair.media_fingerprint"]
    assert differences(old, now, outputs=False) == ["set of images or captions"]
