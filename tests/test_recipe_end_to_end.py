"""The whole recipe on the tiny demo models: both LoRAs, right keys, right windows, reproducible."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import set_train
from wanpair.cli import main
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe

# Every Linear of every block, in original Wan names (2 blocks in the tiny DiT).
TARGETS = [f"blocks_{b}_{m}" for b in range(2) for m in
           ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
            "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o", "ffn_0", "ffn_2")]


def _train(demo, experts=None, **settings):
    set_train(demo / "wanpair.toml", **{"learning_rate": 2e-3, "epochs": 1, **settings})
    project, _ = load_project(demo / "wanpair.toml")
    return project, LoraPairRecipe(project, overwrite=True).run(experts)


def test_train_writes_both_loras_with_every_block_linear_and_the_right_window(demo, capsys):
    project, results = _train(demo)
    high = project.output_dir / "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
    low = project.output_dir / "WAN2.2-LowNoise_demo_shapes_v1.safetensors"
    assert [r.lora for r in results] == [high, low]
    expected = {f"lora_unet_{t}.{s}" for t in TARGETS for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    sd_high, sd_low = load_file(high), load_file(low)
    assert set(sd_high) == expected and set(sd_low) == expected
    assert sd_high["lora_unet_blocks_0_self_attn_q.lora_down.weight"].shape == (16, 128)
    assert sd_high["lora_unet_blocks_0_ffn_0.lora_up.weight"].shape == (256, 16)
    assert all(v.dtype == torch.bfloat16 for v in sd_high.values())
    # trained: up weights moved off their zero init, and the two experts learned different things
    assert sd_high["lora_unet_blocks_1_ffn_2.lora_up.weight"].abs().max() > 0
    assert not torch.equal(sd_high["lora_unet_blocks_1_ffn_2.lora_up.weight"], sd_low["lora_unet_blocks_1_ffn_2.lora_up.weight"])
    with safe_open(str(high), "pt") as f:
        meta_high = f.metadata()
    with safe_open(str(low), "pt") as f:
        meta_low = f.metadata()
    assert meta_high["wanpair.expert"] == "high" and meta_high["modelspec.timestep_range"] == "875,1000"
    assert meta_low["wanpair.expert"] == "low" and meta_low["modelspec.timestep_range"] == "0,875"
    assert meta_high["wanpair.base_model"] == "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
    assert meta_low["wanpair.base_model"] == "wan2.2_t2v_low_noise_tiny_fp16.safetensors"
    assert meta_high["ss_network_dim"] == "16" and meta_high["ss_network_alpha"] == "16.0"
    # every logged timestep of each expert lies inside its window
    logged = [json.loads(line) for line in (project.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]  # training steps (the validation before training has no loss)
    assert {r["expert"] for r in rows} == {"high", "low"}
    assert all(875 <= r["timestep"] <= 1000 for r in rows if r["expert"] == "high")
    assert all(0 <= r["timestep"] <= 875 for r in rows if r["expert"] == "low")
    assert len([r for r in rows if r["expert"] == "high"]) == 18  # 18 images, batch 1, one epoch
    summary = json.loads((project.run_dir / "summary.json").read_text())
    assert [e["expert"] for e in summary["experts"]] == ["high", "low"]
    # where the time went (printed, and in summary.json) agrees with the metrics the steps logged
    for e in summary["experts"]:
        t, mine = e["timings"], [r for r in logged if r["expert"] == e["expert"]]
        steps = [r["s_per_step"] for r in mine if "loss" in r]
        vals = [r["val_seconds"] for r in mine if "val_seconds" in r]
        assert t["steps"] == len(steps) - 1 and abs(t["first_step_s"] - steps[0]) < 1e-4  # metrics keep 0.1 ms
        assert abs(t["steps_s"] - sum(steps[1:])) < 1e-4 * len(steps)
        assert t["validations"] == len(vals) == 2 and abs(t["validation_s"] - sum(vals)) < 1e-3 * len(vals)
        assert t["wall_s"] > t["setup_s"] + t["first_step_s"] + t["steps_s"] + t["validation_s"]
    seconds = summary["seconds"]
    assert seconds["total"] > seconds["check"] + seconds["cache"] + sum(e["timings"]["wall_s"] for e in summary["experts"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time: "))
    assert "high-noise" in line and "low-noise" in line and "17 more steps" in line


def test_same_seed_gives_identical_loras_and_another_seed_does_not(demo):
    project, _ = _train(demo, ("high",), fp8_base=False, mixed_precision="no")
    first = load_file(project.lora_path("high"))
    _train(demo, ("high",), fp8_base=False, mixed_precision="no")
    again = load_file(project.lora_path("high"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    _train(demo, ("high",), fp8_base=False, mixed_precision="no", seed=6)
    other = load_file(project.lora_path("high"))
    assert not torch.equal(first["lora_unet_blocks_0_ffn_0.lora_up.weight"], other["lora_unet_blocks_0_ffn_0.lora_up.weight"])


def test_training_lowers_the_loss(demo):
    """Overfit one expert with a constant lr: the epoch-mean loss must fall clearly."""
    set_train(demo / "wanpair.toml", learning_rate=3e-3, epochs=6, lr_scheduler="constant", fp8_base=False,
              mixed_precision="no")
    project, _ = load_project(demo / "wanpair.toml")
    (result,) = LoraPairRecipe(project, overwrite=True).run(("low",))
    assert result.last_epoch_loss < 0.9 * result.first_epoch_loss
    validated = [json.loads(x)["val_loss"] for x in (project.run_dir / "metrics.jsonl").read_text().splitlines()
                 if "val_loss" in x]
    assert validated[-1] < 0.9 * validated[0]  # fit to the training items, so it falls with the loss


def test_cli_train_one_expert_keep_it_on_a_rerun_and_refuse_to_overwrite_another_runs(demo, capsys):
    set_train(demo / "wanpair.toml", epochs=1)
    high = demo / "output" / "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
    assert main(["train", str(demo / "wanpair.toml"), "--expert", "high"]) == 0
    assert high.exists() and not (demo / "output" / "WAN2.2-LowNoise_demo_shapes_v1.safetensors").exists()
    made = high.stat().st_mtime_ns
    # before anything loads, the run says which model it is and which files it will write
    assert ("model: Wan 2.2 T2V A14B (text to video): a LoRA per expert, high-noise on 875-1000 and low-noise "
            "below -> WAN2.2-HighNoise_demo_shapes_v1.safetensors") in capsys.readouterr().out
    # the same command again: this run's LoRA is kept, not trained again and not refused
    assert main(["train", str(demo / "wanpair.toml"), "--expert", "high"]) == 0
    assert "keeping WAN2.2-HighNoise_demo_shapes_v1.safetensors" in capsys.readouterr().out
    assert high.stat().st_mtime_ns == made
    # another run's LoRA under the same name is never replaced silently
    set_train(demo / "wanpair.toml", epochs=1, learning_rate=1e-3)
    assert main(["train", str(demo / "wanpair.toml"), "--expert", "high"]) == 2
    err = capsys.readouterr().err
    assert ("already exists, made with a different [train] learning_rate (0.0003 then, 0.001 now). Restore it to keep "
            "it, train it again with --overwrite --expert high") in err
    assert high.stat().st_mtime_ns == made


def test_the_time_line_reads_minutes_and_hours_as_a_person_does():
    from wanpair.sizes import human_seconds

    assert [human_seconds(s) for s in (7.64, 204.4, 1445.3, 5000)] == ["7.6 s", "3 min 24 s", "24 min 5 s", "1 h 23 min"]
