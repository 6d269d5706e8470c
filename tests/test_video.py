"""Video datasets: files and folders of frames, frame extraction, caching and training end to end."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import set_train
from wanpair.data.dataset_config import load_dataset_config
from wanpair.data.items import check_dataset
from wanpair.data.video import clip_ranges
from wanpair.project import load_project
from wanpair.setup.doctor import batch_sizes
from wanpair.train.recipe import LoraPairRecipe


def write_mp4(path, frames=20, size=(64, 48)):
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), (i * 12) % 256, dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        c.mux(s.encode())


def make_videos(folder, toml_extra="", target_frames="[1, 5, 9]"):
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(folder / "clip_a.mp4", frames=20)
    (folder / "clip_a.txt").write_text("a grey square fading in\n")
    (folder / "clip_b").mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(folder / "clip_b" / f"{i:03d}.png")
    (folder / "clip_b.txt").write_text("a red square getting brighter\n")
    (folder / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\nenable_bucket = true\n'
        f'[[datasets]]\nvideo_directory = "."\ntarget_frames = {target_frames}\n{toml_extra}')
    return folder / "dataset.toml"


def test_frame_extraction_modes_match_the_reference_trainer(tmp_path):
    spec = load_dataset_config(make_videos(tmp_path))[0]
    assert clip_ranges(20, spec) == [(0, 1), (0, 5), (0, 9)]  # head
    for mode, expected in (("chunk", [(i, 1) for i in range(20)] + [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)]),
                           ("full", [(0, 17)])):
        spec = load_dataset_config(make_videos(tmp_path / mode, f'frame_extraction = "{mode}"\n'))[0]
        assert clip_ranges(20, spec) == expected
    spec = load_dataset_config(make_videos(tmp_path / "u", 'frame_extraction = "uniform"\nframe_sample = 3\n', "[9]"))[0]
    assert clip_ranges(20, spec) == [(0, 9), (5, 9), (11, 9)]
    spec = load_dataset_config(make_videos(tmp_path / "s", 'frame_extraction = "slide"\nframe_stride = 4\n', "[9]"))[0]
    assert clip_ranges(20, spec) == [(0, 9), (4, 9), (8, 9)]


def test_bad_target_frames_are_refused(tmp_path):
    from wanpair.errors import WanpairError

    with pytest.raises(WanpairError, match="4k\\+1"):
        load_dataset_config(make_videos(tmp_path, target_frames="[1, 8]"))


def test_check_reports_clips_and_broken_videos(tmp_path):
    toml = make_videos(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + b"garbage" * 50)
    (tmp_path / "broken.txt").write_text("nothing to see")
    report = check_dataset(load_dataset_config(toml))
    clips = sorted((it.image.name, it.frames) for it in report.items)
    assert clips == [("clip_a.mp4", 1), ("clip_a.mp4", 5), ("clip_a.mp4", 9), ("clip_b", 1), ("clip_b", 5)]
    assert any("broken.mp4: cannot be read as a video" in e for e in report.errors)
    assert "frames" in report.render()


def test_video_dataset_trains_end_to_end(demo, tmp_path, monkeypatch):
    import wanpair.cache

    decoded = []
    real_read = wanpair.cache.clip_frames
    monkeypatch.setattr(wanpair.cache, "clip_frames", lambda p, *a: decoded.append((p.name, a[1], a[2])) or real_read(p, *a))
    make_videos(demo / "videos")
    text = (demo / "wanpair.toml").read_text().replace('config = "dataset/dataset.toml"', 'config = "videos/dataset.toml"')
    (demo / "wanpair.toml").write_text(text)
    set_train(demo / "wanpair.toml", epochs=1)
    project, _ = load_project(demo / "wanpair.toml")
    recipe = LoraPairRecipe(project, overwrite=True)
    results = recipe.run(("low",))
    nine = next(i for i, it in enumerate(recipe.items) if it.frames == 9)
    latent = load_file(recipe.cache_plan.latent_paths[nine])["value"]
    assert latent.shape == (16, 3, 6, 8)  # (9 - 1) / 4 + 1 latent frames of 48x64 / 8
    # the doctor's count of the DiT's tokens (its speed estimate), against the cached latents: 2x2 patches
    assert batch_sizes(recipe) == {(f * (h // 2) * (w // 2), 1) for f, h, w in
                                   {load_file(p)["value"].shape[1:] for p in recipe.cache_plan.latent_paths}}
    assert (3 * 3 * 4, 1) in batch_sizes(recipe)
    assert results[0].steps == 5 and results[0].lora.exists()
    assert sorted(decoded) == sorted((it.image.name, it.start, it.frames) for it in recipe.items)  # each clip alone


def test_a_clip_is_decoded_alone_at_its_buckets_size_and_check_decodes_nothing(tmp_path, monkeypatch):
    """Host memory stays one clip at its bucket's size: `check` reads a video's facts from its container (no
    frame decoded), and the cache decodes only the frames a clip uses, cut to the bucket as each arrives, then
    stops. Resampled from source_fps, frame k of the clip is source frame int(k * fps / 16)."""
    from wanpair.data import video

    write_mp4(tmp_path / "long.mp4", frames=40, size=(96, 64))
    decoded, real = [], av.open

    class Counting:  # the container, counting the frames decoded from it
        def __init__(self, *args, **kwargs):
            self.container = real(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(len(decoded))
                yield frame

    monkeypatch.setattr(av, "open", Counting)
    assert video.video_facts(tmp_path / "long.mp4", None) == (40, (96, 64)) and decoded == []
    assert video.video_facts(tmp_path / "long.mp4", 32.0) == (20, (96, 64))  # at 16 fps: every other frame
    clip = video.clip_frames(tmp_path / "long.mp4", 32.0, 2, 5, (48, 32))
    assert clip.shape == (5, 32, 48, 3) and len(decoded) == 13  # source frames 0..12 (it uses 4, 6, ..., 12), then it stopped
    levels = clip[:, 16, 24].mean(axis=1)  # the grey level write_mp4 gives frame i: i * 12 (within the codec's error)
    assert np.all(np.abs(levels - np.array([4, 6, 8, 10, 12]) * 12) < 6)


def test_a_video_damaged_after_its_header_is_named_when_its_clip_is_read(tmp_path):
    """`check` reads the container's facts only; a stream cut short shows when the cache reads the clip, and is
    then named with what to do, not a traceback."""
    from wanpair.cache import pixels
    from wanpair.errors import WanpairError

    toml = make_videos(tmp_path, target_frames="[17]")
    (item,) = [it for it in check_dataset(load_dataset_config(toml)).items if it.image.name == "clip_a.mp4"]
    data = (tmp_path / "clip_a.mp4").read_bytes()
    (tmp_path / "clip_a.mp4").write_bytes(data[:len(data) // 2])
    with pytest.raises(WanpairError, match=r"clip_a\.mp4: .*Re-export the video"):
        pixels(item)
