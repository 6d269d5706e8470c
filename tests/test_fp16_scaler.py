"""The recipe's own `mixed_precision = "fp16"`: a step the loss scaler skips is not a trained step, a NaN run
stops as a bf16 one does, and a few skips while the scale settles are normal.

accelerate makes its GradScaler only on GPUs; here the same torch GradScaler is given to it on the CPU, so
the loop goes through accelerate's own scaled backward and skipping optimizer step (tests/test_gpu.py runs
the same on a GPU)."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import wanpair.train.expert as expert_mod
import wanpair.train.recipe as recipe_mod
import wanpair.train.step as step_mod
from conftest import set_train
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe


class CpuScaledAccelerator(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mixed_precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cpu")  # accelerate's defaults: scale 2**16, halved at each skip
            self.native_amp = True  # and its fp16 autocast, as on a GPU


@pytest.fixture
def fp16(trained, tmp_path, monkeypatch):
    """The demo (its caches filled, nothing trained) in fp16 with the scaler given on the CPU (where `check`
    refuses fp16 for users: accelerate has no scaler there, so the check is passed as for bf16)."""
    demo = tmp_path / "demo"
    shutil.copytree(trained, demo, ignore=shutil.ignore_patterns("output"))
    monkeypatch.setattr(expert_mod, "Accelerator", CpuScaledAccelerator)
    real = recipe_mod.preflight

    def checked_as_bf16(project, *args, **kwargs):
        project.train.mixed_precision = "bf16"
        try:
            return real(project, *args, **kwargs)
        finally:
            project.train.mixed_precision = "fp16"

    monkeypatch.setattr(recipe_mod, "preflight", checked_as_bf16)
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False, mixed_precision="fp16", validate_every_n_steps=0,
              learning_rate=2e-3, max_bad_steps=2)
    return load_project(demo / "wanpair.toml")[0]


def _loss_times(monkeypatch, factor):
    """Every step's loss multiplied by factor(call number)."""
    real, calls = step_mod.flow_matching_loss, {"n": 0}

    def scaled(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) * factor(calls["n"])

    monkeypatch.setattr(step_mod, "flow_matching_loss", scaled)


def test_an_fp16_run_on_nan_latents_stops_and_saves_nothing(fp16, monkeypatch):
    _loss_times(monkeypatch, lambda n: float("nan"))
    with pytest.raises(WanpairError, match=r"2 consecutive non-finite steps on the high-noise expert; stopped without "
                                           r"saving a broken LoRA\. .*fp16 overflow"):
        LoraPairRecipe(fp16).run(("high",))
    assert not fp16.lora_path("high").exists()


def test_gradients_that_overflow_at_every_scale_stop_the_run_after_the_scale_settled(fp16, monkeypatch, capsys):
    """A finite loss whose gradients overflow fp16 at every scale: 16 skips are the scale going from 2**16 to 1,
    the next max_bad_steps (2) are failures."""
    _loss_times(monkeypatch, lambda n: 1e30)
    with pytest.raises(WanpairError, match="2 consecutive non-finite steps"):
        LoraPairRecipe(fp16).run(("high",))
    out = capsys.readouterr().out
    assert "step 1: fp16 gradients overflow even at loss scale 0.5; update skipped (1 such in a row)" in out
    assert not fp16.lora_path("high").exists()


def test_a_few_skips_while_the_scale_settles_are_not_counted_as_steps(fp16, monkeypatch):
    _loss_times(monkeypatch, lambda n: 1e30 if n <= 3 else 1.0)
    (result,) = LoraPairRecipe(fp16).run(("high",))
    assert result.steps == 15  # 18 batches, the first 3 skipped by the scaler: not trained, not counted
    lora = load_file(str(result.lora))
    assert all(torch.isfinite(v.float()).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)  # trained: up matrices start at zero


def test_a_run_with_skips_ends_with_its_data_validates_there_and_says_how_many(fp16, monkeypatch):
    """Skipped updates are not counted, and the data is used once per epoch: the run's last step is its last
    data position's (step 15 of 18 batches with 3 skips), so the final validation is there, no intermediate
    copy of the final or state of a finished run is written, the total the bar and the dashboard show comes
    down to 15, and the summary says 3 updates were skipped."""
    import json

    set_train(fp16.path, epochs=1, tensorboard=False, mixed_precision="fp16", validate_every_n_steps=100,
              learning_rate=2e-3, max_bad_steps=2, save_every_n_epochs=1)
    project = load_project(fp16.path)[0]
    _loss_times(monkeypatch, lambda n: 1e30 if n <= 3 else 1.0)
    (result,) = LoraPairRecipe(project).run(("high",))
    assert result.steps == 15 and result.skipped_updates == 3
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 15]  # before training and at the last step
    assert [r["total_steps"] for r in rows if "total_steps" in r] == [18]  # the plan
    assert [r["steps_reachable"] for r in rows if "steps_reachable" in r] == [17, 16, 15]  # what the bar shows
    from wanpair.dashboard.runs import progress
    assert progress(rows)["experts"]["high"]["total"] == 15  # and the dashboard
    assert not list(project.output_dir.glob("*-step*.safetensors"))  # the last step is the final save, not a copy
    summary = json.loads((project.run_dir / "summary.json").read_text())
    assert summary["experts"][0]["skipped_updates"] == 3
