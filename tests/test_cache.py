"""Caches keyed by content: edits re-encode exactly what changed, nothing stale is read."""

from __future__ import annotations

import torch

from wanpair.cli import main
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe


def _cache(demo):
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project, overwrite=True)
    recipe.preflight(())
    return recipe, recipe.prepare_caches()


def test_first_run_encodes_all_second_reuses_all(demo):
    _, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded) == (18, 18)
    _, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded, stats.latents_reused, stats.texts_reused) == (0, 0, 18, 18)


def test_editing_one_caption_re_encodes_exactly_that_caption(demo):
    _cache(demo)
    (demo / "dataset" / "img_05.txt").write_text("a brand new caption\n")
    recipe, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded) == (0, 1)
    i = next(i for i, it in enumerate(recipe.items) if it.image.name == "img_05.png")
    assert recipe.cache_plan.text_paths[i].exists()


def test_replacing_an_image_re_encodes_only_its_latent(demo):
    _cache(demo)
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(demo / "dataset" / "img_02.png")
    _, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded) == (1, 0)


def test_swapping_the_vae_re_encodes_every_latent(demo):
    _cache(demo)
    vae = demo / "models" / "wan_2.1_vae_tiny.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(vae)
    sd["encoder.conv1.bias"] = sd["encoder.conv1.bias"] + 0.5
    save_file(sd, str(vae))
    _, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded) == (18, 0)


def test_a_half_written_cache_file_is_never_read(demo, caplog):
    recipe, _ = _cache(demo)
    victim = recipe.cache_plan.latent_paths[0]
    victim.write_bytes(victim.read_bytes()[:40])
    _, stats = _cache(demo)
    assert stats.latents_encoded == 1
    assert not list(victim.parent.glob(".*.tmp"))  # no temp files left behind
    # the message says what happened and that wanpair rebuilds it; no advice meant for model files
    (message,) = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert "damaged" in message and "encoding it again" in message and "nothing for you to do" in message
    assert "download" not in message.lower()


def test_cached_latents_are_normalised_vae_means_of_the_bucket(demo):
    recipe, _ = _cache(demo)
    from safetensors.torch import load_file

    i = next(i for i, it in enumerate(recipe.items) if it.bucket == (80, 48))
    lat = load_file(recipe.cache_plan.latent_paths[i])["value"]
    assert lat.shape == (16, 1, 6, 10) and lat.dtype == torch.float32  # 48x80 px / 8, one frame
    text = load_file(recipe.cache_plan.text_paths[i])["value"]
    assert text.shape[1] == 32 and text.shape[0] < 20  # true length, not padded to 512


def test_cache_cli(demo, capsys):
    assert main(["cache", str(demo / "wanpair.toml")]) == 0
    assert "latents: 18 encoded, 0 reused; text: 18 encoded, 0 reused" in capsys.readouterr().out


def test_stale_entries_are_listed_and_pruned_and_nothing_else_is_touched(demo, capsys):
    _cache(demo)
    cache = demo / "dataset" / "cache"
    (demo / "dataset" / "img_05.txt").write_text("a brand new caption\n")
    (cache / ".text_abc.safetensors.x1y2.tmp").write_bytes(b"torn")  # a write that a kill interrupted
    (cache / "notes.txt").write_text("mine")  # not wanpair's: never touched
    before = set(cache.iterdir())
    assert main(["cache", str(demo / "wanpair.toml")]) == 0
    assert "2 stale cache entries" in capsys.readouterr().out  # the old caption's entry and the temp file
    assert before <= set(cache.iterdir())  # listing removes nothing
    assert main(["cache", str(demo / "wanpair.toml"), "--prune"]) == 0
    assert "removed 2 stale cache entries" in capsys.readouterr().out
    assert (cache / "notes.txt").exists() and not list(cache.glob(".*.tmp"))
    _, stats = _cache(demo)
    assert (stats.latents_encoded, stats.texts_encoded) == (0, 0)  # everything still in use stayed
