"""Loaders for the weight files users have, into the diffusers / transformers classes we train with.

Public API (usable from scripts too):
- `load_dit(path)` -> diffusers `WanTransformer3DModel` (original/ComfyUI single file or diffusers folder)
- `load_vae(path)` -> diffusers `AutoencoderKLWan` (original single file or diffusers folder)
- `load_text_encoder(path, tokenizer_path)` -> (transformers `UMT5EncoderModel`, tokenizer)
All work offline: the architecture is read from the checkpoint's tensor shapes.
"""

from .dit import DitInfo, inspect_dit, load_dit
from .files import WeightFile, inspect_weight_file
from .text_encoder import load_text_encoder
from .vae import load_vae

__all__ = ["DitInfo", "WeightFile", "inspect_dit", "inspect_weight_file", "load_dit", "load_text_encoder", "load_vae"]
