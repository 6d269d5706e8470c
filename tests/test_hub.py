"""The Hugging Face Hub: `wanpair push` (the pair, its model card, workflow and samples in one commit), `[hub]`
pushing in the background while training, and `wanpair train --resume-from-hub` -- the real huggingface_hub
client against the stand-in hub on 127.0.0.1 (tests/hub_standin.py), no network."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import _http
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import set_train
from hub_standin import Hub, running
from wanpair.cli import DESCRIPTION, main
from wanpair.errors import WanpairError
from wanpair.export.hub import card_path
from wanpair.models.files import safetensors_metadata
from wanpair.project import load_project
from wanpair.sample import save_output
from wanpair.train import hub_push
from wanpair.train.expert import ExpertTraining
from wanpair.train.recipe import LoraPairRecipe

TOKEN = "hf_standin_token"
REPO = "someone/shapes-pair"
HIGH, LOW = "WAN2.2-HighNoise_demo_shapes_v1.safetensors", "WAN2.2-LowNoise_demo_shapes_v1.safetensors"


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """`standin(hub)` serves the hub for the test, with the client pointed at it: HF_ENDPOINT, a token, no stored
    token, and no Xet (hf_xet is installed, and the stand-in speaks only the LFS protocol)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    servers = []

    def serve(hub: Hub) -> Hub:
        ctx = running(hub)
        monkeypatch.setenv("HF_ENDPOINT", ctx.__enter__())
        servers.append(ctx)
        return hub
    yield serve
    for ctx in servers:
        ctx.__exit__(None, None, None)


@pytest.fixture
def pair(trained, tmp_path):
    """A copy of the trained demo pair with samples (one with the pair, as `wanpair sample` writes it, and one
    from training), this project's ComfyUI workflow and another project's, and [metadata] for the card."""
    root = tmp_path / "pair"
    shutil.copytree(trained, root)
    with open(root / "wanpair.toml", "a") as f:
        f.write('\n[metadata]\ntitle = "Shapes"\ndescription = "Flat coloured shapes."\nlicense = "apache-2.0"\n'
                'tags = ["shapes"]\ntrigger_words = ["flat illustration"]\n')
    project, _ = load_project(root / "wanpair.toml")
    frame = np.random.default_rng(0).random((1, 16, 16, 3))
    info = {"prompt": "a red circle, flat illustration", "seed": 42,
            "settings": {"steps": 10, "image": str(root / "frames" / "first.png")},  # a local path (I2V's --image)
            "loras": {"high": str(project.lora_path("high")), "low": str(project.lora_path("low"))},
            "project": str(project.path)}
    save_output(frame, project.run_dir / "samples" / "00_a_red_circle_highLora+lowLora", info, 16)
    save_output(frame, project.run_dir / "samples" / "high-step000018_00_a_red_circle_highLora+lowLora",
                {**info, "prompt": "during training"}, 16)
    if not list(project.output_dir.glob("*comfyui_workflow*.json")):  # training writes it where that is built in
        (project.output_dir / f"{project.name}_comfyui_workflow.json").write_text(f'{{"lora": ["{HIGH}", "{LOW}"]}}')
    (project.output_dir / "other_comfyui_workflow.json").write_text('{"lora": ["WAN2.2-HighNoise_other.safetensors"]}')
    return root


def _front_matter(card: str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.DOTALL).group(1))


def _row(card: str, file: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(f"| [`{file}`]"))


def test_push_uploads_the_pair_card_workflow_and_samples_in_one_commit(pair, standin, capsys):
    hub = standin(Hub({}, token=TOKEN))
    out = pair / "output"
    assert main(["push", str(pair / "wanpair.toml"), "--repo", REPO, "--private"]) == 0
    assert len(hub.commits) == 1 and hub.private[REPO]
    files = hub.repos[REPO]
    workflow = next(out.glob("demo_shapes_v1*comfyui_workflow*.json"))
    samples = sorted(p.name for p in (out / "demo_shapes_v1" / "samples").glob("*.png"))
    assert sorted(files) == sorted([HIGH, LOW, "README.md", workflow.name, *(f"samples/{s}" for s in samples)])
    for name in (HIGH, LOW, workflow.name):  # the files as they are, byte for byte
        assert files[name] == (out / name).read_bytes()
    assert files["README.md"].decode() == card_path(load_project(pair / "wanpair.toml")[0]).read_text()
    for s in samples:  # the same pixels and settings; the text chunks naming local paths left out
        local, sent = Image.open(out / "demo_shapes_v1" / "samples" / s), Image.open(io.BytesIO(files[f"samples/{s}"]))
        assert np.array_equal(np.asarray(local), np.asarray(sent))
        assert "wanpair.project" in local.text and "wanpair.loras" in local.text
        assert "wanpair.project" not in sent.text and "wanpair.loras" not in sent.text
        assert sent.text["wanpair.prompt"] == local.text["wanpair.prompt"]
        assert not [v for v in sent.text.values() if str(pair) in v]  # no local path in any chunk
        assert json.loads(sent.text["wanpair.settings"]) == {"steps": 10, "image": "first.png"}
    text = capsys.readouterr().out
    assert "uploading 6 files" in text and "pushed: http://127.0.0.1" in text
    hub.requests.clear()  # pushed again unchanged: nothing is sent again, and no empty commit is made
    assert main(["push", str(pair / "wanpair.toml"), "--repo", REPO]) == 0
    assert len(hub.commits) == 1 and not [r for r in hub.requests if r[0] == "PUT"]


def test_the_model_card_says_which_file_goes_on_which_expert_from_the_files_own_metadata(pair, capsys):
    assert main(["push", str(pair / "wanpair.toml"), "--repo", REPO, "--dry-run"]) == 0  # no hub, no token
    card = (pair / "output" / "demo_shapes_v1_README.md").read_text()
    assert "would upload 6 files" in capsys.readouterr().out
    high, low = _row(card, HIGH), _row(card, LOW)
    assert "**high-noise** expert" in high and "`transformer`" in high and "875–1000" in high
    assert "wan2.2_t2v_high_noise_14B_fp16.safetensors" in high
    assert "**low-noise** expert" in low and "`transformer_2`" in low and "0–875" in low
    assert "wan2.2_t2v_low_noise_14B_fp16.safetensors" in low
    meta = _front_matter(card)
    assert meta["base_model"] == "Wan-AI/Wan2.2-T2V-A14B" and meta["base_model_relation"] == "adapter"
    assert {"lora", "text-to-video", "wan2.2", "diffusers", "shapes"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["instance_prompt"] == "flat illustration"
    # the gallery: the sample made with the finished pair, not the one from training
    assert meta["widget"] == [{"text": "a red circle, flat illustration",
                               "output": {"url": "samples/00_a_red_circle_highLora+lowLora.png"}}]
    assert card.count("<Gallery />") == 1 and "# Shapes" in card and "Flat coloured shapes." in card
    assert 'load_into_transformer_2=True' in card and f'weight_name="{LOW}"' in card
    assert "LoraLoaderModelOnly" in card and "demo_shapes_v1_comfyui_workflow.json" in card
    with safe_open(str(pair / "output" / HIGH), framework="pt") as f:
        m = f.metadata()
    assert f"{float(m['wanpair.validation_loss']):.4f} at step {m['wanpair.validation_step']}" in card
    assert f"| steps (epochs) | {m['ss_steps']} ({m['ss_epoch']})" in card


def test_the_card_of_a_wan21_model_names_its_one_file(trained_wan21, tmp_path):
    from wanpair.export.hub import plan_push

    root = tmp_path / "wan21"
    shutil.copytree(trained_wan21, root)
    project, _ = load_project(root / "wanpair.toml")
    uploads, card = plan_push(project, REPO)
    (lora,) = [u for u in uploads if u.path.endswith(".safetensors")]
    assert lora.path == project.lora_path("full").name and "0–1000" in _row(card, lora.path)
    assert _front_matter(card)["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B"
    assert "transformer_2" not in card and "WanPipeline" in card and "fp8_scaled" not in card  # no fp8 1.3B file


def _rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


def test_push_refuses_a_missing_partial_or_foreign_lora_before_uploading_anything(pair, standin, monkeypatch, capsys):
    hub = standin(Hub({}, token=TOKEN))
    project, args = pair / "wanpair.toml", ["push", str(pair / "wanpair.toml"), "--repo", REPO]
    (pair / "output" / LOW).rename(pair / "low.safetensors")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{pair / 'output' / LOW} does not exist" in err and f"`wanpair train {project}`" in err
    (pair / "low.safetensors").rename(pair / "output" / LOW)
    _rewrite_metadata(pair / "output" / LOW, **{"wanpair.partial": "true"})
    _rewrite_metadata(pair / "output" / HIGH, ss_output_name="WAN2.2-HighNoise_someone_else")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{LOW} is the partial save of a stopped run" in err
    assert f"{HIGH} was not written by this project's run" in err and "'WAN2.2-HighNoise_someone_else'" in err
    assert hub.requests == [] and REPO not in hub.repos
    _rewrite_metadata(pair / "output" / LOW, **{"wanpair.partial": "false"})
    _rewrite_metadata(pair / "output" / HIGH, ss_output_name=HIGH.removesuffix(".safetensors"))
    monkeypatch.delenv("HF_TOKEN")
    assert main(args) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and hub.requests == []


def test_an_interrupted_upload_is_said_clearly_and_the_same_command_completes_it(pair, standin, monkeypatch, capsys):
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda s: None, time=time.time))  # the client's retry waits
    high = hashlib.sha256((pair / "output" / HIGH).read_bytes()).hexdigest()
    hub = standin(Hub({}, token=TOKEN, drop_puts={high: 6}))  # more drops mid-PUT than the client retries (5)
    args = ["push", str(pair / "wanpair.toml"), "--repo", REPO]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"pushing to {REPO} was interrupted" in captured.err and f"'{HIGH}'" in captured.err
    assert "run the same command again" in captured.err and "pushed:" not in captured.out
    assert hub.commits == [] and hub.repos[REPO] == {}
    hub.requests.clear()
    assert main(args) == 0
    assert [p for m, p, _ in hub.requests if m == "PUT"] == [f"/lfs/{high}"]  # only what had not arrived
    assert len(hub.commits) == 1 and hub.repos[REPO][HIGH] == (pair / "output" / HIGH).read_bytes()


def test_a_refused_token_is_a_clear_error_and_nothing_is_claimed_pushed(pair, standin, monkeypatch, capsys):
    hub = standin(Hub({}, token=TOKEN))
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    assert main(["push", str(pair / "wanpair.toml"), "--repo", REPO]) == 2
    captured = capsys.readouterr()
    assert "the hub refused the token (401" in captured.err and "HF_TOKEN" in captured.err
    assert "pushed:" not in captured.out and hub.commits == [] and REPO not in hub.repos


def _hub_project(demo, repo=REPO, **train):
    set_train(demo / "wanpair.toml", epochs=1, max_steps=4, learning_rate=2e-3, save_every_n_steps=2,
              save_state_every_n_steps=2, keep_states=0, validate_every_n_steps=0, tensorboard=False, **train)
    with open(demo / "wanpair.toml", "a") as f:
        f.write(f'\n[hub]\nrepo = "{repo}"\npush_states = true\n')
    return demo / "wanpair.toml"


def test_training_pushes_each_saved_file_and_resume_from_hub_continues_it_elsewhere(demo, tmp_path, standin, capsys):
    hub = standin(Hub({}, token=TOKEN))
    elsewhere = tmp_path / "elsewhere"  # the same project on another machine, before training
    shutil.copytree(demo, elsewhere)
    project = _hub_project(demo)
    assert main(["train", str(project), "--expert", "high"]) == 0
    out = demo / "output"
    files = hub.repos[REPO]
    assert sorted(files) == [HIGH, f"intermediate/{HIGH.removesuffix('.safetensors')}-step000002.safetensors",
                             "state/high-step00000002.pt"]
    assert files[HIGH] == (out / HIGH).read_bytes()
    assert files["state/high-step00000002.pt"] == (out / "demo_shapes_v1" / "state" / "high-step00000002.pt").read_bytes()
    assert "the files this run saved are on http://127.0.0.1" in capsys.readouterr().out

    moved = _hub_project(elsewhere)
    assert main(["train", str(moved), "--expert", "high", "--resume-from-hub", f"{REPO}@main", "--resume"]) == 2
    assert "leave out --resume" in capsys.readouterr().err
    assert main(["train", str(moved), "--expert", "high", "--resume-from-hub", "someone/empty"]) == 2
    assert "does not exist" in capsys.readouterr().err
    hub.repos["someone/no-states"] = {"README.md": b"# a pair pushed without states\n"}
    assert main(["train", str(moved), "--expert", "high", "--resume-from-hub", "someone/no-states"]) == 2
    assert "holds no training state of the high-noise expert" in capsys.readouterr().err
    # a newer state of another run (other images): refused, and never put among this run's states
    foreign = torch.load(out / "demo_shapes_v1" / "state" / "high-step00000002.pt", weights_only=True)
    foreign["identity"]["wanpair.dataset_fingerprint"] = foreign["identity"]["wanpair.media_fingerprint"] = "0" * 16
    torch.save(foreign, buffer := io.BytesIO())
    hub.repos["someone/other-run"] = {"state/high-step00000004.pt": buffer.getvalue()}
    assert main(["train", str(moved), "--expert", "high", "--resume-from-hub", "someone/other-run"]) == 2
    assert "state/high-step00000004.pt is from a run with a different set of images or captions" in capsys.readouterr().err
    run_dir = elsewhere / "output" / "demo_shapes_v1"
    assert not (run_dir / "state" / "high-step00000004.pt").exists() and not (run_dir / ".hub-download").exists()
    assert main(["train", str(moved), "--expert", "high", "--resume-from-hub", f"{REPO}@main"]) == 0
    text = capsys.readouterr().out
    assert f"fetching state/high-step00000002.pt from {REPO}@main" in text
    assert "continuing the high-noise expert from high-step00000002.pt (step 2)" in text
    first, resumed = load_file(str(out / HIGH)), load_file(str(elsewhere / "output" / HIGH))
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)


def test_training_goes_on_when_the_hub_refuses_and_says_what_was_not_pushed(demo, standin, capsys):
    hub = standin(Hub({}, token=TOKEN, refuse_writes=403))
    assert main(["train", str(_hub_project(demo)), "--expert", "high"]) == 0
    assert (demo / "output" / HIGH).is_file()
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("hub: ")]
    assert "not pushed to" in lines[0] and "403" in lines[0] and "training goes on" in lines[0]
    last = lines[-1]
    assert "failed:" in last and HIGH in last and "step000002" in last and "high-step00000002.pt" in last
    assert f"wanpair push {demo / 'wanpair.toml'} --repo {REPO} --states" in last
    assert hub.commits == []
    creates = [r for r in hub.requests if r[1].startswith("/api/repos/create")]
    assert len(creates) == 1  # refused once (403): the pusher stops asking, it does not knock at every save


def _pushed_intermediate(demo, standin):
    """A pusher for the demo's high-noise LoRA whose first intermediate LoRA has reached the stand-in hub (waited
    for, up to 10 s): (hub, pusher, final LoRA's path, intermediate LoRA's path)."""
    hub = standin(Hub({}, token=TOKEN))
    project, _ = load_project(demo / "wanpair.toml")
    project.hub.repo = REPO
    final = project.lora_path("high")
    final.parent.mkdir(parents=True, exist_ok=True)
    intermediate = final.with_name(f"{final.stem}-step000002{final.suffix}")
    intermediate.write_bytes(b"i" * 2048)
    pusher = hub_push.HubPusher(project)
    pusher.push(intermediate)
    deadline = time.monotonic() + 10
    while f"intermediate/{intermediate.name}" not in hub.repos.get(REPO, {}) and time.monotonic() < deadline:
        time.sleep(0.02)
    return hub, pusher, final, intermediate


def test_a_file_the_run_deletes_is_deleted_on_the_hub_with_the_next_commit(demo, standin, capsys):
    """keep_last removes an older intermediate LoRA: the Hub follows, so the repository holds what the run holds."""
    hub, pusher, final, older = _pushed_intermediate(demo, standin)
    assert f"intermediate/{older.name}" in hub.repos[REPO]
    older.unlink()
    final.write_bytes(b"f" * 4096)
    pusher.push(final)
    pusher.close(wait_s=10)
    assert hub.repos[REPO] == {final.name: final.read_bytes()}


def test_a_hub_state_that_is_not_a_state_is_named_as_the_hubs_file(demo, standin, capsys):
    hub = standin(Hub({}, token=TOKEN))
    hub.repos["someone/broken"] = {"state/high-step00000004.pt": b"not a training state"}
    assert main(["train", str(_hub_project(demo)), "--expert", "high", "--resume-from-hub", "someone/broken"]) == 2
    err = capsys.readouterr().err
    assert "someone/broken's state/high-step00000004.pt cannot be read as a training state" in err
    run_dir = demo / "output" / "demo_shapes_v1"
    assert not (run_dir / "state" / "high-step00000004.pt").exists() and not (run_dir / ".hub-download").exists()


def test_the_end_of_an_expert_waits_for_uploads_a_bounded_time(demo, standin, monkeypatch, capsys):
    hub = standin(Hub({}, token=TOKEN, stall_s=1.5))  # a slow link: each commit takes 1.5 s
    project, _ = load_project(demo / "wanpair.toml")
    project.hub.repo = REPO
    lora = project.lora_path("high")
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"x" * 4096)
    pusher = hub_push.HubPusher(project)
    pusher.push(lora)
    thread = pusher.thread
    started = time.perf_counter()
    pusher.close(wait_s=0.2)
    assert time.perf_counter() - started < 1.0
    assert f"still uploading after 0.2 s: {lora.name}" in capsys.readouterr().out
    thread.join(10)  # it goes on in the background, and gets there
    assert hub.repos[REPO][lora.name] == lora.read_bytes()


def test_preflight_needs_a_token_for_hub_before_any_model_loads(demo, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    project, _ = load_project(_hub_project(demo))
    with pytest.raises(WanpairError, match=r"\[hub\] repo = 'someone/shapes-pair'.*HF_TOKEN.*`hf auth login`"):
        LoraPairRecipe(project).preflight(("high", "low"))
    LoraPairRecipe(project).preflight(())  # `wanpair cache` pushes nothing: no token needed


def test_push_refuses_two_loras_that_are_not_one_runs_pair_naming_the_one_to_train_again(pair, standin, capsys):
    """`train --expert high --overwrite` on new data leaves the low-noise LoRA of the old data beside it."""
    hub = standin(Hub({}, token=TOKEN))
    out = pair / "output"
    assert safetensors_metadata(out / LOW)["modelspec.date"] < "2030"
    _rewrite_metadata(out / HIGH, **{"wanpair.dataset_fingerprint": "0" * 16,  # trained again on other images
                                     "modelspec.date": "2030-01-01T00:00:00+00:00"})
    assert main(["push", str(pair / "wanpair.toml"), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert f"{out / HIGH} and {out / LOW} are not one run's pair" in err
    assert f"`wanpair train {pair / 'wanpair.toml'} --overwrite --expert low`" in err
    assert hub.requests == [] and REPO not in hub.repos


def test_a_file_already_gone_from_the_hub_never_blocks_the_next_push(demo, standin, capsys):
    """The user deleted an intermediate LoRA on the Hub (or an earlier commit landed and its answer was lost): its
    removal, due once the run removes it too, would fail every later commit, the final LoRA's included."""
    hub, pusher, final, intermediate = _pushed_intermediate(demo, standin)
    del hub.repos[REPO][f"intermediate/{intermediate.name}"]  # deleted on the Hub
    intermediate.unlink()  # ... and by the run (keep_last): its removal is due with the next commit
    final.write_bytes(b"f" * 4096)
    pusher.push(final)
    pusher.close(wait_s=10)
    assert hub.repos[REPO] == {final.name: final.read_bytes()}
    assert "the files this run saved are on" in capsys.readouterr().out


def _hub_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("hub: ")]


def test_a_pusher_that_cannot_start_says_so_once_and_the_end_does_not_wait(demo, standin, monkeypatch, capsys):
    import huggingface_hub

    standin(Hub({}, token=TOKEN))
    project, _ = load_project(demo / "wanpair.toml")
    project.hub.repo = REPO
    lora = project.lora_path("high")
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"x" * 4096)

    def broken(*args, **kwargs):
        raise ValueError("a broken HF_ENDPOINT")

    monkeypatch.setattr(huggingface_hub, "HfApi", broken)
    pusher = hub_push.HubPusher(project)
    pusher.push(lora)
    pusher.push(lora.with_name("other.safetensors"))
    started = time.perf_counter()
    pusher.close(wait_s=5)
    assert time.perf_counter() - started < 2
    lines = _hub_lines(capsys.readouterr().out)
    assert [line for line in lines if "cannot push" in line] == [
        f"hub: cannot push to {REPO}: ValueError: a broken HF_ENDPOINT; training goes on, with no pushes this run"]
    assert f"failed: {lora.name}" in lines[-1] and "still uploading" not in lines[-1] and "wanpair push" in lines[-1]


def test_the_next_expert_does_not_wait_for_the_last_ones_uploads(demo, standin, capsys):
    """A sequential pair shares one pusher: the low-noise expert trains while the high-noise one's files upload,
    and the uploads are waited for once, when the training ends."""
    hub = standin(Hub({}, token=TOKEN, stall_s=0.2))
    assert main(["train", str(_hub_project(demo))]) == 0
    text = capsys.readouterr().out
    low_saved = next(i for i, line in enumerate(text.splitlines()) if line.startswith("saved ") and LOW in line)
    ends = [i for i, line in enumerate(text.splitlines()) if line.startswith("hub: ") and
            ("waiting up to" in line or " are on " in line or "not on" in line)]
    assert ends and min(ends) > low_saved, text
    assert _hub_lines(text)[-1].startswith("hub: the files this run saved are on http://127.0.0.1")
    assert {HIGH, LOW, "state/high-step00000002.pt", "state/low-step00000002.pt"} <= set(hub.repos[REPO])


def test_a_stop_waits_a_few_seconds_for_uploads_then_says_what_is_not_pushed(demo, standin, monkeypatch, capsys):
    standin(Hub({}, token=TOKEN, stall_s=1.0))  # a slow link
    monkeypatch.setattr(hub_push, "STOP_S", 0.2)
    monkeypatch.setattr(ExpertTraining, "agree", lambda self, signum: True)  # Ctrl-C after the first step
    project = _hub_project(demo)
    started = time.perf_counter()
    assert main(["train", str(project), "--expert", "high"]) == 128 + 15
    assert time.perf_counter() - started < 15
    last = _hub_lines(capsys.readouterr().out)[-1]
    assert "still uploading after 0.2 s" in last and "partial-step000001" in last
    assert f"`wanpair push {project} --repo {REPO} --states`" in last
    for thread in [t for t in threading.enumerate() if t.name == "hub-push"]:
        thread.join(10)  # it goes on in the background until the process ends


def test_hub_repo_is_checked_as_huggingface_hub_checks_it(demo):
    with open(demo / "wanpair.toml", "a") as f:
        f.write('\n[hub]\nrepo = "someone/bad--name"\n')
    with pytest.raises(WanpairError, match=re.escape(f"{demo / 'wanpair.toml'}: [hub] repo = 'someone/bad--name' "
                                                     "should be USER/NAME")):
        load_project(demo / "wanpair.toml")


def _imported(path: Path, package: str) -> set[str]:
    """The modules a source file imports, relative imports resolved against its `package`; `from X import y`
    gives X and X.y (y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_training_imports_nothing_of_sharing_and_the_hub_plumbing_imports_neither():
    """data -> cache -> train -> export: training's Hub code and `wanpair push`'s share `wanpair.hub`, and
    nothing under train imports export's Hub modules (which import train's metadata and states)."""
    src = Path(hub_push.__file__).parents[1]  # src/wanpair
    for path in (src / "train").glob("*.py"):
        sharing = {m for m in _imported(path, "wanpair.train")
                   if m.startswith(("wanpair.export.hub", "wanpair.export.model_card"))}
        assert not sharing, f"{path.name} imports {sharing}"
    assert not {m for m in _imported(src / "hub.py", "wanpair") if m.startswith(("wanpair.train", "wanpair.export"))}


def test_the_readme_and_help_say_every_command_that_uses_the_network():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for text in (readme, DESCRIPTION):
        said = next(p for p in text.split("\n\n") if "network" in p)
        assert "[hub]" in said and "--resume-from-hub" in said and "wandb" in said, said
