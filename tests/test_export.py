"""LoRA files that load in diffusers on the right expert, convert between layouts, and merge exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors import safe_open

from wanpair.cli import main
from wanpair.errors import WanpairError
from wanpair.export.formats import read_lora, write_lora
from wanpair.export.merge import check_expert
from wanpair.models import load_dit, load_text_encoder, load_vae
from wanpair.sample import lora_delta

HIGH = "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
LOW = "WAN2.2-LowNoise_demo_shapes_v1.safetensors"


def _models(root):
    m = root / "models"
    return (m / "wan2.2_t2v_high_noise_tiny_fp16.safetensors", m / "wan2.2_t2v_low_noise_tiny_fp16.safetensors")


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([950.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)


def _out(model):
    with torch.no_grad():
        return model(**_inputs())[0]


def _with_lora(base, lora, strength=1.0):
    return load_dit(base, dtype=torch.float32, delta=lora_delta(read_lora(lora), strength))


def test_diffusers_wan_pipeline_loads_each_lora_onto_its_expert_like_wanpair(trained):
    high_path, low_path = _models(trained)
    te, tok = load_text_encoder(trained / "models" / "models_t5_umt5-tiny-enc-bf16.pth",
                                trained / "models" / "umt5-tiny-tokenizer", dtype=torch.float32)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=load_vae(trained / "models" / "wan_2.1_vae_tiny.safetensors"),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
                       transformer=load_dit(high_path, dtype=torch.float32),
                       transformer_2=load_dit(low_path, dtype=torch.float32), boundary_ratio=0.875)
    base_high, base_low = _out(pipe.transformer), _out(pipe.transformer_2)
    pipe.load_lora_weights(str(trained / "output" / HIGH), adapter_name="high")
    pipe.load_lora_weights(str(trained / "output" / LOW), adapter_name="low", load_into_transformer_2=True)
    by_diffusers_high, by_diffusers_low = _out(pipe.transformer), _out(pipe.transformer_2)

    # wanpair merges each LoRA into its expert as the weights are read (what `wanpair sample` does)
    ours_high = _with_lora(high_path, trained / "output" / HIGH)
    ours_low = _with_lora(low_path, trained / "output" / LOW)
    # diffusers adds the LoRA as side layers, wanpair merges it: fp32 rounding apart, the same outputs (~1)
    assert torch.allclose(by_diffusers_high, _out(ours_high), rtol=0, atol=1e-5)
    assert torch.allclose(by_diffusers_low, _out(ours_low), rtol=0, atol=1e-5)
    assert (by_diffusers_high - base_high).abs().max() > 1e-3  # the LoRA changes the output
    assert (by_diffusers_low - base_low).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["musubi", "comfy", "diffusers", "peft"])
def test_every_layout_round_trips_to_the_same_weight_update(trained, tmp_path, fmt):
    src = read_lora(trained / "output" / HIGH)
    out = write_lora(src, tmp_path / ("out" if fmt == "peft" else "out.safetensors"), fmt, torch.float32)
    back = read_lora(out)
    assert back.source_format == fmt and set(back.modules) == set(src.modules)
    for m in src.modules:
        assert torch.allclose(back.delta(m), src.delta(m), atol=1e-6)


def test_lora_in_comfy_layout_loads_with_the_same_effect(trained, tmp_path):
    high_path, _ = _models(trained)
    comfy = write_lora(read_lora(trained / "output" / HIGH), tmp_path / "c.safetensors", "comfy")
    with safe_open(str(comfy), "pt") as f:
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in f.keys()
    a, b = _with_lora(high_path, trained / "output" / HIGH), _with_lora(high_path, comfy)
    assert torch.allclose(_out(a), _out(b), rtol=0, atol=1e-6)  # the same update in two layouts: rounding only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_merged_file_equals_base_plus_lora(trained, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    high_path, _ = _models(trained)
    base = tmp_path / "wan2.2_t2v_high_noise_base.safetensors"
    sd = load_file(high_path)
    save_file({k: (v.to(dtype) if v.dim() == 2 else v.float()) for k, v in sd.items()}, str(base))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(base), "--lora", str(trained / "output" / HIGH), "--out", str(out),
                 "--strength", "0.7"]) == 0
    merged_sd, base_sd = load_file(out), load_file(base)
    assert set(merged_sd) == set(base_sd) and all(merged_sd[k].dtype == base_sd[k].dtype for k in base_sd)
    reference = _with_lora(base, trained / "output" / HIGH, strength=0.7)
    merged = load_dit(out, dtype=torch.float32)
    if dtype == torch.float32:  # the same sums in float32, stored: identical weights, identical outputs
        assert torch.equal(_out(merged), _out(reference))
    else:  # fp8: the merged weights are the reference weights re-quantised to fp8
        ref_w = reference.blocks[0].attn1.to_q.weight.detach()
        assert torch.equal(merged.blocks[0].attn1.to_q.weight.detach(), ref_w.to(dtype).float())


@pytest.mark.parametrize("layout", ["as trained", "peft"])
def test_lora_for_the_other_expert_is_refused(trained, tmp_path, capsys, layout):
    """Also once exported as a peft adapter folder: its safetensors file keeps the expert it was trained on."""
    _, low_path = _models(trained)
    high = trained / "output" / HIGH
    if layout == "peft":
        assert main(["export", str(high), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
        high = tmp_path / "peft"
    with pytest.raises(WanpairError, match="trained on the high-noise expert but .* low-noise expert"):
        check_expert(read_lora(high), "low", str(low_path))
    out = tmp_path / "m.safetensors"
    args = ["merge", "--base", str(low_path), "--lora", str(high), "--out", str(out)]
    assert main(args) == 2 and "Use the LowNoise LoRA here" in capsys.readouterr().err
    assert main(args + ["--allow-expert-mismatch"]) == 0 and out.exists()


def test_a_damaged_peft_adapter_is_named_not_a_traceback(trained, tmp_path, capsys):
    peft = tmp_path / "peft"
    assert main(["export", str(trained / "output" / HIGH), "--format", "peft", "--out", str(peft)]) == 0
    config, weights = peft / "adapter_config.json", peft / "adapter_model.safetensors"
    good_config = config.read_text()
    config.write_text("{'r': 16")
    assert main(["inspect", str(peft)]) == 2
    assert f"{config} is not readable JSON" in capsys.readouterr().err
    config.write_text(good_config)
    weights.write_bytes(weights.read_bytes()[:40])  # cut inside the header
    assert main(["inspect", str(peft)]) == 2
    assert f"{weights} is not a readable safetensors LoRA" in capsys.readouterr().err


def test_outputs_that_would_replace_an_input_or_cannot_be_written_are_refused_first(trained, tmp_path, capsys):
    high_base, _ = _models(trained)
    lora = trained / "output" / HIGH
    before = high_base.read_bytes()
    merge = ["merge", "--base", str(high_base), "--lora", str(lora), "--overwrite", "--out"]
    assert main(merge + [str(high_base)]) == 2
    assert "is the --base file itself" in capsys.readouterr().err and high_base.read_bytes() == before
    assert main(["export", str(lora), "--format", "comfy", "--overwrite", "--out", str(lora)]) == 2
    assert "is the LoRA itself" in capsys.readouterr().err
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["export", str(lora), "--format", "comfy", "--overwrite", "--out", str(folder)]) == 2
    assert f"{folder} is a folder, and this writes a single file" in capsys.readouterr().err
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    assert main(merge + [str(not_a_folder / "merged.safetensors")]) == 2
    assert f"{not_a_folder} is not a folder wanpair can write to" in capsys.readouterr().err
    assert not_a_folder.read_text() == "mine"


def test_a_base_model_given_as_a_lora_is_named_from_its_header_unread(trained, capsys, monkeypatch):
    import wanpair.export.formats as formats

    high_base, _ = _models(trained)
    monkeypatch.setattr(formats, "load_file", lambda *a, **k: pytest.fail("a base model's tensors were read"))
    assert main(["inspect", str(high_base)]) == 2
    assert f"{high_base} is a Wan diffusion transformer (DiT" in capsys.readouterr().err
    assert main(["sample", str(trained / "wanpair.toml"), "--lora-high", str(high_base), "--prompt", "x"]) == 2
    assert "not a LoRA: give a LoRA file here" in capsys.readouterr().err


def test_merge_with_base_and_lora_swapped_names_the_option(trained, tmp_path, capsys):
    high_base, _ = _models(trained)
    lora = trained / "output" / HIGH
    assert main(["merge", "--base", str(lora), "--lora", str(high_base), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"--base: {lora} is a LoRA file, but this slot needs a Wan diffusion transformer" in err
    assert "give the base model here" in err and "project file" not in err  # merge has no project


def test_inspect_and_export_cli(trained, tmp_path, capsys):
    assert main(["inspect", str(trained / "output" / LOW)]) == 0
    text = capsys.readouterr().out
    assert "expert:      low" in text and "timesteps:   0,875" in text and "rank:        16" in text
    assert "modules:     20 in 2 blocks" in text and "self_attn.q" in text and "ffn.2" in text
    missing = tmp_path / "nope.safetensors"  # the pair at once, and a bad path named after the good ones
    assert main(["inspect", str(trained / "output" / HIGH), str(missing), str(trained / "output" / LOW)]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("expert:") == 2 and captured.out.index("expert:      high") < captured.out.index(
        "expert:      low")
    assert f"LoRA file {missing} does not exist" in captured.err
    out = tmp_path / "x_diffusers.safetensors"
    assert main(["export", str(trained / "output" / LOW), "--format", "diffusers", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in f.keys()
        assert f.metadata()["wanpair.expert"] == "low"
    assert main(["export", str(trained / "output" / LOW), "--format", "diffusers", "--out", str(out)]) == 2
