"""What only a GPU can prove: CUDA's fp8 rules when loading every fp8 layout, fp8 tensor-core matmuls,
block streaming with real copy streams, the compiled block, the memory plan's estimate against the
allocator's real peak at full width, and fp16 training on accelerate's own loss scaler (which it makes only
on a GPU). Run on the GPU machine: `pytest -m gpu` (skipped without CUDA)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

import wanpair.train.step as step_mod
from conftest import set_train
from test_fp16_scaler import _loss_times
from test_models import _dit, _fp8_files, _real_weight
from wanpair.errors import WanpairError
from wanpair.models import load_dit
from wanpair.models.attention import FA4_CAPABILITIES, fa4_status, flash_attention
from wanpair.models.files import iter_tensors, tensors_to_device
from wanpair.models.fp8 import Fp8Linear, fp8_matmul_available, keep_transposed, to_fp8_linears
from wanpair.project import TrainSettings, load_project
from wanpair.train.flow_matching import flow_matching_loss
from wanpair.train.lora import apply_max_norm
from wanpair.train.memory_plan import streamed_block_host_bytes
from wanpair.train.metrics import read_metrics
from wanpair.train.model_setup import prepare_expert
from wanpair.train.recipe import LoraPairRecipe
from wanpair.train.speed import checkpoint_blocks, compile_blocks, eager
from wanpair.train.step_graph import StepGraphs
from wanpair.train.streaming import use_host_memory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
needs_fa4 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in FA4_CAPABILITIES
    or fa4_status()[0] is None, reason='needs FlashAttention-4 (pip install "wanpair[fa4]") on an H100 / H200 / B200')


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", ["e4m3fn", "e5m2", "scaled"])
def test_every_fp8_layout_loads_onto_the_gpu_exactly(tmp_path, layout):
    """The bug a user hit first: CUDA has no abs/amax for fp8 tensors. Stored as fp8 (re-quantised with
    power-of-two row scales: lossless) or widened, the weights are the file's own."""
    paths, files = _fp8_files(_dit(), tmp_path)
    key = "blocks.0.self_attn.q.weight"
    real = _real_weight(files[layout], key).to(CUDA)
    stored = load_dit(paths[layout], dtype=torch.bfloat16, device=CUDA, fp8=True)
    layer = stored.blocks[0].attn1.to_q
    assert isinstance(layer, Fp8Linear) and layer.weight.device.type == "cuda"
    assert torch.equal(layer.weight.float() * layer.weight_scale, real)
    widened = load_dit(paths[layout], dtype=torch.float32, device=CUDA)
    assert torch.equal(widened.blocks[0].attn1.to_q.weight, real)


def test_reading_ahead_into_pinned_memory_gives_the_files_bytes(demo_root):
    path = demo_root / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
    on_host = dict(iter_tensors(path))
    on_gpu = dict(tensors_to_device(path, list(on_host), CUDA))
    assert on_gpu.keys() == on_host.keys()
    assert all(v.device.type == "cuda" and torch.equal(v.cpu(), on_host[k]) for k, v in on_gpu.items())


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmul_available(CUDA), reason="needs fp8 tensor cores")
@pytest.mark.parametrize("rows", [37, 3600])  # 37: padded to a multiple of 16 for _scaled_mm
def test_fp8_tensor_core_matmul_matches_the_dequantised_weight(rows):
    torch.manual_seed(0)
    dense = torch.nn.Linear(5120, 1024, device=CUDA, dtype=torch.bfloat16)
    layer = Fp8Linear(5120, 1024, True, torch.bfloat16).to(CUDA)
    layer.set_weight(dense.weight.data, dense.bias.data)
    x = torch.randn(1, rows, 5120, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, rows, 1024, device=CUDA, dtype=torch.bfloat16)
    results = {}
    for mode in ("dequantised", "fp8 matmul", "fp8 matmul, W^T kept"):
        layer.use_fp8_matmul = mode != "dequantised"
        if mode.endswith("kept"):
            keep_transposed(torch.nn.ModuleList([layer]))
        out = layer(x)
        out.backward(g)
        results[mode] = out.detach(), x.grad.clone()
        x.grad = None
    ref_out, ref_grad = torch.nn.functional.linear(x, dense.weight, dense.bias).detach(), g @ dense.weight
    for mode, (out, grad) in results.items():
        # e4m3 weights (and, for the matmul, e4m3 activations): ~3-5 % relative error, not a wrong formula
        assert rel(out, ref_out) < 0.06 and rel(grad, ref_grad) < 0.06, mode
    assert rel(results["fp8 matmul"][0], results["dequantised"][0]) < 0.06


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmul_available(CUDA), reason="needs fp8 tensor cores")
def test_fast_fp8_accumulation_changes_only_the_accumulations_rounding():
    """The default accumulates fp8 products without fp32 promotion. Over the longest sums of the model
    (the 13 824-wide feed-forward input) its outputs and input gradients stay within 0.5 % of exact
    accumulation's: rounding of the sums, far below the ~3 % of e4m3 storage itself."""
    torch.manual_seed(0)
    layer = Fp8Linear(13824, 5120, False, torch.bfloat16).to(CUDA)
    layer.set_weight(torch.randn(5120, 13824, device=CUDA) * 0.02)
    layer.use_fp8_matmul = True
    x = torch.randn(3600, 13824, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3600, 5120, device=CUDA, dtype=torch.bfloat16)
    results = {}
    for fast in (True, False):
        layer.fast_accum = fast
        out = layer(x)
        out.backward(g)
        results[fast] = out.detach(), x.grad.clone()
        x.grad = None
    (fast_out, fast_grad), (exact_out, exact_grad) = results[True], results[False]
    assert rel(fast_out, exact_out) < 0.005 and rel(fast_grad, exact_grad) < 0.005


def _expert(layers: int, width_heads: int = 1, ffn: int = 256, text_dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with CUDA:
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=width_heads, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn,
                                      num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    to_fp8_linears(model, torch.bfloat16)
    return model


def _inputs(frames_hw=(1, 16, 16), text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 16, *frames_hw, generator=g).to(CUDA)
    noise = torch.randn(x0.shape, generator=g).to(CUDA)
    return x0, noise, torch.tensor([0.9], device=CUDA), torch.randn(1, 512, text_dim, generator=g).to(CUDA)


def _grads(model, params, inputs):
    for p in params:
        p.grad = None
    with torch.autocast("cuda", torch.bfloat16):
        loss = flow_matching_loss(model, *inputs, torch.bfloat16)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _trainable(layers: int, settings: TrainSettings, tokens: int = 0, **shape):
    """A tiny expert with LoRA whose B matrices are non-zero (so gradients reach A too); the same seed
    gives the same base and the same LoRA. `tokens`: what the memory plan plans for (a compiled expert's plan
    needs it); `shape`: `_expert`'s."""
    model = _expert(layers, **shape)
    torch.manual_seed(1)
    params, _ = prepare_expert(model, settings, torch.bfloat16, tokens)
    _lora_b_nonzero(model)
    return model, params


def _lora_b_nonzero(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator(CUDA).manual_seed(len(name)))


def test_streamed_blocks_on_the_gpu_give_the_resident_loss_and_gradients():
    """Blocks 0, 2, 3 of 4 fetched from pinned host memory on a copy stream: the same bytes reach the same
    kernels, so only nondeterministic kernels (attention backward) may differ, far below bf16 noise."""
    settings = TrainSettings(checkpoint_blocks=0, compile="off")
    resident, p_resident = _trainable(4, settings)
    streamed, p_streamed = _trainable(4, settings)
    streamer = use_host_memory(streamed, [0, 2, 3]).streamer
    inputs = _inputs()
    for _ in range(2):  # the second step fetches blocks the first one left in the slots
        (la, ga), (lb, gb) = _grads(resident, p_resident, inputs), _grads(streamed, p_streamed, inputs)
        assert rel(lb, la) < 1e-3 and max(rel(b, a) for a, b in zip(ga, gb)) < 1e-3
    assert streamer.copied_bytes > 0


def test_offloaded_and_in_graph_streamed_compiled_blocks_give_the_resident_loss_and_gradients():
    """Compiled blocks (inductor) recomputing inside their graph: blocks 0, 2, 3 of 4 streamed and what every block
    saves kept in pinned host memory, against the same blocks resident. The same kernels on the same bytes, but
    attention's backward sums in a varying order: the bound is three times the resident model's own difference
    between two runs of one step (at least 1e-3). Two steps with a validation-like pass between; after a forward,
    the offloaded model holds at least three block inputs less on the GPU (4 096 tokens x 384 x bf16 = 3 MiB each)."""
    settings, shape = TrainSettings(checkpoint_blocks=0, compile="off"), dict(width_heads=3, ffn=1040)
    resident, p_resident = _trainable(4, settings, **shape)
    hosted, p_hosted = _trainable(4, settings, **shape)
    host = use_host_memory(hosted, [0, 2, 3], offloaded=[0, 1, 2, 3], in_graph=True)
    for model in (resident, hosted):
        checkpoint_blocks(model, ["recompute"] * 4)
        compile_blocks(model)
    inputs = _inputs(frames_hw=(1, 128, 128))  # 64 x 64 patches: 4 096 tokens
    held = {}
    for name, model in (("resident", resident), ("hosted", hosted)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(model, *inputs, torch.bfloat16)
        torch.cuda.synchronize()
        torch.empty(1, device=CUDA)  # lets the allocator retire blocks whose copies have finished
        held[name] = torch.cuda.memory_allocated() - before
        loss.backward()
    input_bytes = 4096 * 384 * 2
    assert held["hosted"] <= held["resident"] - 3 * input_bytes, held
    for step in range(2):
        (la, ga), (la2, ga2) = _grads(resident, p_resident, inputs), _grads(resident, p_resident, inputs)
        lb, gb = _grads(hosted, p_hosted, inputs)
        noise = max(rel(b, a) for a, b in zip(ga, ga2))
        bound = max(1e-3, 3 * noise)
        assert rel(lb, la) < bound and max(rel(b, a) for a, b in zip(ga, gb)) < bound, (step, noise)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), eager():  # a validation pass between steps
            assert rel(flow_matching_loss(hosted, *inputs, torch.bfloat16),
                       flow_matching_loss(resident, *inputs, torch.bfloat16)) < 1e-3
    assert host.offloader.copied_bytes > 0 and not host.offloader.waiting and host.streamer.copied_bytes > 0


def test_streamed_blocks_take_the_pinned_memory_the_doctor_counts():
    """The doctor's host-RAM check counts each streamed weight rounded up to a power of two, as torch's
    caching host allocator allocates it; widths that are not powers of two (384, 1040) tell the two apart."""
    model, _ = _trainable(4, TrainSettings(checkpoint_blocks=0, compile="off"), width_heads=3, ffn=1040)
    torch.cuda.synchronize()
    torch.empty(1, pin_memory=True)  # an allocation retires earlier tests' pinned blocks whose copies are done
    before = torch.cuda.host_memory_stats()["active_bytes.current"]
    use_host_memory(model, [0, 2, 3])
    pinned = torch.cuda.host_memory_stats()["active_bytes.current"] - before
    exact = 3 * (8 * 384 * 384 + 2 * 384 * 1040)
    assert pinned == 3 * streamed_block_host_bytes(model.config) > exact


def test_the_compiled_block_gives_the_eager_loss_and_gradients():
    eager, p_eager = _trainable(2, TrainSettings(checkpoint_blocks=0, compile="off"))
    compiled, p_compiled = _trainable(2, TrainSettings(checkpoint_blocks=0, compile="off"))
    compile_blocks(compiled)
    inputs = _inputs()
    (la, ga), (lb, gb) = _grads(eager, p_eager, inputs), _grads(compiled, p_compiled, inputs)
    # inductor fuses and reorders bf16 arithmetic: equal up to bf16 rounding (~0.4 % per op)
    assert rel(lb, la) < 1e-2 and max(rel(b, a) for a, b in zip(ga, gb)) < 5e-2


@needs_fa4
def test_fa4_attends_as_sdpa_does_at_a_wan_blocks_shape():
    """FA4 through wanpair::flash_attention against an fp32 reference, with cuDNN's SDPA in bf16 beside it for
    scale: 3 600 tokens (a 960x960 image), head dim 128; output and q/k/v gradients."""
    g = torch.Generator(CUDA).manual_seed(0)
    q, k, v = (torch.randn(1, 3600, 8, 128, generator=g, device=CUDA, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    grad = torch.randn(q.shape, generator=g, device=CUDA, dtype=torch.bfloat16)

    def run(fn, *tensors):
        out = fn(*tensors)
        return [out, *torch.autograd.grad(out, tensors, grad.to(out.dtype))]

    def sdpa(*t):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in t)).transpose(1, 2)

    ref = run(sdpa, *(t.detach().float().requires_grad_() for t in (q, k, v)))
    fa4 = run(lambda *t: flash_attention(*t, 128 ** -0.5)[0], q, k, v)
    cudnn = run(sdpa, q, k, v)
    for name, a, c, r in zip(("out", "dq", "dk", "dv"), fa4, cudnn, ref):
        assert rel(a, r) < max(2 * rel(c, r), 1e-2), name  # bf16 error of the same size as cuDNN's


@needs_fa4
def test_compiled_blocks_with_fa4_give_sdpas_loss_and_gradients():
    """attention = "auto" picks FA4 here; in compiled blocks, kept and recomputing in their graph, the loss and
    LoRA gradients are SDPA's up to bf16 rounding."""
    runs = {}
    for kind in ("sdpa", "auto"):
        model, params = _trainable(2, TrainSettings(checkpoint_blocks=0, compile="on", attention=kind), tokens=256)
        checkpoint_blocks(model, [None, "save-attention"])
        runs[kind] = model, _grads(model, params, _inputs(frames_hw=(1, 32, 32)))
    assert all(b.attn1.processor.flash for b in runs["auto"][0].blocks)
    assert not any(b.attn1.processor.flash for b in runs["sdpa"][0].blocks)
    (la, ga), (lb, gb) = runs["sdpa"][1], runs["auto"][1]
    assert rel(lb, la) < 1e-2 and max(rel(b, a) for a, b in zip(ga, gb)) < 5e-2


def test_a_validation_pass_through_compiled_blocks_gives_the_eager_loss():
    """Validation runs the compiled blocks without gradients (a graph of their own, compiled at the first
    evaluation): the loss is eager's up to inductor's bf16 reordering, with blocks kept, and recomputing or
    keeping attention inside their graph (their checkpoint is skipped without gradients)."""
    model, params = _trainable(3, TrainSettings(checkpoint_blocks=0, compile="on"), tokens=64)  # _inputs(): 8x8
    checkpoint_blocks(model, [None, "recompute", "save-attention"])
    inputs = _inputs()
    _grads(model, params, inputs)  # the training graph first, as in a run
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        with eager():
            reference = flow_matching_loss(model, *inputs, torch.bfloat16)
        compiled = flow_matching_loss(model, *inputs, torch.bfloat16)
    assert rel(compiled, reference) < 1e-2


@pytest.mark.parametrize("stream", [False, True])
def test_the_memory_plan_bounds_the_real_peak_at_full_width(stream):
    """8 blocks of the real 14B width at the recipe's 3 600 tokens: the plan's estimate is at least the
    allocator's peak over real steps (the promise that keeps a run from running out of memory), and not
    wildly above it. With a budget 1.5 GiB under what all-resident needs, it streams blocks and stays
    within that budget."""
    torch.cuda.empty_cache()
    text_dim, shape = 4096, (1, 120, 120)  # 960 x 960 -> 60 x 60 patches = 3 600 tokens
    model = _expert(8, width_heads=40, ffn=13824, text_dim=text_dim)
    inputs = _inputs(shape, text_dim)
    tokens = 3600
    settings = TrainSettings(compile="off", memory_mode="low")
    if stream:
        all_resident = prepare_expert(model, TrainSettings(compile="off", memory_mode="low", memory_budget_gb=1000.0),
                                      torch.bfloat16, tokens)[1].estimate_gib
        del model
        torch.cuda.empty_cache()
        model = _expert(8, width_heads=40, ffn=13824, text_dim=text_dim)
        settings = TrainSettings(compile="off", memory_mode="low", memory_budget_gb=all_resident - 1.5)
    params, plan = prepare_expert(model, settings, torch.bfloat16, tokens)
    assert bool(plan.streamed) == stream, plan.describe()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(model, *inputs, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert peak <= plan.estimate_gib, plan.describe()
    assert peak >= 0.6 * plan.estimate_gib, f"peak {peak:.2f} GiB; {plan.describe()}"
    if stream:
        assert plan.estimate_gib <= settings.memory_budget_gb


def test_max_norm_on_a_full_size_experts_lora_scales_each_module_as_if_alone():
    """`apply_max_norm` on CUDA over an A14B expert's 400 rank-16 LoRA modules (three shapes, interleaved as in a
    block): each module's weight change ends at min(its norm, the limit) -- computed here one module at a time
    in float64 -- and a module under the limit keeps its factors bit for bit (the batched copies scaled in place
    and copied back must not touch it)."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    d, ffn, r, scale = 5120, 13824, 16, 0.5
    shapes = ([((r, d), (d, r))] * 8 + [((r, d), (ffn, r)), ((r, ffn), (d, r))]) * 40  # attn1/attn2 q k v o, ffn
    pairs = [(torch.randn(a, generator=g, device=CUDA) * 0.02, torch.randn(b, generator=g, device=CUDA) * 0.01 * (1 + i % 7))
             for i, (a, b) in enumerate(shapes)]
    before = [scale * (u.double() @ dn.double()).norm().item() for dn, u in pairs]
    ordered = sorted(before)
    limit = (ordered[199] + ordered[200]) / 2  # between two modules' norms: half the modules above it
    kept = [(dn.clone(), u.clone()) for dn, u in pairs]
    stats = apply_max_norm(pairs, limit, scale).tolist()
    after = [scale * (u.double() @ dn.double()).norm().item() for dn, u in pairs]
    worst = max(abs(a - min(b, limit)) / min(b, limit) for a, b in zip(after, before))
    assert worst < 1e-4  # fp32 Gram sums and a fp32 square root against float64 products
    assert all(torch.equal(dn, k[0]) and torch.equal(u, k[1]) for (dn, u), k, b in zip(pairs, kept, before) if b < limit)
    assert stats[0] == 200 and abs(stats[2] - limit) < 1e-4 * limit


def _fp16_demo(demo):
    """The demo in the recipe's fp16 on the GPU: accelerate's own GradScaler, whose skips fused AdamW makes on
    the device (tests/test_fp16_scaler.py gives the same scaler on the CPU). Eager, to keep the test short, and
    without CUDA graphs: `_loss_times` scales the loss on the host per call, which a captured step would freeze."""
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False, mixed_precision="fp16", validate_every_n_steps=0,
              learning_rate=2e-3, max_bad_steps=2, compile="off", cuda_graph="off")
    return load_project(demo / "wanpair.toml")[0]


def test_an_fp16_run_whose_loss_is_nan_stops_on_the_gpus_loss_scaler(demo, monkeypatch):
    project = _fp16_demo(demo)
    _loss_times(monkeypatch, lambda n: float("nan"))
    with pytest.raises(WanpairError, match=r"2 consecutive non-finite steps on the high-noise expert; stopped without "
                                           r"saving a broken LoRA\. .*fp16 overflow"):
        LoraPairRecipe(project).run(("high",))
    assert not project.lora_path("high").exists()


def test_fp16_skips_while_the_gpus_loss_scale_settles_are_not_counted_as_steps(demo, monkeypatch):
    """Gradients that overflow fp16 in the first 3 steps only: the scaler skips them (read from its scale on the
    device), the run trains on and ends 3 steps short of its batches, its LoRA trained and finite."""
    project = _fp16_demo(demo)
    _loss_times(monkeypatch, lambda n: 1e30 if n <= 3 else 1.0)
    (result,) = LoraPairRecipe(project).run(("high",))
    rows = read_metrics(project.run_dir / "metrics.jsonl")
    batches = next(row["total_steps"] for row in rows if "total_steps" in row)
    assert result.steps == batches - 3  # one epoch: as many planned steps as batches
    lora = load_file(str(result.lora))
    assert all(torch.isfinite(v.float()).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)  # trained: up matrices start at zero


def test_a_step_replayed_as_a_cuda_graph_gives_the_eager_loss_and_gradients():
    """The loop's graphs (`wanpair.train.step_graph`) on a compiled tiny expert: a shape's first step runs eagerly,
    the second is captured and replayed, the third replays on other inputs. Each against the plain eager step on
    the same inputs and LoRA: the same kernels on the same bytes. The loss is the same to the bit; gradients may move
    with the compiled attention backward's nondeterministic accumulation, which moved the smallest LoRA tensor of
    this tiny expert by 1.5e-3 of its norm on an H100 (2026-12-07): far below bf16 noise (~4e-3 per op). The loss
    was equal to the bit there; checked to 1e-6."""
    model, params = _trainable(2, TrainSettings(checkpoint_blocks=0, compile="off"))
    compile_blocks(model)

    def eager(micro_batches):
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(model, *micro_batches[0], torch.bfloat16)
        loss.backward()
        return loss.detach()

    graphs = StepGraphs(params, 1, print)
    for seed in (0, 0, 1):
        inputs = _inputs(seed=seed)
        ref_loss, ref_grads = _grads(model, params, inputs)
        for p in params:
            p.grad = None
        loss = graphs.forward_backward(eager, [inputs], 1.0)
        grads = [p.grad.clone() for p in params]
        assert rel(loss, ref_loss) < 1e-6 and max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-2
    assert len(graphs.graphs) == 1 and not graphs.failed
    graphs.release()
    assert not graphs.graphs


def _graph_demo(demo, **settings):
    set_train(demo / "wanpair.toml", epochs=2, tensorboard=False, validate_every_n_steps=6, learning_rate=2e-3,
              **settings)
    (demo / "prompts.txt").write_text("a red circle on a white background\n")
    with open(demo / "wanpair.toml", "a") as f:
        f.write('[sample]\nprompts = "prompts.txt"\nevery_n_steps = 9\nwidth = 32\nheight = 32\nsteps = 2\n')
    return load_project(demo / "wanpair.toml")[0]


@pytest.mark.parametrize("precision, compile", [("bf16", "off"), ("fp16", "off"), ("bf16", "on")])
def test_the_loop_replays_its_steps_as_cuda_graphs_and_trains_as_it_does_without(demo, tmp_path, capsys, precision,
                                                                                  compile):
    """The demo's high-noise expert, 2 epochs of its two batch shapes (compiled: each shape compiles its blocks
    before any graph is captured), with validation every 6 steps and a sample every 9 (which frees the graphs; the
    next step captures again): with graphs and without, from one seed. The graphs run the eager step's kernels on
    the same bytes: on an H100 (2026-12-07, uncompiled) every loss of the two runs was equal to the bit, in bf16 and
    fp16; checked to 1e-3 relative, so that a GPU whose attention backward accumulates nondeterministically still
    passes while a stale input, gradient or loss scale (off by a step) does not."""
    runs = {}
    for graph in ("auto", "off"):
        root = tmp_path / graph
        shutil.copytree(demo, root)
        project = _graph_demo(root, mixed_precision=precision, cuda_graph=graph, compile=compile)
        (result,) = LoraPairRecipe(project).run(("high",))
        out = capsys.readouterr().out
        assert ("training steps replayed as CUDA graphs (2 batch shapes)" in out) == (graph == "auto"), out
        assert ('training steps run without CUDA graphs: cuda_graph = "off"' in out) == (graph == "off"), out
        rows = read_metrics(project.run_dir / "metrics.jsonl")
        runs[graph] = ([r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r],
                       sorted(p.name for p in (project.run_dir / "samples").glob("*.png")))
    (loss_g, val_g, samples_g), (loss_e, val_e, samples_e) = runs["auto"], runs["off"]
    steps = max(abs(a - b) / b for a, b in zip(loss_g, loss_e))
    vals = max(abs(a - b) / b for a, b in zip(val_g, val_e))
    print(f"{precision}, compile {compile}: per-step loss {steps:.2e}, validation {vals:.2e} (largest relative "
          "differences)")
    assert len(loss_g) == len(loss_e) == 36 and len(val_g) == len(val_e) >= 6
    assert steps < 1e-3 and vals < 1e-3
    assert samples_g == samples_e and len(samples_g) == 4


def test_a_step_that_cannot_be_captured_runs_eagerly_and_says_why(demo, capsys, monkeypatch):
    """A loss that reads a value on the host (not allowed while a graph is captured): the capture fails, the
    run says so and trains on eagerly to its end."""
    real = step_mod.flow_matching_loss

    def host_read(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * (1.0 if loss.item() == loss.item() else 0.0)

    monkeypatch.setattr(step_mod, "flow_matching_loss", host_read)
    set_train(demo / "wanpair.toml", epochs=1, tensorboard=False, validate_every_n_steps=0, compile="off")
    project = load_project(demo / "wanpair.toml")[0]
    (result,) = LoraPairRecipe(project).run(("high",))
    out = capsys.readouterr().out
    assert "the training step could not be captured as a CUDA graph" in out and "its steps run without one" in out
    assert result.steps == 18
