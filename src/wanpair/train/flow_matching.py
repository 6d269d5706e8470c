"""The training objective, as Wan is trained (rectified flow):

    x_t = (1 - t) * x0 + t * eps,   target v = eps - x0,   loss = mean((model(x_t, 1000 t, text) - v)^2)

Text embeddings arrive at their true length and are zero-padded to 512 tokens, because Wan's
inference pads the context the same way and cross-attends over all 512 positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_loss_weighting_for_sd3

from ..models.text_encoder import TEXT_LEN


def pad_text(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Stack true-length [L, D] embeddings into a zero-padded [B, 512, D] batch."""
    out = embeddings[0].new_zeros(len(embeddings), TEXT_LEN, embeddings[0].shape[-1])
    for i, e in enumerate(embeddings):
        out[i, : min(len(e), TEXT_LEN)] = e[:TEXT_LEN]
    return out


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                       compute_dtype: torch.dtype, weighting: str = "none", cond: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """One forward pass of the expert and the MSE against the velocity target eps - x0.

    `cond` (the I2V pair): the mask and first-frame latent the expert sees beside the noisy latent, on the
    channel axis (`wanpair.models.i2v`); it is given, never noised, and the loss is over the 16 latent
    channels the expert predicts.

    `weighting` (off by default) scales each sample's error by an SD3-style function of t
    (diffusers' `compute_loss_weighting_for_sd3`: "sigma_sqrt" = 1/t^2, "cosmap").
    """
    x_t = noisy_input(x0, noise, t)
    if cond is not None:
        x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
    pred = model(hidden_states=x_t.to(compute_dtype), timestep=1000 * t.float(),
                 encoder_hidden_states=text.to(compute_dtype), return_dict=False)[0]
    if weighting == "none":
        return F.mse_loss(pred.float(), (noise - x0).float())
    w = compute_loss_weighting_for_sd3(weighting, sigmas=t.float()).view(-1, *([1] * (x0.dim() - 1)))
    return (w * (pred.float() - (noise - x0).float()) ** 2).mean()
