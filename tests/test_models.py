"""Loading the weight formats users have: exact conversions and clear errors for every mix-up."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import UMT5Config, UMT5EncoderModel

from wanpair.demo import TINY_DIT, TINY_VAE
from wanpair.errors import WanpairError
from wanpair.models import inspect_dit, load_dit, load_text_encoder, load_vae
from wanpair.models.dit import to_original_name as dit_original
from wanpair.models.text_encoder import encode_text, to_wan_name
from wanpair.models.vae import to_original_name as vae_original


def _dit(seed=0, **overrides):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_DIT, **overrides}).eval()


def _save_original_dit(model, path, prefix=""):
    save_file({prefix + dit_original(k): v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _dit_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([900.0]),
                encoder_hidden_states=torch.randn(1, 512, TINY_DIT["text_dim"], generator=g), return_dict=False)


def test_our_inverse_names_are_what_diffusers_converter_undoes():
    keys = list(_dit().state_dict())
    assert convert_wan_transformer_to_diffusers({dit_original(k): k for k in keys}) == {k: k for k in keys}
    vae_keys = list(AutoencoderKLWan(**TINY_VAE).state_dict())
    assert convert_wan_vae_to_diffusers({vae_original(k): k for k in vae_keys}) == {k: k for k in vae_keys}
    assert dit_original("blocks.3.attn1.to_out.0") == "blocks.3.self_attn.o"
    assert dit_original("blocks.3.ffn.net.0.proj.weight") == "blocks.3.ffn.0.weight"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_single_file_dit_loads_to_the_same_model(tmp_path, prefix):
    src = _dit()
    path = _save_original_dit(src, tmp_path / "wan2.2_t2v_high_noise_tiny.safetensors", prefix)
    info = inspect_dit(path)
    assert info.expert == "high" and info.config["num_layers"] == 2 and info.config["ffn_dim"] == 256
    loaded = load_dit(path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(src(**_dit_inputs())[0], loaded(**_dit_inputs())[0])


def test_dit_loads_in_bf16_keeping_diffusers_fp32_modules(tmp_path):
    path = _save_original_dit(_dit(), tmp_path / "dit.safetensors")
    model = load_dit(path, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # diffusers keeps modulation tables in fp32


def test_diffusers_folder_dit_loads(tmp_path):
    src = _dit()
    src.save_pretrained(tmp_path / "transformer_2")
    info = inspect_dit(tmp_path / "transformer_2")
    assert info.expert == "low" and info.layout == "diffusers"
    loaded = load_dit(tmp_path / "transformer_2", dtype=torch.float32)
    expected = src.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())  # loading copies every weight exactly
    with torch.no_grad():
        a, b = src(**_dit_inputs())[0], loaded(**_dit_inputs())[0]
    # the same fp32 function on the same weights: only float32 rounding may differ (seen: 4.8e-7 on outputs ~1)
    assert ((a - b).norm() / a.norm()).item() < 1e-5


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_vae_loads_and_encodes_identically(tmp_path, suffix):
    torch.manual_seed(0)
    src = AutoencoderKLWan(**TINY_VAE).eval()
    sd = {vae_original(k): v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"wan_2.1_vae{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    vae = load_vae(path)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(src.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    assert list(vae.config.latents_mean)[:2] == [-0.7571, -0.7089]  # Wan 2.1's published channel means


def test_wan_t5_pth_loads_as_umt5_with_identical_outputs(demo_root):
    tok_dir = demo_root / "models" / "umt5-tiny-tokenizer"
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    src = UMT5EncoderModel(cfg).eval()
    path = demo_root.parent / "t5_roundtrip.pth"
    torch.save({to_wan_name(k): v for k, v in src.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    model, tok = load_text_encoder(path, tok_dir, dtype=torch.float32)
    assert model.config.num_heads == 4 and model.config.num_layers == 3 and model.config.d_kv == 8
    ids = torch.tensor([[5, 9, 3, 1, 0, 0]])
    mask = (ids > 0) | (torch.arange(6) < 4)
    with torch.no_grad():
        a = src(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(a, b)
    (emb,) = encode_text(model, tok, ["a red   circle on a white background"])
    assert emb.shape == (8, 32)  # 7 words + EOS: true length, no padding


def test_demo_files_are_in_the_real_formats(demo_root):
    models = demo_root / "models"
    from safetensors import safe_open

    with safe_open(str(models / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"), "pt") as f:
        assert "blocks.0.self_attn.q.weight" in f.keys() and "head.head.weight" in f.keys()
    with safe_open(str(models / "wan_2.1_vae_tiny.safetensors"), "pt") as f:
        assert "encoder.conv1.weight" in f.keys() and "decoder.upsamples.3.resample.1.weight" in f.keys()
    sd = torch.load(models / "models_t5_umt5-tiny-enc-bf16.pth", weights_only=True)
    assert "blocks.0.pos_embedding.embedding.weight" in sd and "token_embedding.weight" in sd


# ------------------------------------------------------------------ mix-ups and broken files

def test_vae_given_as_dit_is_named(demo_root):
    with pytest.raises(WanpairError, match="is the Wan VAE .*, but this slot needs a Wan diffusion transformer"):
        inspect_dit(demo_root / "models" / "wan_2.1_vae_tiny.safetensors")


def test_t5_given_as_vae_is_named(demo_root):
    with pytest.raises(WanpairError, match="umT5 text encoder .*, but this slot needs the Wan VAE"):
        load_vae(demo_root / "models" / "models_t5_umt5-tiny-enc-bf16.pth")


def test_lora_given_as_base_is_named(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(WanpairError, match="a LoRA file.*give the base model"):
        inspect_dit(path)


def test_wan22_5b_vae_is_refused_with_the_right_file_named(tmp_path):
    path = tmp_path / "Wan2.2_VAE.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(160, 12, 3, 3, 3), "decoder.conv1.weight": torch.zeros(1),
               "conv1.weight": torch.zeros(96, 96, 1, 1, 1)}, str(path))
    with pytest.raises(WanpairError, match="Wan 2.2 VAE \\(48 latent channels\\).*wan_2.1_vae"):
        load_vae(path)


def test_truncated_and_missing_files_are_reported(tmp_path):
    path = _save_original_dit(_dit(), tmp_path / "dit.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WanpairError, match="truncated"):
        inspect_dit(path)
    with pytest.raises(WanpairError, match="does not exist"):
        inspect_dit(tmp_path / "nope.safetensors")


class Fp8LikeCuda(TorchDispatchMode):
    """On the CPU, refuse every op on an fp8 tensor that CUDA does not implement for fp8 (CUDA has
    conversions, copies, views and `_scaled_mm`; no `abs`, `amax`, `mul`, ...). The CPU implements
    them all, which is how a plain-fp8 loading bug once passed every CPU test and crashed on the GPU."""

    ALLOWED = {"_to_copy", "copy_", "view", "_unsafe_view", "t", "transpose", "clone", "detach", "alias", "empty_like",
               "slice", "select", "as_strided", "expand", "reshape", "unsqueeze", "lift_fresh", "_scaled_mm",
               "empty", "empty_strided", "set_", "permute", "contiguous", "split", "squeeze", "_has_compatible_shallow_copy_type"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        name = func.__name__.split(".")[0]
        if any(t.dtype in fp8 for t in tensors) and name not in self.ALLOWED:
            raise NotImplementedError(f"{func} is not implemented for fp8 tensors on CUDA")
        return func(*args, **(kwargs or {}))


def _fp8_files(src, folder):
    """The same tiny expert as the fp8 files in circulation: plain e4m3fn and e5m2 (block matrices cast,
    no scales), and ComfyUI's fp8_e4m3fn_scaled (weight = fp8 * scale_weight, plus a `scaled_fp8` marker)."""
    sd = {dit_original(k): v for k, v in src.state_dict().items()}
    files = {"e4m3fn": {}, "e5m2": {}, "scaled": {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}}
    for k, v in sd.items():
        if v.dim() == 2 and k.startswith("blocks."):
            scale = v.abs().max() / 448
            files["e4m3fn"][k] = v.to(torch.float8_e4m3fn)
            files["e5m2"][k] = v.to(torch.float8_e5m2)
            files["scaled"][k] = (v / scale).to(torch.float8_e4m3fn)
            files["scaled"][k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            for f in files.values():
                f[k] = v
    paths = {}
    for name, tensors in files.items():
        paths[name] = folder / f"wan2.2_t2v_high_noise_fp8_{name}.safetensors"
        save_file(tensors, str(paths[name]))
    return paths, files


def _real_weight(tensors, key):
    w = tensors[key].float()
    scale = tensors.get(key.removesuffix(".weight") + ".scale_weight")
    return w * scale.float() if scale is not None else w


@pytest.mark.parametrize("layout", ["e4m3fn", "e5m2", "scaled"])
def test_fp8_dit_files_load_exactly_with_and_without_fp8_storage(tmp_path, layout):
    """Every fp8 layout loads as the file's own weights: stored as fp8 for training (`fp8_base = true`,
    re-quantised losslessly with power-of-two row scales) or widened (`fp8_base = false`), using only the
    fp8 operations CUDA has."""
    from wanpair.models.fp8 import Fp8Linear

    src = _dit()
    paths, files = _fp8_files(src, tmp_path)
    key = "blocks.0.self_attn.q.weight"
    real = _real_weight(files[layout], key)
    with Fp8LikeCuda():
        stored = load_dit(paths[layout], dtype=torch.bfloat16, fp8=True)
        widened = load_dit(paths[layout], dtype=torch.float32)
    layer = stored.blocks[0].attn1.to_q
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.float() * layer.weight_scale, real)  # nothing lost in re-quantising
    assert torch.equal(widened.blocks[0].attn1.to_q.weight, real)
    w = src.blocks[0].attn1.to_q.weight
    if layout == "scaled":  # the scale keeps small weights out of fp8's subnormals: closer than a plain cast
        plain = files["e4m3fn"][key].float()
        assert (real - w).abs().max() <= (w.abs().max() / 448) * 32  # one fp8 step at the top of the range
        assert (real - w).abs().mean() < (plain - w).abs().mean()


def test_high_precision_weights_may_not_use_fp8_ops_either(tmp_path):
    """The fp16/bf16 files of the recipe go through the same quantisation under CUDA's fp8 rules."""
    path = _save_original_dit(_dit(), tmp_path / "dit.safetensors")
    with Fp8LikeCuda():
        model = load_dit(path, dtype=torch.bfloat16, fp8=True)
    assert model.blocks[1].ffn.net[2].weight.dtype == torch.float8_e4m3fn


def test_the_cuda_rules_stand_in_catches_fp8_arithmetic():
    """The stand-in itself: it refuses what CUDA refuses (this is the op that crashed on the GPU)."""
    with Fp8LikeCuda(), pytest.raises(NotImplementedError, match="abs"):
        torch.ones(4, dtype=torch.float8_e4m3fn).abs()


def test_a_tokenizer_folder_with_only_spiece_model_loads(tmp_path):
    """Some umT5 tokenizer downloads are the bare SentencePiece model; it loads as umT5's T5Tokenizer and
    encodes a prompt to the model's pieces plus EOS (id 1), as Wan tokenizes."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle on a white background", "a blue square, flat illustration"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=30, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = tmp_path / "umt5-tokenizer"
    folder.mkdir()
    (tmp_path / "spiece.model").rename(folder / "spiece.model")
    from wanpair.models.text_encoder import load_tokenizer

    tok = load_tokenizer(folder)
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).encode("a red circle")
    assert tok("a red circle").input_ids == pieces + [1] and tok.pad_token_id == 0
