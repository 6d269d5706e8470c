"""The Wan 2.1 VAE: identify, load into diffusers' `AutoencoderKLWan`, and write the original layout.

The original file (`wan_2.1_vae.safetensors`, `Wan2.1_VAE.pth`) is renamed with diffusers'
`convert_wan_vae_to_diffusers`; that converter assumes the released layout (4 stages, 2 residual
blocks each), so other layouts are refused with a clear message.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..errors import WanpairError
from .files import WeightFile, inspect_weight_file, iter_tensors
from .kinds import identify

log = logging.getLogger(__name__)


def _resnet_to_original(s: str) -> str:
    for new, old in ((".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
                     (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")):
        s = s.replace(new, old)
    return s


def to_original_name(name: str) -> str:
    """diffusers `AutoencoderKLWan` key -> original Wan VAE key (the inverse of diffusers' converter)."""
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for new, old in fixed.items():
        if name.startswith(new):
            return old + name[len(new):]
    for side in ("encoder", "decoder"):
        for new, old in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
            if name.startswith(f"{side}.{new}"):
                return f"{side}.{old}" + name[len(side) + 1 + len(new):]
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", name)
    if m:
        side, kind, i, rest = m.groups()
        idx = 1 if kind == "attentions" else 2 * int(i)
        return _resnet_to_original(f"{side}.middle.{idx}.{rest}") if kind == "resnets" else f"{side}.middle.1.{rest}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", name)
    if m:
        return _resnet_to_original(f"encoder.downsamples.{m[1]}.{m[2]}")
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        block, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 4 * block + (3 if kind == "upsamplers" else i)
        return _resnet_to_original(f"decoder.upsamples.{idx}.{rest}")
    return name


def _config_from_original(shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    z2 = shapes.get("conv1.weight", (0,))[0]
    if z2 == 96:
        raise WanpairError(
            f"{path} is the Wan 2.2 VAE (48 latent channels), which only the TI2V-5B model uses. "
            "Wan 2.2 A14B and Wan 2.1 need the Wan 2.1 VAE: wan_2.1_vae.safetensors."
        )
    try:
        base = shapes["encoder.conv1.weight"][0]
        stages = [shapes[f"encoder.downsamples.{i}.residual.2.weight"][0] for i in (0, 3, 6, 9)]
        temporal = [f"encoder.downsamples.{i}.time_conv.weight" in shapes for i in (2, 5, 8)]
    except KeyError as e:
        raise WanpairError(
            f"{path} is not in the released Wan 2.1 VAE layout (missing {e}); use wan_2.1_vae.safetensors."
        ) from None
    return dict(base_dim=base, z_dim=z2 // 2, dim_mult=[s // base for s in stages], num_res_blocks=2,
                attn_scales=[], temperal_downsample=temporal)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Load the Wan VAE (original single file or diffusers `vae/` folder) into `AutoencoderKLWan`.

    The latent normalisation constants are diffusers' `latents_mean`/`latents_std` defaults, which
    are Wan 2.1's published per-channel values (Wan2.1 `wan/modules/vae.py`).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WanpairError(f"{path} is a folder without config.json; expected a diffusers `vae/` folder.")
        log.info("loading VAE (diffusers folder) from %s", path)
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        if vae.config.z_dim != 16:
            raise WanpairError(f"{path} has {vae.config.z_dim} latent channels; Wan 2.2 A14B and Wan 2.1 need the 16-channel Wan 2.1 VAE.")
        return vae.to(device).eval().requires_grad_(False)
    wf: WeightFile = inspect_weight_file(path)
    identify(wf, expected="vae")
    sd = dict(iter_tensors(path))
    if "encoder.conv_in.weight" in sd:  # already diffusers names in a single file
        raise WanpairError(f"{path} uses diffusers key names; point at its diffusers `vae/` folder instead.")
    config = _config_from_original({k: tuple(v.shape) for k, v in sd.items()}, path)
    log.info("loading VAE from %s", wf.describe())
    vae = AutoencoderKLWan(**config).to(dtype)
    converted = convert_wan_vae_to_diffusers(sd)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise WanpairError(f"{path}: VAE tensors do not fit (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return vae.to(device).eval().requires_grad_(False)
