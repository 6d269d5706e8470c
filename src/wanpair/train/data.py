"""The cached data one expert trains on: the items, where their latents and text embeddings are cached,
and how they group into batches.

It is made once by the recipe (after the caches are filled) and handed to each expert's training unit
as it is, in the same process or -- written to a JSON file -- to a worker process, so a worker never
re-checks the dataset or re-encodes anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import read_entry
from ..data.items import Item
from ..errors import WanpairError
from ..models.i2v import LATENT_CHANNELS, conditioning


@dataclass
class CachedData:
    items: list[Item]
    latent_paths: list[Path]
    text_paths: list[Path]
    batch_sizes: dict[int, int]  # dataset index -> batch_size of that [[datasets]] entry
    validation: list[int] = field(default_factory=list)  # items the validation loss is measured on
    validation_kind: str = "fit"  # "held-out" (never trained on) or "fit" (training items)
    conditioned: bool = False  # the I2V pair: each entry also holds its first-frame condition latent

    @property
    def trained(self) -> list[int]:
        held_out = set(self.validation) if self.validation_kind == "held-out" else set()
        return [i for i in range(len(self.items)) if i not in held_out]

    @property
    def training_items(self) -> list[Item]:
        return [self.items[i] for i in self.trained]

    def buckets(self) -> dict[tuple, list[int]]:
        """(dataset, bucket, frames) -> the training items of that shape, each num_repeats times: one batch
        stacks items of one shape and one [[datasets]] entry's batch_size."""
        buckets: dict[tuple, list[int]] = {}
        for i in self.trained:
            it = self.items[i]
            buckets.setdefault((it.dataset, it.bucket, it.frames), []).extend([i] * it.num_repeats)
        return buckets

    def batch_shapes(self) -> set[tuple]:
        """(samples, bucket, frames) of every batch an epoch makes: each bucket cut into batches of its dataset's
        batch_size, only the last maybe shorter; the same in every epoch, whatever the shuffle. A CUDA graph is
        captured per batch shape (`wanpair.train.step_graph`), and `wanpair doctor` says so before a run."""
        shapes = set()
        for (ds, bucket, frames), idx in self.buckets().items():
            size = self.batch_sizes[ds]
            shapes |= {(min(size, len(idx) - k), bucket, frames) for k in range(0, len(idx), size)}
        return shapes

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(idx) / self.batch_sizes[ds]) for (ds, _, _), idx in self.buckets().items())

    def batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The epoch's batches of item indices in the order they are trained: each bucket's items, repeats
        included, shuffled, cut into batches, and the batches shuffled -- so the same images don't share a
        batch in every epoch, and a repeated image is spread over the epoch. As Musubi-Tuner's bucket
        manager does it (`BucketBatchManager.shuffle`, src/musubi_tuner/dataset/image_video_dataset.py);
        a function of the seed and the epoch alone, so a resumed run draws the same batches."""
        rng = random.Random(seed * 100_003 + epoch)
        batches = []
        for (ds, _, _), idx in sorted(self.buckets().items()):
            rng.shuffle(idx)
            batches += [idx[k:k + self.batch_sizes[ds]] for k in range(0, len(idx), self.batch_sizes[ds])]
        rng.shuffle(batches)
        return batches

    def load(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        """Every latent, text embedding and (I2V) conditioning, read once into host memory (a few MB per
        image); the conditioning is the 20 channels the I2V experts take beside the noisy latent."""
        entries = [read_entry(p) for p in self.latent_paths]
        texts = [read_entry(p) for p in self.text_paths]
        if any(x is None for x in entries + texts):
            raise WanpairError("a cache entry vanished or became unreadable during the run; run again to re-encode it.")
        if not self.conditioned:
            return entries, texts, [None] * len(entries)
        return ([e[:LATENT_CHANNELS] for e in entries], texts,
                [conditioning(e[LATENT_CHANNELS:]) for e in entries])

    @staticmethod
    def tokens(latent_shapes: list[tuple[int, ...]]) -> int:
        """Transformer tokens of a batch of latents [C, F, H, W]: Wan patches them 1x2x2."""
        return sum(math.prod(shape[1:]) // 4 for shape in latent_shapes)

    def to_json(self) -> str:
        return json.dumps({"items": [_item_to_json(it) for it in self.items],
                           "latent_paths": [str(p) for p in self.latent_paths],
                           "text_paths": [str(p) for p in self.text_paths],
                           "batch_sizes": {str(k): v for k, v in self.batch_sizes.items()},
                           "validation": self.validation, "validation_kind": self.validation_kind,
                           "conditioned": self.conditioned})

    @classmethod
    def from_json(cls, text: str) -> "CachedData":
        raw = json.loads(text)
        return cls([_item_from_json(d) for d in raw["items"]], [Path(p) for p in raw["latent_paths"]],
                   [Path(p) for p in raw["text_paths"]], {int(k): v for k, v in raw["batch_sizes"].items()},
                   raw["validation"], raw["validation_kind"], raw["conditioned"])


def validation_set(items: list[Item], validation_datasets: set[int], split: float, count: int,
                   seed: int) -> tuple[list[int], str]:
    """The items each expert's validation loss is measured on, and what it measures.

    [[validation]] datasets when there are any; else, with `split`, that fraction of the media (whole
    videos, so no clip of a held-out video is trained on) chosen by the seed and held out of training;
    else `count` training items spread over the dataset, which measures fit rather than generalisation."""
    held = [i for i, it in enumerate(items) if it.dataset in validation_datasets]
    if held:
        return held, "held-out"
    media = sorted({it.content_hash for it in items})
    if split > 0 and len(media) > 1:
        random.Random(seed).shuffle(media)
        chosen = set(media[:min(len(media) - 1, max(1, round(split * len(media))))])
        return [i for i, it in enumerate(items) if it.content_hash in chosen], "held-out"
    n = min(count, len(items))
    return sorted({k * len(items) // n for k in range(n)}), "fit"


def step_counts(n_batches: int, accumulation: int, processes: int, epochs: int, max_steps: int) -> tuple[int, int, int]:
    """(micro-batches per optimizer step, optimizer steps in all, epochs): an optimizer step takes
    `accumulation` micro-batches on each of `processes` processes; the schedule counts optimizer steps."""
    per_step = accumulation * processes
    per_epoch = math.ceil(n_batches / per_step)
    total = min(max_steps, per_epoch * epochs) if max_steps else per_epoch * epochs
    return per_step, total, math.ceil(total / per_epoch)


def _item_to_json(item: Item) -> dict:
    d = dataclasses.asdict(item)
    d["image"] = str(item.image)
    return d


def _item_from_json(d: dict) -> Item:
    return Item(**{**d, "image": Path(d["image"]), "size": tuple(d["size"]), "bucket": tuple(d["bucket"])})
