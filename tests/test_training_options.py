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
    # before training: the validation loss alone, with the time it took
    assert rows[0].keys() == {"expert", "time", "total_steps", "device", "step", "val_loss", "val_kind", "val_seconds"}
    assert rows[0]["total_steps"] == 36 and rows[0]["device"] == "cpu"
    assert rows[0]["step"] == 0 and rows[0]["val_kind"] == "fit" and rows[0]["val_seconds"] >= 0
    rows = rows[1:]
    assert len(rows) == 36 and rows[-1]["step"] == 36 and rows[-1]["epoch"] == 2
    assert {"loss", "smoothed_loss", "lr", "timestep", "s_per_step", "samples_per_s"} <= set(rows[0])
    # validated where a LoRA was saved (steps 10, 20, 30 and the last), so each file's loss is in the log
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30, 36]
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
    # with --png elsewhere, the CSV goes beside that plot, as the help says
    png = demo / "plots" / "high.png"
    assert main(["timesteps", str(demo / "wanpair.toml"), "--expert", "high", "-n", "100", "--png", str(png), "--csv"]) == 0
    assert png.is_file() and len((demo / "plots" / "high.csv").read_text().split()) == 101


def test_overfitting_one_image_drives_the_loss_down(demo):
    """One image, high-noise window: the LoRA has to learn v = (x_t - x0) / t, so the loss must fall far below
    its start, towards the plateau (~0.2) that is this 2-block random DiT's limit, not the trainer's (training
    *every* weight of this model on the same task does no better).

    Each step sees the image four times (batch_size = num_repeats = 4), each with its own noise and timestep.
    With one draw a step the loss lingered near its start for 150 to 350 steps depending on which of ATen's
    CPU kernels ran (ATEN_CPU_CAPABILITY default / avx2 / avx512: rounding alone), so a bound at a fixed step
    measured the rounding (the old bound failed on AVX-512 machines); with four, every path leaves the start
    within 50 steps and follows the same curve (step-loss means per 50 steps 1.03, 0.72, 0.44, 0.30, 0.25,
    0.23 on all three).
    Measured: the validation loss (fixed noise and timesteps) of the final LoRA over the untrained one's,
    both from this run: 0.1611 / 0.1611 / 0.1607 (default / avx2 / avx512). Bound 0.2: a 24 % margin over
    that, while a trainer at half the speed (150 steps: 0.241) fails it. 300 steps take about the time the
    600 single-draw steps took."""
    for p in (demo / "dataset").glob("img_*"):
        if not p.stem.endswith("01"):
            p.unlink()
    toml = demo / "dataset" / "dataset.toml"
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 4").replace("num_repeats = 1", "num_repeats = 4"))
    set_train(demo / "wanpair.toml", epochs=300, learning_rate=3e-3, lr_scheduler="constant", fp8_base=False, rank=128,
              alpha=128.0, mixed_precision="no", gradient_checkpointing=False, tensorboard=False,
              validate_every_n_steps=1000, validation_timesteps=8)  # validated before the first step and after the last
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("high",))
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()]
    untrained, trained = [x["val_loss"] for x in rows if "val_loss" in x]
    assert trained < 0.2 * untrained


def test_logit_normal_conditioned_on_the_window():
    from wanpair.train.timesteps import sample_timesteps

    t = sample_timesteps(100_000, "logit_normal", (0, 875), logit_mean=0.5, logit_std=0.8,
                         generator=torch.Generator().manual_seed(0)).double()
    phi = lambda x: 0.5 * (1 + math.erf((math.log(x / (1 - x)) - 0.5) / 0.8 / math.sqrt(2)))  # noqa: E731
    assert t.max() <= 0.875
    assert abs((t <= 0.5).double().mean().item() - phi(0.5) / phi(0.875)) < 0.01


def test_rank_and_module_dropout_act_only_in_training(demo_root):
    from wanpair.models import load_dit
    from wanpair.train.model_setup import prepare_expert

    def build(**kw):
        torch.manual_seed(0)
        m = load_dit(demo_root / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors", dtype=torch.float32)
        prepare_expert(m, TrainSettings(fp8_base=False, gradient_checkpointing=False, **kw), torch.float32)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # make the LoRA do something
        return m

    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([900.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)
    plain = build().eval()
    with torch.no_grad():
        reference = plain(**inputs)[0]
        plain.disable_adapters()
        base = plain(**inputs)[0]
        dropped = build(module_dropout=0.999999)
        assert torch.allclose(dropped.eval()(**inputs)[0], reference, atol=1e-5)  # eval: no dropout
        assert torch.allclose(dropped.train()(**inputs)[0], base, atol=1e-5)  # every module dropped
        ranks = build(rank_dropout=0.5).train()
        torch.manual_seed(1)
        a = ranks(**inputs)[0]
        torch.manual_seed(1)
        assert torch.equal(a, ranks(**inputs)[0]) and not torch.allclose(a, reference, atol=1e-4)


def test_batches_repeats_accumulation_and_max_steps(demo):
    toml = demo / "dataset" / "dataset.toml"
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 2").replace("num_repeats = 1", "num_repeats = 2"))
    set_train(demo / "wanpair.toml", epochs=3, gradient_accumulation_steps=2, max_steps=5, tensorboard=False)
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project, overwrite=True)
    (r,) = recipe.run(("high",))
    assert r.steps == 5
    data = recipe.cached_data()
    epochs = [data.batches(epoch, project.train.seed) for epoch in (1, 2, 3)]
    for batches in epochs:
        assert len(batches) == data.batches_per_epoch == 18 and all(len(b) == 2 for b in batches)  # (12 + 6) x 2 / 2
        seen = [i for b in batches for i in b]
        assert sorted(seen) == sorted(data.trained * 2)  # each item exactly num_repeats times an epoch
        assert all(len({(data.items[i].dataset, data.items[i].bucket, data.items[i].frames) for i in b}) == 1
                   for b in batches)  # a batch stays inside one bucket
    # the images that share a batch change from epoch to epoch (they were one image twice, every epoch)
    pairs = [sorted(tuple(sorted(b)) for b in batches) for batches in epochs]
    assert pairs[0] != pairs[1] != pairs[2] and sum(len(set(b)) == 2 for b in epochs[0]) > 9
    assert data.batches(2, project.train.seed) == epochs[1] != data.batches(2, project.train.seed + 1)
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2, 3, 4, 5] and rows[1]["samples_per_s"] > 0


def test_queueing_the_next_step_before_reading_this_one_changes_no_number(demo, monkeypatch):
    """The loop queues step k+1 before it reads step k (wanpair.train.expert): the same LoRA, bit for bit, as
    reading every step before the next begins -- with dropout drawing from the global generators, a
    validation and a saved state in between (where the loop reads first), and an epoch's end."""
    from wanpair.train.expert import ExpertTraining

    set_train(demo / "wanpair.toml", epochs=2, max_steps=20, lora_dropout=0.1, validate_every_n_steps=7,
              save_state_every_n_steps=10)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("low",))
    ahead = load_file(project.lora_path("low"))
    rows = [json.loads(x) for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(rows) == 20 and all(r["s_per_step"] > 0 for r in rows)
    monkeypatch.setattr(ExpertTraining, "overlappable", lambda self, q: False)
    LoraPairRecipe(project, overwrite=True).run(("low",))
    plain = load_file(project.lora_path("low"))
    assert ahead.keys() == plain.keys() and all(torch.equal(ahead[k], plain[k]) for k in ahead)
