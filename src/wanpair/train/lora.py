"""LoRA on every Linear layer inside every transformer block, and the file format ComfyUI loads.

Targets (diffusers names): attn1.to_q/to_k/to_v/to_out.0 (self-attention), attn2.* (cross-attention),
ffn.net.0.proj and ffn.net.2; in original Wan names self_attn.q/k/v/o, cross_attn.q/k/v/o, ffn.0,
ffn.2 -- the set the reference trainer's `networks.lora_wan` targets. Nothing outside the blocks.

Saved layout (kohya / Musubi-Tuner, which ComfyUI and diffusers load for Wan):
`lora_unet_<original module path, dots as underscores>.lora_down.weight` (= peft lora_A),
`.lora_up.weight` (= lora_B) and `.alpha` (a scalar; scale = alpha / rank).
"""

from __future__ import annotations

import re

import torch
import torch.nn.modules.module as module_hooks
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import WanpairError
from ..export.formats import some_keys
from ..models.attention import separate_projections
from ..models.dit import to_original_name

TARGET_MODULES = r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.0\.proj|ffn\.net\.2)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def target_modules(model, include=(), exclude=()) -> list[str]:
    """Every block Linear, narrowed by regexes (searched in the original Wan names, e.g. "ffn", "cross_attn")."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(TARGET_MODULES, n)]
    if include:
        names = [n for n in names if any(re.search(p, to_original_name(n)) for p in include)]
    names = [n for n in names if not any(re.search(p, to_original_name(n)) for p in exclude)]
    if not names:
        raise WanpairError("include_modules / exclude_modules leave no layer to train; loosen them.")
    return names


def add_lora(model, rank: int, alpha: float, dropout: float = 0.0, include=(), exclude=()) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA (down: Kaiming-uniform, up: zeros, so it starts as a no-op); return its fp32 params."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
                                 target_modules=target_modules(model, include, exclude)))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            # peft casts each layer's input to the LoRA's fp32 before the matmul (a full-size copy per
            # layer, kept for backward); under autocast the matmul runs in bf16 anyway.
            module.cast_input_dtype_enabled = False
    params = []
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
            params.append(p)
    return params


def add_lora_dropouts(model, rank_dropout: float, module_dropout: float) -> None:
    """kohya/Musubi's extra LoRA regularisers, as forward hooks on peft's LoRA layers (training only):
    rank dropout zeroes random rank components of lora_A's output (rescaled by 1/(1-p)); module
    dropout drops a module's whole LoRA contribution for the step."""
    if not rank_dropout and not module_dropout:
        return
    for module in model.modules():
        if not (isinstance(module, LoraLayer) and "default" in module.lora_A):
            continue
        if rank_dropout:
            def drop_ranks(mod, args, out, p=rank_dropout):
                if not mod.training:
                    return out
                keep = (torch.rand(out.shape[-1], device=out.device) >= p).to(out.dtype)
                return out * keep / (1 - p)
            module.lora_A["default"].register_forward_hook(drop_ranks)
        if module_dropout:
            def drop_module(mod, args, out, p=module_dropout):
                return out * 0 if mod.training and torch.rand(()) < p else out
            module.lora_B["default"].register_forward_hook(drop_module)


def _plain(layer) -> bool:
    """Whether a layer computes base(x) + B(A(x)) * scaling and nothing else: a peft LoRA Linear whose one adapter
    ("default") is active and unmerged, without dropout, input cast, DoRA-like variant or hooks (rank and module
    dropout are hooks; global module hooks count too)."""
    if not (isinstance(layer, LoraLayer) and "default" in layer.lora_A and list(layer.active_adapters) == ["default"]):
        return False
    modules = (layer, layer.lora_A["default"], layer.lora_B["default"])
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)
    return (not layer.disable_adapters and not layer.merged and not getattr(layer, "lora_variant", None)
            and isinstance(layer.lora_dropout["default"], torch.nn.Identity)
            and not getattr(layer, "cast_input_dtype_enabled", True) and not hooked
            and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


def shared_input_projections(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """Several LoRA Linears on one input (a block's q, k and v), their down-projections as one matmul.

    Why: a down-projection (x @ A^T, rank r) is a thin matmul that reads the whole input for r outputs; three of them
    read it three times, and backward reads it three times more (A's gradient) and writes three input gradients to
    be summed. Stacking the A matrices makes each of those one pass: same products, same gradients. Layers that
    are not plain LoRA (see `_plain`) run as they are."""
    if not all(_plain(layer) for layer in layers):
        return separate_projections(layers, x)
    downs = [layer.lora_A["default"] for layer in layers]
    low = torch.nn.functional.linear(x, torch.cat([down.weight for down in downs]))
    outs = []
    for layer, part in zip(layers, low.split([down.out_features for down in downs], dim=-1)):
        base = layer.base_layer(x)
        outs.append((base + layer.lora_B["default"](part) * layer.scaling["default"]).to(base.dtype))
    return outs


def lora_pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(down, up) weights of every LoRA module (peft's lora_A, lora_B)."""
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A]


@torch.no_grad()
def apply_max_norm(pairs, max_norm: float, scale: float) -> torch.Tensor:
    """Max-norm regularisation after an update, as kohya's sd-scripts (`apply_max_norm_regularization`) and
    Musubi-Tuner's `scale_weight_norms` do it: a module whose weight change dW = scale * up @ down has a
    Frobenius norm above `max_norm` gets both factors scaled by sqrt(max_norm / |dW|). |dW| is computed
    from the rank x rank Gram matrices, |U D|^2 = sum((U^T U) * (D D^T)), never forming dW. Returns
    [modules scaled, mean norm, max norm] after it, on the device (read with the step's verdict).

    Modules of one shape (a 14B expert has 400 in 4 shapes) go through one batched matmul and are scaled
    in one pass: a loop per module launched ~3 000 small kernels, ~50 ms of an H100 step (docs/benchmarks.md)."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for down, up in pairs:
        groups.setdefault((down.shape, up.shape, down.dtype), []).append((down, up))
    ratios, afters = [], []
    for members in groups.values():  # no index tensors built on the host: nothing here waits for the GPU
        downs, ups = torch.stack([d for d, _ in members]), torch.stack([u for _, u in members])
        norms = scale * ((ups.mT @ ups) * (downs @ downs.mT)).sum(dim=(1, 2)).float().clamp_min(0).sqrt()
        ratio = (max_norm / norms).clamp(max=1.0)  # a zero norm gives inf: clamped to 1, left alone
        root = ratio.sqrt().view(-1, 1, 1).to(downs.dtype)
        torch._foreach_copy_([d for d, _ in members], list(downs.mul_(root).unbind()))  # the stacks are copies:
        torch._foreach_copy_([u for _, u in members], list(ups.mul_(root).unbind()))  # scaled in place, no third
        ratios.append(ratio)
        afters.append(norms * ratio)
    ratio, after = torch.cat(ratios), torch.cat(afters)
    return torch.stack([(ratio < 1).sum().to(after.dtype), after.mean(), after.max()])


def kohya_name(module_path: str) -> str:
    """`blocks.0.attn1.to_out.0` -> `lora_unet_blocks_0_self_attn_o`."""
    return "lora_unet_" + to_original_name(module_path).replace(".", "_")


def lora_state_dict(model, alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained LoRA in the kohya/Musubi layout, in `dtype`."""
    sd = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = kohya_name(path)
            sd[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().to("cpu", dtype).contiguous()
            sd[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().to("cpu", dtype).contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    if not sd:
        raise RuntimeError("the model has no LoRA layers to save")
    bad = [k for k, v in sd.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise WanpairError(f"the LoRA has non-finite values (e.g. {bad[0]}); not saving it. Lower the learning rate.")
    return sd


def check_initial_lora(lora, rank: int) -> None:
    """What makes a LoRA file unable to start this run's LoRA, read from the file alone (the pre-flight check
    asks before any model loads): full weight or bias deltas, or another rank."""
    if lora.diffs or lora.bias_diffs:
        raise WanpairError(
            f"the initial LoRA (init_lora) holds full weight or bias deltas, {some_keys(lora.delta_keys())}; "
            f"a rank-{rank} LoRA cannot start from them. Merge that file into the base model (wanpair merge) and train on the "
            "merged model, or start from a LoRA without .diff/.diff_b keys.")
    ranks = sorted({down.shape[0] for down, _, _ in lora.modules.values()} - {rank})
    if ranks:
        raise WanpairError(f"the initial LoRA has rank {ranks[0]} but [train] rank = {rank}; set rank = {ranks[0]}.")


def load_initial_lora(model, lora, rank: int, alpha: float) -> int:
    """Start the peft LoRA from an existing one (any layout `wanpair.export.formats.read_lora` reads).

    Up weights are rescaled so the effective update (alpha/rank * up @ down) equals the file's even
    when its alpha differs from ours. Full weight and bias deltas (`.diff`, `.diff_b`) are refused: a
    rank-r product cannot hold a full-rank delta, and the LoRA trains no biases. Returns how many modules
    were initialised.
    """
    check_initial_lora(lora, rank)
    done = 0
    layers = {to_original_name(path): m for path, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    unknown = sorted(set(lora.modules) - set(layers))
    if unknown:
        raise WanpairError(f"the initial LoRA targets {unknown[0]} (and {len(unknown) - 1} more) which this run does not train.")
    for name, (down, up, file_alpha) in lora.modules.items():
        layer = layers[name]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(down.float())
            layer.lora_B["default"].weight.copy_(up.float() * (file_alpha / alpha))
        done += 1
    return done


def save_lora(path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically, then re-open and verify before the caller reports success."""
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
        with safe_open(str(tmp), framework="pt") as f:
            if set(f.keys()) != set(sd) or f.metadata() != metadata:
                raise WanpairError(f"verification of {path} failed after writing; check the disk.")


