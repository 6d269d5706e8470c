"""`wanpair caption` on a tiny random Qwen2.5-VL (the real classes, tokenizer and image-processor classes, saved as
the hub's folder is; `wanpair.demo.make_captioner`): which files get captions, what the model is shown (the
prompt, a clip's frames), what happens to files it cannot read, the refusals before any weight loads, and
`wanpair download --captioner` against a stand-in hub."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from hub_standin import Hub, running
from test_video import write_mp4
from wanpair import caption
from wanpair.caption import DEFAULT_PROMPT, clean_caption, sample_frames, spread, with_trigger
from wanpair.cli import main
from wanpair.demo import TINY_CAPTIONER, make_captioner
from wanpair.models.fp8 import Fp8Linear
from wanpair.project import load_project
from wanpair.setup.download import CAPTIONER_FILES
from wanpair.setup.scaffold import set_models_table


@pytest.fixture(scope="session")
def captioner(tmp_path_factory):
    """The tiny captioner's folder, named as `wanpair download --captioner` names it. Do not modify."""
    return make_captioner(tmp_path_factory.mktemp("models") / caption.CAPTIONER_DIR, **TINY_CAPTIONER)


@pytest.fixture(autouse=True)
def short_captions(monkeypatch):
    """12 new tokens, not 300: random weights never stop by themselves, and the tests read no prose."""
    monkeypatch.setattr(caption, "MAX_NEW_TOKENS", 12)


@pytest.fixture
def media(tmp_path):
    """Two images, a 20-frame mp4 and a 5-frame one."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "img_01.png")
    Image.new("RGB", (64, 80), (30, 200, 30)).save(folder / "img_02.jpg")
    write_mp4(folder / "clip_01.mp4", frames=20)
    write_mp4(folder / "clip_02.mp4", frames=5)
    return folder


def test_folders_of_frames_are_clips_but_not_beside_image_files(media, captioner, tmp_path):
    """A folder of frames is a clip in a folder of clips; beside image files it is not (an image dataset's
    `originals/`), as training reads them (`wanpair.data.media`)."""
    (media / "originals").mkdir()
    Image.new("RGB", (64, 48)).save(media / "originals" / "000.png")
    clips = tmp_path / "clips"
    (clips / "clip_01").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(clips / "clip_01" / f"{i:03d}.png")
    assert _caption(media, captioner) == 0 and _caption(clips, captioner) == 0
    assert not (media / "originals.txt").exists() and (clips / "clip_01.txt").read_text().strip()


def test_a_caption_written_while_captioning_runs_is_kept(media, captioner, monkeypatch):
    """Between the start (when img_02 had no caption) and its turn, its caption was written in the dashboard."""
    original = caption.Captioner.caption

    def meanwhile(self, batch):
        (media / "img_02.txt").write_text("typed in the page\n")
        return original(self, batch)

    monkeypatch.setattr(caption.Captioner, "caption", meanwhile)
    assert _caption(media, captioner) == 0
    assert (media / "img_02.txt").read_text() == "typed in the page\n" and (media / "img_01.txt").read_text().strip()


def test_a_dataset_toml_decides_the_kind_and_the_caption_extension(media, captioner):
    (media / "dataset.toml").write_text('[general]\nresolution = [64, 64]\ncaption_extension = ".caption"\n\n'
                                        f'[[datasets]]\nimage_directory = "{media}"\n')
    assert _caption(media, captioner) == 0
    assert sorted(p.name for p in media.glob("*.caption")) == ["img_01.caption", "img_02.caption"]
    assert not list(media.glob("*.txt"))  # an image dataset: its clips are not what it trains on


@pytest.fixture
def seen(monkeypatch):
    """Every `generate` call's inputs, as the model received them (the model itself included)."""
    calls = []
    original = Qwen2_5_VLForConditionalGeneration.generate

    def spy(model, **inputs):
        calls.append({"model": model, **inputs})
        return original(model, **inputs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", spy)
    return calls


def _caption(folder, captioner, *argv) -> int:
    return main(["caption", str(folder), "--captioner", str(captioner), *argv])


def test_every_image_and_clip_gets_its_caption_beside_it_with_the_trigger_first(media, captioner, capsys):
    assert _caption(media, captioner, "--trigger", "sks person") == 0
    out = capsys.readouterr().out
    assert "written 4: clip_01.txt, clip_02.txt, img_01.txt, img_02.txt" in out
    for name in ("img_01", "img_02", "clip_01", "clip_02"):
        text = (media / f"{name}.txt").read_text()
        assert text.startswith("sks person, ") and text.endswith("\n") and text.count("\n") == 1  # one paragraph
    assert sorted(p.name for p in media.glob("*.txt")) == ["clip_01.txt", "clip_02.txt", "img_01.txt", "img_02.txt"]


def test_captions_there_are_kept_unless_force_and_dry_run_writes_nothing(media, captioner, seen, capsys):
    (media / "img_01.txt").write_text("my own words\n")
    (media / "img_02.txt").write_text("  \n")  # empty: `wanpair check` calls it missing, so it is written
    assert _caption(media, captioner) == 0
    out = capsys.readouterr().out
    assert (media / "img_01.txt").read_text() == "my own words\n"
    assert "skipped 1 (a caption is there; --force replaces it): img_01.txt" in out
    assert (media / "img_02.txt").read_text().strip()
    before = {p.name: p.read_bytes() for p in media.glob("*.txt")}
    seen.clear()
    assert _caption(media, captioner) == 0  # nothing to caption: no model loads
    assert seen == [] and "written 0" in capsys.readouterr().out

    assert _caption(media, captioner, "--force", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would write img_01.txt: " in out and "would write 4" in out
    assert {p.name: p.read_bytes() for p in media.glob("*.txt")} == before
    assert not list(media.glob(".*.tmp"))

    assert _caption(media, captioner, "--force") == 0
    assert (media / "img_01.txt").read_text() != "my own words\n"


def test_a_clip_reaches_the_model_as_frames_spread_across_it(media, captioner, seen):
    assert _caption(media, captioner, "--batch-size", "1") == 0
    frames = [len(call["image_grid_thw"]) for call in seen]  # one row per picture the model is shown
    assert frames == [caption.CLIP_FRAMES, 5, 1, 1]  # clip_01.mp4 (20 frames), clip_02/ (5), img_01, img_02
    assert spread(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19] and spread(5, 8) == [0, 1, 2, 3, 4]
    # write_mp4's frame i is grey level 12 i: the frames picked are the first, the last and those between
    # (the tolerance covers H.264's rounding of a flat grey, a level or two)
    levels = [float(np.asarray(f).mean()) for f in sample_frames(media / "clip_01.mp4")]
    assert np.allclose(levels, [12 * i for i in spread(20, 8)], atol=3), levels


def test_a_file_that_cannot_be_read_or_captioned_is_reported_and_the_rest_go_on(media, captioner, seen, monkeypatch,
                                                                                capsys):
    (media / "broken.png").write_bytes(b"\x89PNG not really")
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + b"garbage" * 50)
    spy = Qwen2_5_VLForConditionalGeneration.generate

    def fails_on_five_frames(model, **inputs):  # the captioner itself fails on clip_02's 5 frames (13 pictures:
        if len(inputs["image_grid_thw"]) in (5, 13):  # batched with clip_01's 8, then alone)
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return spy(model, **inputs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", fails_on_five_frames)
    assert _caption(media, captioner, "--batch-size", "2") == 1
    out = capsys.readouterr().out
    assert "written 3: clip_01.txt, img_01.txt, img_02.txt" in out
    assert "failed 3:" in out
    assert "  broken.mp4: cannot be read (cannot decode video" in out
    assert "  broken.png: cannot be read (cannot identify image file" in out
    assert "  clip_02.mp4: the captioner failed (RuntimeError: CUDA out of memory (a stand-in))" in out
    assert not (media / "broken.txt").exists() and not (media / "clip_02.txt").exists()


def test_the_prompt_is_what_the_model_reads_and_a_prompt_file_replaces_it(media, captioner, seen, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(captioner)
    assert _caption(media, captioner, "--dry-run") == 0
    shown = tokenizer.decode(seen[0]["input_ids"][0], skip_special_tokens=True)
    assert DEFAULT_PROMPT in shown
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe only the light, in ten words.\n")
    seen.clear()
    assert _caption(media, captioner, "--dry-run", "--prompt", str(prompt)) == 0
    shown = tokenizer.decode(seen[0]["input_ids"][0], skip_special_tokens=True)
    assert "Describe only the light, in ten words." in shown and DEFAULT_PROMPT[:40] not in shown
    # each picture's one placeholder became one token per 2x2 merged patch, as the model counts them
    image_tokens = (seen[0]["input_ids"] == seen[0]["model"].config.image_token_id).sum().item()
    assert image_tokens == (seen[0]["image_grid_thw"].prod(-1) // 4).sum().item()

    prompt.write_text("\n")
    seen.clear()
    capsys.readouterr()
    assert _caption(media, captioner, "--prompt", str(prompt)) == 2
    assert f"--prompt {prompt} is empty" in capsys.readouterr().err and seen == []


def test_refusals_come_before_any_weight_loads(media, captioner, monkeypatch, tmp_path, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", no_loading)
    monkeypatch.setattr(caption, "CPU_LIMIT", 1000)  # the tiny model stands for the 7B
    assert _caption(media, captioner, "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "on the CPU it would take minutes per image. Caption on a machine with a CUDA GPU" in err
    assert _caption(media, tmp_path / "nowhere") == 2
    assert f"no captioner in {tmp_path / 'nowhere'} (no config.json): run `wanpair download --captioner`" in \
        capsys.readouterr().err
    assert not list(media.glob("*.txt"))


def test_fp8_weights_store_the_language_model_and_caption_as_well(media, captioner, seen):
    assert _caption(media, captioner, "--precision", "fp8") == 0
    model = seen[0]["model"]
    linears = {n: type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj", "qkv", "lm_head"))}
    assert {n: t for n, t in linears.items() if ".layers." in n} and \
        all(t is Fp8Linear for n, t in linears.items() if ".layers." in n)
    assert all(t is not Fp8Linear for n, t in linears.items() if ".layers." not in n)  # the vision tower, the head
    assert len(list(media.glob("*.txt"))) == 4


def test_what_the_model_writes_becomes_one_plain_paragraph():
    assert clean_caption('**Caption:** "A woman walks.\n\n- She smiles.\n## Light\nSoft light."') == \
        "A woman walks. She smiles. Light Soft light."
    assert clean_caption("A man runs. He jumps over a fen", cut=True) == "A man runs."
    assert clean_caption("A man runs. He jumps over a fen") == "A man runs. He jumps over a fen"
    assert with_trigger("a woman walks.", "sks person") == "sks person, a woman walks."
    assert with_trigger("sks person, a woman walks.", "sks person,") == "sks person, a woman walks."


def test_init_caption_writes_the_missing_captions_first_and_check_reads_them(media, captioner, tmp_path, capsys):
    for p in ("clip_01.mp4", "clip_02.mp4"):  # an image dataset
        (media / p).unlink()
    (media / "img_02.txt").write_text("a green square\n")
    project = tmp_path / "wanpair.toml"
    assert main(["init", str(media), "--caption", "--trigger", "sks", "--models", str(captioner.parent),
                 "--project", str(project)]) == 0
    assert "written 1: img_01.txt" in capsys.readouterr().out
    assert (media / "img_01.txt").read_text().startswith("sks, ")
    main(["check", str(media / "dataset.toml"), "--captions"])
    out = capsys.readouterr().out
    assert "0 errors" in out and "img_02.jpg: a green square" in out and "img_01.png: sks, " in out


def test_init_refuses_what_it_would_refuse_before_a_captioner_loads(media, captioner, tmp_path, seen, capsys):
    for p in ("clip_01.mp4", "clip_02.mp4"):  # an image dataset
        (media / p).unlink()
    project = tmp_path / "wanpair.toml"
    project.write_text('name = "mine"\n[models]\n[train]\n')  # a whole project: init does not replace it
    assert main(["init", str(media), "--caption", "--models", str(captioner.parent), "--project", str(project)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and not seen and not list(media.glob("*.txt"))


def test_the_project_may_name_the_captioner_and_a_models_download_keeps_it(media, captioner, tmp_path, seen):
    project = tmp_path / "wanpair.toml"
    project.write_text('name = "x"\nmodel = "t2v-A14B"\n[models]\nhigh_noise = "h.safetensors"\n'
                       'low_noise = "l.safetensors"\nvae = "v.safetensors"\nt5 = "t5.pth"\ntokenizer = "tok"\n'
                       f'captioner = "{captioner}"\n[dataset]\nconfig = "dataset.toml"\n')
    assert load_project(project)[0].models.captioner == captioner
    assert main(["caption", str(media), "--project", str(project)]) == 0 and seen  # found through the project
    downloaded = {k: tmp_path / k for k in ("high_noise", "low_noise", "vae", "t5", "tokenizer")}
    set_models_table(project, downloaded)  # what `wanpair download` does to [models]
    assert f'captioner  = "{captioner}"' in project.read_text()
    project.write_text(project.read_text().replace(f'"{captioner}"', '""'))  # "" = not set, as for no captioner
    assert load_project(project)[0].models.captioner is None


def test_download_captioner_fetches_its_files_into_their_folder_verified(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    files = {f.path: hashlib.sha256(f.path.encode()).digest() * (64 if f.path.endswith(".safetensors") else 4)
             for f in CAPTIONER_FILES}
    hub = Hub({caption.CAPTIONER_REPO: files})
    models, project = tmp_path / "models", tmp_path / "wanpair.toml"
    args = ["download", "--captioner", "--dir", str(models), "--project", str(project)]
    with running(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert main(args) == 0
        for path, data in files.items():
            assert (models / caption.CAPTIONER_DIR / path).read_bytes() == data
        assert f"the captioner is in {models / caption.CAPTIONER_DIR} and verified" in capsys.readouterr().out
        assert not project.exists()  # the project is left as it is
        assert json.loads((models / ".wanpair-verified.json").read_text()).keys() == \
            {f"{caption.CAPTIONER_DIR}/{p}" for p in files}
        hub.requests.clear()
        assert main(args) == 0
        assert not [r for r in hub.requests if "/resolve/" in r[1]]  # verified before, unchanged: nothing fetched
