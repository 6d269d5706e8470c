"""Does wanpair's model compute what the official Wan model computes? Tiny random weights, fp32, CPU.

    PYTHONPATH=src python bench/parity_official.py OFFICIAL_DIR [--wan21 WAN21_DIR]

OFFICIAL_DIR holds the official `wan/modules` (e.g. `git archive HEAD wan/modules` of Wan-Video/Wan2.2,
which is not a package we can depend on, so this is a script run by hand, not a test); WAN21_DIR the same
of Wan-Video/Wan2.1, whose own `WanModel` the Wan 2.1 text-to-video models are. For each pair (T2V: 16
input channels; I2V: 36, the conditioning concatenated as the official `WanModel.forward` does with `y`)
and for Wan 2.1 T2V, it builds the official `WanModel` at toy size with every weight random (its own init zeroes
the head, which would make any comparison pass), saves it in the original key layout, loads that file with
`wanpair.models.load_dit` (diffusers' `WanTransformer3DModel`), and compares one forward pass. The
official attention needs flash-attn on a GPU; here it is replaced by PyTorch's scaled-dot-product
attention over the same unpadded sequences, which computes the same function.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TOY = dict(dim=256, ffn_dim=512, freq_dim=64, text_dim=64, out_dim=16, num_heads=2, num_layers=2)


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None):
    """The official `flash_attention`'s function ([B, L, heads, dim] in and out) for unpadded inputs."""
    assert window_size == (-1, -1) and not causal
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def official_model_module(official_dir: Path, package_name: str = "wan_official"):
    """`wan/modules/model.py` and the `attention.py` it imports, without the package's `__init__` (which
    pulls in the T5, the tokenizers and their dependencies), as the package `package_name`."""
    import importlib.util
    import types

    folder = official_dir / "wan" / "modules"
    package = types.ModuleType(package_name)
    package.__path__ = [str(folder)]
    sys.modules[package_name] = package
    for name in ("attention", "model"):
        spec = importlib.util.spec_from_file_location(f"{package_name}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{package_name}.model"]


def compare(official_dir: Path, model_type: str, in_dim: int, package_name: str = "wan_official",
            file_name: str = "wan2.2_{model_type}_high_noise_toy.safetensors") -> float:
    from wanpair.models import load_dit

    official = official_model_module(official_dir, package_name)
    official.flash_attention = sdpa_attention
    torch.manual_seed(0)
    ref = official.WanModel(model_type=model_type, in_dim=in_dim, **TOY).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name.format(model_type=model_type)
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        ours = load_dit(path, dtype=torch.float32)
    frames, h, w, text_len = 3, 8, 8, 7
    x = torch.randn(16, frames, h, w)
    y = torch.randn(in_dim - 16, frames, h, w) if in_dim > 16 else None
    t = torch.tensor([700.0])
    context = torch.randn(text_len, TOY["text_dim"])
    with torch.no_grad():
        want = ref([x], t, [context], seq_len=frames * (h // 2) * (w // 2), y=None if y is None else [y])[0]
        padded = torch.cat([context, context.new_zeros(512 - text_len, context.shape[1])])[None]  # as the official pads
        inputs = x[None] if y is None else torch.cat([x, y])[None]
        got = ours(hidden_states=inputs, timestep=t, encoder_hidden_states=padded, return_dict=False)[0][0]
    return (got - want).abs().max().item() / want.abs().max().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("official_dir", type=Path, help="folder holding the official Wan2.2 wan/modules")
    ap.add_argument("--wan21", type=Path, help="folder holding the official Wan2.1 wan/modules")
    args = ap.parse_args()
    runs = [("t2v-A14B (Wan2.2 code)", args.official_dir, "t2v", 16, "wan_official", None),
            ("i2v-A14B (Wan2.2 code)", args.official_dir, "i2v", 36, "wan_official", None)]
    if args.wan21:  # t2v-14B and t2v-1.3B are one architecture at two sizes; the toy size stands for both
        runs.append(("t2v-14B / t2v-1.3B (Wan2.1 code)", args.wan21, "t2v", 16, "wan21_official",
                     "wan2.1_{model_type}_toy.safetensors"))
    worst = 0.0
    for name, folder, model_type, in_dim, package, file_name in runs:
        err = compare(folder, model_type, in_dim, package, *([file_name] if file_name else []))
        worst = max(worst, err)
        print(f"{name}: max |ours - official| / max |official| = {err:.2e}")
    print("ok" if worst <= 1e-4 else "DIFFERENT")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
