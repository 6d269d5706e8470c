"""Self-attention through FlashAttention-4 (`wanpair.models.attention`): the custom op's plumbing (its fake, its
autograd formula, its place in a traced graph and in the checkpoint policy) and the processor's math, on the CPU
with a reference implementation of FA4's two kernels; FA4 itself is checked against SDPA in tests/test_gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from wanpair.demo import TINY_DIT
from wanpair.errors import WanpairError
from wanpair.models import attention
from wanpair.models.attention import SelfAttention, attention_problem, use_self_attention, wants_fa4
from wanpair.project import TrainSettings
from wanpair.train.model_setup import prepare_expert
from wanpair.train.speed import IN_GRAPH_POLICIES, checkpoint_blocks

from conftest import set_train


def reference_forward(q, k, v, softmax_scale, return_lse):
    """FA4's forward as `flash_attn.cute.interface._flash_attn_fwd` returns it: (out, lse, ...), (B, S, H, D) in."""
    assert return_lse
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v.double())
    return out.to(q.dtype), lse.float(), None, None, None


def reference_backward(q, k, v, out, dout, lse, softmax_scale):
    """FlashAttention's backward from the saved output and log-sum-exp (Dao 2023, algorithm 2), no P kept."""
    q, k, v, out, dout = (t.double() for t in (q, k, v, out, dout))
    p = (torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale - lse.double()[..., None]).exp()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * softmax_scale
    return dq.float(), dk.float(), dv.float()


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setattr(attention, "_kernels", lambda: (reference_forward, reference_backward))


def _qkv(dtype=torch.float32, b=2, s=24, h=3, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, h, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def test_the_op_gives_sdpas_output_and_gradients(reference_kernels):
    q, k, v = _qkv()
    grad = torch.randn_like(q)
    out, lse = torch.ops.wanpair.flash_attention(q, k, v, 0.25)
    assert lse.shape == (2, 3, 24) and lse.dtype == torch.float32
    mine = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.25).transpose(1, 2)
    theirs = [ref, *torch.autograd.grad(ref, (q, k, v), grad)]
    for a, b in zip(mine, theirs):
        assert ((a - b).norm() / b.norm()).item() < 1e-5  # fp32 rounding of two orders of the same sums


def test_the_op_passes_torchs_custom_op_checks(reference_kernels):
    """Schema, fake tensors (shapes, dtypes, strides), autograd registration, AOT dispatch with dynamic shapes."""
    torch.library.opcheck(torch.ops.wanpair.flash_attention.default, (*_qkv(), 0.25))
    q, k, v = _qkv()
    out, lse = reference_forward(q, k, v, 0.25, True)[:2]
    torch.library.opcheck(torch.ops.wanpair.flash_attention_backward.default,
                          (torch.randn_like(q), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 0.25))


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_DIT, "num_attention_heads": 2, "attention_head_dim": 64}).requires_grad_()
    return model.train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 512, TINY_DIT["text_dim"], generator=g), return_dict=False)


def _output_and_grads(model):
    out = model(**_inputs())[0]
    out.square().mean().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_the_processor_computes_what_diffusers_computes(reference_kernels):
    """q/k/v projections, the RMS norms across heads, the rotary embedding on 2 frames of 4x4 patches, the output
    projection: the block's output and every weight's gradient as diffusers' WanAttnProcessor gives them."""
    theirs = _output_and_grads(_tiny())
    model = _tiny()
    assert use_self_attention(model, flash=True) == 2
    assert all(b.attn1.processor.flash and not isinstance(b.attn2.processor, SelfAttention) for b in model.blocks)
    mine = _output_and_grads(model)
    assert len(mine) == len(theirs) > 20
    for a, b in zip(mine, theirs):
        assert ((a - b).norm() / b.norm()).item() < 1e-4  # fp32, same math in another order


@pytest.mark.parametrize("policy", ["save-attention", "recompute"])
def test_the_op_is_one_node_of_a_compiled_checkpointed_block(reference_kernels, policy):
    """Traced by torch.compile (AOT autograd with the op's fake and formula; backend aot_eager, no C++ compiler
    needed) inside a block checkpointed in its graph: same gradients as the eager block; with "save-attention"
    the op runs once per step (its output is kept for backward), with "recompute" twice."""
    calls = []

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return reference_forward(*args, **kwargs)

    attention._kernels = lambda: (counting_forward, reference_backward)  # the fixture restores it
    eager = _tiny()
    use_self_attention(eager, flash=True)
    theirs = _output_and_grads(eager)
    model = _tiny()
    use_self_attention(model, flash=True)
    checkpoint_blocks(model, [policy] * 2)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    torch._dynamo.reset()
    calls.clear()
    mine = _output_and_grads(model)
    for a, b in zip(mine, theirs):
        assert ((a - b).norm() / b.norm()).item() < 1e-4
    assert len(calls) == (2 if policy == "save-attention" else 4)  # 2 blocks; recompute runs each forward again
    assert IN_GRAPH_POLICIES["save-attention"](None, torch.ops.wanpair.flash_attention.default).name == "MUST_SAVE"


def test_auto_keeps_sdpa_where_fa4_is_not_measured_and_fa4_refuses_by_name():
    cpu = torch.device("cpu")
    assert not wants_fa4("auto", cpu, torch.bfloat16) and not wants_fa4("sdpa", cpu, torch.bfloat16)
    assert "needs an NVIDIA GPU" in attention_problem("fa4", cpu, torch.bfloat16)
    assert attention_problem("auto", cpu, torch.bfloat16) is None and attention_problem("sdpa", cpu, torch.float32) is None


@pytest.fixture
def fresh_checks():
    """fa4_status / fa4_probe remember their answer per process; these tests change what they would find."""
    status, probe = attention.fa4_status, attention.fa4_probe
    status.cache_clear()
    probe.cache_clear()
    yield
    status.cache_clear()
    probe.cache_clear()


def test_fa4_not_installed_or_broken_is_named_with_the_fix(monkeypatch, fresh_checks):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "fa4_status", lambda: (None, "ModuleNotFoundError: No module named 'flash_attn'"))
    problem = attention_problem("fa4", cuda, torch.bfloat16)
    assert 'not installed: pip install "wanpair[fa4]"' in problem
    assert "bf16" in attention_problem("fa4", cuda, torch.float32)
    assert not wants_fa4("auto", cuda, torch.bfloat16)
    assert 'pip install "wanpair[fa4]"' in attention.describe_attention(False, cuda, torch.bfloat16)
    attention.fa4_probe.cache_clear()
    monkeypatch.setattr(attention, "fa4_status", lambda: (None, "RuntimeError: No CTK flavor installed"))
    assert "does not import (RuntimeError: No CTK flavor installed)" in attention_problem("fa4", cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "does not train on NVIDIA A100 (compute capability 8.0" in attention_problem("fa4", cuda, torch.bfloat16)


def test_auto_uses_fa4_only_where_it_ran_and_says_why_not(monkeypatch, reference_kernels, fresh_checks):
    """The probe (a 128-token forward and backward) decides: it runs here on the CPU with the reference kernels."""
    cpu = torch.device("cpu")
    with torch.no_grad():  # e.g. the doctor's checks: the probe still runs a backward
        assert attention.fa4_probe(cpu, torch.float32) is None
    monkeypatch.setattr(attention, "_measured_gpu", lambda device, dtype: True)
    assert wants_fa4("auto", cpu, torch.float32)

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    attention.fa4_probe.cache_clear()
    monkeypatch.setattr(attention, "_kernels", lambda: (failing, reference_backward))
    assert not wants_fa4("auto", cpu, torch.float32)
    line = attention.describe_attention(False, cpu, torch.float32)
    assert line.startswith("attention: torch SDPA (FlashAttention-4") and "no kernel image" in line
    assert "failed on this GPU (RuntimeError: CUDA error: no kernel image" in attention.fa4_probe(cpu, torch.float32)


def test_a_cpu_run_says_which_attention_it_uses(caplog):
    with caplog.at_level(logging.INFO, "wanpair.train.model_setup"):
        prepare_expert(_tiny().requires_grad_(False), TrainSettings(fp8_base=False), torch.float32)
    assert "attention: torch SDPA" in caplog.text and "pip install" not in caplog.text


def test_the_setting_is_read_checked_and_does_not_make_a_new_run(demo):
    from wanpair.project import SIDE_SETTINGS, load_project

    assert "attention" in SIDE_SETTINGS  # the same math on another kernel: a state continues under either
    project = demo / "wanpair.toml"
    set_train(project, attention="fa4")
    assert load_project(project)[0].train.attention == "fa4"
    set_train(project, attention="flash")
    with pytest.raises(WanpairError, match="attention = 'flash' must be one of auto, sdpa, fa4"):
        load_project(project)


def test_the_log_line_probes_fa4_only_where_the_setting_lets_it_decide(monkeypatch, fresh_checks):
    """With "sdpa" FA4 is never touched (no import, no kernels compiled, on any GPU); with "fa4" where it cannot
    run the line says why; "cuda" and "cuda:0" share one probe."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    probed = []

    def probe(device, dtype):
        probed.append(device)
        return "FlashAttention-4 is not installed: pip install \"wanpair[fa4]\""

    monkeypatch.setattr(attention, "fa4_probe", probe)
    assert attention.describe_attention(False, cuda, torch.bfloat16, "sdpa") == "attention: torch SDPA"
    assert probed == []
    line = attention.describe_attention(False, cuda, torch.bfloat16, "fa4")
    assert line.startswith('attention: [train] attention = "fa4" but FlashAttention-4 is not installed')
    wants_fa4("auto", cuda, torch.bfloat16)
    wants_fa4("auto", torch.device("cuda", 0), torch.bfloat16)
    assert set(probed) == {torch.device("cuda", 0)}
