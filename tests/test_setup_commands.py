"""From a bare box to a project: `wanpair download` against a stand-in hub on 127.0.0.1 (the real
huggingface_hub client, the hub's protocol), `wanpair init` on a folder of captioned images, and
`wanpair doctor`'s checklist and exit code."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import namedtuple

import pytest

from hub_standin import Hub, running
from wanpair.cli import main
from wanpair.project import load_project
from wanpair.setup import download as dl
from wanpair.setup.download import COMFY_WAN22, RECIPE_FILES, files_for
from wanpair.setup.scaffold import find_models, set_models_table
from wanpair.train.memory_plan import offloaded_block_host_bytes, plan_from_config, streamed_block_host_bytes
from wanpair.project import TrainSettings

BIG = 12 << 20  # over huggingface_hub's 10 MiB download chunk, so a dropped connection leaves bytes to resume from


def _hub_files(big: int = 4096) -> dict[str, dict[str, bytes]]:
    """Every recipe file as distinct bytes: the weight files 'large' (served as LFS), the tokenizer small."""
    repos: dict[str, dict[str, bytes]] = {}
    for i, f in enumerate(RECIPE_FILES):
        size = big if f.path.endswith((".safetensors", ".pth")) else 200
        repos.setdefault(f.repo, {})[f.path] = hashlib.sha256(f.path.encode()).digest() * (size // 32) + bytes([i])
    return repos


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A clean huggingface_hub home (no stored token), and the stand-in hub's address once started."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def serve(hub):
        ctx = running(hub)
        url = ctx.__enter__()
        monkeypatch.setenv("HF_ENDPOINT", url)
        return ctx
    return serve


def _resolves(hub: Hub, method: str = "GET") -> list[str]:
    return [p.split("/resolve/main/")[1] for m, p, _ in hub.requests if m == method and "/resolve/" in p]


def test_download_fetches_the_recipe_files_writes_the_models_table_and_skips_them_next_time(tmp_path, hub_env, capsys,
                                                                                           monkeypatch):
    hub = Hub(_hub_files())
    ctx = hub_env(hub)
    try:
        models, project = tmp_path / "models", tmp_path / "wanpair.toml"
        assert main(["download", "--dir", str(models), "--project", str(project)]) == 0
        for f in files_for("fp16"):
            assert (models / f.path).read_bytes() == hub.repos[f.repo][f.path]
        assert not any("fp8" in p or "i2v" in p for p in _resolves(hub))  # only the variant and pair asked for
        text = project.read_text()
        assert 'high_noise = "models/split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors"' in text
        assert 'tokenizer  = "models/google/umt5-xxl"' in text
        hub.requests.clear()
        assert main(["download", "--dir", str(models), "--project", str(project)]) == 0
        assert _resolves(hub) == [] and _resolves(hub, "HEAD") == []  # nothing fetched twice
        assert "verified before, unchanged" in capsys.readouterr().out
    finally:
        ctx.__exit__(None, None, None)
    # offline later (nothing answers): what is here was verified and is unchanged, so that is enough
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["download", "--dir", str(models), "--project", str(project)]) == 0
    assert "the hub is not reachable; all 8 files" in capsys.readouterr().out


def _download(tmp_path, hub_env, *argv) -> tuple[list[str], str]:
    """`wanpair download ARGV` against a fresh stand-in hub: (the DiT files it fetched, the project file's text)."""
    hub = Hub(_hub_files())
    ctx = hub_env(hub)
    try:
        models, project = tmp_path / "models", tmp_path / "wanpair.toml"
        assert main(["download", *argv, "--dir", str(models), "--project", str(project)]) == 0
        return sorted(p for p in _resolves(hub) if "diffusion_models" in p), project.read_text()
    finally:
        ctx.__exit__(None, None, None)


def test_download_of_the_i2v_pair_fetches_its_experts_and_the_shared_files(tmp_path, hub_env):
    fetched, text = _download(tmp_path, hub_env, "--model", "i2v-A14B", "--variant", "fp8")
    assert [p.rsplit("/", 1)[1] for p in fetched] == ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                                                     "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"]
    assert 'high_noise = "models/split_files/diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"' in text
    assert 'vae        = "models/split_files/vae/wan_2.1_vae.safetensors"' in text


def test_download_of_a_wan21_model_fetches_its_one_file_and_writes_dit(tmp_path, hub_env):
    fetched, text = _download(tmp_path, hub_env, "--model", "t2v-14B", "--variant", "fp8")
    assert fetched == ["split_files/diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors"]
    assert all(f.repo == dl.COMFY_WAN21 for f in files_for("fp8", "t2v-14B") if f.role == "dit")
    assert 'dit        = "models/split_files/diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors"' in text
    assert "high_noise" not in text
    # the 1.3B is published as fp16 only (2.8 GB): that is what either variant fetches
    assert [f.path for f in files_for("fp8", "t2v-1.3B") if f.role == "dit"] == \
        ["split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"]


def test_a_dropped_connection_resumes_and_a_corrupted_file_is_fetched_again(tmp_path, hub_env, capsys):
    high = next(f for f in RECIPE_FILES if f.role == "high_noise" and f.variant == "fp16")
    hub = Hub(_hub_files(BIG), cut_first_get={high.path: BIG - (1 << 20)})
    ctx = hub_env(hub)
    try:
        models = tmp_path / "models"
        assert main(["download", "--dir", str(models), "--project", str(tmp_path / "p.toml")]) == 0
        resumed = [r for m, p, r in hub.requests if m == "GET" and p.endswith(high.path) and r]
        assert resumed and int(resumed[0].split("=")[1].rstrip("-")) > 0  # asked for the rest, not from byte 0
        local = models / high.path
        assert local.read_bytes() == hub.repos[COMFY_WAN22][high.path]
        with open(local, "r+b") as f:  # a flipped byte, same size: only the hash can tell
            f.seek(1000)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
        hub.requests.clear()
        assert main(["download", "--dir", str(models), "--project", str(tmp_path / "p.toml")]) == 0
        assert _resolves(hub) == [high.path]  # that file alone, again
        assert local.read_bytes() == hub.repos[COMFY_WAN22][high.path]
        assert f"damaged {high.path}" in capsys.readouterr().out
    finally:
        ctx.__exit__(None, None, None)


def test_hub_refusals_are_said_as_what_to_do(tmp_path, hub_env, monkeypatch, capsys):
    files = _hub_files()
    hub = Hub(files, token="hf_right")
    ctx = hub_env(hub)
    try:
        args = ["download", "--dir", str(tmp_path / "m"), "--project", str(tmp_path / "p.toml")]
        assert main(args) == 2
        assert "HF_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("HF_TOKEN", "hf_right")  # the usual place for a token
        hub.gated = {COMFY_WAN22}
        assert main(args) == 2
        assert f"{COMFY_WAN22} is gated: accept its terms" in capsys.readouterr().err
        hub.gated = set()
        del files[COMFY_WAN22]["split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "wan2.2_t2v_low_noise_14B_fp16.safetensors is no longer in" in err and "[models] low_noise" in err
        assert _resolves(hub) == []  # refused before anything was fetched
    finally:
        ctx.__exit__(None, None, None)


def test_no_network_and_a_full_disk_fail_before_the_first_byte(tmp_path, hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    args = ["download", "--dir", str(tmp_path / "m"), "--project", str(tmp_path / "p.toml")]
    assert main(args) == 2
    assert "Check the network connection (or HF_ENDPOINT" in capsys.readouterr().err
    hub = Hub(_hub_files())
    ctx = hub_env(hub)
    try:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(dl.shutil, "disk_usage", lambda _: usage(10 << 30, 10 << 30, 5 << 20))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "not enough disk space" in err and "5.0 MiB is free" in err
        assert _resolves(hub) == [] and not (tmp_path / "p.toml").exists()
    finally:
        ctx.__exit__(None, None, None)


def test_the_models_table_is_replaced_in_place_keeping_the_rest(tmp_path):
    project = tmp_path / "wanpair.toml"
    project.write_text('name = "x"  # mine\n\n[models]\nhigh_noise = "old"\nvae = "old"\n\n# mine too\n[train]\nrank = 32\n')
    paths = {k: tmp_path / "models" / f"{k}.bin" for k in ("high_noise", "low_noise", "vae", "t5", "tokenizer")}
    set_models_table(project, paths)
    text = project.read_text()
    assert text.startswith('name = "x"  # mine\n') and text.endswith("\n\n# mine too\n[train]\nrank = 32\n")
    assert 'high_noise = "models/high_noise.bin"' in text and '"old"' not in text


def _captioned_folder(demo_root, tmp_path):
    data = tmp_path / "my_subject"
    shutil.copytree(demo_root / "dataset", data)
    (data / "dataset.toml").unlink()
    return data


def test_init_writes_a_project_that_loads_and_never_overwrites(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = _captioned_folder(demo_root, tmp_path)
    shutil.copytree(demo_root / "models", tmp_path / "models")
    for pattern, recipe_name in (("*vae*", "wan_2.1_vae.safetensors"), ("*t5*.pth", "models_t5_umt5-xxl-enc-bf16.pth")):
        next((tmp_path / "models").glob(pattern)).rename(tmp_path / "models" / recipe_name)  # the recipe's names
    assert main(["init", str(data)]) == 0
    out = capsys.readouterr().out
    assert "18 items, 0 errors" in out and "next: wanpair doctor wanpair.toml" in out
    project, _ = load_project(tmp_path / "wanpair.toml")  # every path filled, every setting valid
    assert project.name == "my_subject" and project.train == TrainSettings()
    assert project.models.vae.name == "wan_2.1_vae.safetensors"
    assert "# learning_rate = 0.0003" in (tmp_path / "wanpair.toml").read_text()
    before = (tmp_path / "wanpair.toml").read_text()
    assert main(["init", str(data)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "wanpair.toml").read_text() == before
    assert main(["doctor", "wanpair.toml"]) == 0
    assert "ready: `wanpair train` would start." in capsys.readouterr().out


def test_init_on_images_without_captions_points_to_the_captions_first(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = _captioned_folder(demo_root, tmp_path)
    for caption in list(data.glob("*.txt"))[:3]:
        caption.unlink()
    assert main(["init", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"next: 3 file(s) have no caption: write them, or `wanpair caption {data}`" in out
    assert "then: wanpair train" not in out


def test_init_completes_the_file_download_started(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = _captioned_folder(demo_root, tmp_path)
    paths = find_models(demo_root / "models")
    set_models_table(tmp_path / "wanpair.toml", {**paths, "t5": demo_root / "models" / "models_t5_umt5-tiny-enc-bf16.pth",
                                                 "vae": demo_root / "models" / "missing-vae.safetensors"})
    assert main(["init", str(data), "--name", "v1"]) == 0
    project_text = (tmp_path / "wanpair.toml").read_text()
    assert 'name = "v1"' in project_text and "missing-vae.safetensors" in project_text  # its [models] kept
    assert main(["doctor", "wanpair.toml"]) == 1  # and the doctor names what is wrong
    out = capsys.readouterr().out
    assert "✗ models, dataset" in out and "missing-vae.safetensors" in out


A14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256)


def test_the_doctors_run_time_counts_the_steps_and_validations_a_run_makes(demo):
    """The doctor's whole-run estimate counts what training does: the steps of each expert (epochs, batches,
    gradient accumulation), its validations (step 0's, its interval, every intermediate LoRA's, the last step's) and
    its training states (here the crash states), read back from a real (tiny) run's metrics and summary; each
    counted at the H100's measured figures."""
    from conftest import set_train
    from wanpair.setup.doctor import (LOOP_EXTRA_S, S_PER_FORWARD, S_PER_STATE_RANK_16, forward_flops, item_tokens,
                                      measured_s_per_step, run_time, useful_flops)
    from wanpair.train.metrics import read_metrics
    from wanpair.train.preflight import preflight
    from wanpair.train.recipe import LoraPairRecipe

    set_train(demo / "wanpair.toml", epochs=3, gradient_accumulation_steps=4, validate_every_n_steps=4,
              save_every_n_steps=3, validation_items=2, validation_timesteps=3)
    project, _ = load_project(demo / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run(("high",))
    rows = [r for r in read_metrics(project.run_dir / "metrics.jsonl") if r.get("expert") == "high"]
    recipe = LoraPairRecipe(project)
    recipe.checked = preflight(project, project.task.experts, recipe.device, quiet=True)
    recipe.choose_validation()
    resident = plan_from_config(A14B, 3600, TrainSettings(), 78.5, fp8_matmul=True)
    got = run_time(recipe, resident, A14B)
    high = got.experts["high"]
    assert high.steps == next(r["total_steps"] for r in rows if "total_steps" in r) > 4
    assert high.validations == sum("val_loss" in r for r in rows) > 3
    micro = 3 * recipe.cached_data(paths=False).batches_per_epoch  # 3 epochs; each epoch's last step takes what is left
    assert high.steps * 4 > micro > (high.steps - 3) * 4
    scale = [useful_flops(A14B, item_tokens(it)) / useful_flops(A14B, 3600) for it in recipe.items]  # batches of one
    step, extra = measured_s_per_step(resident), high.steps * LOOP_EXTRA_S  # the loop's extra: per optimizer step
    assert min(scale) * step * micro + extra <= high.steps_s <= (max(scale) * step * micro + extra) * (1 + 1e-9)
    one = sum(forward_flops(A14B, item_tokens(recipe.items[i])) for i in recipe.validation) / forward_flops(A14B, 3600)
    assert abs(high.validation_s - high.validations * 3 * S_PER_FORWARD * one) < 1e-9
    summary = json.loads((project.run_dir / "summary.json").read_text())
    assert high.states == summary["experts"][0]["timings"]["states"] > 3  # a crash state every tenth of the run
    assert abs(high.states_s - high.states * S_PER_STATE_RANK_16 * project.settings("high").rank / 16) < 1e-9
    text = got.describe()
    assert "at an H100's measured speed, one expert after the other: about" in text and "high-noise" in text
    from wanpair.setup.doctor import batch_sizes, speed_checks  # what `wanpair doctor` prints on a GPU

    sizes = batch_sizes(recipe)
    shown = [c.what for c in speed_checks(recipe, resident, A14B, "NVIDIA H100 80GB HBM3", sizes)]
    assert len(shown) == 3 and "expected ≈" in shown[0] and shown[2] == text
    assert shown[1] == "training steps run without CUDA graphs: gradient_accumulation_steps > 1"  # as the loop logs it
    assert [c.what for c in speed_checks(recipe, resident, A14B, "NVIDIA A100-SXM4-80GB", sizes)][0].endswith(
        "speed on NVIDIA A100-SXM4-80GB: not measured (H100/H200: docs/benchmarks.md)")


def test_doctor_says_whether_steps_replay_as_cuda_graphs_counting_the_batch_shapes_training_makes(demo):
    """The doctor's CUDA graph line is the loop's rule on the doctor's plan, and counts the batch shapes the loop will
    meet: with batch_size 4, the demo's 12 square images make batches of 4 and its 6 landscape ones a 4 and a 2 --
    three shapes, in every epoch the loop draws. No graphs where blocks stream from host memory."""
    from wanpair.setup.doctor import step_graph_check
    from wanpair.train.preflight import preflight
    from wanpair.train.recipe import LoraPairRecipe

    toml = demo / "dataset" / "dataset.toml"
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 4"))
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project)
    recipe.checked = preflight(project, project.task.experts, recipe.device, quiet=True)
    recipe.choose_validation()
    data = recipe.cached_data(paths=False)
    drawn = {(len(idx), data.items[idx[0]].bucket, data.items[idx[0]].frames)
             for epoch in range(1, 6) for idx in data.batches(epoch, 42)}
    assert data.batch_shapes() == drawn and sorted(n for n, _, _ in drawn) == [2, 4, 4]
    resident = plan_from_config(A14B, 3600, TrainSettings(), 78.5, fp8_matmul=True)
    graphs, graphed = step_graph_check(recipe, resident)
    assert graphed and graphs.what.startswith("training steps replayed as CUDA graphs (3 batch shapes;")
    low = plan_from_config(A14B, 3600, TrainSettings(memory_mode="low"), 16.0, fp8_matmul=True)
    streamed, graphed = step_graph_check(recipe, low)
    assert not graphed and streamed.what == "training steps run without CUDA graphs: blocks stream from host memory"


def test_doctor_expects_the_faster_loop_where_flashattention4_steps_replay_as_graphs(demo):
    """FlashAttention-4's steps replayed as CUDA graphs ran 0.353 s on an H100 where eagerly 0.380 (eighteenth round):
    the doctor's expected step and whole run use the graphed loop's extra only where both hold -- not with torch's
    attention, and not where the steps run eagerly (blocks streamed in low-memory mode)."""
    from wanpair.setup.doctor import LOOP_EXTRA_GRAPHED_FA4_S, LOOP_EXTRA_S, batch_sizes, speed_checks
    from wanpair.train.preflight import preflight
    from wanpair.train.recipe import LoraPairRecipe

    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project)
    recipe.checked = preflight(project, project.task.experts, recipe.device, quiet=True)
    recipe.choose_validation()
    sizes, gpu = batch_sizes(recipe), "NVIDIA H100 80GB HBM3"

    def shown(plan, fa4):
        checks = [c.what for c in speed_checks(recipe, plan, A14B, gpu, sizes, fa4)]
        return float(checks[0].split("≈ ")[1].split(" s/step")[0]), checks[1], checks[2]

    resident = plan_from_config(A14B, 3600, TrainSettings(), 78.5, fp8_matmul=True)
    (fa4_step, graphs, fa4_run), (sdpa_step, _, sdpa_run) = shown(resident, True), shown(resident, False)
    assert graphs.startswith("training steps replayed as CUDA graphs")
    assert 0.02 < LOOP_EXTRA_S - LOOP_EXTRA_GRAPHED_FA4_S < 0.04  # what the two measured loops differ by
    assert abs(sdpa_step - fa4_step - (LOOP_EXTRA_S - LOOP_EXTRA_GRAPHED_FA4_S)) <= 0.01  # each rounded to 0.01
    assert fa4_run != sdpa_run
    low = plan_from_config(A14B, 3600, TrainSettings(memory_mode="low"), 16.0, fp8_matmul=True)
    assert shown(low, True) == shown(low, False)  # streamed blocks run eagerly: the same loop either way


def test_doctor_says_what_train_would_do_with_earlier_work_and_is_not_ready_where_it_would_refuse(trained, tmp_path,
                                                                                                   capsys):
    """`doctor` exits 0 only when `train` would start: a finished LoRA made with another learning_rate makes train
    refuse by name, and so the doctor, with the same words."""
    from conftest import set_train

    root = tmp_path / "demo"
    shutil.copytree(trained, root)
    assert main(["doctor", str(root / "wanpair.toml")]) == 0
    out = capsys.readouterr().out
    assert "· this run's earlier work: keeping WAN2.2-HighNoise_demo_shapes_v1.safetensors" in out
    set_train(root / "wanpair.toml", learning_rate=1e-3, epochs=1, lr_scheduler="constant")
    assert main(["doctor", str(root / "wanpair.toml")]) == 1
    out = capsys.readouterr().out
    assert "✗ this run's earlier work: `wanpair train` would refuse to start" in out
    assert "made with a different [train] learning_rate" in out


def test_doctor_estimates_the_plan_the_loaded_expert_got_on_the_h200():
    """The estimate from the file's shapes, against the plan the real run logged on an H200 (139.1 GiB
    free, 3 600 tokens; docs/rehearsal.md): all blocks resident, none checkpointed, W^T kept, 61.8 GiB."""
    a14b = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256)
    plan = plan_from_config(a14b, 3600, TrainSettings(), 139.1, fp8_matmul=True)
    assert (plan.checkpointed, plan.streamed, plan.transposed) == (0, [], True)
    assert abs(plan.estimate_gib - 61.8) < 0.05 * 61.8  # within 5 % of the measured model's estimate
    low = plan_from_config(a14b, 3600, TrainSettings(memory_mode="low"), 16.0, fp8_matmul=True)
    assert low.streamed and low.checkpointed == 40 and low.estimate_gib <= 16.0
    # each streamed block's ten fp8 weights (8 x 25 MiB, 2 x 67.5 MiB) pinned as torch's host allocator rounds them
    assert streamed_block_host_bytes(a14b) == 8 * 32 * 2**20 + 2 * 128 * 2**20
    # an offloaded block's input on an 81-frame 832x480 clip: 32 760 tokens x 5 120 x bf16 = 320 MiB, taken as 512
    assert offloaded_block_host_bytes(a14b, 32760) == 512 * 2**20


def test_doctor_speed_estimate_follows_the_plan_and_scales_by_the_steps_flops():
    """The measured H100 figures (docs/benchmarks.md): the bench's 0.347 s resident, 0.446 s for the 24 GiB plan (37
    blocks recomputing in the graph, keeping attention outputs), 0.482 s streaming, each plus the 0.037 s a step that
    real runs' loops measured beyond the bench (0.3925 and 0.375 s resident on two H100s); a step of more tokens by
    its FLOPs, whose attention grows with the square of the tokens: the I2V A14B expert on an 81-frame 832x480 clip
    (32 760 tokens, every block streamed at a 32 GiB budget) measured 9.46 s/step with FlashAttention-4 and 10.37
    with SDPA; other GPUs and sizes: no guess."""
    from wanpair.setup.doctor import expected_s_per_step, useful_flops

    a14b = A14B

    def estimate(plan, tokens, gpu="NVIDIA H100 80GB HBM3"):
        text = expected_s_per_step(plan, a14b, useful_flops(a14b, tokens), gpu)
        return float(text.split("≈ ")[1].split(" s/step")[0]) if "≈" in text else text

    card24 = plan_from_config(a14b, 3600, TrainSettings(memory_budget_gb=24.0), 24.0, fp8_matmul=True)
    assert card24.keep_attention == card24.checkpointed > 30
    assert abs(estimate(card24, 3600) - (0.446 + 0.037)) < 0.01
    resident = plan_from_config(a14b, 3600, TrainSettings(), 78.5, fp8_matmul=True)
    assert estimate(resident, 3600) == 0.38 and estimate(resident, 3600, "NVIDIA H200") == 0.38
    clip = plan_from_config(a14b, 32760, TrainSettings(memory_budget_gb=32.0), 32.0, fp8_matmul=True)
    assert len(clip.streamed) == 40 and 9.46 < estimate(clip, 32760) < 1.05 * 10.37  # by tokens alone: 4.4
    assert "scaled by the step's FLOPs: 21.46×" in expected_s_per_step(clip, a14b, useful_flops(a14b, 32760), "H100")
    assert "not measured" in expected_s_per_step(resident, a14b, useful_flops(a14b, 3600), "NVIDIA A100-SXM4-80GB")
    assert "of the 14B models" in expected_s_per_step(resident, a14b, 1.0, "NVIDIA H200", fourteen_b=False)
    uncompiled = plan_from_config(a14b, 3600, TrainSettings(memory_budget_gb=24.0), 24.0, fp8_matmul=True,
                                  compiled=False)
    assert "inside the compiled graph" not in uncompiled.describe() and not uncompiled.in_graph
    assert "kept transposed" not in plan_from_config(a14b, 3600, TrainSettings(fp8_base=False), 139.1,
                                                     fp8_matmul=True).describe()  # no fp8 weights to transpose


def test_init_for_the_i2v_pair_finds_its_experts_and_names_the_pair(tmp_path, monkeypatch, capsys):
    from wanpair.demo import make_dataset, make_demo
    from wanpair.models.tasks import I2V

    demo = tmp_path / "i2v-demo"
    make_demo(demo, I2V)
    clips = tmp_path / "clips"
    shutil.copytree(demo / "dataset", clips, ignore=shutil.ignore_patterns("dataset.toml", "cache"))
    monkeypatch.chdir(tmp_path)
    main(["init", str(clips), "--model", "i2v-A14B", "--models", str(demo / "models")])
    text = (tmp_path / "wanpair.toml").read_text()
    assert 'model = "i2v-A14B"' in text
    assert "wan2.2_i2v_high_noise_tiny_fp16.safetensors" in text and "wan2.2_i2v_low_noise_tiny_fp16.safetensors" in text
    assert "video_directory" in (clips / "dataset.toml").read_text()
    stills = make_dataset(tmp_path / "stills")  # the image dataset pointed at from the i2v project
    (tmp_path / "wanpair.toml").write_text(re.sub(r"(?m)^config = .*$", f"config = {json.dumps(str(stills))}", text))
    assert main(["check", "wanpair.toml"]) == 1  # what train refuses, check finds without loading a model
    assert "i2v-A14B learns how a clip goes on from its first frame" in capsys.readouterr().out
    images = tmp_path / "images"  # and init says so of a folder of images, before pointing to the doctor
    shutil.copytree(stills.parent, images, ignore=shutil.ignore_patterns("dataset.toml", "cache"))
    assert main(["init", str(images), "--model", "i2v-A14B", "--project", "stills.toml"]) == 1
    out = capsys.readouterr().out
    assert "i2v-A14B learns how a clip goes on from its first frame" in out and "next: fix the errors above" in out
