"""The speed levers keep the numbers right: fp8 weights and matmuls, block streaming, the memory plan,
the device-side skip of a bad update. (Their speed is measured in bench/, not here.)"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanpair.errors import WanpairError
from wanpair.models import load_dit
from wanpair.models.attention import SelfAttention, separate_projections, use_self_attention
from wanpair.models.fp8 import FP8_MAX, Fp8Linear, keep_transposed, quantize_rows, to_fp8_linears, use_fp8_matmul
from wanpair.project import TrainSettings
from wanpair.train.lora import add_lora, shared_input_projections
from wanpair.train.memory_plan import MemoryPlan, decide, plan_from_config
from wanpair.train.model_setup import prepare_expert
from wanpair.train.speed import InGraphCheckpoint, checkpoint_blocks
from wanpair.train.step import train_step
from wanpair.train.step_graph import StepGraphs, why_not
from wanpair.train.streaming import use_host_memory


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_row_scaled_fp8_keeps_every_row_including_small_ones():
    w = torch.randn(64, 256) * torch.logspace(-4, 0, 64)[:, None]  # rows from 1e-4 to 1 in scale
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row uses the full range
    per_row = ((q.float() * scale - w).norm(dim=1) / w.norm(dim=1))
    assert per_row.max() < 0.04  # e4m3 has 3 mantissa bits: ~2.6 % relative error, in every row
    plain = w.to(torch.float8_e4m3fn).float()  # no scale: the small rows vanish into subnormals / zero
    assert ((plain - w).norm(dim=1) / w.norm(dim=1))[:8].min() > 0.5


@pytest.mark.parametrize("rows", [37, 48])  # 37: not a multiple of 16, padded for _scaled_mm
def test_fp8_matmul_matches_the_dequantised_weight_and_gives_input_gradients(rows):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128).bfloat16()
    layer = Fp8Linear(256, 128, True, torch.bfloat16)
    layer.set_weight(dense.weight.data, dense.bias.data)
    x = torch.randn(2, rows, 256, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, rows, 128, dtype=torch.bfloat16)
    results = {}
    for mode in ("dequantised", "fp8 matmul", "fp8 matmul, W^T kept"):
        layer.use_fp8_matmul = mode != "dequantised"
        if mode.endswith("kept"):
            keep_transposed(torch.nn.ModuleList([layer]))
        out = layer(x)
        out.backward(g)
        results[mode] = out.detach(), x.grad.clone()
        x.grad = None
    ref_out = torch.nn.functional.linear(x, dense.weight, dense.bias).detach()
    ref_grad = g @ dense.weight
    for mode, (out, grad) in results.items():
        assert out.shape == (2, rows, 128)
        assert rel(out, ref_out) < 0.06 and rel(grad, ref_grad) < 0.06, mode  # fp8 error, not a wrong formula
    assert torch.equal(results["fp8 matmul"][1], results["fp8 matmul, W^T kept"][1])


def test_fp8_loading_quantises_as_it_reads_and_keeps_lora_in_fp32(demo_root):
    path = demo_root / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
    plain = load_dit(path, dtype=torch.bfloat16)
    fp8 = load_dit(path, dtype=torch.bfloat16, fp8=True)
    layers = [m for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 10 and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    params, _ = prepare_expert(fp8, TrainSettings(), torch.bfloat16)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    inputs = _tiny_inputs()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert rel(fp8(**inputs)[0], plain(**inputs)[0]) < 0.05


def _tiny_inputs() -> dict:
    """One 8x8-latent image and its 512-token text for the tiny Wan models here, the same every call."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([900.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)


def _tiny_fp8_model(layers: int):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    to_fp8_linears(model, torch.bfloat16)
    params, _ = prepare_expert(model, TrainSettings(checkpoint_blocks=0), torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train(), params


def test_streamed_blocks_give_the_same_loss_and_gradients_in_any_call_order():
    """Blocks 0, 2 and 3 of 4 stream through 2 slots (the schedule runs on the CPU with plain copies)."""
    inputs = _tiny_inputs()
    resident, p_resident = _tiny_fp8_model(4)
    streamed, p_streamed = _tiny_fp8_model(4)
    streamer = use_host_memory(streamed, [0, 2, 3]).streamer
    assert [n for n, _ in streamed.named_parameters()] == [n for n, _ in resident.named_parameters()]  # LoRA names kept
    block_bytes = sum(m.host_weight.numel() for m in streamer.linears[0])
    copies = []
    for _ in range(2):
        before = streamer.copied_bytes
        for model, params in ((resident, p_resident), (streamed, p_streamed)):
            for p in params:
                p.grad = None
            with torch.autocast("cpu", torch.bfloat16):
                model(**inputs)[0].float().square().mean().backward()
        copies.append((streamer.copied_bytes - before) // block_bytes)
        for a, b in zip(p_resident, p_streamed):
            assert torch.equal(a.grad, b.grad)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # sampling between steps
            assert torch.equal(resident(**inputs)[0], streamed(**inputs)[0])
    # step 1: 0, 2, 3 in, then 0 again for backward (2 slots); step 2 starts after a sampling pass
    # (0, 2, 3, then 0 again for the next forward) and brings back 2, 3 and 0
    assert copies == [4, 3]
    assert all(m.weight.numel() == 0 for i in streamer.order for m in streamer.linears[i])  # nothing left borrowed


@pytest.mark.parametrize("backend", [None, "aot_eager_decomp_partition"])
def test_offloaded_and_in_graph_streamed_blocks_give_the_gradients_of_resident_ones(backend):
    """Every block recomputing inside its graph, blocks 0, 2 and 3 streamed through 2 slots, and what every block
    saves for backward kept on the host (copies on the CPU here): the same loss and LoRA gradients as the same
    blocks resident, over two steps with a sampling pass between. Eager (the checkpoint saves the block's input)
    and compiled (AOTAutograd's backward saves the input and the slot weights it ran with: the hooks must find
    block i's weights in whichever slot holds it when its backward runs). The block's weights and LoRA and the
    inputs all blocks share stay where they are. Backend: inductor's partitioner, run eagerly (no C++ compiler);
    inductor itself on the GPU (tests/test_gpu.py)."""
    inputs = _tiny_inputs()
    torch._dynamo.reset()
    resident, p_resident = _tiny_fp8_model(4)
    hosted, p_hosted = _tiny_fp8_model(4)
    for model in (resident, hosted):
        checkpoint_blocks(model, ["recompute"] * 4)
        if backend:
            for block in model.blocks._modules.values():
                block.compile(backend=backend)
    host = use_host_memory(hosted, [0, 2, 3], offloaded=[0, 1, 2, 3], in_graph=True)
    offloader = host.offloader
    offloader.min_bytes = 0  # the tiny model's tensors are all below the GPU's threshold
    events = []  # ("pack", block, shape, address), ("fetch", block), ("use", block): what moved when
    pack, fetch, unpack = offloader.pack, offloader._fetch, offloader.unpack
    kept = []  # what was offloaded, held so that no later tensor reuses its memory (and address) in the step
    offloader.pack = lambda block, t: events.append(("pack", block, tuple(t.shape), t.untyped_storage().data_ptr())) \
        or kept.append(t) or pack(block, t)
    weights = {t.untyped_storage().data_ptr() for t in (*hosted.parameters(), *hosted.buffers()) if t.numel()}
    offloader._fetch = lambda block: events.append(("fetch", block)) or fetch(block)
    offloader.unpack = lambda saved: events.append(("use", saved.block)) or unpack(saved)
    for step in range(2):
        events.clear()
        for model, params in ((resident, p_resident), (hosted, p_hosted)):
            for p in params:
                p.grad = None
            with torch.autocast("cpu", torch.bfloat16):
                model(**inputs)[0].float().square().mean().backward()
        for a, b in zip(p_resident, p_hosted):
            assert torch.equal(a.grad, b.grad)  # the same graph on the same values: bit for bit
        packed = [e for e in events if e[0] == "pack"]
        assert {e[1] for e in packed} == {0, 1, 2, 3} and all((b, (1, 16, 128)) in {e[1:3] for e in packed} for b in range(4))  # inputs
        # what stays: weights and LoRA, and the inputs every block shares (text, time, positions: one block's each)
        owners = {}
        for _, block, _, ptr in packed:
            owners.setdefault(ptr, set()).add(block)
        assert not weights & set(owners) and all(len(blocks) == 1 for blocks in owners.values())
        kept.clear()
        # backward: each block fetched once, the next one's fetch started as its own tensors are used
        moves = [e[:2] for e in events if e[0] != "pack"]
        firsts = [m for k, m in enumerate(moves) if m[0] == "fetch" or m not in moves[:k]]
        assert firsts == [("use", 3), ("fetch", 3), ("fetch", 2), ("use", 2), ("fetch", 1), ("use", 1), ("fetch", 0),
                          ("use", 0)]
        assert not offloader.waiting  # every saved tensor came back
        if step == 0:
            host_bytes = offloader.host_bytes
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(resident(**inputs)[0], hosted(**inputs)[0])
    assert offloader.host_bytes == host_bytes  # the second step reused the first's host buffers
    assert sum(map(len, offloader.buffers.values())) == len(packed)  # one per saved tensor
    streamer = host.streamer
    assert all(m.weight.numel() == 0 for i in streamer.order for m in streamer.linears[i])  # nothing left borrowed
    torch._dynamo.reset()


@pytest.mark.parametrize("offloading", [False, True], ids=["streaming", "offloading"])
def test_a_host_memory_plan_is_applied_as_planned_and_trains_as_resident_blocks(monkeypatch, offloading):
    """`prepare_expert` with a compiled plan that borrows host memory -- blocks 0 and 2 of 3 streamed (the second
    tier), or every block streamed and offloading (the third): every block gets the in-graph class, the streamed
    ones' compiled backward saves their slot weights as "block i's Linear j", and a step's LoRA gradients are those
    of the same expert with every block resident and recomputing in its graph."""
    from wanpair.train import model_setup
    from wanpair.train.memory_plan import MemoryPlan

    def plan(model, *args, **kwargs):
        n = len(model.blocks)
        return MemoryPlan(16.0, n, n, list(range(n)) if offloading else [0, 2], 15.0, in_graph=True,
                          offloaded=list(range(n)) if offloading else [])

    resident, p_resident = _tiny_fp8_model(3)
    checkpoint_blocks(resident, ["recompute"] * 3)
    monkeypatch.setattr(model_setup, "plan_memory", plan)
    hosted, p_hosted = _tiny_fp8_model(3)
    assert all(isinstance(b, InGraphCheckpoint) for b in hosted.blocks._modules.values())
    calls = hosted.blocks.calls
    assert sorted(calls) == ([0, 1, 2] if offloading else [0, 2]) and all(c.in_graph for c in calls.values())
    assert all(bool(c.offloader) == offloading and c.streamer for c in calls.values())
    streamer = calls[0].streamer
    if offloading:
        calls[0].offloader.min_bytes = 0  # one offloader for all; the tiny model's tensors are below the GPU's threshold
    torch._dynamo.reset()
    for model in (resident, hosted):  # compiled as in training (inductor's partitioner, run eagerly: see above)
        for block in model.blocks._modules.values():
            block.compile(backend="aot_eager_decomp_partition")
    slot_weights = []
    pack = streamer.pack
    streamer.pack = lambda t: (lambda w: slot_weights.append(w) or w)(pack(t))
    inputs = _tiny_inputs()
    for model in (resident, hosted):
        with torch.autocast("cpu", torch.bfloat16):
            model(**inputs)[0].float().square().mean().backward()
    for a, b in zip(p_resident, p_hosted):
        assert torch.equal(a.grad, b.grad)  # the same ops on the same values: bit for bit
    assert any(w is not None for w in slot_weights) and streamer.copied_bytes > 0
    assert not offloading or calls[0].offloader.copied_bytes > 0
    torch._dynamo.reset()


def test_blocks_checkpointed_inside_their_graph_give_the_gradients_of_kept_blocks():
    """Each way a block can save for backward recomputes exactly the forward it replaces (eager here: the
    compiled form is the same checkpoint traced, proven on the GPU in bench/train_step.py); LoRA names and
    files are untouched, and applying a new plan undoes the old one."""
    inputs = _tiny_inputs()
    kept, p_kept = _tiny_fp8_model(4)
    tiered, p_tiered = _tiny_fp8_model(4)
    names = [n for n, _ in tiered.named_parameters()]
    checkpoint_blocks(tiered, ["recompute", "save-attention", "eager", None])
    assert [type(b).__name__ for b in tiered.blocks][:2] == ["InGraphCheckpointedWanTransformerBlock"] * 2
    assert [n for n, _ in tiered.named_parameters()] == names and not isinstance(tiered.blocks[2], InGraphCheckpoint)
    for model in (kept, tiered):
        with torch.autocast("cpu", torch.bfloat16):
            model(**inputs)[0].float().square().mean().backward()
    for a, b in zip(p_kept, p_tiered):
        assert torch.equal(a.grad, b.grad)  # the recompute repeats the same ops on the same inputs: bit for bit
    checkpoint_blocks(tiered, [None] * 4)
    assert not any(isinstance(b, InGraphCheckpoint) for b in tiered.blocks)


def _tiny_lora_model(project=None, dropout: float = 0.0):
    """Two fp32 blocks with a non-zero LoRA on every Linear; `project`: the self-attention processor's q/k/v
    projection (None: diffusers' own processor)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).requires_grad_(False)
    params = add_lora(model, 4, 4.0, dropout)
    with torch.no_grad():
        for p in params:
            if p.shape[1] == 4:  # lora_B (out, rank): zeros would give A no gradient
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.shape[0]))
    if project is not None:
        use_self_attention(model, False, project)
    return model.train(), params


def _out_and_grads(model, params):
    g = torch.Generator().manual_seed(0)
    out = model(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([900.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)[0]
    out.square().mean().backward()
    return [out.detach()] + [p.grad for p in params]


def test_q_k_v_share_one_lora_down_projection_with_diffusers_outputs_and_gradients():
    """The training processor stacks q, k and v's LoRA down matrices into one matmul: the block's output and every
    LoRA gradient are what diffusers' processor with peft's three layers gives (fp32; the matmuls sum in another
    order), and the three down-projections are not called one by one."""
    theirs = _out_and_grads(*_tiny_lora_model())
    model, params = _tiny_lora_model(shared_input_projections)
    assert all(isinstance(b.attn1.processor, SelfAttention) and not b.attn1.processor.flash for b in model.blocks)

    def not_alone(x):
        raise AssertionError("a q/k/v down-projection ran on its own")

    def alone_raises(model):
        for block in model.blocks:
            for layer in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
                layer.lora_A["default"].forward = not_alone
        return model

    mine = _out_and_grads(alone_raises(model), params)
    assert len(mine) == len(theirs) == 1 + 2 * 2 * 10  # 2 blocks x 10 layers x (down, up)
    for a, b in zip(mine, theirs):
        assert rel(a, b) < 1e-5
    compiled, params = _tiny_lora_model(shared_input_projections)  # traced by torch.compile (AOT autograd, no C++)
    for block in alone_raises(compiled).blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    for a, b in zip(_out_and_grads(compiled, params), theirs):
        assert rel(a, b) < 1e-5


def test_q_k_v_with_hooks_or_dropout_run_layer_by_layer():
    """A LoRA that is more than base + B(A(x)) * scaling keeps its own forward: with a hook that zeroes its
    down-projection's output (as rank dropout's hook scales it) the output is that of the same model whose q/k/v
    LoRAs are zero; with lora_dropout each of q, k and v draws its own dropout."""
    hooked, _ = _tiny_lora_model(shared_input_projections)
    zeroed, _ = _tiny_lora_model(separate_projections)
    for h, z in zip(hooked.blocks, zeroed.blocks):
        for name in ("to_q", "to_k", "to_v"):
            getattr(h.attn1, name).lora_A["default"].register_forward_hook(lambda mod, args, out: out * 0)
            getattr(z.attn1, name).lora_B["default"].weight.data.zero_()
    outs = [_out_and_grads(m, [])[0] for m in (hooked, zeroed, _tiny_lora_model(separate_projections)[0])]
    assert rel(outs[0], outs[1]) < 1e-6
    assert rel(outs[1], outs[2]) > 1e-3  # the q/k/v LoRAs do change the output when they run

    dropped, _ = _tiny_lora_model(shared_input_projections, dropout=0.1)
    calls = []
    for block in dropped.blocks:
        for layer in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
            dropout = layer.lora_dropout["default"]
            dropout.forward = lambda x, f=dropout.forward: calls.append(1) or f(x)
    _out_and_grads(dropped, [])
    assert len(calls) == 2 * 3


def test_training_runs_self_attention_through_the_shared_down_projection():
    """`prepare_expert` (what `wanpair train` runs) gives every block the shared down-projection; on an fp8 base under
    bf16 autocast its output and LoRA gradients are the layer-by-layer ones up to bf16 rounding."""
    model, params = _tiny_fp8_model(2)
    assert all(b.attn1.processor.project is shared_input_projections for b in model.blocks)
    inputs = _tiny_inputs()
    runs = []
    for project in (shared_input_projections, separate_projections):
        for block in model.blocks:
            block.attn1.processor.project = project
        for p in params:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            out = model(**inputs)[0]
        out.float().square().mean().backward()
        runs.append([out.detach().float()] + [p.grad.clone() for p in params])
    for a, b in zip(*runs):
        assert rel(a, b) < 2e-2  # bf16 products summed in another order (measured <= 5.3e-3 on default/avx2/avx512)


def test_memory_plan_gives_spare_memory_to_attention_outputs_then_to_kept_blocks():
    # a compiled 14B expert at 3 600 tokens (GiB): per block 0.017 kept when recomputing in the graph, 0.086
    # keeping its attention outputs, 0.75 keeping everything
    tiers = (0.017, 0.086)
    card24 = decide(40, 24.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327, tiers)
    assert card24.in_graph and card24.streamed == [] and 1 <= 40 - card24.checkpointed <= 4
    assert card24.keep_attention == card24.checkpointed and card24.estimate_gib <= 24.0  # every one keeps them
    tight = decide(40, 20.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327, tiers)
    assert tight.checkpointed == 40 and 0 < tight.keep_attention < 40 and tight.estimate_gib <= 20.0
    policies = tight.policies()
    assert policies == ["recompute"] * (40 - tight.keep_attention) + ["save-attention"] * tight.keep_attention
    low = decide(40, 16.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327, tiers)
    assert low.streamed and low.estimate_gib <= 16.0
    assert set(low.policies()) == {"recompute"}  # streamed or not, compiled blocks recompute inside their graph
    big = decide(40, 139.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327, tiers)
    assert (big.checkpointed, big.transposed) == (0, True)
    assert "inside the compiled graph, 37 keeping their attention outputs" in decide(
        40, 24.0, 18.5, 0.75, 0.327, "auto", 37, 3600, 0.327, tiers).describe()


def test_memory_plan_spends_spare_memory_then_streams_only_what_does_not_fit():
    # numbers of a 14B expert at 3 600 tokens (GiB): fixed 18.5, 0.75 per kept block, 0.327 per block's weights
    h100 = decide(40, 78.4, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327)
    assert (h100.checkpointed, h100.streamed, h100.transposed) == (0, [], True) and h100.estimate_gib <= 78.4
    card24 = decide(40, 24.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327)
    assert card24.streamed == [] and card24.checkpointed == 40 - int((24.0 - 18.5) / 0.75) and not card24.transposed
    low = decide(40, 16.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327)
    assert low.checkpointed == 40 and low.estimate_gib <= 16.0 and 8 <= len(low.streamed) <= 12
    assert set(low.policies()) == {"eager"}  # not compiled: every block, streamed or not, checkpoints around itself
    gaps = [b - a for a, b in zip(low.streamed, low.streamed[1:])]
    assert min(gaps) >= 3  # spread out, so each copy hides behind resident blocks' compute
    forced = decide(40, 78.4, 18.5, 0.75, 0.327, "low", -1, 3600, 0.327)
    assert forced.checkpointed == 40 and forced.streamed == []  # "low" that fits needs no streaming
    assert decide(40, 78.4, 18.5, 0.75, 0.327, "auto", 12, 3600, 0.327).checkpointed == 12
    with pytest.raises(WanpairError, match="checkpoint_blocks = 0"):
        decide(40, 24.0, 18.5, 0.75, 0.327, "auto", 0, 3600, 0.327)
    with pytest.raises(WanpairError, match="memory_mode = \"fast\""):
        decide(40, 16.0, 18.5, 0.75, 0.327, "fast", -1, 3600, 0.327)
    with pytest.raises(WanpairError, match="fp8_base = false"):
        decide(40, 16.0, 18.5, 0.75, 0.0, "auto", -1, 3600, 0.0)
    with pytest.raises(WanpairError, match="even with all 40 blocks streamed"):
        decide(40, 6.0, 18.5, 0.75, 0.327, "auto", -1, 3600, 0.327)


def test_memory_plan_offloads_what_blocks_save_when_streaming_every_block_is_not_enough():
    """The I2V A14B expert on an 81-frame 832x480 clip (32 760 tokens; each block's input alone is 0.31 GiB):
    at 32 GiB streaming every block fits; at 24 it does not, so compiled blocks keep what they save on the host,
    every block streaming and recomputing inside its graph (measured on an H100: 16.0 GiB at 24, 27.6 at 32,
    docs/benchmarks.md twelfth round)."""
    config = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096,
                  freq_dim=256)
    clip = 21 * 30 * 52
    at32 = plan_from_config(config, clip, TrainSettings(), 32.0, True)
    assert len(at32.streamed) == 40 and not at32.offloaded and set(at32.policies()) == {"recompute"}
    assert at32.estimate_gib >= 27.6  # measured peak on an H100 (docs/benchmarks.md, twelfth round)
    at24 = plan_from_config(config, clip, TrainSettings(), 24.0, True)
    assert at24.offloaded == at24.streamed == list(range(40))
    assert set(at24.policies()) == {"recompute"} and 16.0 <= at24.estimate_gib <= 24.0 - 4  # measured peak 16.0
    assert "40 keeping what they save for backward in pinned host memory" in at24.describe()
    with pytest.raises(WanpairError, match="streamed from the host and what they save for backward offloaded"):
        plan_from_config(config, clip, TrainSettings(memory_mode="low"), 16.0, True)
    with pytest.raises(WanpairError, match="even with all 40 blocks streamed from the host \\("):
        plan_from_config(config, clip, TrainSettings(), 24.0, True, compiled=False)  # offloading needs the graph
    image = plan_from_config(config, 3600, TrainSettings(memory_mode="low"), 16.0, True)
    assert image.streamed and not image.offloaded and set(image.policies()) == {"recompute"}


def test_a_non_finite_step_is_skipped_on_the_device_with_fused_adamw():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = torch.nn.Linear(4, 4)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)

    class Fake(torch.nn.Module):  # flow_matching_loss calls model(hidden_states=..., ...)[0]
        def __init__(self, inner, value):
            super().__init__()
            self.inner, self.value = inner, value

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            return (self.inner(hidden_states) * self.value,)

    x = torch.randn(1, 4)
    before = [p.detach().clone() for p in params]
    batch = [(x, x, torch.tensor([0.5]), torch.zeros(1, 1), None)]
    loss, ok = train_step(Fake(model, float("nan")), opt, sched, acc, params, batch, torch.float32, 0.0)
    assert not ok and all(torch.equal(a, b) for a, b in zip(before, params)) and sched.get_last_lr() == [0.1]
    loss, ok = train_step(Fake(model, 1.0), opt, sched, acc, params, batch, torch.float32, 0.0)
    assert ok and not all(torch.equal(a, b) for a, b in zip(before, params)) and sched.get_last_lr() == [0.05]


def test_speed_settings_read_naturally_and_bad_combinations_are_named(tmp_path):
    from wanpair.project import _train_settings

    problems: list[str] = []
    t = _train_settings({"compile": True, "fp8_matmul": False, "memory_mode": "low", "memory_budget_gb": 12},
                        tmp_path / "wanpair.toml", problems)
    assert not problems and (t.compile, t.fp8_matmul, t.memory_mode, t.memory_budget_gb) == ("on", "off", "low", 12.0)
    _train_settings({"memory_mode": "low", "fp8_base": False, "memory_budget_gb": -1, "fp8_matmul": "yes"},
                    tmp_path / "wanpair.toml", problems)
    text = "\n".join(problems)
    assert "memory_mode = \"low\"" in text and "memory_budget_gb" in text and "fp8_matmul" in text


def test_use_fp8_matmul_skips_layers_it_cannot_serve():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].ok = torch.nn.Linear(32, 48)
    model.blocks[0].odd = torch.nn.Linear(30, 48)  # 30 is not a multiple of 16
    to_fp8_linears(model, torch.bfloat16)
    assert use_fp8_matmul(model, True) == 1
    assert model.blocks[0].ok.use_fp8_matmul and not model.blocks[0].odd.use_fp8_matmul


def test_steps_are_replayed_as_cuda_graphs_only_where_that_is_safe():
    """`cuda_graph = "auto"` on the recipe's H100 plan replays the steps; every other case runs them eagerly, and the
    log names the reason (`wanpair.train.step_graph`; the replay itself is proven in tests/test_gpu.py)."""
    cuda = torch.device("cuda")
    roomy = MemoryPlan(budget_gib=78.6, blocks=40, checkpointed=0, estimate_gib=61.7, in_graph=True)
    assert why_not(cuda, "auto", 1, roomy, 1, 0.0, 2) is None
    assert why_not(cuda, "auto", 1, dataclasses.replace(roomy, checkpointed=12), 1, 0.0, 8) is None  # inside compile
    cases = [((cuda, "off", 1, roomy, 1, 0.0, 2), 'cuda_graph = "off"'),
             ((torch.device("cpu"), "auto", 1, roomy, 1, 0.0, 2), "not on a CUDA GPU"),
             ((cuda, "auto", 2, roomy, 1, 0.0, 2), "several processes"),
             ((cuda, "auto", 1, dataclasses.replace(roomy, streamed=[0, 1]), 1, 0.0, 2), "stream from host memory"),
             ((cuda, "auto", 1, dataclasses.replace(roomy, offloaded=[0]), 1, 0.0, 2), "stream from host memory"),
             ((cuda, "auto", 1, dataclasses.replace(roomy, checkpointed=4, in_graph=False), 1, 0.0, 2),
              "checkpoint outside a compiled graph"),
             ((cuda, "auto", 1, dataclasses.replace(roomy, budget_gib=24.0, estimate_gib=22.5), 1, 0.0, 2),
              "less than 2 GiB spare"),
             ((cuda, "auto", 1, roomy, 4, 0.0, 2), "gradient_accumulation_steps > 1"),
             ((cuda, "auto", 1, roomy, 1, 0.1, 2), "module_dropout decides on the host"),
             ((cuda, "auto", 1, roomy, 1, 0.0, 9), "9 batch shapes (more than 8)")]
    for args, reason in cases:
        assert reason in (why_not(*args) or ""), (args, why_not(*args))


def test_step_graphs_capture_only_once_every_batch_shape_ran_eagerly(monkeypatch):
    """The graphs' memory rule (`StepGraphs`): no eager step may run once a graph holds the step's activations, so
    every batch shape runs eagerly once (compiling its blocks) before the first capture; after a release (samples)
    the next step captures again at once; a capture that fails leaves eager steps for good, said once. CUDA's
    graph calls are stood in for (this machine has no GPU): what is checked is which steps run how."""
    events, messages, inside = [], [], {"capture": False}

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def capturing(graph, pool=None):
        events.append("capture")
        inside["capture"] = True
        try:
            yield
        finally:
            inside["capture"] = False

    for name, value in {"CUDAGraph": Graph, "graph": capturing, "graph_pool_handle": object,
                        "empty_cache": lambda: None, "synchronize": lambda: None,
                        "current_stream": lambda: None, "set_stream": lambda s: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    param = torch.nn.Parameter(torch.ones(3))
    fail = {"on": False}

    def eager(micro_batches):
        if fail["on"] and inside["capture"]:
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        events.append("eager")
        loss = (param * micro_batches[0][0].sum()).sum()
        loss.backward()
        return loss.detach()

    def step(size):
        del events[:]
        graphs.forward_backward(eager, [(torch.ones(size), None)], 1.0)
        return list(events)

    graphs = StepGraphs([param], 2, messages.append)
    assert [step(4), step(4), step(5)] == [["eager"], ["eager"], ["eager"]]  # 5 is the second shape: now all ran
    assert step(4) == ["capture", "eager", "replay"]  # the capture runs the passes once to record them
    assert [step(5), step(4), step(5)] == [["capture", "eager", "replay"], ["replay"], ["replay"]]
    assert messages == ["training steps replayed as CUDA graphs (2 batch shapes)"]
    graphs.release()
    assert step(5) == ["capture", "eager", "replay"] and step(5) == ["replay"]
    graphs.release()
    fail["on"] = True
    assert step(4) == ["capture", "eager"]  # failed, then the step eagerly
    assert [step(4), step(5)] == [["eager"], ["eager"]] and graphs.failed and not graphs.graphs
    assert messages[1:] == ["the training step could not be captured as a CUDA graph (operation not permitted when "
                            "stream is capturing); its steps run without one"]
