"""Loaders for the weight files users have, into the diffusers / transformers classes we train with.

Public API (usable from scripts too):
- `load_dit(path)` -> diffusers `WanTransformer3DModel` (original/ComfyUI single file or diffusers folder)
- `load_vae(path)` -> diffusers `AutoencoderKLWan` (original single file or diffusers folder)
- `load_text_encoder(path, tokenizer_path)` -> (transformers `UMT5EncoderModel`, tokenizer)
All work offline: the architecture is read from the checkpoint's tensor shapes.

The names are imported when first used (PEP 562), so that the light modules of this package (`tasks`,
`files`, `kinds`) do not pull in diffusers and transformers: `wanpair --help`, `check` and `inspect`
start in a second or two instead of eight.
"""

import importlib

_WHERE = {"DitInfo": "dit", "inspect_dit": "dit", "load_dit": "dit", "WeightFile": "files",
          "inspect_weight_file": "files", "load_text_encoder": "text_encoder", "load_vae": "vae"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
