"""Time the fp8 GEMMs of one training step's shapes, one scaling form against another.

    PYTHONPATH=src python bench/fp8_gemm.py [--autotune] [--json FILE]

The base's fp8 matmuls are ~125 ms of an H100 step (docs/benchmarks.md: one cuBLASLt kernel, 61-70 % of the fp8 peak
at the 700 W power cap). This bench asks whether another form of the same matmul is faster before any of it is
built: for every GEMM shape of a 960x960 step (3 600 tokens, 512 text tokens, Wan 2.2 A14B's 5 120 / 13 824 widths;
the forward `x @ W^T` and the backward's input gradient `g @ W`, with W^T kept), it times `torch._scaled_mm` as
wanpair calls it (row-wise scales, fast accumulation: `wanpair.models.fp8`) against tensor-wise scales (one scale
per matrix, as torchao's default float8 training recipe uses), and, with `--autotune`, against inductor's Triton
templates for the row-wise form (`max_autotune_gemm`; only the three forward shapes at 3 600 tokens, so it has no
per-step sum). Each figure is the median over 20 CUDA-event timings of 10 back-to-back calls (the GEMM's time, not a
launch's). The step's GEMM time per form is the sum over its calls per step (40 blocks). The text's k/v projections
need no input gradient (the text trains nothing), so they have no backward shape. The first version of this bench
(2026-12-07, f9673fa) timed one call at a time (its launch included), counted a text k/v backward and an amax kernel
inside the tensor-wise GEMM: its figures are high by those, by how much not measured.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from wanpair.models.fp8 import FP8, quantize_rows

TOKENS, TEXT, DIM, FFN, BLOCKS = 3600, 512, 5120, 13824, 40
# (name, M, K, N, calls per block per step): forward x @ W^T and the backward's g @ W (the frozen base needs no
# weight gradient). Self-attention q, k, v, o and cross-attention q, o at (tokens, dim, dim); cross k, v on the text.
SHAPES = [("attn fwd", TOKENS, DIM, DIM, 6), ("attn bwd", TOKENS, DIM, DIM, 6),
          ("text k/v fwd", TEXT, DIM, DIM, 2),
          ("ffn up fwd", TOKENS, DIM, FFN, 1), ("ffn up bwd", TOKENS, FFN, DIM, 1),
          ("ffn down fwd", TOKENS, FFN, DIM, 1), ("ffn down bwd", TOKENS, DIM, FFN, 1)]


def median_ms(fn, warmup: int = 10, repeats: int = 20, calls: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def forms(m: int, k: int, n: int, autotune: bool) -> dict:
    """(median ms, FLOPs) of the same product in each form: x (m, k) bf16 activations, w (n, k) a weight (the second
    operand column-major); `autotune`: inductor's templates too."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02

    def tensorwise(v):  # one scale for the whole matrix
        s = (v.float().abs().amax() / 448).reshape(())
        return (v.float() / s).to(FP8), s

    def gemm(a, sa, b, sb):  # b: (n, k) row-major, so b.t() is the column-major operand _scaled_mm wants
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)

    (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
    (xt, xts), (wt, wts) = tensorwise(x), tensorwise(w)
    out = {"gemm only, row-wise": lambda: gemm(xq, xs, wq, ws.t()),
           "gemm only, tensor-wise": lambda: gemm(xt, xts, wt, wts),
           "gemm only, bf16": lambda: x @ w.t(),
           "quantise + gemm, row-wise (eager)": lambda: gemm(*quantize_rows(x), wq, ws.t()),
           "quantise + gemm, tensor-wise (eager)": lambda: gemm(*tensorwise(x), wt, wts)}
    if autotune:
        import torch._inductor.config as cfg

        with cfg.patch(max_autotune_gemm=True, max_autotune_gemm_backends="TRITON,CUBLAS"):
            tuned = torch.compile(lambda: gemm(xq, xs, wq, ws.t()))
            tuned()
        out["gemm only, row-wise, inductor max-autotune"] = tuned
    return {name: (median_ms(fn), 2 * m * k * n) for name, fn in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autotune", action="store_true", help="also inductor's Triton templates (minutes of tuning)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    a = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    per_step: dict[str, float] = {}
    shapes: dict[str, int] = {}  # how many shapes each form was timed on: a per-step sum only over all of them
    rows = []
    for name, m, k, n, calls in SHAPES:
        for form, (ms, flops) in forms(m, k, n, a.autotune and m == TOKENS and name.endswith("fwd")).items():
            per_step[form] = per_step.get(form, 0.0) + ms * calls * BLOCKS
            shapes[form] = shapes.get(form, 0) + 1
            rows.append({"shape": name, "m": m, "k": k, "n": n, "form": form, "ms": round(ms, 4),
                         "tflops": round(flops / ms / 1e9, 1)})
            print(f"{name:14s} {m:5d}x{k:5d}x{n:5d} {form:45s} {ms:7.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    per_step = {form: ms for form, ms in per_step.items() if shapes[form] == len(SHAPES)}
    for form, ms in per_step.items():
        print(f"per step (40 blocks), {form}: {ms:.1f} ms")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                                "per_step_ms": {k: round(v, 1) for k, v in per_step.items()}}) + "\n")


if __name__ == "__main__":
    main()
