"""Settings that cannot work are refused up front, by name, before any model loads: numbers out of range,
a warm-up longer than the run, a fixed resolution Wan cannot take, a dataset that yields nothing to train
on, and model paths `wanpair init` left empty."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from PIL import Image

from conftest import set_train
from wanpair.cli import main
from wanpair.project import SAMPLE_BOUNDS, TRAIN_BOUNDS, SampleDuringTraining, TrainSettings, load_project


def test_every_numeric_setting_has_a_range_its_default_is_in():
    numeric = [f.name for f in dataclasses.fields(TrainSettings)
               if type(f.default) in (int, float) and f.name != "logit_mean"]  # logit_mean: any finite value
    assert sorted(TRAIN_BOUNDS) == sorted(numeric)
    assert sorted(SAMPLE_BOUNDS) == sorted(f.name for f in dataclasses.fields(SampleDuringTraining)
                                           if type(f.default) is int)
    for settings, bounds in ((TrainSettings(), TRAIN_BOUNDS), (SampleDuringTraining(), SAMPLE_BOUNDS)):
        for key, b in bounds.items():
            assert b.holds(getattr(settings, key)) and b.why, key


def test_train_and_sample_settings_that_cannot_work_are_all_named_at_once(demo, capsys):
    set_train(demo / "wanpair.toml", lr_scheduler_power=-1.0, min_lr_ratio=1.0, weight_decay=-0.1,
              lr_scheduler_num_cycles=0, max_grad_norm=-1.0, logit_mean=float("nan"), alpha=float("inf"),
              max_bad_steps=0, checkpoint_blocks=-2, seed=-3,
              logit_std=1.0, learning_rate=2e-3)  # in range: not mentioned
    with open(demo / "wanpair.toml", "a") as f:
        f.write("[sample]\nwidth = 0\nheight = 500\nframes = 4\nsteps = 0\n")
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    err = capsys.readouterr().err
    for part in ("[train] lr_scheduler_power = -1.0: lr_scheduler_power must be above 0; the polynomial schedule "
                 "decays as (1 - progress)^power",
                 "[train] min_lr_ratio = 1.0: min_lr_ratio must be in [0, 1); ", "at 1 or above there is nothing to decay",
                 "[train] weight_decay = -0.1: weight_decay must be at least 0; ",
                 "[train] lr_scheduler_num_cycles = 0: lr_scheduler_num_cycles must be at least 1; ",
                 "[train] max_grad_norm = -1.0: max_grad_norm must be at least 0; ",
                 "[train] logit_mean = nan must be a finite number.", "[train] alpha = inf must be a finite number.",
                 "[train] max_bad_steps = 0: max_bad_steps must be at least 1; ",
                 "[train] checkpoint_blocks = -2: checkpoint_blocks must be at least -1; ",
                 "[train] seed = -3: seed must be in [0, 4294967295]; ",
                 "[sample] width = 0: width must be at least 16; ", "[sample] height = 500: height must be a multiple of 16",
                 "[sample] frames = 4: frames must be 4k+1", "[sample] steps = 0: steps must be at least 1; "):
        assert part in err, part
    assert err.count("wanpair.toml: [") == 14 and "[train] logit_std" not in err and "Traceback" not in err
    assert not (demo / "output").exists()  # refused before anything was made


def test_a_negative_learning_rate_end_is_refused_and_the_edges_of_each_range_are_taken(demo, capsys):
    set_train(demo / "wanpair.toml", min_lr_ratio=-0.5)
    assert main(["check", str(demo / "wanpair.toml")]) == 2
    assert "min_lr_ratio = -0.5: min_lr_ratio must be in [0, 1); " in capsys.readouterr().err
    set_train(demo / "wanpair.toml", min_lr_ratio=0.0, max_grad_norm=0.0, checkpoint_blocks=-1, logit_mean=-3.5,
              seed=2**32 - 1, max_bad_steps=1)
    assert main(["check", str(demo / "wanpair.toml")]) == 0, capsys.readouterr().err


def _refused_warmup(demo, capsys, **settings) -> str:
    set_train(demo / "wanpair.toml", epochs=1, **settings)
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    assert not (demo / "dataset" / "cache").exists()  # nothing encoded: no model was loaded
    return capsys.readouterr().err


def test_a_warm_up_as_long_as_the_run_is_refused_before_any_model_loads(demo, capsys):
    # the demo: 18 images, batch_size 1, so 18 optimizer steps per epoch
    err = _refused_warmup(demo, capsys, lr_warmup_steps=18)
    assert ("[train] lr_warmup_steps = 18 warms up over 18 steps, but the run has 18 optimizer steps (18 batches per "
            "epoch x 1 epoch): the learning rate would still be rising when training ends") in err
    err = _refused_warmup(demo, capsys, lr_warmup_steps=9, gradient_accumulation_steps=2)
    assert "the run has 9 optimizer steps (18 batches per epoch / gradient_accumulation_steps 2 x 1 epoch)" in err
    err = _refused_warmup(demo, capsys, lr_warmup_ratio=0.99)  # ceil(0.99 x 18) = 18 steps
    assert "[train] lr_warmup_ratio = 0.99 warms up over 18 steps, but the run has 18 optimizer steps" in err
    set_train(demo / "wanpair.toml", epochs=1, lr_warmup_steps=17)
    assert main(["doctor", str(demo / "wanpair.toml")]) == 0  # one step at the full rate: it starts
    assert "ready: `wanpair train` would start." in capsys.readouterr().out


def test_a_fixed_resolution_wan_cannot_take_is_refused_with_the_nearest_sizes(demo, capsys):
    toml = demo / "dataset" / "dataset.toml"
    text = toml.read_text().replace("resolution = [64, 64]", "resolution = [500, 300]")
    toml.write_text(text.replace("enable_bucket = true", "enable_bucket = false"))
    assert main(["check", str(demo / "wanpair.toml")]) == 2
    err = capsys.readouterr().err
    assert (f"{toml}: [general].resolution = [500, 300] with enable_bucket = false trains every item at exactly that "
            "size, but Wan needs multiples of 16") in err
    assert "Use resolution = [496, 304] (nearest: width 496 or 512; height 288 or 304), or enable_bucket = true." in err
    toml.write_text(text)  # with buckets the size is only an area: the buckets are multiples of 16
    assert main(["check", str(demo / "wanpair.toml")]) == 1  # warnings only (the 64x64 images are upscaled)
    assert "error" not in capsys.readouterr().err


def _clip(folder, frames: int) -> None:
    folder.mkdir(parents=True)
    for i in range(frames):
        Image.new("RGB", (64, 48), (i * 20, 0, 0)).save(folder / f"{i:03d}.png")
    (folder.parent / f"{folder.name}.txt").write_text(f"a clip of {frames} frames\n")


def test_a_dataset_entry_that_yields_nothing_is_an_error_naming_why(demo, capsys):
    videos = demo / "videos"
    _clip(videos / "train" / "clip_a", 9)
    _clip(videos / "train" / "clip_b", 5)
    _clip(videos / "held" / "clip_c", 5)
    (videos / "none.jsonl").write_text("\n")
    (videos / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\nenable_bucket = true\n'
        '[[datasets]]\nvideo_directory = "train"\ntarget_frames = [17, 33]\n'
        '[[datasets]]\nimage_jsonl_file = "none.jsonl"\n'
        '[[validation]]\nvideo_directory = "held"\ntarget_frames = [9]\n')
    assert main(["check", str(videos / "dataset.toml")]) == 1
    out = capsys.readouterr().out
    assert "0 items, 3 errors" in out
    assert (f"{videos / 'dataset.toml'}: [[datasets]] #1 (video_directory {videos / 'train'}) gives no item to train "
            "on:\n  clip_a: 9 frames; target_frames [17, 33] need at least 17\n  clip_b: 5 frames; target_frames "
            "[17, 33] need at least 17") in out
    assert f"[[datasets]] #2 (image_jsonl_file {videos / 'none.jsonl'}) gives no item to train on: it lists none." in out
    assert "[[validation]] #1" in out and "gives no item to validate on:\n  clip_c: 5 frames; target_frames [9]" in out
    # the project's train stops there, before anything is loaded or cached
    project = demo / "wanpair.toml"
    project.write_text(project.read_text().replace('config = "dataset/dataset.toml"', 'config = "videos/dataset.toml"'))
    assert main(["train", str(project)]) == 2
    out, err = capsys.readouterr()
    assert "gives no item to train on" in out and "the dataset has 3 problem(s), listed above" in err
    assert not (videos / "train" / "cache").exists()
    # one clip long enough: the short one is a warning, the dataset trains
    (videos / "dataset.toml").write_text('[general]\nresolution = [64, 48]\nenable_bucket = true\n'
                                         '[[datasets]]\nvideo_directory = "train"\ntarget_frames = [9]\n')
    assert main(["check", str(videos / "dataset.toml")]) == 1
    out = capsys.readouterr().out
    assert "1 items, 0 errors, 1 warnings" in out
    assert f"{videos / 'train' / 'clip_b'}: 5 frames; target_frames [9] need at least 9; it gives no clip." in out


def test_clip_settings_that_give_no_clip_are_refused_when_the_dataset_is_read(demo, capsys):
    _clip(demo / "videos" / "clip_a", 9)
    (demo / "videos" / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\n[[datasets]]\nvideo_directory = "."\nframe_extraction = "slide"\n'
        'frame_stride = 0\nsource_fps = nan\ntarget_frames = []\n')
    assert main(["check", str(demo / "videos" / "dataset.toml")]) == 2
    err = capsys.readouterr().err
    for part in ("[[datasets]] #1.frame_stride = 0 must be at least 1.", "[[datasets]] #1.source_fps = nan must be",
                 "[[datasets]] #1.target_frames = [] gives no clip length"):
        assert part in err, part


def test_model_paths_init_left_empty_say_run_download_in_doctor_and_train_not_check(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_root / "dataset", tmp_path / "data")
    (tmp_path / "data" / "dataset.toml").unlink()
    (tmp_path / "no_models").mkdir()
    assert main(["init", "data", "--models", "no_models"]) == 0  # writes high_noise = "" and the others
    capsys.readouterr()
    expected = (f"{tmp_path / 'wanpair.toml'}: [models] high_noise, low_noise, vae, t5 and tokenizer are not set (\"\"): "
                f"run `wanpair download --model t2v-A14B --project {tmp_path / 'wanpair.toml'}` to fetch the recipe's "
                "files and fill them in, or set the path to your own file.")
    assert main(["doctor", "wanpair.toml"]) == 1
    out = capsys.readouterr().out
    assert f"✗ project wanpair.toml\n    fix: {expected}" in out and "Traceback" not in out
    assert main(["train", "wanpair.toml"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    # the guide's order is init, check, download: `check` reads the dataset without the models
    assert main(["check", "wanpair.toml"]) == 1  # the demo's 64 px images under the recipe's 960 px: warnings
    out = capsys.readouterr().out
    assert "18 items, 0 errors, 18 warnings" in out and "caption lengths not checked: [models] tokenizer is not set" in out
    project = tmp_path / "wanpair.toml"  # the paths written ahead of the download (the guide's own [models])
    project.write_text(project.read_text().replace('tokenizer  = ""', 'tokenizer  = "models/umt5-xxl-tokenizer"'))
    assert main(["check", "wanpair.toml"]) == 1
    assert f"[models] tokenizer {tmp_path / 'models' / 'umt5-xxl-tokenizer'} is not there yet" in capsys.readouterr().out


def test_one_empty_model_path_and_a_model_folder_without_config_are_named(demo, capsys):
    project = demo / "wanpair.toml"
    text = project.read_text()
    project.write_text(text.replace('vae = "models/wan_2.1_vae_tiny.safetensors"', 'vae = ""'))
    assert main(["doctor", str(project)]) == 1
    assert "[models] vae is not set (\"\"): run `wanpair download" in capsys.readouterr().out
    project.write_text(text.replace('vae = "models/wan_2.1_vae_tiny.safetensors"', 'vae = "models"'))
    assert main(["doctor", str(project)]) == 1
    assert (f"[models] vae: {demo / 'models'} is a folder without config.json; give the VAE file, or a diffusers "
            "`vae/` folder.") in capsys.readouterr().out


def test_an_empty_init_lora_is_not_set_and_a_folder_is_refused(demo, capsys):
    """`init_lora = ""` (a template's blank) means none, not the project's folder."""
    project = demo / "wanpair.toml"
    text = project.read_text()
    project.write_text(text + '\n[experts.high]\ninit_lora = ""\n')
    assert load_project(project)[0].experts["high"].init_lora is None
    project.write_text(text + '\n[experts.high]\ninit_lora = "models"\n')
    assert main(["check", str(project)]) == 2
    assert f"[experts.high] init_lora {demo / 'models'} is not a file." in capsys.readouterr().err


def test_a_table_written_as_a_plain_value_is_named_not_a_traceback(demo, capsys):
    project = demo / "wanpair.toml"
    project.write_text(project.read_text().replace('name = "demo_shapes_v1"', 'name = "demo_shapes_v1"\nsample = 5'))
    assert main(["check", str(project)]) == 2
    assert "sample = 5 must be a table: [sample] on a line of its own, its keys below." in capsys.readouterr().err


def test_optimizer_args_that_do_not_fit_are_refused_before_any_model_loads(demo, monkeypatch):
    """A misspelt argument or an impossible value: named by the pre-flight check, not after the expert loaded."""
    import wanpair.models as models
    from wanpair.errors import WanpairError
    from wanpair.train.recipe import LoraPairRecipe

    monkeypatch.setattr(models, "load_dit", lambda *a, **k: pytest.fail("a model was loaded"))
    for args, why in ((["momentm=0.9"], "unexpected keyword argument 'momentm'"), (["betas=(2.0, 0.9)"], "beta")):
        set_train(demo / "wanpair.toml", epochs=1, optimizer_args=args)
        project = load_project(demo / "wanpair.toml")[0]
        with pytest.raises(WanpairError, match=rf"\[train\] optimizer_args .* do not fit adamw: .*{why}"):
            LoraPairRecipe(project).preflight(("high",))


def test_values_of_the_wrong_kind_in_tables_are_named_not_a_traceback(demo, capsys):
    config = demo / "dataset" / "dataset.toml"
    config.write_text(config.read_text().replace('image_directory = "."', 'video_directory = "."\ntarget_frames = 5'))
    assert main(["check", str(demo / "wanpair.toml")]) == 2
    assert "[[datasets]] #1.target_frames = 5 should be a list." in capsys.readouterr().err
    project = demo / "wanpair.toml"
    project.write_text(project.read_text() + "\n[experts]\nhigh = 5\n")
    assert main(["check", str(project)]) == 2
    assert "[experts] high = 5 must be a table: [experts.high] on a line of its own" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["timesteps", "P", "--expert", "high", "-n", "0"], ["train", "P", "--gpus", "0"],
                                     ["dashboard", "D", "--port", "-5"], ["sample", "P", "--prompt", "x", "--fps", "0"],
                                     ["sample", "P", "--prompt", "x", "--steps", "-1"], ["caption", "D", "--batch-size", "0"]],
                         ids=lambda c: f"{c[0]} {c[-2]}")
def test_a_count_out_of_range_is_a_usage_error_naming_its_option(command, demo, capsys):
    command = [{"P": str(demo / "wanpair.toml"), "D": str(demo)}.get(a, a) for a in command]
    with pytest.raises(SystemExit) as usage:
        main(command)
    err = capsys.readouterr().err
    assert usage.value.code == 2 and f"argument {command[-2]}: {command[-1]}: give a whole number from" in err


def test_a_sample_shift_that_cannot_work_is_refused_before_loading(trained, tmp_path, capsys):
    args = ["sample", str(trained / "wanpair.toml"), "--prompt", "x", "--out", str(tmp_path)]
    assert main(args + ["--shift", "-1"]) == 2
    assert "shift = -1 must be above 0 (Wan 2.2 T2V A14B (text to video)'s own: 12)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
