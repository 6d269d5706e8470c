"""Every file wanpair writes is readable by other users as an ordinary `open()` would make it, and its
folder is synced after the rename (a file reported as saved survives a power cut)."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import set_train
from wanpair.cli import main
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_gets_the_mode_open_would_give(demo, tmp_path, umask):
    set_train(demo / "wanpair.toml", epochs=1, max_steps=4, save_state_every_n_steps=2, keep_states=0,
              save_every_n_steps=2)
    old = os.umask(umask)
    try:
        project, _ = load_project(demo / "wanpair.toml")
        (result,) = LoraPairRecipe(project, overwrite=True).run(("high",))
        exported = tmp_path / "exported.safetensors"
        assert main(["export", str(result.lora), "--format", "comfy", "--out", str(exported)]) == 0
        peft = tmp_path / "peft_adapter"
        assert main(["export", str(result.lora), "--format", "peft", "--out", str(peft)]) == 0
        merged = tmp_path / "merged" / "merged.safetensors"
        assert main(["merge", "--base", str(project.models.high_noise), "--lora", str(result.lora),
                     "--out", str(merged)]) == 0
    finally:
        os.umask(old)
    run = project.run_dir
    files = {
        "LoRA": result.lora,
        "intermediate LoRA": next(project.output_dir.glob("*-step000002.safetensors")),
        "training state": next((run / "state").glob("high-step*.pt")),
        "cache entry": next((demo / "dataset" / "cache").glob("latent_*.safetensors")),
        "text cache entry": next((demo / "dataset" / "cache").glob("text_*.safetensors")),
        "metrics": run / "metrics.jsonl",
        "summary": run / "summary.json",
        "loss plot": run / "loss.png",
        "export": exported,
        "peft export": peft / "adapter_model.safetensors",
        "merge": merged,
    }
    for what, path in files.items():
        assert _mode(path) == 0o666 & ~umask, f"{what}: {path} has mode {oct(_mode(path))}"
    for folder in (project.output_dir, run / "state", demo / "dataset" / "cache", merged.parent, peft):
        assert _mode(folder) == 0o777 & ~umask, f"{folder} has mode {oct(_mode(folder))}"


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    from wanpair import atomic

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    atomic.write_text_atomic(tmp_path / "out" / "file.txt", "saved")
    assert synced == [False, True]  # the file's bytes first, then the folder holding the new name
    assert (tmp_path / "out" / "file.txt").read_text() == "saved"
