"""Merging a LoRA into a base file, streamed tensor by tensor (in memory, `load_dit(delta=...)` merges as it
loads; see `wanpair.sample.lora_delta`). Its full and bias deltas are added as they are (W += s * diff,
b += s * diff_b), once `check_layers` has matched each to a tensor of its shape.

Both refuse a LoRA whose metadata names the other expert (wanpair writes `wanpair.expert`), since
a HighNoise LoRA on the low-noise model is the recipe's most common silent mistake, and one trained on
another model (text- vs image-to-video, Wan 2.1 vs 2.2: `wanpair.architecture`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..errors import WanpairError
from ..models.dit import guess_expert
from ..models.files import iter_tensors, safetensors_header, strip_prefix
from ..models.tasks import EXPERT_NAMES, Task, by_architecture, expert_noun
from .formats import LoraWeights

_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _trained_on(expert: str) -> str:
    return "one model over all timesteps (Wan 2.1)" if expert == "full" else expert_noun(expert)


def check_expert(lora: LoraWeights, base_expert: str | None, what: str, allow_mismatch: bool = False) -> None:
    """Refuse a LoRA trained for the other expert (or for a single model on an expert), unless the user insists."""
    lora_expert = lora.metadata.get("wanpair.expert")
    if lora_expert in EXPERT_NAMES and base_expert and lora_expert != base_expert and not allow_mismatch:
        use = (f"Use the {'HighNoise' if base_expert == 'high' else 'LowNoise'} LoRA here" if base_expert != "full"
               else "Use a LoRA trained on this model")
        raise WanpairError(f"this LoRA was trained on {_trained_on(lora_expert)} but {what} is "
                           f"{_trained_on(base_expert)}. {use} (or pass --allow-expert-mismatch if you really mean it).")


def check_pair(lora: LoraWeights, task: Task, what: str, allow_mismatch: bool = False) -> None:
    """Refuse a LoRA trained on another model (text- vs image-to-video pair, Wan 2.1 vs 2.2): their layers
    can have the same names and shapes, so only the metadata tells them apart (`wanpair.architecture`)."""
    trained = by_architecture(lora.metadata.get("wanpair.architecture"))
    if trained and trained is not task and not allow_mismatch:
        raise WanpairError(
            f"this LoRA was trained on {trained.title} but {what} belongs to {task.title}. Use a LoRA "
            f"trained on {task.name} (or pass --allow-expert-mismatch if you really mean it: where the layers "
            "match, it applies).")


def layer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a single-file DiT, by its original Wan key (ComfyUI's prefix stripped), read
    without loading weights (a safetensors header; a .pth is memory-mapped)."""
    if path.suffix == ".safetensors":
        header = safetensors_header(path)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k not in ("__data_start__", "__metadata__")}
    else:
        shapes = {k: tuple(t.shape) for k, t in iter_tensors(path)}
    prefix = strip_prefix(tuple(shapes))
    return {k[len(prefix):]: s for k, s in shapes.items()}


def check_layers(lora: LoraWeights, shapes: dict[str, tuple[int, ...]], what: str, lora_name: str = "the LoRA") -> None:
    """Refuse a LoRA that updates a tensor `what` lacks, or updates it with another shape: added as it is, a
    [1] bias delta would broadcast over the whole bias without a word."""
    for key, shape in lora.targets():
        if key not in shapes:
            raise WanpairError(f"{lora_name} updates {key}, which {what} does not have; is this the right base model?")
        if shapes[key] != shape:
            raise WanpairError(f"{lora_name} updates {key} with a {list(shape)} tensor but {what} holds it as "
                               f"{list(shapes[key])}; the LoRA was made for another model.")


def _merged(base: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """base + delta in float32, returned in the base's dtype (fp8: re-quantised with the same scale)."""
    w = base.float() * (scale.float() if scale is not None else 1.0) + delta
    if base.dtype in _FP8_MAX:
        if scale is not None:
            w = w / scale.float()
        return w.clamp(-_FP8_MAX[base.dtype], _FP8_MAX[base.dtype]).to(base.dtype)
    return w.to(base.dtype)


def merge_into_file(base: Path, lora: LoraWeights, out: Path, task: Task, strength: float = 1.0,
                    allow_mismatch: bool = False) -> int:
    """Write base + LoRA as a single file in the base's own key layout and dtypes.

    The output is written tensor by tensor (the safetensors header is computed from the input's
    header first), so memory holds one tensor at a time even for a 28 GB base.
    """
    if base.suffix != ".safetensors":
        raise WanpairError(f"{base}: merge needs a .safetensors base model.")
    check_expert(lora, guess_expert(base, {}) if task.paired else "full", str(base), allow_mismatch)
    check_pair(lora, task, str(base), allow_mismatch)
    check_layers(lora, layer_shapes(base), str(base))
    header = safetensors_header(base)
    header.pop("__data_start__")
    metadata = header.pop("__metadata__", None) or {}
    prefix = strip_prefix(tuple(header))
    targets = {prefix + key: key for key, _ in lora.targets()}
    entries, offset = {}, 0
    for key, info in header.items():
        n = info["data_offsets"][1] - info["data_offsets"][0]
        entries[key] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    metadata = {**metadata, "wanpair.merged_lora": json.dumps({"strength": strength, **{
        k: v for k, v in lora.metadata.items() if k in ("wanpair.expert", "modelspec.title", "wanpair.base_fingerprint")}})}
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    # "scaled" fp8 checkpoints store a per-layer scale beside each fp8 weight: real = fp8 * scale.
    scale_keys = [k.removesuffix(".weight") + ".scale_weight" for k in targets]
    scales = dict(iter_tensors(base, [k for k in scale_keys if k in header]))
    # the arithmetic on a GPU when there is one: on a CPU the fp32 updates of a 14B expert take minutes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, t in tqdm(iter_tensors(base), total=len(header), desc="merging", unit="tensor"):
            if key in targets:
                scale = scales.get(key.removesuffix(".weight") + ".scale_weight")
                t = _merged(t.to(device), strength * lora.update(targets[key], device),
                            None if scale is None else scale.to(device)).cpu()
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
    return len({key.rpartition(".")[0] for key in targets})
