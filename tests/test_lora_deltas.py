"""Full weight and bias deltas (ComfyUI's `.diff` / `.diff_b` keys) merged, sampled, inspected and exported;
LoKr, LoHa and unknown keys refused by every command that reads a LoRA: nothing in a file is dropped in silence."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import set_train
from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.export.formats import read_lora, to_state_dict, write_lora
from wanpair.models import load_dit
from wanpair.project import load_project
from wanpair.sample import checked_loras, lora_delta
from wanpair.train.recipe import LoraPairRecipe

HIGH = "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
BASE = "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
# each layout's name for a module (the diffusers names of the demo DiT's layers)
NAMED = {"musubi": lambda m: "lora_unet_" + m.replace(".", "_"), "comfy": lambda m: "diffusion_model." + m,
         "diffusers": lambda m: "transformer." + {"blocks.0.self_attn.q": "blocks.0.attn1.to_q"}[m],
         "peft": lambda m: "base_model.model." + {"blocks.0.self_attn.q": "blocks.0.attn1.to_q"}[m]}


def _deltas(*keys: str) -> dict[str, torch.Tensor]:
    """Deterministic deltas shaped like the demo DiT's layers (dim 128, head 64 x 128)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"blocks.0.self_attn.q.diff": (128, 128), "blocks.0.self_attn.q.diff_b": (128,),
              "head.head.diff": (64, 128), "head.head.diff_b": (64,)}
    made = {k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()}
    return {k: made[k] for k in keys or shapes}


def _lora_with(trained, path, extra: dict[str, torch.Tensor]):
    """The trained HighNoise LoRA's pairs in ComfyUI's layout, plus the `extra` keys (`diffusion_model.` added)."""
    src = read_lora(trained / "output" / HIGH)
    sd = {**to_state_dict(src, "comfy", torch.float32), **{"diffusion_model." + k: v for k, v in extra.items()}}
    save_file(sd, str(path), metadata=src.metadata)
    return path


def _fp32_base(trained, tmp_path):
    base = tmp_path / "wan2.2_t2v_high_noise_base.safetensors"  # named as the high-noise expert
    save_file({k: v.float() for k, v in load_file(trained / "models" / BASE).items()}, str(base))
    return base


@pytest.mark.parametrize("fmt", ["musubi", "comfy", "diffusers", "peft"])
def test_every_layout_keeps_weight_and_bias_deltas_by_wan_module(trained, tmp_path, fmt):
    src, deltas = read_lora(trained / "output" / HIGH), _deltas("blocks.0.self_attn.q.diff", "blocks.0.self_attn.q.diff_b")
    path = write_lora(src, tmp_path / ("lora" if fmt == "peft" else "lora.safetensors"), fmt, torch.float32)
    weights = path / "adapter_model.safetensors" if fmt == "peft" else path
    sd = load_file(weights)
    for key, value in deltas.items():
        module, _, part = key.rpartition(".")
        sd[f"{NAMED[fmt](module)}.{part}"] = value
    save_file(sd, str(weights))
    lora = read_lora(path)
    assert len(lora.modules) == 20  # the pairs, as before
    assert set(lora.diffs) == set(lora.bias_diffs) == {"blocks.0.self_attn.q"}
    assert torch.equal(lora.diffs["blocks.0.self_attn.q"], deltas["blocks.0.self_attn.q.diff"])  # stored as read
    assert torch.equal(lora.bias_diffs["blocks.0.self_attn.q"], deltas["blocks.0.self_attn.q.diff_b"])


def test_merge_and_sampling_add_the_deltas_at_their_strength(trained, tmp_path):
    base = _fp32_base(trained, tmp_path)
    path = _lora_with(trained, tmp_path / "d.safetensors", _deltas())
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(base), "--lora", str(path), "--out", str(out), "--strength", "0.7"]) == 0
    before, merged, d = load_file(base), load_file(out), _deltas()
    pair = read_lora(trained / "output" / HIGH).delta("blocks.0.self_attn.q")
    expected = {  # W += s * (pair + diff), b += s * diff_b; head.head has deltas only
        "blocks.0.self_attn.q.weight": before["blocks.0.self_attn.q.weight"] + 0.7 * (pair + d["blocks.0.self_attn.q.diff"]),
        "blocks.0.self_attn.q.bias": before["blocks.0.self_attn.q.bias"] + 0.7 * d["blocks.0.self_attn.q.diff_b"],
        "head.head.weight": before["head.head.weight"] + 0.7 * d["head.head.diff"],
        "head.head.bias": before["head.head.bias"] + 0.7 * d["head.head.diff_b"],
    }
    # in memory, as `wanpair sample` loads an expert (diffusers' names for the same tensors)
    params = dict(load_dit(base, dtype=torch.float32, delta=lora_delta(read_lora(path), 0.7)).named_parameters())
    in_memory = {"blocks.0.self_attn.q.weight": params["blocks.0.attn1.to_q.weight"],
                 "blocks.0.self_attn.q.bias": params["blocks.0.attn1.to_q.bias"],
                 "head.head.weight": params["proj_out.weight"], "head.head.bias": params["proj_out.bias"]}
    for key, want in expected.items():
        assert (want - before[key]).abs().max() > 1e-3  # the delta moves the tensor
        # fp32 sums of terms below 1, added in another order at most: a few float32 ulps
        assert (merged[key] - want).abs().max() <= 1e-6, key
        assert (in_memory[key].detach() - want).abs().max() <= 1e-6, key
    assert torch.equal(merged["blocks.0.self_attn.k.bias"], before["blocks.0.self_attn.k.bias"])  # no delta there


def test_diffusers_wan_loader_reads_exported_bias_and_head_deltas_like_wanpair(trained, tmp_path):
    """diffusers' Wan loader takes `.diff_b` (and `head.head.diff`) from ComfyUI's layout; block `.diff` it skips,
    and it needs a bias delta for every LoRA pair once there is one (as in the files that have them)."""
    base = trained / "models" / BASE
    exported = tmp_path / "export_comfy.safetensors"
    g = torch.Generator().manual_seed(6)
    biases = {f"{m}.diff_b": torch.randn(up.shape[0], generator=g) * 0.05
              for m, (_, up, _) in read_lora(trained / "output" / HIGH).modules.items()}
    source = _lora_with(trained, tmp_path / "d.safetensors", {**biases, **_deltas("head.head.diff", "head.head.diff_b")})
    assert main(["export", str(source), "--format", "comfy", "--out", str(exported)]) == 0
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([950.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=load_dit(base, dtype=torch.float32))
    pipe.load_lora_weights(str(exported))
    ours = load_dit(base, dtype=torch.float32, delta=lora_delta(read_lora(exported), 1.0))
    pairs_only = load_dit(base, dtype=torch.float32, delta=lora_delta(read_lora(trained / "output" / HIGH), 1.0))
    with torch.no_grad():
        # side layers vs merged weights, fp32 on outputs ~1: rounding only
        assert torch.allclose(pipe.transformer(**inputs)[0], ours(**inputs)[0], rtol=0, atol=1e-5)
        assert (ours(**inputs)[0] - pairs_only(**inputs)[0]).abs().max() > 1e-3  # the deltas made it into the file


def test_a_delta_of_another_shape_is_refused_before_any_model_loads(trained, tmp_path, capsys):
    path = _lora_with(trained, tmp_path / "d.safetensors", {"head.head.diff_b": torch.ones(1)})
    args = ["merge", "--base", str(_fp32_base(trained, tmp_path)), "--lora", str(path), "--out", str(tmp_path / "m.safetensors")]
    assert main(args) == 2 and not (tmp_path / "m.safetensors").exists()
    assert "updates head.head.bias with a [1] tensor but" in capsys.readouterr().err
    project, _ = load_project(trained / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"d\.safetensors updates head\.head\.bias with a \[1\] tensor but the "
                                           r"high-noise slot .* holds it as \[64\]"):
        checked_loras(project, {"high": path, "low": None})


def test_inspect_counts_the_deltas(trained, tmp_path, capsys):
    assert main(["inspect", str(_lora_with(trained, tmp_path / "d.safetensors", _deltas()))]) == 0
    text = capsys.readouterr().out
    assert "deltas:      2 full weight deltas (.diff), 2 bias deltas (.diff_b)" in text
    assert "modules:     21 in 2 blocks" in text and "head.head" in text  # 20 pairs, and head.head's deltas


def test_export_carries_deltas_to_comfy_and_refuses_layouts_without_names_for_them(trained, tmp_path, capsys):
    path = _lora_with(trained, tmp_path / "d.safetensors", _deltas())
    out = tmp_path / "c.safetensors"
    assert main(["export", str(path), "--format", "comfy", "--out", str(out)]) == 0
    assert "20 modules, 4 deltas" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert {"diffusion_model.head.head.diff", "diffusion_model.blocks.0.self_attn.q.diff_b"} <= set(f.keys())
    back = read_lora(out)
    for key, value in _deltas().items():
        module, _, part = key.rpartition(".")
        assert torch.equal((back.diffs if part == "diff" else back.bias_diffs)[module], value)  # copied, not computed
    for fmt in ("musubi", "diffusers", "peft"):
        target = tmp_path / f"x_{fmt}"
        assert main(["export", str(path), "--format", fmt, "--out", str(target)]) == 2 and not target.exists()
        assert (f"the {fmt} layout cannot hold full weight or bias deltas, and this LoRA has 4 keys "
                "(blocks.0.self_attn.q.diff, blocks.0.self_attn.q.diff_b, head.head.diff, head.head.diff_b); "
                "export it with --format comfy") in capsys.readouterr().err


def test_init_lora_refuses_deltas_naming_them_before_any_model_loads(trained, demo, tmp_path):
    path = _lora_with(trained, tmp_path / "d.safetensors", _deltas())
    with open(demo / "wanpair.toml", "a") as f:
        f.write(f"[experts.high]\ninit_lora = {json.dumps(str(path))}\n")
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"init_lora .*d\.safetensors: the initial LoRA \(init_lora\) holds full "
                                           r"weight or bias deltas, 4 keys \(blocks\.0\.self_attn\.q\.diff, "
                                           r".*head\.head\.diff_b\); a rank-16 LoRA cannot start from them"):
        LoraPairRecipe(project).preflight(("high",))  # the checks before any model loads


def _unusable_files(trained, tmp_path) -> dict[str, tuple]:
    """kind -> (file, the message's list of keys): LoKr in kohya's, LyCORIS' and diffusers' naming, LoHa and unknown
    keys beside real LoRA pairs."""
    lokr = {f"lora_unet_blocks_0_self_attn_{m}.{p}": torch.zeros(8, 8) for m in "qk" for p in ("lokr_w1", "lokr_w2", "alpha")}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    save_file({k.replace("lora_unet_", "lycoris_"): v for k, v in lokr.items()}, str(tmp_path / "lycoris.safetensors"))
    diffusers_lokr = {f"blocks.0.attn1.to_{m}.{p}": torch.zeros(8, 8) for m in "qk" for p in ("lokr_w1", "lokr_w2")}
    save_file(diffusers_lokr, str(tmp_path / "lokr-diffusers.safetensors"))  # named like a DiT's own modules
    loha = {f"blocks.0.self_attn.q.hada_w{i}_{ab}": torch.zeros(8, 8) for i in (1, 2) for ab in "ab"}
    modules = [f"blocks.{b}.{m}" for b in (0, 1) for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")]
    unknown = {f"{m}.dora_scale": torch.ones(1, 128) for m in modules[:7]}
    return {
        "LoKr": (tmp_path / "lokr.safetensors", "4 keys (lora_unet_blocks_0_self_attn_k.lokr_w1, "
                 "lora_unet_blocks_0_self_attn_k.lokr_w2, lora_unet_blocks_0_self_attn_q.lokr_w1, "
                 "lora_unet_blocks_0_self_attn_q.lokr_w2)"),
        "LoKr (LyCORIS names)": (tmp_path / "lycoris.safetensors", "6 keys (lycoris_blocks_0_self_attn_k.alpha, "),
        "LoKr (diffusers names)": (tmp_path / "lokr-diffusers.safetensors", "4 keys (blocks.0.attn1.to_k.lokr_w1, "),
        "LoHa": (_lora_with(trained, tmp_path / "loha.safetensors", loha), "4 keys (diffusion_model.blocks.0.self_attn.q.hada_w1_a, "),
        "unknown": (_lora_with(trained, tmp_path / "unknown.safetensors", unknown),
                    "7 keys (diffusion_model.blocks.0.self_attn.k.dora_scale, diffusion_model.blocks.0.self_attn.o.dora_scale, "
                    "diffusion_model.blocks.0.self_attn.q.dora_scale, diffusion_model.blocks.0.self_attn.v.dora_scale, "
                    "diffusion_model.blocks.1.self_attn.k.dora_scale, ...)"),
    }


def test_lokr_loha_and_unknown_keys_are_refused_by_every_command(trained, tmp_path, capsys):
    project, _ = load_project(trained / "wanpair.toml")
    base = trained / "models" / BASE
    for kind, (path, keys) in _unusable_files(trained, tmp_path).items():
        looks = "their kind is unknown" if kind == "unknown" else f"they look like {kind.split()[0]} (LyCORIS), not a LoRA"
        message = f"{path} holds {keys}"
        with pytest.raises(WanpairError) as refused:
            read_lora(path)
        assert message in str(refused.value) and looks in str(refused.value), kind
        for command in (["inspect", str(path)], ["export", str(path), "--format", "comfy", "--out", str(tmp_path / "x")],
                        ["merge", "--base", str(base), "--lora", str(path), "--out", str(tmp_path / "m")]):
            assert main(command) == 2, (kind, command[0])
            assert message in capsys.readouterr().err, (kind, command[0])
        with pytest.raises(WanpairError, match="that wanpair cannot apply"):  # `wanpair sample --lora-high`
            checked_loras(project, {"high": path, "low": None})
        assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


def test_init_lora_of_an_unusable_kind_stops_training_before_it_starts(trained, demo, tmp_path):
    loha = {"blocks.0.self_attn.q.hada_w1_a": torch.zeros(8, 128)}
    path = _lora_with(trained, tmp_path / "loha.safetensors", loha)
    set_train(demo / "wanpair.toml", epochs=1, learning_rate=1e-9, lr_scheduler="constant")
    with open(demo / "wanpair.toml", "a") as f:
        f.write(f"[experts.high]\ninit_lora = {json.dumps(str(path))}\n")
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match=r"init_lora .*loha\.safetensors holds 1 key "
                                           r"\(diffusion_model\.blocks\.0\.self_attn\.q\.hada_w1_a\) .* LoHa"):
        LoraPairRecipe(project, overwrite=True).run(("high",))
    assert not project.lora_path("high").exists()
