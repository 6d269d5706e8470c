"""First-frame conditioning of the Wan 2.2 I2V A14B experts, built as inference builds it.

The official pipeline (Wan2.2 `wan/image2video.py`; diffusers' `WanImageToVideoPipeline.prepare_latents`
does the same) encodes the given first frame followed by zeros (mid-gray in the VAE's [-1, 1] range) with the VAE, and puts a mask
before it that marks which frames are given; the expert then sees [noisy latent | mask | condition
latent] along the channels: 16 + 4 + 16 = 36. Training must show the expert exactly that.

The mask is made at pixel-frame resolution (1 for the first frame, 0 after it), its first frame repeated
4 times, and folded 4 frames to a latent frame, so with only the first frame given it comes down to:
all 4 channels 1 on latent frame 0, 0 on the others (checked against diffusers' pipeline in the tests).
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 16  # Wan 2.1 VAE


def condition_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> the same clip with every frame after the first set to 0 (what is encoded)."""
    out = torch.zeros_like(pixels)
    out[:, :1] = pixels[:, :1]
    return out


def first_frame_mask(latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The [4, T, h, w] mask for a condition latent of shape [16, T, h, w]: latent frame 0 is given."""
    _, frames, h, w = latent_shape
    mask = torch.zeros(4, frames, h, w)
    mask[:, 0] = 1.0
    return mask


def conditioning(condition_latent: torch.Tensor) -> torch.Tensor:
    """[16, T, h, w] normalised VAE latent of the condition clip -> the expert's 20 extra input channels."""
    return torch.cat([first_frame_mask(tuple(condition_latent.shape)).to(condition_latent), condition_latent])
