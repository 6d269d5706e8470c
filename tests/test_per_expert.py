"""Per-expert settings ([experts.high] / [experts.low]: learning_rate, epochs, max_steps, rank, alpha), LoRA+ and
max-norm regularisation: what each trains with, what its LoRA says, what a rerun keeps, and what is refused."""

from __future__ import annotations

import importlib.util
import json
import uuid

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import set_train
from test_dashboard import reader
from test_dashboard_jobs import OK, TOKEN, _new_run
from test_trackers import wandb_records
from wanpair.dashboard.app import create_app
from wanpair.errors import WanpairError
from wanpair.project import TrainSettings, load_project
from wanpair.setup.doctor import project_checks
from wanpair.train.lora import apply_max_norm
from wanpair.train.metadata import same_run
from wanpair.train.metrics import read_metrics
from wanpair.train.optim import build_optimizer
from wanpair.train.recipe import LoraPairRecipe


# Trackio reads TRACKIO_DIR once, when first imported: a name of its own keeps this run apart even if another test
# imported it first (then its store is the default one)
TRACKER_PROJECT = f"wanpair-test-{uuid.uuid4().hex[:12]}"


def _experts(project_file, text: str) -> None:
    with open(project_file, "a") as f:
        f.write(text)


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.skipif(not (importlib.util.find_spec("trackio") and importlib.util.find_spec("wandb")),
                    reason="the test extras (trackio, wandb) are not installed")
def test_each_expert_trains_with_its_own_settings_and_reports_them(demo, tmp_path, monkeypatch, capsys):
    """One pair, the high-noise expert with its own rate, rank, alpha and length, LoRA+ and max-norm on, logging to
    Trackio, W&B (offline) and TensorBoard with samples; then a rerun after the low-noise rate changed."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (demo / "prompts.txt").write_text("a red circle\n")
    set_train(demo / "wanpair.toml", epochs=1, learning_rate=2e-3, lr_scheduler="constant", validate_every_n_steps=2,
              loraplus_lr_ratio=4.0, scale_weight_norms=0.05, log_with=["tensorboard", "wandb", "trackio"],
              tracker_project=TRACKER_PROJECT)
    _experts(demo / "wanpair.toml", "[experts.high]\nlearning_rate = 5e-4\nrank = 4\nalpha = 2.0\nmax_steps = 3\n"
                                    '[sample]\nprompts = "prompts.txt"\nevery_n_epochs = 1\nwidth = 32\nheight = 32\n'
                                    'steps = 2\n[metadata]\ntitle = "Shapes"\ndescription = "circles and squares"\n'
                                    'license = "apache-2.0"\ntags = ["shapes", "test"]\ntrigger_words = ["sks shape"]\n'
                                    'training_comment = "per-expert rates"\n')
    project, _ = load_project(demo / "wanpair.toml")
    doctor = [c.what for c in project_checks(demo / "wanpair.toml")]
    assert "set per expert: high-noise learning_rate 0.0005, rank 4, alpha 2, max_steps 3 (the rest from [train])" in doctor
    assert project.settings("high").learning_rate == 5e-4 and project.settings("low").learning_rate == 2e-3
    assert project.train.rank == 16 and project.settings("high").rank == 4
    LoraPairRecipe(project, overwrite=True).run()

    high, low = (_meta(project.lora_path(e)) for e in ("high", "low"))
    assert (high["ss_learning_rate"], high["ss_network_dim"], high["ss_network_alpha"], high["ss_steps"]) == \
        ("0.0005", "4", "2.0", "3")
    assert (low["ss_learning_rate"], low["ss_network_dim"]) == ("0.002", "16") and int(low["ss_steps"]) > 3
    assert json.loads(high["wanpair.pair_settings"]) == {
        "high": {"learning_rate": 5e-4, "rank": 4, "alpha": 2.0, "max_steps": 3, "epochs": 1},
        "low": {"learning_rate": 2e-3, "rank": 16, "alpha": 16.0, "max_steps": 0, "epochs": 1}}
    assert same_run(high, low) and same_run(low, high)  # the two LoRAs of one run
    assert (high["modelspec.title"], low["modelspec.title"]) == ("Shapes (high-noise expert)", "Shapes (low-noise expert)")
    assert (high["modelspec.description"], high["modelspec.license"], high["modelspec.tags"],
            high["modelspec.trigger_phrase"], high["ss_training_comment"]) == (
        "circles and squares", "apache-2.0", "shapes, test", "sks shape", "per-expert rates")
    sd = load_file(str(project.lora_path("high")))
    down = next(v for k, v in sd.items() if k.endswith("lora_down.weight"))
    assert down.shape[0] == 4
    rows = read_metrics(project.run_dir / "metrics.jsonl")
    for expert, lr in (("high", 5e-4), ("low", 2e-3)):
        steps = [r for r in rows if r["expert"] == expert and "loss" in r]
        assert steps and all(r["lr"] == lr for r in steps)  # the down matrices' rate; LoRA+ scales the up ones
        # max-norm: every module's change is held to 0.05 (a norm rounded in fp32: 1e-5 relative)
        assert all(r["max_key_norm"] <= 0.05 * (1 + 1e-5) and 0 <= r["keys_scaled"] <= 20 for r in steps)  # of 2 x 10 modules
    assert any(r["keys_scaled"] > 0 for r in rows if "keys_scaled" in r)  # a rate this high does reach the cap
    assert [r for r in rows if r["expert"] == "high" and "loss" in r][-1]["step"] == 3
    _trackers_saw_the_pair(project)

    # a new learning rate for the low-noise expert alone: the high-noise LoRA is still this run's; only the low one
    # is named as made otherwise, and trains again when asked to
    _experts(demo / "wanpair.toml", "[experts.low]\nlearning_rate = 1e-3\n")
    before = project.lora_path("high").read_bytes()
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError) as refused:
        LoraPairRecipe(project).run()
    assert "LowNoise_demo_shapes_v1.safetensors already exists, made with a different [train] learning_rate" in \
        str(refused.value) and "HighNoise" not in str(refused.value)
    capsys.readouterr()
    LoraPairRecipe(project, overwrite=True).run(("low",))
    assert project.lora_path("high").read_bytes() == before
    assert _meta(project.lora_path("low"))["ss_learning_rate"] == "0.001"
    assert same_run(_meta(project.lora_path("high")), _meta(project.lora_path("low")))  # still the new low's partner


def _trackers_saw_the_pair(project) -> None:
    """Each expert is one run of the group `<name>` in Trackio and W&B, its own learning rate in its config and its
    rows, its samples logged; TensorBoard has a folder per expert."""
    from trackio.sqlite_storage import SQLiteStorage

    assert sorted(SQLiteStorage.get_runs(TRACKER_PROJECT)) == ["demo_shapes_v1-high", "demo_shapes_v1-low"]
    for expert, lr in (("high", 5e-4), ("low", 2e-3)):
        run = f"demo_shapes_v1-{expert}"
        config = SQLiteStorage.get_run_config(TRACKER_PROJECT, run)
        assert config["learning_rate"] == lr and config["_Group"] == "demo_shapes_v1"
        assert config["timestep_window"] == ("875-1000" if expert == "high" else "0-875")
        logs = SQLiteStorage.get_logs(TRACKER_PROJECT, run)
        losses = [r for r in logs if "loss" in r]
        assert losses and all(r["lr"] == lr for r in losses)
        assert [r["step"] for r in losses] == list(range(1, len(losses) + 1))
        assert any("val_loss" in r for r in logs) and all("max_key_norm" in r for r in losses)
        images = [v for r in logs for k, v in r.items() if k.startswith(f"samples/{expert}/")]
        assert images and all(v["_type"] == "trackio.image" for v in images)

    runs = sorted((project.run_dir / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    seen = {}
    for path in runs:
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        seen[run.display_name] = (run.run_group, [h for h in history if "loss" in h], history)
    assert set(seen) == {"demo_shapes_v1-high", "demo_shapes_v1-low"}
    for group, losses, history in seen.values():
        assert group == "demo_shapes_v1" and losses and any(k.startswith("samples/") for h in history for k in h)
    events = list((project.run_dir / "tensorboard").glob("*/events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"high", "low"}


def test_per_expert_values_are_checked_and_only_those_keys_differ(demo):
    set_train(demo / "wanpair.toml", epochs=1)
    _experts(demo / "wanpair.toml", "[experts.high]\nlearning_rate = -1.0\nweight_decay = 0.0\nrank = 0\n")
    with pytest.raises(WanpairError) as e:
        load_project(demo / "wanpair.toml")
    text = str(e.value)
    assert "[experts.high] learning_rate = -1.0: learning_rate must be above 0" in text
    assert "[experts.high] rank = 0: rank must be at least 1" in text
    assert "unknown key 'weight_decay' in [experts.high]" in text and "weight_decay is shared: set it in [train]" in text


def test_a_warmup_longer_than_one_experts_run_is_named_with_that_expert(demo):
    set_train(demo / "wanpair.toml", epochs=1, lr_warmup_steps=5, lr_scheduler="constant_with_warmup")
    _experts(demo / "wanpair.toml", "[experts.high]\nmax_steps = 3\n")
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match="warms up over 5 steps, but the high-noise expert's run has 3 optimizer "
                                           r"steps \(max_steps = 3\)"):
        LoraPairRecipe(project).preflight(("high", "low"))
    LoraPairRecipe(project).preflight(("low",))  # training the low-noise expert alone: the high one's steps are not its


def test_loraplus_needs_a_learning_rate_to_scale_said_before_loading(demo):
    set_train(demo / "wanpair.toml", epochs=1, optimizer="adafactor", loraplus_lr_ratio=4.0,
              optimizer_args=["relative_step=True", "lr=None", "warmup_init=True"])
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"LoRA\+ \(loraplus_lr_ratio\) scales a learning rate, and lr is None"):
        LoraPairRecipe(project).preflight(("high", "low"))


def test_the_partner_is_what_this_project_gives_that_expert():
    pair = {"high": {"learning_rate": 5e-4, "rank": 4}, "low": {"learning_rate": 3e-4, "rank": 16}}
    common = {"wanpair.output_settings": "{}", "wanpair.pair_settings": json.dumps(pair),
              **{k: "x" for k in ("wanpair.dataset_fingerprint", "wanpair.batch_size", "wanpair.num_repeats",
                                  "wanpair.buckets", "wanpair.frames")}}
    high = {**common, "wanpair.expert": "high", "wanpair.settings": json.dumps({"learning_rate": 5e-4, "rank": 4})}
    low = {**common, "wanpair.expert": "low", "wanpair.settings": json.dumps({"learning_rate": 3e-4, "rank": 16})}
    assert same_run(low, high) and same_run(high, low)  # their own keys differ by design
    older = {**low, "wanpair.settings": json.dumps({"learning_rate": 1e-3, "rank": 16})}
    assert not same_run(older, high)  # trained at a rate this project no longer gives the low-noise expert
    other = {**low, "wanpair.settings": json.dumps({"learning_rate": 3e-4, "rank": 16, "weight_decay": 0.0})}
    assert not same_run(other, high)  # a shared setting differs


def test_loraplus_puts_the_up_matrices_in_a_faster_group():
    down, up = torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(8, 4))
    opt = build_optimizer([down, up], TrainSettings(learning_rate=1e-3, loraplus_lr_ratio=16.0), up=[up])
    assert [(g["lr"], len(g["params"])) for g in opt.param_groups] == [(1e-3, 1), (16e-3, 1)]
    assert opt.param_groups[1]["params"][0] is up
    plain = build_optimizer([down, up], TrainSettings(learning_rate=1e-3), up=[up])
    assert len(plain.param_groups) == 1
    with pytest.raises(WanpairError, match="LoRA's up matrices") as e:  # never LoRA+ silently off
        build_optimizer([down, up], TrainSettings(learning_rate=1e-3, loraplus_lr_ratio=16.0))
    assert "optimizer_args" not in str(e.value)  # not blamed on the user's settings


def test_max_norm_scales_only_the_modules_above_it():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g) * s) for s in (1.0, 1e-3)]
    before = [(u @ d).norm().item() * 0.5 for d, u in pairs]
    limit = (before[0] + before[1]) / 2  # between the two modules' norms
    stats = apply_max_norm(pairs, limit, 0.5)
    after = [(u @ d).norm().item() * 0.5 for d, u in pairs]
    assert abs(after[0] - limit) < 1e-4 * limit  # the big one is scaled to the limit (fp32 products)
    assert after[1] == pytest.approx(before[1], rel=1e-6)  # the small one untouched
    assert stats[0].item() == 1 and abs(stats[2].item() - limit) < 1e-4 * limit


def test_max_norm_batched_by_shape_scales_each_module_by_its_own_norm():
    """Modules of three shapes, interleaved (as q/k/v/o, ffn.0, ffn.2 are): each scaled as if alone."""
    g = torch.Generator().manual_seed(1)
    shapes = [((4, 32), (16, 4)), ((4, 64), (32, 4)), ((4, 32), (64, 4))] * 4
    pairs = [(torch.randn(d, generator=g), torch.randn(u, generator=g) * (0.5 + i)) for i, (d, u) in enumerate(shapes)]
    before = [0.5 * (u @ d).norm().item() for d, u in pairs]
    limit = sorted(before)[len(before) // 2]
    expected = [min(b, limit) for b in before]
    stats = apply_max_norm(pairs, limit, 0.5)
    after = [0.5 * (u @ d).norm().item() for d, u in pairs]
    assert max(abs(a - e) / e for a, e in zip(after, expected)) < 1e-5  # fp32 Gram sums vs the product's norm
    assert stats[0].item() == sum(b > limit for b in before)
    assert abs(stats[1].item() - sum(expected) / len(expected)) < 1e-5 * limit


def test_the_dashboard_form_sets_a_learning_rate_per_expert(demo):
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    form = _new_run(client, epochs=3) | {"experts": {"high": {"learning_rate": "3e-5"}, "low": {"learning_rate": ""}}}
    got = client.post("/api/new-run", json=form, headers=OK)
    assert got.status_code == 200, got.get_json()
    project, _ = load_project(demo / "mine.toml")
    assert project.experts["high"].overrides == {"learning_rate": 3e-5} and project.experts["low"].overrides == {}
    bad = client.post("/api/new-run/preview", json=form | {"experts": {"high": {"weight_decay": "0"}}}, headers=OK)
    assert bad.status_code == 400 and "[experts.high] weight_decay: the form sets learning_rate" in bad.get_json()["error"]
    page = client.get(f"/?token={TOKEN}").get_data(as_text=True)
    assert 'data-expert="high" data-expert-setting="learning_rate"' in page
