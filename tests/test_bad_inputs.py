"""Every awkward input either works correctly or gets a clear error: never a traceback, never a bad cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from wanpair.cache import pixels
from wanpair.data.dataset_config import load_dataset_config
from wanpair.data.items import check_dataset
from wanpair.errors import WanpairError
from wanpair.project import load_project

TOML = '[general]\nresolution = [64, 64]\nenable_bucket = true\n[[datasets]]\nimage_directory = "."\n'


def _report(folder: Path):
    (folder / "dataset.toml").write_text(TOML)
    return check_dataset(load_dataset_config(folder / "dataset.toml"))


def test_odd_image_modes_and_exif_rotation_load_as_rgb(tmp_path):
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    rotated = Image.new("RGB", (96, 64), (0, 255, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (64, 64)).save(tmp_path / "café au lait 1.png")
    for stem in ("cmyk", "sixteen", "alpha", "palette", "rotated", "café au lait 1"):
        (tmp_path / f"{stem}.txt").write_text(f"caption for {stem}")
    report = _report(tmp_path)
    assert not report.errors, report.render()
    items = {it.image.stem: it for it in report.items}
    assert items["rotated"].size == (64, 96)  # EXIF orientation honoured: portrait
    assert items["sixteen"].size == (64, 64)
    for it in items.values():
        px = pixels(it)
        assert px.shape == (3, 1, it.bucket[1], it.bucket[0]) and px.min() >= -1 and px.max() <= 1
    assert pixels(items["sixteen"]).max() == 1.0  # full-scale 16-bit white stays white
    assert pixels(items["cmyk"])[0].mean() < -0.5  # CMYK cyan has no red


def test_bad_captions_and_files_are_reported_not_raised(tmp_path):
    for i in range(4):
        Image.new("RGB", (64, 64), (i, i, i)).save(tmp_path / f"img_{i}.png")
    (tmp_path / "img_0.txt").write_bytes(b"")  # zero-byte caption
    (tmp_path / "img_1.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8
    (tmp_path / "img_2.txt").write_bytes("\ufeffa caption with a byte-order mark".encode())
    (tmp_path / "img_3.txt").write_text("word " * 10_000)
    (tmp_path / "empty.png").write_bytes(b"")  # zero-byte image
    (tmp_path / "empty.txt").write_text("x")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")  # a symlink loop
    report = _report(tmp_path)
    text = report.render()
    assert "img_0.txt: caption is empty" in text
    assert "img_1.txt: caption is not UTF-8" in text
    assert "empty.png: cannot be read as an image" in text
    captions = {it.image.name: it.caption for it in report.items}
    assert captions["img_2.png"] == "a caption with a byte-order mark"
    assert captions["img_3.png"].startswith("word word")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_dataset_toml_text_parses_or_gives_a_wanpair_error(tmp_path, text):
    path = tmp_path / "d.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_dataset_config(path)
    except WanpairError:
        return  # a clear error is an accepted outcome; any other exception fails the test


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["rank", "alpha", "epochs", "learning_rate", "optimizer", "lr_scheduler",
                                        "optimizer_args", "seed", "fp8_base", "mixed_precision", "bogus"]),
                       st.one_of(st.integers(-5, 50), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                                 st.text(max_size=8), st.lists(st.text(max_size=5), max_size=2)), max_size=5))
def test_any_train_table_parses_or_gives_a_wanpair_error(tmp_path, table):
    import json

    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    (tmp_path / "p.toml").write_text('name = "x"\n[models]\nhigh_noise="a"\nlow_noise="b"\nvae="c"\nt5="d"\n'
                                     f'tokenizer="e"\n[dataset]\nconfig="f"\n[train]\n{lines}')
    try:
        load_project(tmp_path / "p.toml")
    except WanpairError:
        return  # a clear error is an accepted outcome; any other exception fails the test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_caption_bytes_are_read_or_reported(tmp_path, data):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(data)
    report = _report(tmp_path)
    assert len(report.items) + len(report.errors) == 1


def test_a_prompts_file_that_is_not_utf8_or_not_there_is_named_with_the_fix(tmp_path):
    from wanpair.project import read_prompts

    latin = tmp_path / "prompts.txt"
    latin.write_bytes(b"a caf\xe9 at dusk\n")
    with pytest.raises(WanpairError, match="not UTF-8") as e:
        read_prompts(latin)
    assert str(latin) in str(e.value) and "save it as UTF-8" in str(e.value)
    with pytest.raises(WanpairError, match="cannot read the prompts file") as e:
        read_prompts(tmp_path / "missing.txt")
    assert str(tmp_path / "missing.txt") in str(e.value)
    (tmp_path / "ok.txt").write_text("one\n\n  two  \n", encoding="utf-8")
    assert read_prompts(tmp_path / "ok.txt") == ["one", "two"]


def test_a_folder_given_for_a_toml_file_names_the_toml_files_in_it(tmp_path, capsys):
    from wanpair.cli import main

    (tmp_path / "dataset.toml").write_text(TOML)
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder; give a .toml file in it: {tmp_path / 'dataset.toml'}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", str(empty)]) == 2
    assert f"{empty} is a folder; give a .toml file. Give a wanpair.toml project" in capsys.readouterr().err
