"""Self-attention through FlashAttention-4 where it is installed: a torch custom op and the Wan self-attention
processor training uses (with FA4 or torch's SDPA).

Why: a Wan block's self-attention (3 600 tokens for a 960x960 image, 32 760 for an 81-frame 832x480 clip, 40 heads
of 128) is a quarter of a training step. FlashAttention-4 (`flash_attn.cute` in Dao-AILab/flash-attention)
runs it faster than torch's cuDNN SDPA on Hopper: 1.47 vs 1.78 ms forward + backward per block at 3 600 tokens,
123 vs 145 ms at 32 760 (H200), 0.354 -> 0.345 s per H100 training step (docs/benchmarks.md, sixth round).
Cross-attention (queries against 512 text tokens) stays with SDPA: cuDNN is the faster one there.

Why a custom op: FA4's kernels are CuTe DSL code compiled on first use, which torch.compile cannot trace.
Registered as `wanpair::flash_attention` with a fake (shapes only) and an autograd formula, the call is one node
of the block's compiled graph, and the in-graph checkpoint policy keeps its output as it keeps SDPA's
(`wanpair.train.speed`). diffusers wraps FlashAttention-3 the same way (`_diffusers_flash_attn_3` ops in
models/attention_dispatch.py); its FA4 backend downloads the kernel from the Hub instead, which training here
must not do.

FA4 is an optional extra (`pip install "wanpair[fa4]"`), never a dependency: `[train] attention = "auto"` uses it
on GPUs of compute capability 9.x and 10.x (H100, H200, B200) when it imports, torch's SDPA everywhere else.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings

import torch
import torch.nn.functional as F

FA4_INSTALL = 'pip install "wanpair[fa4]"'
FA4_CAPABILITIES = (9, 10)  # the major compute capabilities `auto` trusts FA4 on (Hopper, Blackwell datacenter)
FA4_TRAINS_ON = (9, 10, 11, 12)  # the ones flash-attn-4 4.0's backward pass accepts (`_flash_attn_bwd`'s check)


@functools.cache
def _kernels():
    """FA4's forward and backward: the functions of `flash_attn.cute.interface` that its own autograd function and
    torch's FA4 bridge (torch/nn/attention/_fa4.py) call. Tests substitute a reference; nothing else should."""
    # flash-attn-4 4.0.0b36 with nvidia-cutlass-dsl 4.8 warns at each kernel's first compile that an internal
    # argument is not a JIT argument: nothing a user can act on (and ~600 characters of it)
    warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument")
    from flash_attn.cute import interface

    return interface._flash_attn_fwd, interface._flash_attn_bwd


@torch.library.custom_op("wanpair::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of unmasked softmax attention; q, k, v as (batch, tokens, heads, head_dim), half
    precision. The log-sum-exp (batch, heads, tokens; fp32) is what the backward pass needs."""
    forward, _ = _kernels()
    out, lse = forward(q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=scale, return_lse=True)[:2]
    return out.contiguous(), lse.contiguous()


@flash_attention.register_fake
def _flash_attention_shapes(q, k, v, scale):
    b, s, h, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("wanpair::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from the output's gradient, the forward's output and its log-sum-exp."""
    _, backward = _kernels()
    dq, dk, dv = backward(q.contiguous(), k.contiguous(), v.contiguous(), out, grad.contiguous(), lse,
                          softmax_scale=scale)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attention_backward.register_fake
def _flash_attention_backward_shapes(grad, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*flash_attention_backward(grad_out, q, k, v, out, lse, ctx.scale), None)


flash_attention.register_autograd(_backward, setup_context=_save_for_backward)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (batch, tokens, heads, head_dim): each (even, odd) channel pair turned by its
    angle. `cos`/`sin` come as diffusers' WanRotaryPosEmbed gives them, each angle repeated for both channels."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


def separate_projections(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """Each projection on its own, as diffusers' processor calls them."""
    return [layer(x) for layer in layers]


class SelfAttention:
    """The processor of a Wan block's self-attention (`attn1`) that computes what diffusers' WanAttnProcessor
    does there -- q, k, v projections, RMS norms across heads, the rotary embedding -- and attends with
    `wanpair::flash_attention` (`flash`) or torch's SDPA (diffusers' attention-backend setting does not reach it).
    Self-attention in Wan has no mask, no added key/values and no text. `project(layers, x)` gives the three
    projections of one input: training passes one that shares the LoRAs' down-projection
    (`wanpair.train.lora.shared_input_projections`)."""

    def __init__(self, flash: bool, project=separate_projections):
        self.flash, self.project = flash, project

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelfAttention is for a Wan block's self-attention (attn1) only")
        heads = (attn.heads, -1)
        q, k, v = self.project((attn.to_q, attn.to_k, attn.to_v), hidden_states)
        q, k, v = attn.norm_q(q).unflatten(2, heads), attn.norm_k(k).unflatten(2, heads), v.unflatten(2, heads)
        if rotary_emb is not None:
            q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        if self.flash:
            out, _ = flash_attention(q, k, v, q.shape[-1] ** -0.5)
        else:  # SDPA takes (batch, heads, tokens, head_dim), as diffusers' native backend passes it
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(q)))


@functools.cache
def fa4_status() -> tuple[str | None, str | None]:
    """(flash-attn-4's version, None) when its kernels import; (None, why not) otherwise -- not installed, or
    installed without a CUDA flavour that loads here (the import also loads the CuTe DSL's libraries)."""
    try:
        _kernels()
    except Exception as e:  # noqa: BLE001 -- any failure to import means SDPA, and the reason is shown
        return None, f"{type(e).__name__}: {e}"
    try:
        return importlib.metadata.version("flash-attn-4"), None
    except importlib.metadata.PackageNotFoundError:
        return "unknown version", None


def _fa4_missing(why: str) -> str:
    return f"not installed: {FA4_INSTALL}" if why.startswith("ModuleNotFoundError") else f"does not import ({why})"


@functools.cache
def fa4_probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when FA4 imports and its forward and backward run on `device` in `dtype` (a 128-token problem: the
    kernels compile here, once per process, and serve the run's shapes too); otherwise why not, so that a run
    learns it before its first step, not in it."""
    version, why = fa4_status()
    if version is None:
        return f"FlashAttention-4 is {_fa4_missing(why)}"
    try:
        with torch.enable_grad():  # whatever the caller's mode: the backward kernel is what training needs
            q, k, v = (torch.randn(1, 128, 1, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            out, _ = flash_attention(q, k, v, 128 ** -0.5)
            torch.autograd.grad(out.float().sum(), (q, k, v))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 -- whatever fails, the run uses SDPA (auto) or refuses (fa4), saying why
        return f"FlashAttention-4 {version} failed on this GPU ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def attention_problem(setting: str, device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """Why `[train] attention = "fa4"` cannot run here (None when it can, or when the setting is not "fa4")."""
    if setting != "fa4":
        return None
    if device.type != "cuda":
        return "[train] attention = \"fa4\" needs an NVIDIA GPU (FlashAttention-4); use \"auto\" or \"sdpa\"."
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return "[train] attention = \"fa4\" needs mixed_precision = \"bf16\" or \"fp16\"."
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FA4_TRAINS_ON:
        return (f"[train] attention = \"fa4\": FlashAttention-4 does not train on {torch.cuda.get_device_name(device)} "
                f"(compute capability {major}.{minor}; it needs 9.x-12.x); use \"auto\" or \"sdpa\".")
    if why := fa4_probe(_one_name(device), compute_dtype):
        return f"[train] attention = \"fa4\" but {why}; or use \"auto\"."
    return None


def _one_name(device: torch.device) -> torch.device:
    """"cuda" as "cuda:<current>", so that the preflight's and the model's probes share one cached answer."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _measured_gpu(device: torch.device, compute_dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device)[0] in FA4_CAPABILITIES)


def wants_fa4(setting: str, device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether self-attention runs on FA4: always with "fa4" (the preflight refused it where it cannot run), never
    with "sdpa"; with "auto" on GPUs FA4 was measured on (compute capability 9.x / 10.x) in half precision, when
    it ran there (`fa4_probe`)."""
    if setting == "fa4":
        return True
    return (setting == "auto" and _measured_gpu(device, compute_dtype)
            and fa4_probe(_one_name(device), compute_dtype) is None)


def use_self_attention(model, flash: bool, project=separate_projections) -> int:
    """Give every block's self-attention a `SelfAttention` processor (FA4 when `flash`); returns how many blocks."""
    blocks = list(model.blocks._modules.values())
    for block in blocks:
        block.attn1.set_processor(SelfAttention(flash, project))
    return len(blocks)


def describe_attention(fa4: bool, device: torch.device, compute_dtype: torch.dtype, setting: str = "auto") -> str:
    """The log line: which kernels attend; with `setting` "auto" on a GPU where FA4 would be faster, why it is not
    used (the probe's answer, cached: nothing runs again); with "fa4" where it cannot run, why not. With "sdpa"
    FA4 is not touched at all."""
    if fa4:
        return f"self-attention: FlashAttention-4 ({fa4_status()[0]}), cross-attention: torch SDPA"
    if setting == "fa4":
        return f"attention: {attention_problem(setting, device, compute_dtype)}"
    why = (fa4_probe(_one_name(device), compute_dtype)
           if setting == "auto" and _measured_gpu(device, compute_dtype) else None)
    return "attention: torch SDPA" + (f" ({why}; it is faster here)" if why else "")
