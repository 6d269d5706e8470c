"""LoRA file layouts for Wan, read into one canonical form and written back out in any of them.

Canonical form: original Wan module path (`blocks.0.self_attn.q`) -> (down [r, in], up [out, r], alpha),
plus full weight deltas and bias deltas by module path (ComfyUI's `.diff` and `.diff_b` keys, read in every
layout's naming). Any other key (LoKr, LoHa, ...) is refused: a file is applied whole or not at all.
Layouts:
- musubi (kohya; the default, what ComfyUI and diffusers load for Wan):
  `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`
- comfy (also ai-toolkit's): `diffusion_model.blocks.0.self_attn.q.lora_A.weight`, `.lora_B.weight`, `.alpha`;
  the one layout that also holds deltas when written (`.diff`, `.diff_b`)
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
from ..models.kinds import LYCORIS_KINDS, describe_kind, kind_of


FORMATS = ("musubi", "comfy", "diffusers", "peft")


@dataclass
class LoraWeights:
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "musubi"
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> full weight delta [out, in]
    bias_diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> bias delta [out]

    @property
    def rank(self) -> int:
        return max(d.shape[0] for d, _, _ in self.modules.values())

    def scale(self, module: str) -> float:
        down, _, alpha = self.modules[module]
        return alpha / down.shape[0]

    def delta(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight update this LoRA adds to `module` at strength 1: (alpha / rank) * up @ down plus its
        full delta, made on `device` (a 5120 x 13824 update is 283 MB of fp32: made on the GPU, it never
        crosses the bus)."""
        update = self.diffs[module].to(device).float() if module in self.diffs else 0
        if module in self.modules:
            down, up, _ = self.modules[module]
            update = update + self.scale(module) * (up.to(device).float() @ down.to(device).float())
        return update

    def update(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """What this LoRA adds at strength 1 to the base tensor `key` (original Wan name, a `.weight` or
        `.bias`), or None when it leaves that tensor alone."""
        module, _, leaf = key.rpartition(".")
        if leaf == "bias" and module in self.bias_diffs:
            return self.bias_diffs[module].to(device).float()
        if leaf == "weight" and (module in self.modules or module in self.diffs):
            return self.delta(module, device)
        return None

    def targets(self) -> list[tuple[str, tuple[int, ...]]]:
        """(base tensor key, shape of the update) for each part -- a pair and a `.diff` of one layer are
        listed apart, so that each is checked against the layer."""
        pairs = [(f"{m}.weight", (up.shape[0], down.shape[1])) for m, (down, up, _) in self.modules.items()]
        return (pairs + [(f"{m}.weight", tuple(d.shape)) for m, d in self.diffs.items()]
                + [(f"{m}.bias", tuple(b.shape)) for m, b in self.bias_diffs.items()])

    def delta_keys(self) -> list[str]:
        """The full and bias deltas, named as ComfyUI names them (`blocks.0.self_attn.q.diff`, `.diff_b`)."""
        return sorted([f"{m}.diff" for m in self.diffs] + [f"{m}.diff_b" for m in self.bias_diffs])


def some_keys(keys) -> str:
    """`7 keys (a, b, c, d, e, ...)`: the count and up to five names, for error messages."""
    keys = sorted(keys)
    return f"{len(keys)} key{'' if len(keys) == 1 else 's'} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"


def _kohya_to_module(name: str) -> str:
    """`blocks_0_cross_attn_k_img` -> `blocks.0.cross_attn.k_img`."""
    s = re.sub(r"^blocks_(\d+)_", r"blocks.\1.", name)
    return re.sub(r"\.(self_attn|cross_attn|ffn)_", r".\1.", s)


# The parts of one module's update, by each layout's name for them (kohya: lora_down/up; peft, diffusers,
# ai-toolkit: lora_A/B; ComfyUI: `.diff` a full weight delta, `.diff_b` a bias delta).
_PARTS = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up", "alpha": "alpha",
          "diff": "diff", "diff_b": "diff_b"}


def _unusable(path: Path, keys: list[str]) -> WanpairError:
    kind = next((k for marker, k in LYCORIS_KINDS.items() if any(marker in key for key in keys)), "unknown")
    looks = f"they look like {kind} (LyCORIS), not a LoRA" if kind != "unknown" else "their kind is unknown"
    tool = f", or use it with a tool that applies {kind}" if kind != "unknown" else ""
    return WanpairError(
        f"{path} holds {some_keys(keys)} that wanpair cannot apply: {looks}. wanpair "
        "applies LoRA down/up pairs with their alpha (lora_unet_*, diffusion_model.*, lora_A/lora_B keys) and full "
        f"weight and bias deltas (.diff, .diff_b), and skips nothing: convert the file to a plain LoRA{tool}.")


def _group(path: Path, sd: dict[str, torch.Tensor], prefix: str, to_module) -> tuple[dict, dict, dict]:
    """The LoRA pairs, full weight deltas and bias deltas of a state dict whose keys are `prefix` + a module
    name (`to_module` makes it the Wan module path) + a part; any other key is refused."""
    pattern = re.compile(rf"^{prefix}(.+)\.({'|'.join(_PARTS)})(?:\.weight)?$")
    parts: dict[str, dict] = {}
    unusable = []
    for key, value in sd.items():
        m = pattern.match(key)
        if m:
            parts.setdefault(to_module(m.group(1)), {})[_PARTS[m.group(2)]] = value
        else:
            unusable.append(key)
    if unusable:
        raise _unusable(path, unusable)
    modules = {}
    for module, p in parts.items():
        if p.keys() & {"down", "up", "alpha"}:
            lacking = [n for n in ("down", "up") if n not in p]
            if lacking:
                raise WanpairError(f"{path}: LoRA module {module} lacks its {lacking[0]} weight "
                                   f"({'lora_down / lora_A' if lacking[0] == 'down' else 'lora_up / lora_B'}).")
            alpha = float(p["alpha"].float().item()) if "alpha" in p else float(p["down"].shape[0])
            modules[module] = (p["down"], p["up"], alpha)
    diffs = {m: p["diff"] for m, p in parts.items() if "diff" in p}
    bias_diffs = {m: p["diff_b"] for m, p in parts.items() if "diff_b" in p}
    return modules, diffs, bias_diffs


_MODEL_KINDS = ("dit", "vae", "t5", "clip")  # files `kind_of` recognises as whole models, not adapters
_DELTA_ENDINGS = (".alpha", ".diff", ".diff_b")  # a LoRA's own parts: a file holding them is not a base model


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A LoRA's safetensors file: its metadata and tensors, or an error naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, tuple(f.keys())
        kind = kind_of(keys)
        if kind in _MODEL_KINDS and not any(k.endswith(_DELTA_ENDINGS) for k in keys):
            raise WanpairError(f"{path} is {describe_kind(kind)}, not a LoRA: give a LoRA file here (a base model "
                               "goes to `merge --base` or a project's [models]).")  # before its gigabytes are read
        return metadata, load_file(str(path))
    except WanpairError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise WanpairError(f"{path} is not a readable safetensors LoRA ({e}).") from None


def read_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA in any supported layout (file, or peft adapter folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not (cfg_path.is_file() and weights.is_file()):
            raise WanpairError(f"{path} is a folder but not a peft adapter (adapter_config.json + adapter_model.safetensors).")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (ValueError, OSError) as e:
            raise WanpairError(f"{cfg_path} is not readable JSON ({e}): export the adapter again.") from None
        if not isinstance(cfg, dict):
            raise WanpairError(f"{cfg_path} is not a peft adapter config (a JSON object): export the adapter again.")
        metadata, sd = _read_safetensors(weights)  # wanpair's exports keep the expert and base model here
        modules, diffs, bias_diffs = _group(path, sd, r"(?:base_model\.model\.)?", to_original_name)
        modules = {m: (d, u, float(cfg.get("lora_alpha", d.shape[0]))) for m, (d, u, _) in modules.items()}
        return LoraWeights(modules, metadata, "peft", diffs, bias_diffs)
    if not path.is_file():
        raise WanpairError(f"LoRA file {path} does not exist.")
    metadata, sd = _read_safetensors(path)
    if not sd:
        raise WanpairError(f"{path} holds no LoRA modules.")
    if any(k.startswith("lora_unet_") for k in sd):
        fmt, prefix, to_module = "musubi", r"lora_unet_", _kohya_to_module
    elif any(k.startswith("diffusion_model.") for k in sd):
        fmt, prefix, to_module = "comfy", r"diffusion_model\.", str
    elif any(".lora_A." in k or ".lora_B." in k for k in sd):
        fmt, prefix, to_module = "diffusers", r"(?:transformer\.)?", to_original_name
    else:
        raise _unusable(path, list(sd))
    modules, diffs, bias_diffs = _group(path, sd, prefix, to_module)
    return LoraWeights(modules, metadata, fmt, diffs, bias_diffs)


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
    # ComfyUI's own keys for full and bias deltas. diffusers' Wan loader reads them from this layout only
    # (huggingface/diffusers src/diffusers/loaders/lora_conversion_utils.py,
    # `_convert_non_diffusers_wan_lora_to_diffusers`: `.diff_b` becomes the layer's `lora_B.bias`, `head.head.diff`
    # a proj_out update; a block's `.diff` it logs and leaves out); its kohya/Musubi reader and the lora_A/lora_B
    # layouts have no name for them.
    if lora.diffs or lora.bias_diffs:
        if fmt != "comfy":
            raise WanpairError(f"the {fmt} layout cannot hold full weight or bias deltas, and this LoRA has "
                               f"{some_keys(lora.delta_keys())}; export it with --format comfy.")
        sd |= {f"diffusion_model.{m}.diff": cast(d) for m, d in sorted(lora.diffs.items())}
        sd |= {f"diffusion_model.{m}.diff_b": cast(b) for m, b in sorted(lora.bias_diffs.items())}
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
    tensors = [d for d, _, _ in lora.modules.values()] + [*lora.diffs.values(), *lora.bias_diffs.values()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    updated = {*lora.modules, *lora.diffs, *lora.bias_diffs}
    kinds = sorted({re.sub(r"^blocks\.\d+\.", "", m) for m in updated})
    blocks = sorted({int(m.split(".")[1]) for m in updated if m.startswith("blocks.")})
    meta = lora.metadata
    lines = [
        f"file:        {path}",
        f"layout:      {lora.source_format}",
        f"expert:      {meta.get('wanpair.expert', 'unknown (not a wanpair file)')}"
        + (" (one model over all timesteps)" if meta.get("wanpair.expert") == "full" else ""),
        f"timesteps:   {meta.get('modelspec.timestep_range', meta.get('wanpair.timestep_window', 'unknown'))}",
        f"rank:        {', '.join(map(str, ranks))}    alpha: {', '.join(f'{a:g}' for a in alphas)}" if ranks
        else "rank:        none (no down/up pairs)",
        f"dtype:       {', '.join(dtypes)}",
        f"modules:     {len(updated)} in {len(blocks)} blocks" + (f" ({blocks[0]}-{blocks[-1]})" if blocks else ""),
        f"targets:     {', '.join(kinds)}",
    ]
    if lora.diffs or lora.bias_diffs:
        lines.append(f"deltas:      {len(lora.diffs)} full weight deltas (.diff), {len(lora.bias_diffs)} bias deltas (.diff_b)")
    if "wanpair.validation_loss" in meta:
        lines.append(f"validation:  loss {meta['wanpair.validation_loss']} at step {meta.get('wanpair.validation_step')} "
                     f"({meta.get('wanpair.validation_kind')})")
    if meta:
        lines.append("metadata:")
        lines += [f"  {k} = {v if len(v) < 200 else v[:200] + '...'}" for k, v in sorted(meta.items())]
    return "\n".join(lines)
