"""The DiT's two naming schemes: the original Wan / ComfyUI keys (`blocks.0.self_attn.q.weight`) and
diffusers' (`blocks.0.attn1.to_q.weight`). Pure renaming, kept apart from the loader so that reading or
converting a LoRA file does not import diffusers' model code (seconds at every command's start); the
original -> diffusers direction is diffusers' own `convert_wan_transformer_to_diffusers`, applied to
names only.
"""

from __future__ import annotations

import re

# diffusers module path -> original Wan module path. Applied to "name." so partial words never match.
_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers swapped norm2/norm3 of the original
    (r"^(blocks\.\d+)\.scale_shift_table\.", r"\1.modulation."),
    (r"^scale_shift_table\.", "head.modulation."),
    (r"^proj_out\.", "head.head."),
]


def to_original_name(name: str) -> str:
    """`blocks.0.attn1.to_out.0.weight` -> `blocks.0.self_attn.o.weight` (works for module paths too)."""
    s = name + "."
    for pattern, repl in _TO_ORIGINAL:
        s = re.sub(pattern, repl, s)
    return s[:-1]


def original_to_diffusers_names(keys: list[str]) -> dict[str, str]:
    """Map original Wan key names to diffusers names using diffusers' own converter on the names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    renamed = convert_wan_transformer_to_diffusers({k: k for k in keys})
    return {orig: new for new, orig in renamed.items()}
