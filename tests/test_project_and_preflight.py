"""The project file and the checks that run before any model is loaded."""

from __future__ import annotations

import shutil

import pytest

from wanpair.cli import build_parser, main
from wanpair.errors import WanpairError
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe


def test_minimal_project_gets_the_recipe_defaults(demo):
    text = (demo / "wanpair.toml").read_text().split("[train]")[0]
    (demo / "wanpair.toml").write_text(text)
    project, warnings = load_project(demo / "wanpair.toml")
    t = project.train
    assert (t.rank, t.alpha, t.learning_rate, t.weight_decay, t.max_grad_norm) == (16, 16.0, 3e-4, 0.1, 0.0)
    assert (t.lr_scheduler, t.lr_scheduler_power, t.min_lr_ratio, t.epochs, t.seed) == ("polynomial", 8.0, 5e-5, 100, 5)
    assert (t.timestep_sampling, t.discrete_flow_shift, t.preserve_distribution_shape) == ("shift", 1.0, True)
    assert t.fp8_base and t.gradient_checkpointing and t.mixed_precision == "bf16"
    assert (project.experts["high"].min_timestep, project.experts["high"].max_timestep) == (875, 1000)
    assert (project.experts["low"].min_timestep, project.experts["low"].max_timestep) == (0, 875)
    assert not warnings
    assert project.lora_path("high").name == "WAN2.2-HighNoise_demo_shapes_v1.safetensors"


def test_every_project_error_is_reported_at_once(demo):
    (demo / "wanpair.toml").write_text(
        'name = "x"\n[models]\nhigh_noise = "a"\n[train]\nlearning_rat = 1e-4\nrank = 0\nmixed_precision = "fp32"\n'
        "[experts.high]\nmin_timestep = 900\nmax_timestep = 800\n")
    with pytest.raises(WanpairError) as e:
        load_project(demo / "wanpair.toml")
    msg = str(e.value)
    for part in ("'learning_rat'", "Did you mean 'learning_rate'?", "rank must be at least 1", "mixed_precision",
                 "[models] vae is missing", "[dataset] config is missing", "min_timestep 900 must be below"):
        assert part in msg


def test_window_off_the_boundary_is_a_warning_naming_both_numbers(demo):
    with open(demo / "wanpair.toml", "a") as f:
        f.write("[experts.high]\nmin_timestep = 900\n")
    _, warnings = load_project(demo / "wanpair.toml")
    assert warnings and "900-1000" in warnings[0] and "875" in warnings[0]


def _preflight(demo):
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).preflight(("high", "low"))


def test_swapped_experts_are_refused_before_loading(demo):
    text = (demo / "wanpair.toml").read_text()
    text = text.replace("high_noise_tiny", "TMP").replace("low_noise_tiny", "high_noise_tiny").replace("TMP", "low_noise_tiny")
    (demo / "wanpair.toml").write_text(text)
    with pytest.raises(WanpairError, match="named as the low-noise expert. Swap high_noise and low_noise"):
        _preflight(demo)


def test_the_same_file_for_both_experts_is_refused(demo):
    m = demo / "models"
    shutil.copy(m / "wan2.2_t2v_high_noise_tiny_fp16.safetensors", m / "expert_a.safetensors")
    shutil.copy(m / "wan2.2_t2v_high_noise_tiny_fp16.safetensors", m / "expert_b.safetensors")
    text = (demo / "wanpair.toml").read_text()
    text = text.replace("wan2.2_t2v_high_noise_tiny_fp16", "expert_a").replace("wan2.2_t2v_low_noise_tiny_fp16", "expert_b")
    (demo / "wanpair.toml").write_text(text)
    with pytest.raises(WanpairError, match="same file/content"):
        _preflight(demo)


def test_preflight_lists_all_problems_and_cli_exits_2_without_traceback(demo, capsys):
    text = (demo / "wanpair.toml").read_text().replace("wan_2.1_vae_tiny.safetensors", "missing_vae.safetensors")
    (demo / "wanpair.toml").write_text(text)
    (demo / "dataset" / "img_03.txt").unlink()
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    out, err = capsys.readouterr()
    assert "missing_vae.safetensors does not exist" in err and "the dataset has 1 problem(s), listed above" in err
    assert (out + err).count("no caption file img_03.txt") == 1  # the dataset's report, once
    assert "Traceback" not in err


def test_device_cuda_without_a_cuda_torch_is_a_named_problem_in_doctor_and_train(demo, capsys, monkeypatch):
    """A CPU build of torch on a GPU box (the README's warning): no traceback from the first GPU query (FA4's
    check asks the GPU's capability), and the doctor still lists the project's other problems."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    for query in ("get_device_name", "get_device_capability"):
        monkeypatch.setattr(torch.cuda, query, lambda *a: pytest.fail("asked a GPU that is not there"))
    text = (demo / "wanpair.toml").read_text()
    (demo / "wanpair.toml").write_text(text.replace("[train]\n", '[train]\ndevice = "cuda"\nattention = "fa4"\n', 1))
    (demo / "dataset" / "img_03.txt").unlink()
    said = '[train] device = "cuda" but this torch is a CPU build; install the CUDA build of torch'
    assert main(["doctor", str(demo / "wanpair.toml")]) == 1
    out, err = capsys.readouterr()
    assert said in out and "no caption file img_03.txt" in out and "Traceback" not in out + err
    assert main(["train", str(demo / "wanpair.toml")]) == 2
    out, err = capsys.readouterr()
    assert said in err and "Traceback" not in err


def test_help_is_there_for_every_command():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("demo", "check", "cache", "train"):
        assert cmd in text
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["train", "--help"])
    assert e.value.code == 0
