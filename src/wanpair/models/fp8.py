"""fp8 (e4m3) storage and fp8 matmuls for the frozen base's block Linears; LoRA stays in high precision.

Why: only the LoRA trains, so the 14B base is read-only. Stored as fp8 its block weights take 14 GB
instead of 28, and on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper and later)
the matmuls themselves run at twice the bf16 rate through `torch._scaled_mm`.

Scales: one per output row of each weight (amax / 448, e4m3's largest value), fixed at load. Wan's
weights have a std near 0.02, so a plain cast (diffusers' layerwise casting, no scale) puts about
half of them among e4m3's subnormals (below 2^-6); with a row scale every weight keeps e4m3's 3
mantissa bits (relative error of an N(0, 0.02) weight: 3.3 % cast, 2.6 % row-scaled). In a matmul
the input is quantised per row (per token) on the fly, and in the backward pass the output gradient
is too: the input gradient is grad_out @ (diag(s) W) = (grad_out * s) @ W, so the weight's row scale
is folded into the gradient before it is quantised. No weight gradient is ever computed (the base
is frozen), so no activation is saved for the base path -- only the fp8 weight itself.

The fp8 matmuls use the tensor cores' fast accumulation (`use_fast_accum`: partial sums are not
promoted to fp32 at intervals). On an H200 it took the base's fp8 GEMMs from 138 to 115 ms per
training step at 960x960, and changed the loss and LoRA gradients against a bf16 base by less than
the measurement resolves (gradient error 3.49 % with it, 3.48 % without, all of it fp8 storage's;
docs/benchmarks.md, fourth round).

Where fp8 matmuls are not available (CPU, older GPUs) the layer dequantises its
weight inside the forward (`weight.to(bf16) * scale`) and runs an ordinary matmul: fp8 storage only.
Both forms are plain tensor code, so `torch.compile` fuses the quantisation into neighbouring kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_ALIGN = 16  # torch._scaled_mm needs every matrix dimension to be a multiple of 16


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_rows(x: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale per row) with x * tensor_scale ~= values * scale.

    High-precision weights: every row's largest |x| maps to 448. Weights that are already fp8 (plain
    e4m3fn / e5m2 files, or ComfyUI "scaled" files whose real weight is x * tensor_scale) get row
    scales that are powers of two instead, so re-quantising them loses nothing: an e4m3 value times
    2^k is again an e4m3 value (e5m2 values too, unless 2^17 below their row's largest). Arithmetic is
    done in fp32 because CUDA implements no `abs`/`amax`/division for fp8 tensors, only conversions.
    """
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    if x.dtype in FP8_DTYPES:
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    else:
        scale = amax / FP8_MAX
    values = (xf / scale).to(FP8)
    if tensor_scale is not None:
        scale = scale * tensor_scale.to(scale.device, torch.float32).reshape(-1)[0]
    return values, scale


def fp8_matmul_available(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _Fp8Matmul(torch.autograd.Function):
    """x @ (W * s)^T with x quantised per row; backward gives the input gradient only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, weight_t: torch.Tensor | None,
                out_dtype: torch.dtype, fast_accum: bool):
        xq, xs = quantize_rows(x)
        ctx.save_for_backward(weight, scale, weight_t)
        ctx.in_dtype, ctx.fast_accum = x.dtype, fast_accum
        return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale, weight_t = ctx.saved_tensors
        gq, gs = quantize_rows(grad.float() * scale.t())
        # _scaled_mm's second operand must be column-major: W^T stored contiguously, or transposed now
        column_major = (weight_t if weight_t is not None else weight.t().contiguous()).t()
        ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
        grad_x = torch._scaled_mm(gq, column_major, scale_a=gs, scale_b=ones, out_dtype=grad.dtype,
                                  use_fast_accum=ctx.fast_accum)
        return grad_x.to(ctx.in_dtype), None, None, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is fp8 with a per-row scale. A subclass of `nn.Linear` so that
    peft wraps it like any Linear; `compute_dtype` tells peft (and the dequantising path) the dtype
    to compute in, so the LoRA is not created in fp8.

    `weight` and `weight_scale` are buffers, not parameters: nothing about them trains, and block
    streaming (`wanpair.train.streaming`) may point `weight` at a different GPU buffer between calls.
    `weight_t` (optional, see `keep_transposed`) spares the backward pass a transpose of the weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None = None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.use_fp8_matmul = False
        self.fast_accum = True  # see the module's docstring; False only to measure what it changes
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, device=device) if bias else None)
        self.weight_t: torch.Tensor | None = None

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   tensor_scale: torch.Tensor | None = None) -> None:
        """Quantise a weight (any float dtype, fp8 included; on whatever device it is) into this layer;
        `tensor_scale` is a scaled-fp8 file's factor (real weight = weight * tensor_scale)."""
        self.weight, self.weight_scale = quantize_rows(weight, tensor_scale)
        if bias is not None:
            self.bias = bias.to(self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_fp8_matmul:
            return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), self.bias)
        lead, rows = x.shape[:-1], x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        pad = -rows % _ALIGN
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        out = _Fp8Matmul.apply(x2, self.weight, self.weight_scale, self.weight_t, self.compute_dtype,
                                 self.fast_accum)[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_matmul={self.use_fp8_matmul}"


def block_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """Every Linear of the base inside a transformer block (the layers LoRA targets and fp8 stores)."""
    return [(n, m) for n, m in model.named_modules()
            if n.startswith("blocks.") and isinstance(m, torch.nn.Linear) and ".lora_" not in n]


def to_fp8_linears(model, compute_dtype: torch.dtype, linears: list[tuple[str, torch.nn.Module]] | None = None) -> None:
    """Replace every block `nn.Linear` (or the `linears` given, named inside `model`) by an `Fp8Linear`,
    quantising its weight (meta modules stay empty for a loader to fill with `set_weight`)."""
    for name, linear in block_linears(model) if linears is None else linears:
        if isinstance(linear, Fp8Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        device = linear.weight.device
        fp8 = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device=device)
        if device.type != "meta":
            fp8.set_weight(linear.weight.data, None if linear.bias is None else linear.bias.data)
        setattr(model.get_submodule(parent_name), child, fp8)


def use_fp8_matmul(model, enabled: bool) -> int:
    """Switch every Fp8Linear between fp8 matmuls and dequantise-then-matmul; returns how many
    layers can use fp8 matmuls (dimensions must be multiples of 16, compute dtype bf16 or fp16: `_scaled_mm`
    writes either, so the recipe's fp16 runs at bf16's speed)."""
    n = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            ok = (enabled and module.compute_dtype in (torch.bfloat16, torch.float16)
                  and module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0)
            module.use_fp8_matmul = ok
            n += ok
    return n


def keep_transposed(model) -> None:
    """Store W^T beside W for every layer using fp8 matmuls (memory for speed: the backward pass
    then reads it instead of transposing W each step)."""
    for module in model.modules():
        if isinstance(module, Fp8Linear) and module.use_fp8_matmul:
            module.weight_t = module.weight.t().contiguous()
