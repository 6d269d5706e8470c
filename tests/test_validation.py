"""Validation loss: measured on held-out items (or a fixed sample of training items), reproducible, and
reported where a user picks a LoRA: the log, the summary, the file's metadata, `wanpair inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import set_train
from wanpair.cli import main
from wanpair.data.dataset_config import load_dataset_config
from wanpair.data.items import Item
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.data import validation_set
from wanpair.train.recipe import LoraPairRecipe


def _hold_out(demo: Path, names=("img_16", "img_17", "img_18")) -> None:
    """Move three demo images to a [[validation]] dataset of their own."""
    data = demo / "dataset"
    (data / "val").mkdir()
    for name in names:
        for ext in (".png", ".txt"):
            shutil.move(data / f"{name}{ext}", data / "val" / f"{name}{ext}")
    toml = data / "dataset.toml"
    toml.write_text(toml.read_text() + '\n[[validation]]\nimage_directory = "val"\ncache_directory = "cache_val"\n')


def _rows(project, expert):
    return [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["expert"] == expert]


def test_held_out_items_are_measured_not_trained_and_reported_everywhere(demo, capsys):
    _hold_out(demo)
    set_train(demo / "wanpair.toml", epochs=1, validate_every_n_steps=5, save_every_n_steps=10, tensorboard=False)
    assert main(["check", str(demo / "wanpair.toml")]) == 0
    assert "(validation)" in capsys.readouterr().out
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project, overwrite=True)
    (r,) = recipe.run(("low",))
    out = capsys.readouterr().out
    assert "validation: 3 held-out items" in out
    assert r.steps == 15  # 18 images, 3 held out: each training step is one of the other 15
    held = {Path(recipe.items[i].image).name for i in recipe.validation}
    assert held == {"img_16.png", "img_17.png", "img_18.png"}
    assert not {i for b in recipe.cached_data().batches(1, project.train.seed) for i in b} & set(recipe.validation)

    rows = _rows(project, "low")
    validated = [(x["step"], x["val_loss"]) for x in rows if "val_loss" in x]
    # before training, every 5 steps (10 is also an intermediate save) and at the end
    assert [s for s, _ in validated] == [0, 5, 10, 15]
    assert all(x.get("val_kind") == "held-out" for x in rows if "val_loss" in x)

    with safe_open(str(r.lora), "pt") as f:
        meta = f.metadata()
    assert meta["wanpair.validation_step"] == "15" and meta["wanpair.validation_kind"] == "held-out"
    assert float(meta["wanpair.validation_loss"]) == pytest.approx(validated[-1][1], rel=1e-5)  # printed to 6 digits
    with safe_open(str(project.output_dir / "WAN2.2-LowNoise_demo_shapes_v1-step000010.safetensors"), "pt") as f:
        assert f.metadata()["wanpair.validation_step"] == "10"  # each intermediate file carries its own loss

    best_step, best = min(validated[1:], key=lambda sv: sv[1])
    (summary,) = json.loads((project.run_dir / "summary.json").read_text())["experts"]
    assert summary["best_validation_step"] == best_step and summary["validation_kind"] == "held-out"
    assert f"lowest validation loss {best:.4f} (held-out) at step {best_step}" in out

    assert main(["inspect", str(r.lora)]) == 0
    assert "validation:  loss " in capsys.readouterr().out


def test_validation_loss_is_the_same_at_every_evaluation_of_the_same_lora(demo):
    """Fixed noise and timesteps: two evaluations of one LoRA agree to the last bit, and training's random
    stream does not move the validation's (another seed trains differently, validates the untouched
    LoRA - zero-initialised up matrices - identically)."""
    set_train(demo / "wanpair.toml", epochs=1, max_steps=2, validate_every_n_steps=1, tensorboard=False)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("high",))
    first = _rows(project, "high")
    set_train(demo / "wanpair.toml", epochs=1, max_steps=2, validate_every_n_steps=1, tensorboard=False, seed=7)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("high",))
    other = _rows(project, "high")
    # the same computation on the same inputs on this machine: bit-equal, not merely close
    assert first[0]["step"] == other[0]["step"] == 0 and first[0]["val_loss"] == other[0]["val_loss"]
    assert first[-1]["val_loss"] != other[-1]["val_loss"]  # different training, different LoRA


def test_validation_split_holds_out_whole_media_chosen_by_the_seed():
    def item(media: str, start: int) -> Item:
        return Item(Path(f"{media}.mp4"), "c", 0, (64, 64), (64, 64), media, 1, start=start, frames=5)

    items = [item(m, s) for m in "abcdefghij" for s in (0, 5, 10)]  # 10 videos, 3 clips each
    held, kind = validation_set(items, set(), 0.2, 4, seed=1)
    assert kind == "held-out" and len(held) == 6  # 2 of 10 videos, all 3 clips of each
    media = {items[i].content_hash for i in held}
    assert len(media) == 2 and all(it.content_hash not in media for i, it in enumerate(items) if i not in held)
    assert validation_set(items, set(), 0.2, 4, seed=1) == (held, kind)
    assert validation_set(items, set(), 0.2, 4, seed=2) != (held, kind)
    # one video: nothing left to train on if it were held out, so the split falls back to measuring fit
    assert validation_set(items[:3], set(), 0.5, 4, seed=1) == ([0, 1, 2], "fit")
    # no split: a fixed spread of training items
    assert validation_set(items, set(), 0.0, 4, seed=1) == ([0, 7, 15, 22], "fit")


def test_validation_tables_are_checked_like_datasets(tmp_path):
    toml = tmp_path / "dataset.toml"
    toml.write_text('[[datasets]]\nimage_directory = "."\n[validation]\nimage_directory = "val"\n')
    with pytest.raises(WanpairError, match=r"validation must be written \[\[validation\]\]"):
        load_dataset_config(toml)
    toml.write_text('[[datasets]]\nimage_directory = "."\n[[validation]]\nimage_dir = "val"\n')
    with pytest.raises(WanpairError, match=r"'image_dir' in \[\[validation\]\] #1. Did you mean 'image_directory'"):
        load_dataset_config(toml)
    toml.write_text('[[datasets]]\nimage_directory = "."\n[[validate]]\nimage_directory = "val"\n')
    with pytest.raises(WanpairError, match=r"unknown top-level table 'validate'.*validation"):
        load_dataset_config(toml)


def test_the_doctor_plans_for_the_batches_training_makes_not_the_held_out_items(demo):
    """Held-out items larger than any training item (a [[validation]] dataset at 128x128 beside 64x64 training
    images) are measured, never trained on: the doctor's plan and s/step are for the training batches, as the run's."""
    from wanpair.setup.doctor import batch_sizes, item_tokens

    _hold_out(demo)
    toml = demo / "dataset" / "dataset.toml"
    toml.write_text(toml.read_text() + "resolution = [128, 128]\n")
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project)
    recipe.preflight(())
    held = {item_tokens(recipe.items[i]) for i in recipe.validation}  # ~(128 / 16)^2 in their buckets
    trained = batch_sizes(recipe)  # ~(64 / 16)^2, batches of one
    assert max(n for n, _ in trained) < min(held) and {b for _, b in trained} == {1}
