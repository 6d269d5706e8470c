"""Training items (an image and its caption) and the dataset check that runs before any model loads.

Discovery follows the reference trainer: image files directly in `image_directory` (no recursion),
extensions png/jpg/jpeg/webp/bmp in either case, sorted by name; the caption is the file with the
same stem and `caption_extension`, stripped of surrounding white space. With `image_jsonl_file`,
each line is {"image_path": ..., "caption": ...}.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import WanpairError
from .buckets import choose_bucket
from .dataset_config import DatasetSpec

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Item:
    """One training example: where its pixels and caption come from, and the bucket it trains at."""

    image: Path
    caption: str
    dataset: int
    size: tuple[int, int]  # original (width, height), after EXIF orientation
    bucket: tuple[int, int]  # (width, height) it is trained at
    content_hash: str  # sha256 of the image file's bytes
    num_repeats: int


@dataclass
class Report:
    """Everything `check` found. Errors stop training; warnings are worth reading."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def render(self) -> str:
        lines = []
        buckets = Counter((it.dataset, it.bucket) for it in self.items)
        if buckets:
            lines.append("dataset  bucket (w x h)  items")
            for (ds, (w, h)), n in sorted(buckets.items()):
                lines.append(f"{ds + 1:>7}  {w:>6} x {h:<6}  {n:>5}")
        lines.append(f"{len(self.items)} items, {len(self.errors)} errors, {len(self.warnings)} warnings")
        lines += [f"ERROR   {e}" for e in self.errors]
        lines += [f"WARNING {w}" for w in self.warnings]
        return "\n".join(lines)


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully (so truncation is caught), honour EXIF rotation, return 8-bit RGB."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
        return im.convert("RGB")


def _read_caption(path: Path, report: Report) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        report.errors.append(f"{path}: caption is not UTF-8 text; re-save it as UTF-8.")
        return None
    return text.strip()


def _pairs(spec: DatasetSpec, report: Report) -> list[tuple[Path, str | None, Path | None]]:
    """(image, caption text, caption file) for every image of a dataset."""
    if spec.from_jsonl:
        if not spec.source.is_file():
            report.errors.append(f"{spec.source}: image_jsonl_file does not exist.")
            return []
        pairs = []
        for n, line in enumerate(spec.source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = (spec.source.parent / row["image_path"]).resolve()
                pairs.append((image, str(row["caption"]).strip(), None))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                report.errors.append(f"{spec.source}:{n}: expected {{\"image_path\": ..., \"caption\": ...}} ({e}).")
        return pairs
    if not spec.source.is_dir():
        report.errors.append(f"{spec.source}: image_directory does not exist (dataset #{spec.index + 1}).")
        return []
    images = sorted(p for p in spec.source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    stems = {p.stem for p in images}
    for cap in sorted(spec.source.glob(f"*{spec.caption_extension}")):
        if cap.stem not in stems:
            report.warnings.append(f"{cap}: caption without an image (no {cap.stem}.png/.jpg/...); it is ignored.")
    pairs = []
    for image in images:
        cap = image.with_suffix(spec.caption_extension)
        if not cap.is_file():
            report.errors.append(f"{image}: no caption file {cap.name}; write one (same name, {spec.caption_extension}).")
            continue
        pairs.append((image, _read_caption(cap, report), cap))
    if not images:
        report.errors.append(f"{spec.source}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder.")
    return pairs


def check_dataset(specs: list[DatasetSpec], tokenizer=None, max_tokens: int = 512) -> Report:
    """Inspect every item of every dataset; collect all problems instead of stopping at the first."""
    from ..models.text_encoder import token_count

    report = Report()
    if any(s.kind == "video" for s in specs):
        report.errors.append("video datasets are not supported by this version of wanpair; use image datasets.")
    seen: dict[str, Path] = {}
    for spec in (s for s in specs if s.kind == "image"):
        for image, caption, cap_path in _pairs(spec, report):
            if caption is None:
                continue
            if not caption:
                report.errors.append(f"{cap_path or image}: caption is empty; describe the image in it.")
                continue
            try:
                data = image.read_bytes()
                size = load_rgb(image).size
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                report.errors.append(f"{image}: cannot be read as an image ({e}); re-export or remove it.")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                report.warnings.append(f"{image}: same content as {seen[digest]}; it will be trained twice as often.")
            seen.setdefault(digest, image)
            bucket = choose_bucket(size, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
            if size[0] < bucket[0] or size[1] < bucket[1]:
                report.warnings.append(
                    f"{image}: {size[0]}x{size[1]} is smaller than its bucket {bucket[0]}x{bucket[1]} and will be "
                    "upscaled (blurry); use a larger image or set bucket_no_upscale = true."
                )
            if tokenizer is not None and (n := token_count(tokenizer, caption)) > max_tokens:
                report.warnings.append(f"{cap_path or image}: caption is {n} tokens; only the first {max_tokens} are used.")
            report.items.append(Item(image, caption, spec.index, size, bucket, digest, spec.num_repeats))
    return report


def require_clean(report: Report) -> list[Item]:
    if report.errors:
        raise WanpairError("the dataset has problems; fix them and run again:\n" + report.render())
    return report.items
