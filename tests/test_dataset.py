"""dataset.toml parsing, bucketing and `wanpair check` on small fixture datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from wanpair.cli import main
from wanpair.data.buckets import bucket_set, choose_bucket, resize_and_crop
from wanpair.data.dataset_config import load_dataset_config
from wanpair.data.items import check_dataset
from wanpair.errors import WanpairError

TOML = """[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = true
[[datasets]]
image_directory = "."
"""


def make(tmp_path: Path, n=3, size=(64, 64), toml=TOML) -> Path:
    for i in range(n):
        Image.new("RGB", size, (10 * i, 100, 200)).save(tmp_path / f"img_{i}.png")
        (tmp_path / f"img_{i}.txt").write_text(f"picture number {i}\n")
    (tmp_path / "dataset.toml").write_text(toml)
    return tmp_path / "dataset.toml"


def test_bucket_set_matches_the_reference_trainer():
    buckets = bucket_set((960, 960))
    assert len(buckets) == 61 and buckets[0] == (480, 1920) and buckets[-1] == (1920, 480)
    assert (960, 960) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)


def test_bucket_choice_and_crop():
    assert choose_bucket((1920, 1080), (960, 960), True, False) == (1280, 720)
    assert choose_bucket((500, 300), (960, 960), True, True) == (496, 288)  # no upscale: own size, /16
    assert choose_bucket((500, 300), (960, 544), False, False) == (960, 544)  # buckets off: the resolution
    arr = resize_and_crop(Image.new("RGB", (300, 100), (255, 0, 0)), (64, 48))
    assert arr.shape == (48, 64, 3)


def test_general_defaults_and_per_dataset_overrides(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "d.toml").write_text('[general]\nresolution = 512\nnum_repeats = 2\n'
                                     '[[datasets]]\nimage_directory = "a"\n'
                                     '[[datasets]]\nimage_directory = "b"\nresolution = [960, 544]\nnum_repeats = 5\n'
                                     'cache_directory = "cache_b"\n')
    a, b = load_dataset_config(tmp_path / "d.toml")
    assert a.resolution == (512, 512) and a.num_repeats == 2 and a.cache_dir == tmp_path / "a" / "cache"
    assert b.resolution == (960, 544) and b.num_repeats == 5 and b.cache_dir == tmp_path / "cache_b"


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    (tmp_path / "d.toml").write_text('[general]\nresolutoin = [64, 64]\n[[datasets]]\nimage_directory = "."\nnum_repeat = 2\n')
    with pytest.raises(WanpairError) as e:
        load_dataset_config(tmp_path / "d.toml")
    assert "'resolutoin'" in str(e.value) and "Did you mean 'resolution'?" in str(e.value)
    assert "'num_repeat'" in str(e.value) and "Did you mean 'num_repeats'?" in str(e.value)


def test_clean_dataset_passes(tmp_path):
    report = check_dataset(load_dataset_config(make(tmp_path)))
    assert not report.errors and not report.warnings and len(report.items) == 3
    assert "64 x 64" in report.render()


def test_check_finds_every_problem_at_once(tmp_path):
    toml = make(tmp_path, n=6)
    (tmp_path / "img_0.txt").unlink()  # image without caption
    (tmp_path / "orphan.txt").write_text("no image for me")  # caption without image
    (tmp_path / "img_1.txt").write_text("   \n")  # empty caption
    data = (tmp_path / "img_2.png").read_bytes()
    (tmp_path / "img_2.png").write_bytes(data[: len(data) // 2])  # truncated image
    shutil.copy(tmp_path / "img_3.png", tmp_path / "img_4.png")  # duplicate content
    Image.new("RGB", (20, 20)).save(tmp_path / "img_5.png")  # smaller than its bucket
    report = check_dataset(load_dataset_config(toml))
    text = report.render()
    assert "img_0.png: no caption file img_0.txt" in text
    assert "orphan.txt: caption without an image" in text
    assert "img_1.txt: caption is empty" in text
    assert "img_2.png: cannot be read as an image" in text
    assert "img_4.png: same content as" in text
    assert "img_5.png: 20x20 is smaller than its bucket 64x64" in text
    assert len(report.errors) == 3 and len(report.warnings) == 3


def test_check_cli_exit_codes(tmp_path, capsys):
    toml = make(tmp_path)
    assert main(["check", str(toml)]) == 0
    (tmp_path / "img_1.txt").unlink()
    assert main(["check", str(toml)]) == 1
    assert "no caption file img_1.txt" in capsys.readouterr().out


def test_check_counts_caption_tokens_with_the_projects_tokenizer(demo, capsys):
    (demo / "dataset" / "img_01.txt").write_text(" ".join(["red"] * 600))
    assert main(["check", str(demo / "wanpair.toml")]) == 1
    assert "img_01.txt: caption is 601 tokens; only the first 512 are used" in capsys.readouterr().out


def test_media_are_hashed_a_piece_at_a_time_with_the_hashes_caches_are_keyed_by(demo_root, tmp_path):
    """The content hash that keys the latent cache: an image's is the sha256 of its bytes, a frame folder's of each
    frame's name and bytes (as before: existing caches stay valid); a file of 256 MiB (a long video, or one planted
    in a folder the dashboard checks) is read a piece at a time, never held whole."""
    import hashlib
    import tracemalloc

    from wanpair.data.video import content_hash

    image = demo_root / "dataset" / "img_01.png"
    assert content_hash(image) == hashlib.sha256(image.read_bytes()).hexdigest()
    frames = tmp_path / "clip"
    frames.mkdir()
    for name in ("f1.png", "f0.png"):
        shutil.copy(image, frames / name)
    expected = hashlib.sha256()
    for name in ("f0.png", "f1.png"):
        expected.update(name.encode() + image.read_bytes())
    assert content_hash(frames) == expected.hexdigest()
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        digest = content_hash(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == "a6d72ac7690f53be6ae46ba88506bd97302a093f7108472bd9efc3cefda06484"  # 256 MiB of zeros
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB held at once"
