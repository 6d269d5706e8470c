"""The recipe's options do what they say: schedules, optimizers, targets, weighting, saves, metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import set_train
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.project import TrainSettings, load_project
from wanpair.train.flow_matching import flow_matching_loss
from wanpair.train.optim import build_optimizer, build_scheduler
from wanpair.train.recipe import LoraPairRecipe


def _lrs(settings, total=40):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.learning_rate)
    sched = build_scheduler(opt, settings, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name,formula", [
    ("constant", lambda s, n, w: 1.0),
    ("constant_with_warmup", lambda s, n, w: min(1.0, s / w)),
    ("linear", lambda s, n, w: s / w if s < w else (n - s) / (n - w)),
    ("cosine", lambda s, n, w: s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w)))),
    ("cosine_with_restarts", lambda s, n, w: s / w if s < w else 0.5 * (1 + math.cos(math.pi * ((2 * (s - w) / (n - w)) % 1)))),
])
def test_each_scheduler_follows_its_formula(name, formula):
    s = TrainSettings(lr_scheduler=name, learning_rate=1e-3, lr_warmup_ratio=0.1, lr_scheduler_num_cycles=2)
    lrs = _lrs(s)
    for step in (0, 2, 4, 10, 25, 39):
        assert lrs[step] == pytest.approx(1e-3 * formula(step, 40, 4), abs=1e-9), step


def test_optimizers_and_their_args():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(p, TrainSettings(optimizer_args=["betas=(0.8, 0.9)", "eps=1e-6"]))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert type(build_optimizer(p, TrainSettings(optimizer="adafactor"))).__name__ == "Adafactor"
    assert type(build_optimizer(p, TrainSettings(optimizer="prodigy", learning_rate=1.0))).__name__ == "Prodigy"
    with pytest.raises(WanpairError, match="key=value"):
        build_optimizer(p, TrainSettings(optimizer_args=["betas"]))
    with pytest.raises(WanpairError, match="do not fit adamw"):
        build_optimizer(p, TrainSettings(optimizer_args=["momentum=0.9"]))


def test_sigma_sqrt_weighting_scales_each_sample_by_one_over_t_squared():
    x0 = torch.zeros(2, 1, 1, 1, 1)
    eps = torch.ones(2, 1, 1, 1, 1)
    t = torch.tensor([0.5, 0.25])

    def model(hidden_states, timestep, encoder_hidden_states, return_dict):
        return (torch.zeros_like(hidden_states),)

    # per-sample squared error 1; weights 1/0.25 = 4 and 1/0.0625 = 16 -> mean 10
    assert flow_matching_loss(model, x0, eps, t, torch.zeros(2, 512, 4), torch.float32, "sigma_sqrt").item() == pytest.approx(10.0)
    assert flow_matching_loss(model, x0, eps, t, torch.zeros(2, 512, 4), torch.float32).item() == pytest.approx(1.0)


def test_include_and_exclude_patterns_choose_the_layers(demo):
    set_train(demo / "wanpair.toml", epochs=1, include_modules=["ffn", "cross_attn"], exclude_modules=["cross_attn\\.[kv]$"])
    project, _ = load_project(demo / "wanpair.toml")
    (r,) = LoraPairRecipe(project, overwrite=True).run(("high",))
    modules = {k.split(".")[0] for k in load_file(r.lora)}
    assert modules == {f"lora_unet_blocks_{b}_{m}" for b in (0, 1) for m in ("ffn_0", "ffn_2", "cross_attn_q", "cross_attn_o")}


def test_intermediate_saves_keep_the_last_k_and_metrics_are_complete(demo):
    set_train(demo / "wanpair.toml", epochs=2, save_every_n_steps=10, keep_last=2, tensorboard=True)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("low",))
    saved = sorted(p.name for p in project.output_dir.glob("WAN2.2-LowNoise_demo_shapes_v1-step*.safetensors"))
    assert saved == ["WAN2.2-LowNoise_demo_shapes_v1-step000020.safetensors",
                     "WAN2.2-LowNoise_demo_shapes_v1-step000030.safetensors"]
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and rows[-1]["step"] == 36 and rows[-1]["epoch"] == 2
    assert {"loss", "smoothed_loss", "lr", "timestep", "s_per_step", "samples_per_s"} <= set(rows[0])
    assert list((project.run_dir / "tensorboard" / "low").glob("events.out.tfevents.*"))
    assert (project.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_timesteps_command(demo, capsys):
    assert main(["timesteps", str(demo / "wanpair.toml"), "--expert", "high", "-n", "5000", "--csv"]) == 0
    out = capsys.readouterr().out
    assert "window 875-1000" in out and "n = 5000" in out
    run = demo / "output" / "demo_shapes_v1"
    values = [float(v) for v in (run / "timesteps_high.csv").read_text().split()[1:]]
    assert len(values) == 5000 and min(values) >= 875 and max(values) <= 1000
    assert (run / "timesteps_high.png").read_bytes()[:4] == b"\x89PNG"


def test_overfitting_one_image_drives_the_loss_down(demo):
    """One image, high-noise window: the LoRA can learn v = (x_t - x0) / t, so the loss must collapse.

    The 2-block random DiT plateaus near 0.25 (from 1.33) however long it trains, so this asks for 4x;
    a 10x drop was not reachable with this tiny model (see the issue's closing note)."""
    for p in (demo / "dataset").glob("img_*"):
        if not p.stem.endswith("01"):
            p.unlink()
    set_train(demo / "wanpair.toml", epochs=1200, learning_rate=3e-3, lr_scheduler="constant", fp8_base=False, rank=128, alpha=128.0,
              mixed_precision="no", gradient_checkpointing=False, tensorboard=False)
    project, _ = load_project(demo / "wanpair.toml")
    (r,) = LoraPairRecipe(project, overwrite=True).run(("high",))
    assert sum(r.epoch_losses[-20:]) / 20 < 0.25 * sum(r.epoch_losses[:5]) / 5
