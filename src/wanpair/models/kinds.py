"""Tell weight files apart by their tensor names, so a mix-up is caught before anything loads."""

from __future__ import annotations

from pathlib import Path

from .files import WeightFile, inspect_weight_file, strip_prefix
from ..errors import WanpairError

_DESCRIPTIONS = {
    "dit": "a Wan diffusion transformer (DiT, like wan2.2_t2v_high_noise_14B_fp16.safetensors)",
    "vae": "the Wan VAE (like wan_2.1_vae.safetensors)",
    "t5": "Wan's umT5 text encoder (like models_t5_umt5-xxl-enc-bf16.pth)",
    "lora": "a LoRA file",
    "clip": "the CLIP image encoder that only Wan's image-to-video models use",
    "unknown": "not a file wanpair recognises",
}


# LyCORIS adapters whose update is no low-rank product, by the marker in their key names (lokr_w1, hada_w1_a): they
# name the modules they adapt like a DiT's own keys (`blocks.0.attn1.to_q.lokr_w1`) and are no base model either
LYCORIS_KINDS = {"lokr_": "LoKr", "hada_": "LoHa"}
_ADAPTER_MARKERS = ("lora_down", "lora_A", "lora_up", "lora_B", *LYCORIS_KINDS)  # parts only an adapter has


def kind_of(keys: tuple[str, ...]) -> str:
    """Classify a state dict by its key names."""
    prefix = strip_prefix(keys)
    names = {k[len(prefix):] for k in keys}
    if any(marker in k for k in names for marker in _ADAPTER_MARKERS):
        return "lora"
    if "patch_embedding.weight" in names or any(k.startswith("blocks.0.attn1.") for k in names):
        return "dit"
    if {"encoder.conv1.weight", "decoder.conv1.weight"} <= names or "encoder.conv_in.weight" in names:
        return "vae"
    if "token_embedding.weight" in names and any(".attn.q." in k for k in names):
        return "t5"
    if "shared.weight" in names or any(k.startswith("encoder.block.0.layer.0.SelfAttention") for k in names):
        return "t5"
    if any(k.startswith(("visual.", "textual.")) for k in names):
        return "clip"
    return "unknown"


def describe_kind(kind: str) -> str:
    """What a file of `kind_of`'s `kind` is, in words ("a Wan diffusion transformer (DiT, like ...)")."""
    return _DESCRIPTIONS[kind]


def identify(wf: WeightFile, expected: str) -> None:
    """Raise a clear error if `wf` is not the kind of file the caller expects; the caller names the slot (a
    project's `[models] high_noise: `, merge's `--base: `)."""
    kind = kind_of(wf.keys)
    if kind == expected:
        return
    hint = {
        "lora": " A LoRA is what wanpair produces; give the base model here.",
    }.get(kind, "")
    raise WanpairError(f"{wf.path} is {_DESCRIPTIONS[kind]}, but this slot needs {_DESCRIPTIONS[expected]}.{hint}")


# the library folder each of the other models may come as instead of a file
_FOLDERS = {"vae": ("VAE", "diffusers `vae/`"), "t5": ("umT5", "transformers `text_encoder/`")}


def other_model_problems(models) -> list[str]:
    """[models] vae and t5 (a project's `models`): each a weight file of its kind (from its header, no weights read)
    or a library folder with its config.json; what is wrong, named by key, before anything loads."""
    problems = []
    for key, (noun, folder) in _FOLDERS.items():
        path: Path = getattr(models, key)
        try:
            if not path.is_dir():
                identify(inspect_weight_file(path), expected=key)
            elif not (path / "config.json").is_file():
                raise WanpairError(f"{path} is a folder without config.json; give the {noun} file, or a {folder} "
                                   "folder.")
        except WanpairError as e:
            problems.append(f"[models] {key}: {e}")
    return problems
