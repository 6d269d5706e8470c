"""The Wan diffusion transformer (DiT): identify a checkpoint, read its architecture, load it.

Checkpoints come in two layouts: the original Wan / ComfyUI single file (`blocks.0.self_attn.q.weight`)
and diffusers folders (`transformer/`, `blocks.0.attn1.to_q.weight`). Both load into diffusers'
`WanTransformer3DModel`. The key renaming (`wanpair.models.dit_names`) is diffusers' own
`convert_wan_transformer_to_diffusers`, applied to key *names* only so that tensors can be streamed one by one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers import WanTransformer3DModel
from tqdm.auto import tqdm

from ..errors import WanpairError
from .dit_names import original_to_diffusers_names, to_original_name
from .fp8 import Fp8Linear, to_fp8_linears
from .files import WeightFile, fingerprint, inspect_weight_file, iter_tensors, strip_prefix, tensors_to_device
from .kinds import identify
from .tasks import Task, check_task

log = logging.getLogger(__name__)

# Every released Wan DiT (1.3B, 5B, 14B) uses 128-dim attention heads; the head count is not
# recoverable from tensor shapes, so it follows from this (Wan2.2 `wan/configs/*.py`: dim / num_heads).
WAN_HEAD_DIM = 128

@dataclass(frozen=True)
class DitInfo:
    file: WeightFile | None
    path: Path
    config: dict
    layout: str  # "original" or "diffusers"
    expert: str | None  # "high" / "low" when the file name or metadata says so

    @property
    def fingerprint(self) -> str:
        return self.file.fingerprint if self.file else _folder_fingerprint(self.path)


def _folder_fingerprint(folder: Path) -> str:
    shards = sorted(folder.glob("*.safetensors"))
    return hashlib.sha256("".join(fingerprint(s) for s in shards).encode()).hexdigest()[:16]


def guess_expert(path: Path, metadata: dict[str, str]) -> str | None:
    """Which Wan 2.2 expert a checkpoint is, if its name or metadata says so.

    Single files carry `high_noise` / `low_noise` in their names (Comfy-Org repackaging); in the
    diffusers Wan2.2-T2V-A14B folders `transformer/` is the high-noise and `transformer_2/` the
    low-noise expert (diffusers `WanPipeline`: transformer runs while t >= boundary); a Wan 2.1 folder
    has `transformer/` alone, which is no expert.
    """
    if path.is_dir() and (path.name == "transformer_2" or path.name == "transformer" and
                          (path.parent / "transformer_2").is_dir()):
        return "high" if path.name == "transformer" else "low"
    text = f"{path.name} {json.dumps(metadata)}".lower()
    high = re.search(r"high[_\- ]?noise", text) is not None
    low = re.search(r"low[_\- ]?noise", text) is not None
    return ("high" if high else "low") if high != low else None


def config_from_original_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    """Read the architecture off the tensor shapes of an original-layout checkpoint."""
    try:
        dim, in_channels, *patch = shapes["patch_embedding.weight"]
        num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
        text_dim = shapes["text_embedding.0.weight"][1]
        freq_dim = shapes["time_embedding.0.weight"][1]
        out_channels = shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2])
    except (KeyError, ValueError) as e:
        raise WanpairError(f"{path} looks like a Wan DiT but lacks tensor {e}; the file is incomplete.") from None
    image_dim = shapes.get("img_emb.proj.0.weight", (None,))[0]
    return dict(
        patch_size=tuple(patch),
        num_attention_heads=dim // WAN_HEAD_DIM,
        attention_head_dim=WAN_HEAD_DIM,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=dim if "blocks.0.cross_attn.k_img.weight" in shapes else None,
    )


def inspect_dit(path: str | Path) -> DitInfo:
    """Validate a DiT checkpoint (file or diffusers folder) and read its architecture, loading no weights."""
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise WanpairError(f"{path} is a folder without config.json; expected a diffusers `transformer/` folder.")
        config = json.loads(cfg_file.read_text())
        if config.get("_class_name") != "WanTransformer3DModel":
            raise WanpairError(f"{path} holds a {config.get('_class_name')}, not a WanTransformer3DModel (the DiT).")
        if not list(path.glob("*.safetensors")):
            raise WanpairError(f"{path} has no .safetensors weights next to its config.json.")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return DitInfo(None, path, config, "diffusers", guess_expert(path, {}))
    wf = inspect_weight_file(path)
    identify(wf, expected="dit")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        shapes = {k: tuple(t.shape) for k, t in iter_tensors(path)}
    prefix = strip_prefix(tuple(shapes))
    shapes = {k[len(prefix):]: s for k, s in shapes.items()}
    layout = "original" if "patch_embedding.weight" in shapes and "head.head.weight" in shapes else "diffusers"
    if layout == "original":
        config = config_from_original_shapes(shapes, path)
    else:
        raise WanpairError(
            f"{path} uses diffusers key names in a single file; point at its diffusers folder "
            "(the one with config.json) instead."
        )
    return DitInfo(wf, path, config, layout, guess_expert(path, wf.metadata))


def dit_problems(task: Task, paths: dict[str, Path]) -> tuple[list[str], dict[str, DitInfo]]:
    """A project's DiT file(s) (`paths`: expert -> the file or folder its [models] key names) checked from their
    headers for its `task`: each of this model and size, a single model not one expert of a
    pair, the experts in their own slots and not one file twice. The problems named by key, and what each file is;
    for training's preflight and for `wanpair sample` alike, before anything loads."""
    problems, infos = [], {}
    for expert, path in paths.items():
        key = task.dit_key(expert)
        try:
            info = inspect_dit(path)
            check_task(info.config, info.path, task, key)
        except WanpairError as e:
            problems.append(f"[models] {key}: {e}")
            continue
        if not task.paired and info.expert:
            problems.append(
                f"[models] {key} = {info.path} is the {info.expert}-noise expert of a Wan 2.2 pair (its folder or "
                f"metadata says so), not a single model: {task.name} needs a Wan 2.1 file or folder.")
        if task.paired and info.expert and info.expert != expert:
            problems.append(
                f"[models] {key} = {info.path} is named as the {info.expert}-noise expert. Swap high_noise and "
                "low_noise: a LoRA trained on the wrong expert does nothing useful at inference."
            )
        infos[expert] = info
    if len(infos) == 2 and infos["high"].fingerprint == infos["low"].fingerprint:
        problems.append(
            f"[models] high_noise and low_noise are the same file/content ({infos['high'].path}). Wan 2.2 "
            f"needs both experts: {task.dit_file('high', '*')} and {task.dit_file('low', '*')}."
        )
    return problems, infos


def _keep_fp32(name: str) -> bool:
    keep = getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or []
    return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in keep)


def load_dit(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    info: DitInfo | None = None,
    fp8: bool = False,
    delta: Callable[[str], torch.Tensor | None] | None = None,
) -> WanTransformer3DModel:
    """Load a Wan DiT into diffusers' `WanTransformer3DModel`, streaming tensor by tensor.

    The model is built on the meta device and each tensor is converted to `dtype` on `device` as it
    is read (on a GPU: read ahead by several threads, `files.tensors_to_device`), so host memory never
    holds the whole checkpoint. Modules diffusers keeps in fp32 (time embedding, modulation tables,
    norms) stay fp32. With `fp8`, every block Linear becomes an `Fp8Linear` and its weight is quantised
    as it arrives, so the device never holds the 28 GB bf16 form of a 14B expert (only its 14 GB fp8
    form); a diffusers folder is converted after loading. `delta(name)` (original Wan key, e.g.
    `blocks.0.self_attn.q.weight`) may return an update to add to that weight before it is stored: a
    LoRA merged at full precision, before any fp8 quantisation.
    """
    device = torch.device(device)
    info = info or inspect_dit(path)
    if info.layout == "diffusers":
        log.info("loading DiT (diffusers folder) from %s", info.path)
        model = WanTransformer3DModel.from_pretrained(info.path, torch_dtype=dtype, local_files_only=True)
        model = model.to(device)
        if delta is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, p in params.items():
                    d = delta(to_original_name(name))
                    if d is not None:
                        p.copy_((p.float() + d.to(p.device)).to(p.dtype))
        if fp8:
            to_fp8_linears(model, dtype)
        return model.eval().requires_grad_(False)
    log.info("loading DiT from %s", info.file.describe())
    with init_empty_weights():
        model = WanTransformer3DModel(**info.config)
    if fp8:
        to_fp8_linears(model, dtype)
    expected = set(model.state_dict())
    prefix = strip_prefix(info.file.keys)
    # "scaled" fp8 files (ComfyUI's fp8_e4m3fn_scaled) keep a per-layer scale beside each fp8 weight
    # (real weight = fp8 * scale_weight) and a `scaled_fp8` marker; the scales are applied here.
    extra = [k for k in info.file.keys if k.endswith((".scale_weight", ".scale_input")) or k == prefix + "scaled_fp8"]
    scales = dict(iter_tensors(info.path, [k for k in extra if k.endswith(".scale_weight")]))
    skip = set(extra)
    keys = [k for k in info.file.keys if k not in skip]
    names = original_to_diffusers_names([k[len(prefix):] for k in keys])
    seen: set[str] = set()
    # move first, convert on the device: a GPU converts 28 GB of fp16 in milliseconds, a CPU core in seconds
    stream = tensors_to_device(info.path, keys, device)
    for key, value in tqdm(stream, total=len(keys), desc="DiT", unit="tensor", leave=False):
        name = names[key[len(prefix):]]
        if name not in expected:
            raise WanpairError(f"{info.path}: tensor {key!r} has no place in a Wan DiT; is this the right file?")
        target = torch.float32 if _keep_fp32(name) else dtype
        scale = scales.get(key.removesuffix(".weight") + ".scale_weight")
        update = delta(key[len(prefix):]) if delta is not None else None
        if update is not None:
            value = value.float() * (scale.to(device).float() if scale is not None else 1.0) + update.to(device)
            scale = None
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf == "weight" and isinstance(module, Fp8Linear):
            module.set_weight(value, tensor_scale=scale)  # an fp8 file's weights stay exactly as they are
            seen.add(f"{owner}.weight_scale")
        else:
            if scale is not None:
                value = value.float() * scale.to(device).float()
            set_module_tensor_to_device(model, name, device, value=value.to(target), dtype=target)
        seen.add(name)
    missing = expected - seen
    if missing:
        raise WanpairError(f"{info.path} lacks {len(missing)} tensors (e.g. {sorted(missing)[0]}); it is incomplete.")
    return model.eval().requires_grad_(False)
