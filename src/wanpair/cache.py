"""Latent and text-embedding caches keyed by what they were made from, so they can never go stale.

A latent's file name is a hash of: the image file's bytes, the bucket it is cropped to, and the VAE
file's fingerprint. A text embedding's: the caption text and the text encoder's and tokenizer's
fingerprints. Change one caption and exactly that caption is re-encoded; swap the VAE and every
latent is. Files are written atomically, so a killed run never leaves a half-written entry, and an
unreadable entry is simply encoded again.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_path
from .data.buckets import resize_and_crop
from .data.images import load_rgb
from .data.items import Item
from .data.video import clip_frames
from .errors import DamagedFile, WanpairError
from .models.i2v import condition_pixels
from .models.files import fingerprint, safetensors_header

log = logging.getLogger(__name__)

FORMAT = "wanpair-cache-1"


def folder_fingerprint(path: Path) -> str:
    """Fingerprint of a file, or of every file in a folder (tokenizers are folders)."""
    if path.is_file():
        return fingerprint(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{fingerprint(f)}".encode())
    return h.hexdigest()[:16]


def latent_key(item: Item, vae_fp: str, conditioned: bool = False) -> str:
    clip = f"{item.start}+{item.frames}@{item.source_fps}" if item.is_video else "image"
    kind = "latent+first-frame" if conditioned else "latent"
    return hashlib.sha256(f"{FORMAT}|{kind}|{item.content_hash}|{item.bucket}|{clip}|{vae_fp}".encode()).hexdigest()[:32]


def text_key(caption: str, t5_fp: str, tokenizer_fp: str) -> str:
    return hashlib.sha256(f"{FORMAT}|text|{caption}|{t5_fp}|{tokenizer_fp}".encode()).hexdigest()[:32]


@dataclass
class CacheStats:
    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0

    def __str__(self) -> str:
        return (f"latents: {self.latents_encoded} encoded, {self.latents_reused} reused; "
                f"text: {self.texts_encoded} encoded, {self.texts_reused} reused")


def read_entry(path: Path) -> torch.Tensor | None:
    """The cached tensor, or None if the file is missing or unreadable (it is then re-encoded)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["value"]
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        log.warning("cache entry %s is unreadable (%s); encoding it again -- nothing for you to do", path.name, e)
        return None


def write_entry(path: Path, value: torch.Tensor, source: str) -> None:
    meta = {"format": FORMAT, "source": source, "dtype": str(value.dtype), "shape": "x".join(map(str, value.shape))}
    with atomic_path(path) as tmp:
        save_file({"value": value.contiguous()}, str(tmp), metadata=meta)


@dataclass(frozen=True)
class CachePlan:
    """Where each item's latent and text entry live, where the extra texts' entries live (prompts for
    samples), and which must be encoded. `conditioned` (the I2V pair): each latent entry holds the clip's
    latent and, after it on the channel axis, the latent of its first frame followed by zeros
    (`wanpair.models.i2v`), encoded together so they cannot come from different files."""

    latent_paths: list[Path]
    text_paths: list[Path]
    missing_latents: list[int]
    missing_texts: dict[Path, str]  # entry -> the caption or prompt to encode into it
    prompt_paths: list[Path] = field(default_factory=list)
    conditioned: bool = False


def entry_ok(path: Path) -> bool:
    """A cache entry exists and is whole: checked from its header and size, without reading the tensor."""
    if not path.is_file():
        return False
    try:
        safetensors_header(path)
        return True
    except DamagedFile as e:
        log.warning("cache entry %s is damaged (%s); encoding it again -- nothing for you to do", path.name, e.reason)
        return False


def plan(items: list[Item], cache_dirs: dict[int, Path], vae_fp: str, t5_fp: str, tokenizer_fp: str,
         prompts: list[str] = (), prompt_dir: Path | None = None, conditioned: bool = False) -> CachePlan:
    """Entries for every item, and for `prompts` (in `prompt_dir`), with those missing or damaged marked."""
    lat = [cache_dirs[it.dataset] / f"latent_{latent_key(it, vae_fp, conditioned)}.safetensors" for it in items]
    txt = [cache_dirs[it.dataset] / f"text_{text_key(it.caption, t5_fp, tokenizer_fp)}.safetensors" for it in items]
    extra = [prompt_dir / f"text_{text_key(p, t5_fp, tokenizer_fp)}.safetensors" for p in prompts] if prompts else []
    texts = dict(zip(txt, (it.caption for it in items))) | dict(zip(extra, prompts))
    return CachePlan(lat, txt, [i for i, p in enumerate(lat) if not entry_ok(p)],
                     {p: text for p, text in texts.items() if not entry_ok(p)}, extra, conditioned)


def pixels(item: Item) -> torch.Tensor:
    """The item's bucket-sized pixels as a [3, F, H, W] tensor in [-1, 1] (Wan's VAE input range). A clip's
    frames are decoded one at a time and cut to the bucket as they come (`clip_frames`), never the whole video."""
    if item.is_video:
        try:
            arr = clip_frames(item.image, item.source_fps, item.start, item.frames, item.bucket)  # F, H, W, 3
        except ValueError as e:  # `check` read only the container's facts: a damaged stream shows here
            raise WanpairError(f"{item.image}: {e}; the clip of {item.frames} frames from frame {item.start} cannot be "
                               "read. Re-export the video (or remove it from the dataset) and run again.") from None
    else:
        arr = resize_and_crop(load_rgb(item.image), item.bucket)[None].copy()  # writable, as torch wants it
    return torch.from_numpy(arr).permute(3, 0, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, batch: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean, normalised per channel with the VAE's latents_mean / latents_std."""
    device, dtype = vae.device, vae.dtype
    mu = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist.mean.float()
    mean = torch.tensor(vae.config.latents_mean, device=mu.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=mu.device).view(1, -1, 1, 1, 1)
    return ((mu - mean) / std).cpu()


def fill(items: list[Item], cplan: CachePlan, load_vae_fn, load_text_fn, batch_size: int = 4) -> CacheStats:
    """Encode whatever the plan says is missing. Models are loaded only if needed and freed after."""
    from .models.text_encoder import encode_text

    stats = CacheStats(latents_reused=len(items) - len(cplan.missing_latents),
                       texts_reused=len(set(cplan.text_paths) | set(cplan.prompt_paths)) - len(cplan.missing_texts))
    if cplan.missing_latents:
        vae = load_vae_fn()
        # Batches hold one shape (bucket, frames). Images are ordered by shape; a video's clips stay together
        # (each decoded up to its own last frame, one clip at a time: host memory stays one clip's).
        def batch_key(i: int) -> tuple:
            return (str(items[i].image) if items[i].is_video else "", items[i].bucket, items[i].frames)

        with tqdm(total=len(cplan.missing_latents), desc="caching latents", unit="img") as bar:
            for _, grouped in itertools.groupby(sorted(cplan.missing_latents, key=batch_key), key=batch_key):
                group = list(grouped)
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    clips = torch.stack([pixels(items[i]) for i in chunk])
                    latents = encode_latents(vae, clips)
                    if cplan.conditioned:
                        firsts = torch.stack([condition_pixels(c) for c in clips])
                        latents = torch.cat([latents, encode_latents(vae, firsts)], dim=1)
                    for i, lat in zip(chunk, latents):
                        write_entry(cplan.latent_paths[i], lat, str(items[i].image))
                        stats.latents_encoded += 1
                    bar.update(len(chunk))
        del vae
        gc.collect()
    if cplan.missing_texts:
        te, tok = load_text_fn()
        pending = list(cplan.missing_texts.items())
        with tqdm(total=len(pending), desc="caching text", unit="caption") as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                for (path, caption), emb in zip(chunk, encode_text(te, tok, [c for _, c in chunk])):
                    write_entry(path, emb, caption)
                    stats.texts_encoded += 1
                bar.update(len(chunk))
        del te, tok
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats


def cached_texts(texts: list[str], cache_dir: Path, t5_fp: str, tokenizer_fp: str, load_text_fn) -> list[torch.Tensor]:
    """Embeddings of `texts` (sampling prompts) from the text cache, encoding only those not cached yet:
    the text encoder is not even loaded when every prompt was seen before."""
    cplan = plan([], {}, "", t5_fp, tokenizer_fp, texts, cache_dir)
    fill([], cplan, load_vae_fn=None, load_text_fn=load_text_fn)
    return [read_entry(p) for p in cplan.prompt_paths]


def stale_entries(cache_dirs: set[Path], used: set[Path]) -> list[Path]:
    """Entries in these cache folders that `used` does not name (left behind when a caption, an image or a
    model changed), and temporary files of killed writes. Only files named as wanpair names its entries."""
    found = []
    for folder in sorted(cache_dirs):
        if folder.is_dir():
            found += [p for p in folder.iterdir()
                      if p.is_file() and (p.name.startswith(("latent_", "text_")) and p.suffix == ".safetensors"
                                          and p not in used or p.name.startswith((".latent_", ".text_"))
                                          and p.name.endswith(".tmp"))]
    return sorted(found)
