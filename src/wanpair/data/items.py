"""Training items (an image and its caption) and the dataset check that runs before any model loads.

Discovery follows the reference trainer: image files directly in `image_directory` (no recursion),
extensions png/jpg/jpeg/webp/bmp in either case, sorted by name; the caption is the file with the
same stem and `caption_extension`, stripped of surrounding white space. With `image_jsonl_file`,
each line is {"image_path": ..., "caption": ...}.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from ..errors import WanpairError
from .buckets import choose_bucket
from .dataset_config import DatasetSpec
from .images import IMAGE_EXTENSIONS, load_rgb
from .media import caption_path, dataset_media
from .video import VIDEO_EXTENSIONS, WAN_FPS, clip_ranges, content_hash, video_facts


@dataclass(frozen=True)
class Item:
    """One training example: where its pixels and caption come from, and the bucket it trains at."""

    image: Path
    caption: str
    dataset: int
    size: tuple[int, int]  # original (width, height), after EXIF orientation
    bucket: tuple[int, int]  # (width, height) it is trained at
    content_hash: str  # sha256 of the image's (or video's) bytes
    num_repeats: int
    start: int = 0  # video clips: first frame (after source_fps resampling)
    frames: int = 1  # 1 for images; 4k+1 for video clips
    source_fps: float | None = None

    @property
    def is_video(self) -> bool:
        return self.frames > 1 or self.image.suffix.lower() not in IMAGE_EXTENSIONS


@dataclass
class Report:
    """Everything `check` found. Errors stop training; warnings are worth reading."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    validation: set[int] = field(default_factory=set)  # indices of [[validation]] datasets

    def render(self) -> str:
        lines = []
        buckets = Counter((it.dataset, it.bucket, it.frames) for it in self.items)
        if buckets:
            lines.append("dataset  bucket (w x h)  frames  items")
            for (ds, (w, h), f), n in sorted(buckets.items()):
                role = "  (validation)" if ds in self.validation else ""
                lines.append(f"{ds + 1:>7}  {w:>6} x {h:<6}  {f:>6}  {n:>5}{role}")
        lines.append(f"{len(self.items)} items, {len(self.errors)} errors, {len(self.warnings)} warnings")
        lines += [f"ERROR   {e}" for e in self.errors]
        lines += [f"WARNING {w}" for w in self.warnings]
        return "\n".join(lines)


MAX_CAPTION_BYTES = 64 * 1024


def _read_caption(path: Path, report: Report) -> str | None:
    """A caption's text; a file larger than any caption (umT5 reads 512 tokens, a few KB) is refused unread: it is
    the wrong file, or one planted to fill the memory of whatever checks the folder (the dashboard)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
        if len(data) > MAX_CAPTION_BYTES:
            report.errors.append(f"{path}: over {MAX_CAPTION_BYTES // 1024} KiB, too large for a caption (the text "
                                 "encoder reads 512 tokens, a few KB); is it the right file?")
            return None
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.errors.append(f"{path}: caption is not UTF-8 text; re-save it as UTF-8.")
        return None
    return text.strip()


def _pairs(spec: DatasetSpec, report: Report) -> list[tuple[Path, str | None, Path | None]]:
    """(image or video, caption text, caption file) for every example of a dataset."""
    media = "video" if spec.kind == "video" else "image"
    if spec.from_jsonl:
        if not spec.source.is_file():
            report.errors.append(f"{spec.source}: {media}_jsonl_file does not exist.")
            return []
        pairs = []
        for n, line in enumerate(spec.source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append(((spec.source.parent / row[f"{media}_path"]).resolve(), str(row["caption"]).strip(), None))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                report.errors.append(f"{spec.source}:{n}: expected {{\"{media}_path\": ..., \"caption\": ...}} ({e}).")
        return pairs
    if not spec.source.is_dir():
        report.errors.append(f"{spec.source}: {media}_directory does not exist (dataset #{spec.index + 1}).")
        return []
    entries = dataset_media(spec.source, spec.kind)
    if spec.kind == "video":
        kinds = "videos (" + ", ".join(sorted(VIDEO_EXTENSIONS)) + ", or folders of frames)"
    else:
        kinds = "images (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
    stems = {p.name if p.is_dir() else p.stem for p in entries}
    for cap in sorted(spec.source.glob(f"*{spec.caption_extension}")):
        if cap.stem not in stems:
            report.warnings.append(f"{cap}: caption without an {media} (no {cap.stem}.*); it is ignored.")
    pairs = []
    for entry in entries:
        cap = caption_path(entry, spec.caption_extension)
        if not cap.is_file():
            report.errors.append(f"{entry}: no caption file {cap.name}; write one (same name, {spec.caption_extension}).")
            continue
        pairs.append((entry, _read_caption(cap, report), cap))
    if not entries:
        report.errors.append(f"{spec.source}: no {kinds} in this folder.")
    return pairs


def _image_items(spec: DatasetSpec, path: Path, caption: str, report: Report) -> list[Item]:
    size = load_rgb(path).size
    bucket = choose_bucket(size, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
    _warn_small(path, size, bucket, report)
    return [Item(path, caption, spec.index, size, bucket, content_hash(path), spec.num_repeats)]


def _video_items(spec: DatasetSpec, path: Path, caption: str, report: Report,
                 unused: list[tuple[Path, str]]) -> list[Item]:
    """The clips of one video; a video too short for any clip is noted in `unused`, with why."""
    count, size = video_facts(path, spec.source_fps)  # no frame decoded: a long 4K clip would fill the memory
    if not count:
        report.errors.append(f"{path}: the video has no frames; re-export or remove it.")
        return []
    ranges = clip_ranges(count, spec)
    if not ranges:
        resampled = f" at {WAN_FPS} fps (resampled from source_fps {spec.source_fps})" if spec.source_fps else ""
        unused.append((path, f"{count} frames{resampled}; target_frames {list(spec.target_frames)} need at "
                             f"least {min(spec.target_frames)}"))
        return []
    bucket = choose_bucket(size, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
    _warn_small(path, size, bucket, report)
    digest = content_hash(path)
    return [Item(path, caption, spec.index, size, bucket, digest, spec.num_repeats, start, n, spec.source_fps)
            for start, n in ranges]


def _warn_small(path: Path, size: tuple[int, int], bucket: tuple[int, int], report: Report) -> None:
    if size[0] < bucket[0] or size[1] < bucket[1]:
        report.warnings.append(
            f"{path}: {size[0]}x{size[1]} is smaller than its bucket {bucket[0]}x{bucket[1]} and will be "
            "upscaled (blurry); use a larger source or set bucket_no_upscale = true."
        )


def check_dataset(specs: list[DatasetSpec], tokenizer=None, max_tokens: int = 512, task=None) -> Report:
    """Inspect every item of every dataset; collect all problems instead of stopping at the first. `task`: the
    model it trains (`models.tasks.Task`), where known: an image-to-video pair learns nothing from images."""
    from ..models.text_encoder import token_count

    report = Report(validation={s.index for s in specs if s.validation})
    seen: dict[str, tuple[Path, bool]] = {}
    for spec in specs:
        errors, found, unused = len(report.errors), len(report.items), []
        for path, caption, cap_path in _pairs(spec, report):
            if caption is None:
                continue
            if not caption:
                report.errors.append(f"{cap_path or path}: caption is empty; describe the {spec.kind} in it.")
                continue
            try:
                items = (_video_items(spec, path, caption, report, unused) if spec.kind == "video"
                         else _image_items(spec, path, caption, report))
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                report.errors.append(f"{path}: cannot be read as {'a video' if spec.kind == 'video' else 'an image'} "
                                     f"({e}); re-export or remove it.")
                continue
            if items and items[0].content_hash in seen:
                other, other_validates = seen[items[0].content_hash]
                if other_validates == spec.validation:
                    report.warnings.append(f"{path}: same content as {other}; it will be "
                                           + ("validated twice." if spec.validation else "trained twice as often."))
                else:
                    report.warnings.append(f"{path}: same content as {other}, but one is trained on and the other held "
                                           "out for validation: its validation loss measures fit, not generalisation.")
            if items:
                seen.setdefault(items[0].content_hash, (path, spec.validation))
            if tokenizer is not None and (n := token_count(tokenizer, caption)) > max_tokens:
                report.warnings.append(f"{cap_path or path}: caption is {n} tokens; only the first {max_tokens} are used.")
            report.items.extend(items)
        if len(report.items) > found:
            report.warnings += [f"{path}: {why}; it gives no clip." for path, why in unused]
        elif unused or len(report.errors) == errors:  # else its errors say why
            report.errors.append(_gives_nothing(spec, unused))
    if task is not None and (problem := stills_problem(task, report.items)):
        report.errors.append(problem)
    return report


def stills_problem(task, items: list[Item]) -> str | None:
    """Image items for an image-to-video model (`models.tasks.Task`), which has nothing to learn from them: in
    `check_dataset`'s report, and among `train`'s refusals (a mismatch of the project's model and its data)."""
    stills = [it for it in items if it.frames == 1]
    if task.conditioned and stills:
        return (f"{task.name} learns how a clip goes on from its first frame, and a still image is its own first "
                f"frame: there is nothing to learn from {len(stills)} image item(s) (e.g. {stills[0].image}). Use "
                "video clips (video_directory in dataset.toml), or train the t2v-A14B pair on the images.")
    return None


def _gives_nothing(spec: DatasetSpec, unused: list[tuple[Path, str]]) -> str:
    """A dataset entry without one item to train on (or validate with): an error here, not a `max()` of
    nothing when training starts."""
    source = f"{spec.kind}_{'jsonl_file' if spec.from_jsonl else 'directory'} {spec.source}"
    why = "".join(f"\n  {path if spec.from_jsonl else path.name}: {reason}" for path, reason in unused) \
        or " it lists none."
    return f"{spec.where} ({source}) gives no item to {'validate' if spec.validation else 'train'} on:{why}"


def require_clean(report: Report, shown: bool = False) -> list[Item]:
    """The items of a report without errors; else an error with the report (`shown`: printed already, so named)."""
    if report.errors:
        raise WanpairError(f"the dataset has {len(report.errors)} problem(s), listed above; fix them and run again."
                           if shown else "the dataset has problems; fix them and run again:\n" + report.render())
    return report.items
