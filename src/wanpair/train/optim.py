"""Optimizer and learning-rate schedule, built from the field's implementations.

Optimizers: AdamW (torch), AdamW8bit (bitsandbytes), Adafactor (transformers), Prodigy (prodigyopt),
each where installed, with `optimizer_args` ("key=value" strings, values as Python literals) passed
through. Schedules: transformers' schedulers; polynomial ends at min_lr_ratio * lr.
"""

from __future__ import annotations

import ast
import math

import torch
from transformers import get_polynomial_decay_schedule_with_warmup, get_scheduler

from ..errors import WanpairError
from ..project import TrainSettings


def parse_optimizer_args(args: list[str]) -> dict:
    out = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WanpairError(f"optimizer_args entry {item!r} must look like \"key=value\", e.g. \"betas=(0.9, 0.99)\".")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def build_optimizer(params, t: TrainSettings, up: list | None = None) -> torch.optim.Optimizer:
    """The optimizer over the LoRA's `params`; with LoRA+ (`loraplus_lr_ratio`), the `up` matrices (the LoRA's B)
    in a group of their own at that many times the learning rate. LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+:
    Efficient Low Rank Adaptation of Large Models") as Musubi-Tuner's `network_args = ["loraplus_lr_ratio=4"]`
    sets it; schedules scale every group alike."""
    kwargs = {"lr": t.learning_rate, "weight_decay": t.weight_decay, **parse_optimizer_args(t.optimizer_args)}
    tensors, name = params, t.optimizer
    if t.loraplus_lr_ratio and not up:  # a caller that forgot the up matrices would train without LoRA+, silently
        raise WanpairError("LoRA+ (loraplus_lr_ratio) needs the LoRA's up matrices and the optimizer was given "
                           "none: a bug in wanpair, not in your settings; please report it.")
    try:
        if t.loraplus_lr_ratio:
            if not isinstance(kwargs["lr"], (int, float)):
                raise ValueError(f"LoRA+ (loraplus_lr_ratio) scales a learning rate, and lr is {kwargs['lr']!r}")
            ids = {id(p) for p in up}
            params = [{"params": [p for p in tensors if id(p) not in ids]},
                      {"params": [p for p in tensors if id(p) in ids], "lr": kwargs["lr"] * t.loraplus_lr_ratio}]
        if name == "adamw":
            if all(p.is_cuda for p in tensors):
                kwargs.setdefault("fused", True)  # one kernel for all ~800 LoRA tensors instead of foreach groups
            return torch.optim.AdamW(params, **kwargs)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            kwargs.setdefault("relative_step", False)
            kwargs.setdefault("scale_parameter", False)
            return Adafactor(params, **kwargs)
        if name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise WanpairError("optimizer = \"adamw8bit\" needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes") from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        if name == "prodigy":
            try:
                from prodigyopt import Prodigy
            except ImportError:
                raise WanpairError("optimizer = \"prodigy\" needs prodigyopt: pip install prodigyopt") from None
            return Prodigy(params, **kwargs)
    except (TypeError, ValueError) as e:  # an argument the optimizer does not take, or a value it refuses
        raise WanpairError(f"optimizer_args {t.optimizer_args} do not fit {name}: {e}") from None
    raise WanpairError(f"unknown optimizer {name!r}")


def warmup_steps(t: TrainSettings, total_steps: int) -> int:
    return t.lr_warmup_steps or math.ceil(t.lr_warmup_ratio * total_steps)


def build_scheduler(optimizer, t: TrainSettings, total_steps: int):
    warmup = warmup_steps(t, total_steps)
    if t.lr_scheduler == "polynomial":
        # lr_end = min_lr_ratio * lr (the reference trainer never passes its min_lr_ratio; see docs/fidelity.md).
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=t.min_lr_ratio * t.learning_rate, power=t.lr_scheduler_power)
    extra = {"num_cycles": t.lr_scheduler_num_cycles} if t.lr_scheduler == "cosine_with_restarts" else {}
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)
