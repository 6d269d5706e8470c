"""Timestep sampling for flow matching, restricted to one expert's window.

t lives in (0, 1); the model sees 1000 * t. Methods (Musubi-Tuner `hv_train_network.py`,
`get_noisy_model_input_and_timesteps`, which the recipe's flags select):
- uniform:  t ~ U(0, 1)
- sigmoid:  t = sigmoid(s * z), z ~ N(0, 1), s = sigmoid_scale
- shift:    t = sigmoid(s * z), then t <- shift * t / (1 + (shift - 1) * t), shift = discrete_flow_shift
- logit_normal: t = sigmoid(mean + std * z) (SD3's logit-normal, Esser et al. 2024)
A window [min, max] (0..1000 scale) either conditions that distribution on the window
(preserve_distribution_shape: rejection sampling) or maps t linearly into it.
"""

from __future__ import annotations

import torch

from ..errors import WanpairError

# Rejection sampling gives up after this many candidate draws per requested sample: a window
# with acceptance below 1e-4 is a configuration mistake, not something to spin on.
_MAX_CANDIDATES_PER_SAMPLE = 10_000


def sample_base(n: int, method: str, shift: float, sigmoid_scale: float, generator: torch.Generator,
                logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    if method == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * z)
    t = torch.sigmoid(sigmoid_scale * z)
    if method == "shift":
        t = shift * t / (1 + (shift - 1) * t)
    elif method != "sigmoid":
        raise ValueError(f"unknown timestep_sampling {method!r}")
    return t


def sample_timesteps(n: int, method: str, window: tuple[int, int], *, shift: float = 1.0, sigmoid_scale: float = 1.0,
                     logit_mean: float = 0.0, logit_std: float = 1.0, preserve_shape: bool = True,
                     generator: torch.Generator) -> torch.Tensor:
    """n values of t in the window [lo, hi] / 1000, as float32."""
    lo, hi = window[0] / 1000, window[1] / 1000
    base = (method, shift, sigmoid_scale, generator, logit_mean, logit_std)
    if not preserve_shape:
        return (lo + (hi - lo) * sample_base(n, *base)).float()
    accepted: list[torch.Tensor] = []
    have, drawn = 0, 0
    chunk = max(64, 4 * n)
    while have < n:
        if drawn > _MAX_CANDIDATES_PER_SAMPLE * n:
            raise WanpairError(
                f"timestep window {window[0]}-{window[1]} is too narrow for timestep_sampling = {method!r} "
                f"(shift {shift}, sigmoid_scale {sigmoid_scale}): fewer than 1 in {_MAX_CANDIDATES_PER_SAMPLE} draws land "
                "in it. Widen the window or set preserve_distribution_shape = false."
            )
        t = sample_base(chunk, *base)
        drawn += chunk
        t = t[(t >= lo) & (t <= hi)]
        accepted.append(t)
        have += len(t)
    return torch.cat(accepted)[:n].float()
