"""Wan 2.1's single text-to-video models (t2v-14B, t2v-1.3B): one model, one LoRA over all timesteps, through
the same command as the pairs -- and the mistakes of mixing a single model with a pair refused before
anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from conftest import set_train
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.models.tasks import T2V, T2V_14B, T2V_1_3B, check_task
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe

LORA = "WAN2.1-1.3B_demo_shapes_v1.safetensors"


def raising(argv):
    """`wanpair ARGV`, with its error raised instead of printed (so the test reads the message)."""
    import wanpair.cli

    args = wanpair.cli.build_parser().parse_args(argv)
    return args.func(args)


def test_one_lora_is_trained_over_all_timesteps_and_samples_with_the_model_alone(trained_wan21, tmp_path):
    project, _ = load_project(trained_wan21 / "wanpair.toml")
    assert project.task is T2V_1_3B and list(project.experts) == ["full"]
    lora = trained_wan21 / "output" / LORA
    assert sorted(p.name for p in (trained_wan21 / "output").glob("*.safetensors")) == [LORA]  # one LoRA, no pair
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert (meta["wanpair.expert"], meta["wanpair.timestep_window"], meta["modelspec.timestep_range"]) == \
        ("full", "0,1000", "0,1000")
    assert meta["wanpair.architecture"] == "wan2.1-t2v-1.3b" and meta["modelspec.architecture"] == "wan2.1-t2v-1.3b/lora"
    rows = [json.loads(x) for x in (trained_wan21 / "output" / "demo_shapes_v1" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert {r["expert"] for r in rows} == {"full"} and len(losses) == 18  # 18 items, 1 epoch
    assert all(0 <= r["timestep"] <= 1000 for r in losses)

    caption = (trained_wan21 / "dataset" / "img_01.txt").read_text().strip()
    assert main(["sample", str(project.path), "--prompt", caption, "--width", "32", "--height", "32", "--steps", "3",
                 "--strength", "0.5", "--out", str(tmp_path)]) == 0
    (picture,) = tmp_path.glob("*.png")
    assert picture.name.endswith("_fullLora.png")
    info = json.loads(picture.with_suffix(".json").read_text())
    assert info["loras"] == {"full": str(trained_wan21 / "output" / LORA)}
    assert info["settings"]["strength_full"] == 0.5 and info["settings"]["guidance_high"] == 5.0  # Wan 2.1's CFG 5


def test_the_timesteps_cover_both_sides_of_the_pairs_boundary():
    """One model serves every timestep, so its LoRA is trained on all of them (the recipe's sampler)."""
    from wanpair.project import Project, default_windows
    from wanpair.train.timestep_report import draw

    project = Project(path=None, name="x", models=None, dataset_config=None, output_dir=None,
                      experts=default_windows(T2V_14B), task=T2V_14B)
    values = draw(project, "full", 20_000)
    assert values.min() < 50 and values.max() > 950
    assert 0.01 < (values >= 875).mean() < 0.2  # the high-noise side of a pair is trained too, as rarely as drawn


def test_sampling_defaults_are_wan21s_own():
    from wanpair.sample import SampleSettings

    s = SampleSettings.for_task(T2V_1_3B)
    assert (s.steps, s.shift, s.guidance_high, s.frames) == (50, 5.0, 5.0, 1)  # Wan2.1 wan_t2v_1_3B.py
    assert SampleSettings.for_task(T2V).steps == 40


def test_samples_during_training_use_the_single_models_shift_and_guidance(trained_wan21, monkeypatch):
    import torch

    import wanpair.cache
    from wanpair.sample import make_sampler

    monkeypatch.setattr(wanpair.cache, "read_entry", lambda path: torch.zeros(3, 8))  # the cached prompt embeddings
    project, _ = load_project(trained_wan21 / "wanpair.toml")
    sampler = make_sampler(project, ["a red circle"], [trained_wan21 / "p.pt", trained_wan21 / "n.pt"],
                           torch.device("cpu"))
    s = sampler.settings
    assert (s.shift, s.guidance_high, s.steps) == (5.0, 5.0, project.sample.steps)  # Wan2.1's, not Wan 2.2 T2V's 12


def _project(root, tmp_path, text: str):
    path = tmp_path / "wanpair.toml"
    path.write_text(text.replace('"models/', f'"{root}/models/').replace('"dataset/', f'"{root}/dataset/'))
    return path


def test_the_project_file_names_one_dit_and_a_wrong_mix_is_said_with_the_fix(trained_wan21, tmp_path):
    text = (trained_wan21 / "wanpair.toml").read_text()
    path = _project(trained_wan21, tmp_path, text.replace('model = "t2v-1.3B"\n', ""))
    project, _ = load_project(path)
    assert project.task is T2V_14B  # a `dit` alone is Wan 2.1; the tiny model has not the 1.3B's shapes
    assert project.lora_path("full").name == "WAN2.1-14B_demo_shapes_v1.safetensors"
    dit = next(line for line in text.splitlines() if line.startswith("dit = "))
    pair = text.replace(dit, dit.replace("dit", "high_noise") + "\n" + dit.replace("dit", "low_noise"))
    with pytest.raises(WanpairError, match=r"high_noise and low_noise do not belong to t2v-1.3B.*dit ="):
        load_project(_project(trained_wan21, tmp_path, pair))
    with pytest.raises(WanpairError, match=r"\[models\] dit do not belong to t2v-A14B.*high_noise and low_noise"):
        load_project(_project(trained_wan21, tmp_path, text.replace('model = "t2v-1.3B"', 'model = "t2v-A14B"')))
    with pytest.raises(WanpairError, match=r"\[models\] dit is missing"):
        load_project(_project(trained_wan21, tmp_path, text.replace(dit + "\n", "")))
    with pytest.raises(WanpairError, match=r"\[experts.high\].*one model.*\[experts.full\]"):
        load_project(_project(trained_wan21, tmp_path, text + "\n[experts.high]\nmin_timestep = 875\n"))
    project, _ = load_project(_project(trained_wan21, tmp_path, text + "\n[experts.full]\nmin_timestep = 100\n"))
    assert (project.experts["full"].min_timestep, project.experts["full"].max_timestep) == (100, 1000)


def test_a_model_in_the_wrong_slot_is_refused_naming_what_it_is(trained_wan21, demo_root, tmp_path):
    from wanpair.models.dit import inspect_dit

    wan21 = inspect_dit(next((trained_wan21 / "models").glob("wan2.1_*.safetensors")))
    expert = inspect_dit(demo_root / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors")
    with pytest.raises(WanpairError, match=r"named as a Wan 2.2 expert.*where the expert never runs"):
        check_task(expert.config, expert.path, T2V_14B, "dit")
    size_1_3b = {**wan21.config, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    with pytest.raises(WanpairError, match=r'shapes of a 1.3B model.*trains Wan 2.1 T2V 14B.*model = "t2v-1.3B"'):
        check_task(size_1_3b, wan21.path, T2V_14B, "dit")
    size_14b = {**wan21.config, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
    with pytest.raises(WanpairError, match=r"shapes of a 14B model.*trains Wan 2.1 T2V 1.3B.*wan2.1_t2v_1.3B_\*"):
        check_task(size_14b, wan21.path, T2V_1_3B, "dit")
    with pytest.raises(WanpairError, match=r"I2V A14B \(image to video\) expert.*trains Wan 2.1 T2V 14B"):
        check_task({**wan21.config, "in_channels": 36}, wan21.path, T2V_14B, "dit")
    # and in the preflight, before anything loads: the slot and the file named
    root = tmp_path / "demo"
    shutil.copytree(trained_wan21, root, ignore=shutil.ignore_patterns("output"))
    shutil.copy(expert.path, root / "models")
    text = (root / "wanpair.toml").read_text()
    (root / "wanpair.toml").write_text(text.replace(wan21.path.name, expert.path.name))
    project, _ = load_project(root / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"cannot start training:\n- \[models\] dit: .*wan2.2_t2v_high_noise"):
        LoraPairRecipe(project).preflight(project.task.experts)


def test_a_single_models_lora_and_a_pairs_are_never_mixed(trained_wan21, trained, tmp_path):
    wan21_project = str(trained_wan21 / "wanpair.toml")
    wan21_lora = str(trained_wan21 / "output" / LORA)
    high_lora = str(trained / "output" / "WAN2.2-HighNoise_demo_shapes_v1.safetensors")
    with pytest.raises(WanpairError, match=r"trained on the high-noise expert but .* is one model over all timesteps"):
        raising(["sample", wan21_project, "--prompt", "x", "--lora", high_lora])
    with pytest.raises(WanpairError, match=r"trained on one model over all timesteps \(Wan 2.1\) but the high-noise slot"):
        raising(["sample", str(trained / "wanpair.toml"), "--prompt", "x", "--lora-high", wan21_lora])
    # the options of the other kind of model are refused, not ignored
    with pytest.raises(WanpairError, match=r"--lora-high: t2v-1.3B is one model; use --lora"):
        raising(["sample", wan21_project, "--prompt", "x", "--lora-high", wan21_lora])
    with pytest.raises(WanpairError, match=r"--lora: a Wan 2.2 pair has two LoRAs"):
        raising(["sample", str(trained / "wanpair.toml"), "--prompt", "x", "--lora", high_lora])
    with pytest.raises(WanpairError, match=r"--expert high: t2v-1.3B is one model"):
        raising(["train", wan21_project, "--expert", "high"])
    # merging: its own LoRA into its base works, a pair's is refused and nothing is written
    base = str(next((trained_wan21 / "models").glob("wan2.1_*.safetensors")))
    assert main(["merge", "--base", base, "--lora", wan21_lora, "--out", str(tmp_path / "merged.safetensors")]) == 0
    with pytest.raises(WanpairError, match=r"trained on the high-noise expert but .*wan2.1_t2v_tiny.* is one model"):
        raising(["merge", "--base", base, "--lora", high_lora, "--out", str(tmp_path / "wrong.safetensors")])
    assert not (tmp_path / "wrong.safetensors").exists()


def test_init_finds_the_single_model_and_writes_its_project(trained_wan21, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(trained_wan21 / "dataset", images, ignore=shutil.ignore_patterns("dataset.toml", "cache"))
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    shutil.copytree(trained_wan21 / "models", models)
    for pattern, recipe_name in (("*vae*", "wan_2.1_vae.safetensors"), ("*t5*.pth", "models_t5_umt5-xxl-enc-bf16.pth")):
        next(models.glob(pattern)).rename(models / recipe_name)  # the recipe's names, which init looks for
    main(["init", str(images), "--model", "t2v-1.3B", "--models", str(models)])
    text = (tmp_path / "wanpair.toml").read_text()
    assert 'model = "t2v-1.3B"' in text and "LoRA: WAN2.1-1.3B_images.safetensors" in text
    assert "dit        = " in text and "high_noise" not in text
    project, _ = load_project(tmp_path / "wanpair.toml")
    assert project.task is T2V_1_3B and project.models.dit.name.startswith("wan2.1_t2v")


def test_a_demanding_user_can_continue_the_single_model(trained_wan21, tmp_path):
    """Running the same command again keeps the finished LoRA (the run's identity), as for a pair."""
    root = tmp_path / "demo"
    shutil.copytree(trained_wan21, root)
    project, _ = load_project(root / "wanpair.toml")
    results = LoraPairRecipe(project).run()
    assert [r.expert for r in results] == ["full"] and results[0].lora.name == LORA
    set_train(root / "wanpair.toml", learning_rate=2e-3, epochs=3, validate_every_n_steps=0)
    project, _ = load_project(root / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"WAN2.1-1.3B_demo_shapes_v1.safetensors already exists, made with a "
                                           r"different \[train\] epochs"):
        LoraPairRecipe(project).run()


def test_a_diffusers_folder_is_a_single_model_alone_and_an_expert_beside_transformer_2(trained_wan21, tmp_path):
    """Wan2.1-T2V-*-Diffusers has `transformer/` alone; Wan2.2-T2V-A14B-Diffusers has `transformer/` (high)
    and `transformer_2/` (low): only the latter are experts."""
    from diffusers import WanTransformer3DModel

    from wanpair.demo import TINY_DIT
    from wanpair.models.dit import inspect_dit

    model = WanTransformer3DModel(**TINY_DIT)
    model.save_pretrained(tmp_path / "Wan2.1-T2V-14B-Diffusers" / "transformer")
    for name in ("transformer", "transformer_2"):
        model.save_pretrained(tmp_path / "Wan2.2-T2V-A14B-Diffusers" / name)
    assert inspect_dit(tmp_path / "Wan2.1-T2V-14B-Diffusers" / "transformer").expert is None
    assert [inspect_dit(tmp_path / "Wan2.2-T2V-A14B-Diffusers" / n).expert for n in ("transformer", "transformer_2")] \
        == ["high", "low"]
    root = tmp_path / "demo"
    shutil.copytree(trained_wan21, root, ignore=shutil.ignore_patterns("output"))
    text = (root / "wanpair.toml").read_text()
    dit = next(line for line in text.splitlines() if line.startswith("dit = "))
    (root / "wanpair.toml").write_text(text.replace(dit, f'dit = "{tmp_path}/Wan2.2-T2V-A14B-Diffusers/transformer"'))
    project, _ = load_project(root / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"\[models\] dit = .*transformer is the high-noise expert of a Wan 2.2 pair"):
        LoraPairRecipe(project).preflight(project.task.experts)


def test_strength_and_guidance_set_every_lora_and_the_specific_options_win(trained, monkeypatch):
    import wanpair.sample

    seen = []
    monkeypatch.setattr(wanpair.sample, "sample", lambda project, prompts, settings, *a, **k: seen.append(settings))
    assert main(["sample", str(trained / "wanpair.toml"), "--prompt", "x", "--strength", "0.7", "--strength-low", "0.5",
                 "--guidance", "2"]) == 0
    (s,) = seen
    assert (s.strength_high, s.strength_low, s.guidance_high, s.guidance_low) == (0.7, 0.5, 2.0, 2.0)
