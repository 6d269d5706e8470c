"""One optimizer step of the flow-matching objective over this process's share of the micro-batches.

    for each micro-batch (x0, eps, t, text):   loss_k = mean((model(x_t, 1000 t, text) - (eps - x0))^2)
                                                backward(w * loss_k)
    if every gradient is finite:                AdamW update, then the learning-rate schedule
                                                (otherwise the update is skipped: no NaN reaches the LoRA)

`w` makes the step's gradient the mean over all micro-batches of the optimizer step, however they are
spread over processes: with n micro-batches in the step and W processes averaging their gradients
(DDP), w = W / n. One process, one micro-batch: w = 1.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .flow_matching import flow_matching_loss

# x0, noise, t, text, and the I2V experts' first-frame conditioning (None for T2V), on the device
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def train_step(model, optimizer, scheduler, accelerator, params, micro_batches: list[MicroBatch],
               compute_dtype: torch.dtype, max_grad_norm: float, weighting: str = "none",
               loss_weight: float = 1.0) -> tuple[torch.Tensor, bool]:
    """Forward and backward over `micro_batches`, then the update; returns their mean loss and whether
    the update was applied.

    Non-finite gradients (a NaN/Inf loss makes them so) skip the update. Fused AdamW (the GPU default)
    takes the verdict as a device tensor and skips on the GPU, so the check costs no host sync in the
    middle of the step; other optimizers need one sync per step. In fp16 accelerate's loss scaler does
    this itself (and lowers the scale). Gradients are all-reduced only after the last micro-batch.
    """
    losses = []
    for k, (x0, noise, t, text, cond) in enumerate(micro_batches):
        with accelerator.no_sync(model) if k < len(micro_batches) - 1 else nullcontext():
            loss = flow_matching_loss(model, x0, noise, t, text, compute_dtype, weighting, cond)
            accelerator.backward(loss if loss_weight == 1.0 else loss * loss_weight)
        losses.append(loss.detach())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    on_device = inner.defaults.get("fused", False)
    check = accelerator.mixed_precision != "fp16"
    ok = True
    if check:
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []  # one fused pass instead of a check per tensor
        finite = torch.stack([*norms, *losses]).isfinite().all()
        if on_device:
            inner.found_inf = (~finite).float()
        else:
            ok = bool(finite)
    if ok:
        if max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if on_device and check:
            ok = bool(finite)  # the step is queued; this read waits for it, as the caller's loss.item() would
            inner.found_inf = None
        if ok and not getattr(optimizer, "step_was_skipped", False):  # fp16: the scaler skipped an overflow
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(), ok
