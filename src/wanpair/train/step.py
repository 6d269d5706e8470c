"""One optimizer step of the flow-matching objective over this process's share of the micro-batches.

    for each micro-batch (x0, eps, t, text):   loss_k = mean((model(x_t, 1000 t, text) - (eps - x0))^2)
                                                backward(w * loss_k)
    if every gradient is finite:                AdamW update, then the learning-rate schedule
                                                (otherwise the update is skipped: no NaN reaches the LoRA,
                                                and the step is not counted)

`w` makes the step's gradient the mean over all micro-batches of the optimizer step, however they are
spread over processes: with n micro-batches in the step and W processes averaging their gradients
(DDP), w = W / n. One process, one micro-batch: w = 1.

The step comes in three phases so that the training loop never lets the GPU run dry: `forward_backward`
and `update` only queue work on the device, `finish` reads the verdict (the one host sync of a step)
and steps the schedule. The loop queues step k+1's forward and backward before it finishes step k
(`wanpair.train.expert`), so the host prepares the next step while the GPU still computes this one;
the numbers are the same as in the plain order (`train_step`), the GPU just never waits for the host.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .flow_matching import flow_matching_loss

# x0, noise, t, text, and the I2V experts' first-frame conditioning (None for T2V), on the device
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class Verdict:
    """What a queued update did, read by `finish`."""

    finite: torch.Tensor | bool  # loss (and, but in fp16, gradients) finite: a device tensor, not read yet
    scaler_skipped: torch.Tensor | bool = False  # fp16: the loss scaler found non-finite gradients, skipped, and
    # halved its scale (a device tensor, not read yet)


# What `finish` says of a step.
APPLIED = "applied"
NON_FINITE = "non-finite"  # its loss or gradients are NaN or inf: skipped
SCALER_SKIPPED = "scaler-skipped"  # fp16: its scaled gradients overflowed; skipped with the scale halved


def forward_backward(model, accelerator, micro_batches: list[MicroBatch], compute_dtype: torch.dtype,
                     weighting: str = "none", loss_weight: float = 1.0) -> torch.Tensor:
    """Queue the forward and backward passes of every micro-batch; returns their mean loss (on the device).
    Gradients are all-reduced only after the last micro-batch."""
    losses = []
    for k, (x0, noise, t, text, cond) in enumerate(micro_batches):
        with accelerator.no_sync(model) if k < len(micro_batches) - 1 else nullcontext():
            loss = flow_matching_loss(model, x0, noise, t, text, compute_dtype, weighting, cond)
            accelerator.backward(loss if loss_weight == 1.0 else loss * loss_weight)
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def update(optimizer, accelerator, params, loss: torch.Tensor, max_grad_norm: float) -> Verdict:
    """Queue the update from the accumulated gradients, skipped if `loss` or any gradient is not finite;
    the verdict stays on the device where the optimizer decides there.

    Fused AdamW (the GPU default) takes the verdict as a device tensor and skips on the GPU, so the check
    costs no host sync; other optimizers need the verdict first, one sync. In fp16 accelerate's loss
    scaler checks the gradients itself (and lowers the scale); the verdict is then the loss's alone."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    scaler = accelerator.scaler
    # torch's GradScaler keeps its scale as a device tensor and halves it exactly when it skips a step (fused
    # AdamW skips on the device, where accelerate's `step_was_skipped` cannot see it): compared there, no sync.
    scale_before = scaler._scale.clone() if scaler is not None else None
    finite: torch.Tensor | bool
    if scaler is not None:
        finite = loss.isfinite()
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []  # one fused pass instead of a check per tensor
        finite = torch.stack([*norms, loss]).isfinite().all()
        if not inner.defaults.get("fused", False):
            finite = bool(finite)
    if finite is not False:
        if max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        if isinstance(finite, torch.Tensor) and accelerator.scaler is None:
            inner.found_inf = (~finite).float()  # read by torch's fused AdamW: skip on the device
        optimizer.step()
        inner.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    return Verdict(finite, False if scaler is None else scaler._scale < scale_before)


def finish(verdict: Verdict, scheduler) -> str:
    """Wait for a queued update's verdict (the step's host sync): APPLIED (and the learning-rate schedule
    steps), NON_FINITE or SCALER_SKIPPED (no update, no schedule step: the step is not counted)."""
    if not bool(verdict.finite):
        return NON_FINITE
    if bool(verdict.scaler_skipped):
        return SCALER_SKIPPED
    scheduler.step()
    return APPLIED


def train_step(model, optimizer, scheduler, accelerator, params, micro_batches: list[MicroBatch],
               compute_dtype: torch.dtype, max_grad_norm: float, weighting: str = "none",
               loss_weight: float = 1.0) -> tuple[float, bool]:
    """The three phases in their plain order, waiting for the step's end (the benchmark's per-step
    timing): (mean loss, whether the update was applied)."""
    loss = forward_backward(model, accelerator, micro_batches, compute_dtype, weighting, loss_weight)
    outcome = finish(update(optimizer, accelerator, params, loss, max_grad_norm), scheduler)
    return loss.item(), outcome == APPLIED
