"""Musubi-Tuner's `dataset.toml`, read as it is, so users bring the file they already have.

Format (Musubi-Tuner `dataset/config_utils.py`): a `[general]` table whose keys are defaults for
every `[[datasets]]` entry, and one entry per image or video dataset. Keys not in that format are an
error naming the closest valid key, because a typo (`num_repeat`) otherwise silently does nothing.

wanpair adds one table Musubi does not have: `[[validation]]`, with the same keys as `[[datasets]]`,
for items held out of training on which each expert's validation loss is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import WanpairError
from ..tomlfile import did_you_mean, read_toml
from .buckets import STEP

# Keys allowed in [general] and inherited by each dataset (Musubi's "ascendable" keys).
GENERAL_KEYS = {"caption_extension": str, "batch_size": int, "num_repeats": int, "resolution": (int, list),
                "enable_bucket": bool, "bucket_no_upscale": bool}
IMAGE_KEYS = {**GENERAL_KEYS, "image_directory": str, "image_jsonl_file": str, "cache_directory": str,
              "control_directory": str}
VIDEO_KEYS = {**GENERAL_KEYS, "video_directory": str, "video_jsonl_file": str, "cache_directory": str,
              "control_directory": str, "target_frames": list, "frame_extraction": str, "frame_stride": int,
              "frame_sample": int, "max_frames": int, "source_fps": (int, float)}
# Musubi also accepts FramePack-only keys; they mean nothing for Wan, so we accept and ignore them.
FRAMEPACK_KEYS = {"fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post"}
FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")


@dataclass(frozen=True)
class DatasetSpec:
    """One `[[datasets]]` entry with `[general]` and Musubi's defaults filled in."""

    index: int
    kind: str  # "image" or "video"
    source: Path  # directory or jsonl file
    from_jsonl: bool
    resolution: tuple[int, int]  # (width, height)
    caption_extension: str = ".txt"
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    cache_directory: Path | None = None
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    validation: bool = False  # a [[validation]] entry: measured, never trained on
    where: str = ""  # "<dataset.toml>: [[datasets]] #1", for messages about the entry

    @property
    def cache_dir(self) -> Path:
        """Musubi's default: the cache lives beside the images unless `cache_directory` says otherwise."""
        if self.cache_directory is not None:
            return self.cache_directory
        return self.source.parent / "cache" if self.from_jsonl else self.source / "cache"


def _check_types(table: dict, schema: dict, where: str, path: Path, problems: list[str]) -> None:
    for key, value in table.items():
        if key in FRAMEPACK_KEYS:
            continue
        if key not in schema:
            problems.append(f"{path}: unknown key {key!r} in {where}.{did_you_mean(key, schema)}")
            continue
        expected = schema[key]
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, (int, float)))
        if not ok:
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            problems.append(f"{path}: {where}.{key} = {value!r} should be a {names}.")


def _resolution(value, where: str, path: Path, problems: list[str]) -> tuple[int, int]:
    if isinstance(value, int):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 16 for v in value)):
        problems.append(f"{path}: {where}.resolution = {value!r} must be [width, height] (integers >= 16).")
        return (960, 544)
    return (value[0], value[1])


def _multiples_of_step(resolution: tuple[int, int]) -> tuple[int, int]:
    """The nearest size Wan can take, each side rounded to a multiple of 16 (down on a tie: no upscaling)."""
    return tuple(max(STEP, (side + STEP // 2 - 1) // STEP * STEP) for side in resolution)


def _fixed_size_problem(resolution: tuple[int, int], where: str, path: Path) -> str:
    """With enable_bucket = false every item is trained at exactly `resolution`, so it must already be a size
    Wan takes. Refused rather than rounded: a silently changed resolution is not the one the user set (the
    reference trainer rounds its buckets to multiples of 16; with bucketing on, wanpair does too)."""
    choices = [f"{name} {side // STEP * STEP} or {side // STEP * STEP + STEP}"
               for name, side in zip(("width", "height"), resolution) if side % STEP]
    return (f"{path}: {where}.resolution = {list(resolution)} with enable_bucket = false trains every item at "
            f"exactly that size, but Wan needs multiples of {STEP} (the VAE's stride 8 x the DiT's patch 2). Use "
            f"resolution = {list(_multiples_of_step(resolution))} (nearest: {'; '.join(choices)}), or "
            "enable_bucket = true.")


def load_dataset_config(path: str | Path, text: str | None = None) -> list[DatasetSpec]:
    """Parse and validate a Musubi `dataset.toml` (`text`: its text, already read); every problem is reported at
    once."""
    path, raw = read_toml(path, "Point [dataset] config in your project at your Musubi dataset.toml.", text)
    problems: list[str] = []
    for key in raw:
        if key not in ("general", "datasets", "validation"):
            problems.append(f"{path}: unknown top-level table {key!r}."
                            f"{did_you_mean(key, ['general', 'datasets', 'validation'])}")
    general = raw.get("general", {})
    if not isinstance(general, dict):
        problems.append(f"{path}: [general] must be a table.")
        general = {}
    _check_types(general, GENERAL_KEYS, "[general]", path, problems)
    entries = raw.get("datasets", [])
    if not isinstance(entries, list) or not entries:
        problems.append(f"{path}: no [[datasets]] entry; add one with image_directory = \"...\".")
        entries = []
    held_out = raw.get("validation", [])
    if not isinstance(held_out, list):
        problems.append(f"{path}: validation must be written [[validation]] (a list of tables, like [[datasets]]).")
        held_out = []
    specs = []
    for i, entry in enumerate([*entries, *held_out]):
        is_validation = i >= len(entries)
        where = f"[[validation]] #{i - len(entries) + 1}" if is_validation else f"[[datasets]] #{i + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{path}: {where} must be a table.")
            continue
        is_video = "video_directory" in entry or "video_jsonl_file" in entry
        known = len(problems)
        _check_types(entry, VIDEO_KEYS if is_video else IMAGE_KEYS, where, path, problems)
        if len(problems) > known:  # a value of the wrong type (target_frames = 5): named, and the entry not read
            continue
        merged = {**general, **entry}
        src_keys = [k for k in (("video_directory", "video_jsonl_file") if is_video else ("image_directory", "image_jsonl_file")) if k in entry]
        if len(src_keys) != 1:
            problems.append(f"{path}: {where} needs exactly one of image_directory, image_jsonl_file, video_directory, video_jsonl_file.")
            continue
        source = (path.parent / Path(entry[src_keys[0]]).expanduser()).resolve()
        if "resolution" not in merged:
            problems.append(f"{path}: {where} has no resolution; set resolution = [960, 960] in [general] or the dataset.")
        resolution = _resolution(merged.get("resolution", [960, 544]), where, path, problems)
        cache = merged.get("cache_directory")
        kwargs = dict(
            caption_extension=merged.get("caption_extension", ".txt"),
            batch_size=merged.get("batch_size", 1), num_repeats=merged.get("num_repeats", 1),
            enable_bucket=merged.get("enable_bucket", False), bucket_no_upscale=merged.get("bucket_no_upscale", False),
            cache_directory=(path.parent / Path(cache).expanduser()).resolve() if isinstance(cache, str) else None,
        )
        if is_video:
            kwargs.update(
                target_frames=tuple(merged.get("target_frames", [1])), frame_extraction=merged.get("frame_extraction", "head"),
                frame_stride=merged.get("frame_stride", 1), frame_sample=merged.get("frame_sample", 1),
                max_frames=merged.get("max_frames", 129), source_fps=merged.get("source_fps"),
            )
            if kwargs["frame_extraction"] not in FRAME_EXTRACTIONS:
                problems.append(f"{path}: {where}.frame_extraction must be one of {', '.join(FRAME_EXTRACTIONS)}.")
            bad = [f for f in kwargs["target_frames"] if not isinstance(f, int) or f < 1 or (f - 1) % 4]
            if bad:
                problems.append(f"{path}: {where}.target_frames {bad} must be 4k+1 (1, 5, 9, ... 81): the Wan VAE packs 4 frames per latent.")
            if not kwargs["target_frames"] and kwargs["frame_extraction"] != "full":
                problems.append(f"{path}: {where}.target_frames = [] gives no clip length; list the lengths, "
                                "e.g. [1, 25, 45].")
            fps = kwargs["source_fps"]
            if isinstance(fps, (int, float)) and not (math.isfinite(fps) and fps > 0):
                problems.append(f"{path}: {where}.source_fps = {fps!r} must be the videos' frame rate, above 0.")
        for key in ("batch_size", "num_repeats", "frame_stride", "frame_sample", "max_frames"):
            if isinstance(kwargs.get(key), int) and kwargs[key] < 1:
                problems.append(f"{path}: {where}.{key} = {kwargs[key]} must be at least 1.")
        if not kwargs["enable_bucket"] and resolution != _multiples_of_step(resolution):
            problem = _fixed_size_problem(resolution, where if "resolution" in entry else "[general]", path)
            if problem not in problems:  # once for a [general] resolution, however many entries take it
                problems.append(problem)
        if not kwargs["caption_extension"].startswith("."):
            kwargs["caption_extension"] = "." + kwargs["caption_extension"]
        specs.append(DatasetSpec(i, "video" if is_video else "image", source, src_keys[0].endswith("jsonl_file"),
                                 resolution, validation=is_validation, where=f"{path}: {where}", **kwargs))
    if problems:
        raise WanpairError("\n".join(problems))
    return specs
