"""Two-expert sampling: the switch at the boundary, seeds, LoRA/expert checks, outputs with metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.sample import SampleSettings, build_pipeline, sample

HIGH = "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
LOW = "WAN2.2-LowNoise_demo_shapes_v1.safetensors"


def _loras(root):
    return {"high": root / "output" / HIGH, "low": root / "output" / LOW}


def test_high_expert_runs_above_the_boundary_and_low_below(trained, monkeypatch):
    import wanpair.sample as sample_mod

    project, _ = load_project(trained / "wanpair.toml")
    calls = []
    real_build = sample_mod.build_pipeline

    def instrumented(*args, **kwargs):
        pipe = real_build(*args, **kwargs)
        for name in ("transformer", "transformer_2"):
            getattr(pipe, name).register_forward_pre_hook(
                lambda mod, a, kw, name=name: calls.append((name, float(kw["timestep"].flatten()[0]))), with_kwargs=True)
        return pipe

    monkeypatch.setattr(sample_mod, "build_pipeline", instrumented)
    sample(project, ["a red circle"], SampleSettings(width=32, height=32, steps=12), _loras(trained),
           trained.parent / "s1")
    assert {n for n, _ in calls} == {"transformer", "transformer_2"}
    assert all(t >= 875 for n, t in calls if n == "transformer")  # high-noise expert
    assert all(t < 875 for n, t in calls if n == "transformer_2")  # low-noise expert
    assert len(calls) == 2 * 12  # cond + uncond per step (guidance > 1)


def test_seed_reproduces_and_outputs_carry_their_settings(trained, tmp_path):
    project, _ = load_project(trained / "wanpair.toml")
    s = SampleSettings(width=32, height=32, steps=4, seed=7)
    (a,) = sample(project, ["a blue square"], s, _loras(trained), tmp_path / "a")
    (b,) = sample(project, ["a blue square"], s, _loras(trained), tmp_path / "b")
    (c,) = sample(project, ["a blue square"], SampleSettings(width=32, height=32, steps=4, seed=8), _loras(trained), tmp_path / "c")
    pa, pb, pc = (torch.from_numpy(np.array(Image.open(p))) for p in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.suffix == ".png" and "highLora+lowLora" in a.name
    info = Image.open(a).text
    assert info["wanpair.prompt"] == "a blue square" and json.loads(info["wanpair.seed"]) == 7
    side = json.loads(a.with_suffix(".json").read_text())
    assert side["settings"]["steps"] == 4 and side["loras"]["high"].endswith(HIGH)
    # the same prompt again, another seed, into the same folder: a new file beside the first, which stays
    (again,) = sample(project, ["a blue square"], SampleSettings(width=32, height=32, steps=4, seed=8), _loras(trained),
                      tmp_path / "a")
    assert again.name == f"{a.stem}-2.png" and json.loads(again.with_suffix(".json").read_text())["seed"] == 8
    assert torch.equal(torch.from_numpy(np.array(Image.open(a))), pa) and json.loads(Image.open(a).text["wanpair.seed"]) == 7


def test_lora_for_the_other_expert_is_refused_unless_forced(trained):
    project, _ = load_project(trained / "wanpair.toml")
    swapped = {"high": trained / "output" / LOW, "low": trained / "output" / HIGH}
    with pytest.raises(WanpairError, match="trained on the low-noise expert but the high-noise slot"):
        build_pipeline(project, swapped, SampleSettings(), torch.device("cpu"), torch.float32)
    build_pipeline(project, swapped, SampleSettings(), torch.device("cpu"), torch.float32, allow_mismatch=True)


def test_sample_cli_writes_a_video_and_rejects_bad_frame_counts(trained, tmp_path, capsys):
    pytest.importorskip("av")
    args = ["sample", str(trained / "wanpair.toml"), "--prompt", "a green triangle", "--width", "32", "--height", "32",
            "--steps", "2", "--out", str(tmp_path)]
    assert main(args + ["--frames", "5"]) == 0
    (video,) = tmp_path.glob("*.mp4")
    import av

    with av.open(str(video)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
    assert main(args + ["--frames", "4"]) == 2
    assert "must be 4k+1" in capsys.readouterr().err


def test_samples_during_training_name_which_loras_ran(demo, capsys):
    from conftest import set_train
    from wanpair.train.recipe import LoraPairRecipe

    (demo / "prompts.txt").write_text("a red circle on a white background\n")
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=True, validate_every_n_steps=0)
    with open(demo / "wanpair.toml", "a") as f:
        # step 18 ends the epoch too: drawn for both reasons, kept once under its step's name (as the dashboard reads it)
        f.write('[sample]\nprompts = "prompts.txt"\nevery_n_steps = 9\nevery_n_epochs = 1\nwidth = 32\nheight = 32\n'
                'steps = 2\n')
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run()
    names = sorted(p.name for p in (project.run_dir / "samples").glob("*.png"))
    assert names == ["high-step000009_00_a_red_circle_on_a_white_background_highLora+lowBase.png",
                     "high-step000018_00_a_red_circle_on_a_white_background_highLora+lowBase.png",
                     "low-step000009_00_a_red_circle_on_a_white_background_highLora+lowLora.png",
                     "low-step000018_00_a_red_circle_on_a_white_background_highLora+lowLora.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(project.run_dir / "tensorboard" / "low"))
    events.Reload()
    assert "samples/low/00" in events.Tags()["images"]

    # high-noise again with another learning rate: the low-noise LoRA on disk is the earlier run's, not this one's
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False, validate_every_n_steps=0, learning_rate=1e-4)
    with open(demo / "wanpair.toml", "a") as f:
        f.write('[sample]\nprompts = "prompts.txt"\nevery_n_steps = 18\nwidth = 32\nheight = 32\nsteps = 2\n')
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("high",))
    assert sorted(p.name for p in (project.run_dir / "samples").glob("high-*.png")) == [
        "high-step000018_00_a_red_circle_on_a_white_background_highLora+lowBase.png"]
    assert "note: samples during training use the low-noise base model without a LoRA: " \
           "WAN2.2-LowNoise_demo_shapes_v1.safetensors is not this run's (other settings or data, or unreadable)." in capsys.readouterr().out


def test_samples_during_training_check_the_gpu_has_room_before_loading_the_other_expert(trained, monkeypatch, capsys):
    """A small card between steps: the other expert is not put on the GPU to find out it does not fit."""
    import wanpair.sample as sample_mod

    project, _ = load_project(trained / "wanpair.toml")
    sampler = sample_mod.TrainingSampler(project, ["a red circle"], [torch.zeros(3, 8)], torch.zeros(3, 8),
                                         SampleSettings(width=32, height=32, steps=2), torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(sample_mod, "load_expert", lambda *a, **k: pytest.fail("the other expert was loaded"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 16 * 2**30))
    assert sampler(object(), "high", 9, None, {}) == []
    assert "note: samples during training are skipped: the other expert needs" in capsys.readouterr().out


def test_a_wrong_lora_is_refused_before_any_model_loads(trained, monkeypatch):
    import wanpair.models as models

    loaded = []
    for name in ("load_dit", "load_text_encoder", "load_vae"):
        real = getattr(models, name)
        monkeypatch.setattr(models, name, lambda *a, _real=real, _name=name, **k: loaded.append(_name) or _real(*a, **k))
    project, _ = load_project(trained / "wanpair.toml")
    swapped = {"high": trained / "output" / LOW, "low": trained / "output" / HIGH}
    with pytest.raises(WanpairError, match="trained on the low-noise expert but the high-noise slot"):
        sample(project, ["a red circle"], SampleSettings(width=32, height=32, steps=2), swapped, trained.parent / "s")
    assert loaded == []


def test_a_missing_model_or_an_unwritable_output_is_refused_before_any_model_loads(trained, tmp_path, monkeypatch):
    import dataclasses

    import wanpair.models as models

    loaded = []
    for name in ("load_dit", "load_text_encoder", "load_vae"):
        real = getattr(models, name)
        monkeypatch.setattr(models, name, lambda *a, _real=real, _name=name, **k: loaded.append(_name) or _real(*a, **k))
    project, _ = load_project(trained / "wanpair.toml")
    settings = SampleSettings(width=32, height=32, steps=2)
    moved = dataclasses.replace(project, models=dataclasses.replace(project.models, vae=tmp_path / "gone.safetensors"))
    with pytest.raises(WanpairError, match=r"cannot sample:\n- \[models\] vae: .*gone.safetensors"):
        sample(moved, ["a red circle"], settings, _loras(trained), tmp_path / "s")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(WanpairError, match="notes.txt is not a folder wanpair can write to"):
        sample(project, ["a red circle"], settings, _loras(trained), a_file / "samples")
    assert loaded == [] and a_file.read_text() == "mine"


def test_prompts_are_encoded_once_and_then_read_from_the_cache(trained, tmp_path, monkeypatch):
    import wanpair.models as models

    project, _ = load_project(trained / "wanpair.toml")
    calls = []
    real = models.load_text_encoder
    monkeypatch.setattr(models, "load_text_encoder", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = SampleSettings(width=32, height=32, steps=2)
    (a,) = sample(project, ["a purple triangle at dusk"], settings, _loras(trained), tmp_path / "a")
    (b,) = sample(project, ["a purple triangle at dusk"], settings, _loras(trained), tmp_path / "b")
    assert calls == [1]  # the second run found the prompt (and Wan's negative prompt) cached
    assert Image.open(a).tobytes() == Image.open(b).tobytes()  # the cached embeddings give the same picture


def test_experts_are_held_in_bf16_when_both_fit_else_fp8_else_one_at_a_time(monkeypatch):
    import wanpair.sample as sample_mod

    config = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)  # a 14B expert
    bf16 = sample_mod.expert_bytes(config, 2)
    assert abs(bf16 / 2**30 - 26.2) < 0.1  # 14.05e9 block weights in bf16
    cuda = torch.device("cuda")
    for free, expected in ((2 * bf16 + 9 * 2**30, "bf16"), (bf16 + 9 * 2**30, "fp8"), (bf16 // 2, "offload")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * 2**30))
        assert sample_mod.storage_for(cuda, [config, config]) == expected
    assert sample_mod.storage_for(torch.device("cpu"), [config, config]) == "bf16"


def test_a_model_file_of_the_wrong_kind_is_named_by_its_key_before_the_loras_are_checked(trained, tmp_path, capsys):
    project = tmp_path / "wrong.toml"
    text = (trained / "wanpair.toml").read_text()
    project.write_text(text.replace("wan2.2_t2v_high_noise_tiny_fp16.safetensors", "wan_2.1_vae_tiny.safetensors")
                       .replace('"models/', f'"{trained}/models/').replace('"dataset/', f'"{trained}/dataset/'))
    assert main(["sample", str(project), "--lora-high", str(trained / "output" / HIGH), "--prompt", "x",
                 "--out", str(tmp_path / "s")]) == 2
    assert "[models] high_noise: " in (err := capsys.readouterr().err) and "is the Wan VAE" in err


def test_sample_names_one_file_given_for_both_experts_before_any_model_loads(trained, tmp_path, monkeypatch):
    """The experts' files are checked as training checks them (`models.dit.dit_problems`): the high-noise file in
    the low-noise slot too would sample every step with one expert, so it is named by key before loading."""
    import dataclasses

    import wanpair.models as models

    loaded = []
    monkeypatch.setattr(models, "load_dit", lambda *a, **k: loaded.append("load_dit"))
    project, _ = load_project(trained / "wanpair.toml")
    models_twice = dataclasses.replace(project.models, low_noise=project.models.high_noise)
    twice = dataclasses.replace(project, models=models_twice)
    same = r"(?s)cannot sample:\n.*- \[models\] high_noise and low_noise are the same file"
    with pytest.raises(WanpairError, match=same):
        sample(twice, ["a red circle"], SampleSettings(width=32, height=32, steps=2), {"high": None, "low": None},
               tmp_path / "s")
    assert loaded == []
