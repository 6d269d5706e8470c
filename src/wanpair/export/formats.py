"""LoRA file layouts for Wan, read into one canonical form and written back out in any of them.

Canonical form: original Wan module path (`blocks.0.self_attn.q`) -> (down [r, in], up [out, r], alpha).
Layouts:
- musubi (kohya; the default, what ComfyUI and diffusers load for Wan):
  `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`
- comfy (also ai-toolkit's): `diffusion_model.blocks.0.self_attn.q.lora_A.weight`, `.lora_B.weight`, `.alpha`
- diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight`; no alpha key, so
  alpha/rank is folded into the down weights on export
- peft: a folder with `adapter_model.safetensors` (`base_model.model.<diffusers name>.lora_A.weight`)
  and `adapter_config.json` (r, lora_alpha, target_modules)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..errors import WanpairError
from ..models.dit_names import original_to_diffusers_names, to_original_name


FORMATS = ("musubi", "comfy", "diffusers", "peft")


@dataclass
class LoraWeights:
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "musubi"

    @property
    def rank(self) -> int:
        return max(d.shape[0] for d, _, _ in self.modules.values())

    def scale(self, module: str) -> float:
        down, _, alpha = self.modules[module]
        return alpha / down.shape[0]

    def delta(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight update this LoRA adds to `module` at strength 1: (alpha / rank) * up @ down, made
        on `device` (a 5120 x 13824 update is 283 MB of fp32: made on the GPU, it never crosses the bus)."""
        down, up, _ = self.modules[module]
        return self.scale(module) * (up.to(device).float() @ down.to(device).float())


def _kohya_to_module(name: str) -> str:
    """`blocks_0_cross_attn_k_img` -> `blocks.0.cross_attn.k_img`."""
    s = re.sub(r"^blocks_(\d+)_", r"blocks.\1.", name)
    return re.sub(r"\.(self_attn|cross_attn|ffn)_", r".\1.", s)


def _group(sd: dict[str, torch.Tensor], pattern: str, down: str, up: str, to_module) -> dict:
    parts: dict[str, dict] = {}
    for key, value in sd.items():
        m = re.match(pattern, key)
        if not m:
            continue
        name, kind = m.group(1), m.group(2)
        parts.setdefault(to_module(name), {})[kind] = value
    modules = {}
    for module, p in parts.items():
        if down not in p or up not in p:
            raise WanpairError(f"LoRA module {module} lacks its {down if down not in p else up} weight.")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else float(p[down].shape[0])
        modules[module] = (p[down], p[up], alpha)
    return modules


def read_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA in any supported layout (file, or peft adapter folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not (cfg_path.is_file() and weights.is_file()):
            raise WanpairError(f"{path} is a folder but not a peft adapter (adapter_config.json + adapter_model.safetensors).")
        cfg = json.loads(cfg_path.read_text())
        sd = load_file(str(weights))
        modules = _group(sd, r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight$", "lora_A", "lora_B", to_original_name)
        modules = {m: (d, u, float(cfg.get("lora_alpha", d.shape[0]))) for m, (d, u, _) in modules.items()}
        return LoraWeights(modules, {}, "peft")
    if not path.is_file():
        raise WanpairError(f"LoRA file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise WanpairError(f"{path} is not a readable safetensors LoRA ({e}).") from None
    if any(k.startswith("lora_unet_") for k in sd):
        modules = _group(sd, r"^lora_unet_(.+)\.(lora_down|lora_up|alpha)(?:\.weight)?$", "lora_down", "lora_up", _kohya_to_module)
        fmt = "musubi"
    elif any(k.startswith("diffusion_model.") for k in sd):
        modules = _group(sd, r"^diffusion_model\.(.+)\.(lora_A|lora_B|alpha)(?:\.weight)?$", "lora_A", "lora_B", lambda s: s)
        fmt = "comfy"
    elif any(".lora_A." in k or ".lora_B." in k for k in sd):
        modules = _group(sd, r"^(?:transformer\.)?(.+)\.(lora_A|lora_B)\.weight$", "lora_A", "lora_B", to_original_name)
        fmt = "diffusers"
    else:
        raise WanpairError(f"{path} is not a Wan LoRA wanpair recognises (no lora_unet_/diffusion_model./lora_A keys).")
    if not modules:
        raise WanpairError(f"{path} holds no LoRA modules.")
    return LoraWeights(modules, metadata, fmt)


def _diffusers_name(module: str, names: dict[str, str]) -> str:
    return names[module + ".weight"].removesuffix(".weight")


def to_state_dict(lora: LoraWeights, fmt: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA as a state dict in layout `fmt` (not peft: see write_lora)."""
    cast = (lambda t: t.to(dtype).contiguous()) if dtype else (lambda t: t.contiguous())
    sd: dict[str, torch.Tensor] = {}
    names = original_to_diffusers_names([m + ".weight" for m in lora.modules])
    for module, (down, up, alpha) in sorted(lora.modules.items()):
        if fmt == "musubi":
            key = "lora_unet_" + module.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = cast(down), cast(up)
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype or down.dtype)
        elif fmt == "comfy":
            key = f"diffusion_model.{module}"
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = cast(down), cast(up)
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype or down.dtype)
        elif fmt in ("diffusers", "peft"):
            prefix = "transformer." if fmt == "diffusers" else "base_model.model."
            key = prefix + _diffusers_name(module, names)
            scale = alpha / down.shape[0] if fmt == "diffusers" else 1.0
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = cast(down * scale), cast(up)
        else:
            raise WanpairError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return sd


def write_lora(lora: LoraWeights, path: str | Path, fmt: str, dtype: torch.dtype | None = None) -> Path:
    """Write atomically in layout `fmt`; a peft adapter is a folder."""
    path = Path(path)
    sd = to_state_dict(lora, fmt, dtype)
    metadata = {k: str(v) for k, v in lora.metadata.items()}
    if fmt == "peft":
        ranks = {d.shape[0] for d, _, _ in lora.modules.values()}
        alphas = {a for _, _, a in lora.modules.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise WanpairError("a peft adapter needs one rank and alpha for all modules; export as musubi instead.")
        names = original_to_diffusers_names([m + ".weight" for m in lora.modules])
        targets = sorted({_diffusers_name(m, names) for m in lora.modules})
        config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": targets,
                  "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "adapter_model.safetensors") as tmp:
            save_file(sd, str(tmp), metadata=metadata)
        with atomic_path(path / "adapter_config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        return path
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
        with safe_open(str(tmp), framework="pt") as f:
            if set(f.keys()) != set(sd):
                raise WanpairError(f"verification of {path} failed after writing; check the disk.")
    return path


def describe(lora: LoraWeights, path: Path) -> str:
    """What `wanpair inspect` prints."""
    ranks = sorted({d.shape[0] for d, _, _ in lora.modules.values()})
    alphas = sorted({a for _, _, a in lora.modules.values()})
    dtypes = sorted({str(d.dtype).removeprefix("torch.") for d, _, _ in lora.modules.values()})
    kinds = sorted({re.sub(r"^blocks\.\d+\.", "", m) for m in lora.modules})
    blocks = sorted({int(m.split(".")[1]) for m in lora.modules if m.startswith("blocks.")})
    meta = lora.metadata
    lines = [
        f"file:        {path}",
        f"layout:      {lora.source_format}",
        f"expert:      {meta.get('wanpair.expert', 'unknown (not a wanpair file)')}"
        + (" (one model over all timesteps)" if meta.get("wanpair.expert") == "full" else ""),
        f"timesteps:   {meta.get('modelspec.timestep_range', meta.get('wanpair.timestep_window', 'unknown'))}",
        f"rank:        {', '.join(map(str, ranks))}    alpha: {', '.join(f'{a:g}' for a in alphas)}",
        f"dtype:       {', '.join(dtypes)}",
        f"modules:     {len(lora.modules)} in {len(blocks)} blocks" + (f" ({blocks[0]}-{blocks[-1]})" if blocks else ""),
        f"targets:     {', '.join(kinds)}",
    ]
    if "wanpair.validation_loss" in meta:
        lines.append(f"validation:  loss {meta['wanpair.validation_loss']} at step {meta.get('wanpair.validation_step')} "
                     f"({meta.get('wanpair.validation_kind')})")
    if meta:
        lines.append("metadata:")
        lines += [f"  {k} = {v if len(v) < 200 else v[:200] + '...'}" for k, v in sorted(meta.items())]
    return "\n".join(lines)
