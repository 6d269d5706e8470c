"""The built-in demo: a tiny dataset and tiny random models of the real architectures, in the real files.

Everything is generated deterministically (no downloads): 18 small images with captions (for the
image-to-video pair, `--model i2v-A14B`: 12 short clips of moving shapes, as folders of frames), a
Musubi `dataset.toml`, two 2-block Wan DiTs (high- and low-noise; one for Wan 2.1, `--model t2v-14B` or
`t2v-1.3B`) saved as original-layout single-file safetensors like the Comfy-Org files, a small Wan
2.1-layout VAE saved the same way, a small umT5 saved as a Wan-format `.pth`, and a word-level tokenizer
built from the captions. The demo then runs
the ordinary `train` path on a generated `wanpair.toml`, so it exercises the code a real run uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from .models.dit import to_original_name as dit_original_name
from .models.tasks import T2V, Task
from .setup.scaffold import dataset_toml
from .models.text_encoder import to_wan_name
from .models.vae import to_original_name as vae_original_name

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")

# Tiny but real architectures: 128-dim heads as in every Wan DiT; umT5 with per-layer position bias;
# the released VAE layout (4 stages, 2 residual blocks) at a small width.
TINY_TEXT_DIM = 32
TINY_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=256, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])


def make_dataset(root: Path, n: int = 18, size: int = 64) -> Path:
    """18 images of coloured shapes with matching captions, and a Musubi-style dataset.toml."""
    images = root / "dataset"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[i % len(SHAPES)]
        bg = list(BACKGROUNDS)[(i // len(SHAPES)) % len(BACKGROUNDS)]
        w, h = (size, size) if i % 3 else (size * 3 // 2, size)  # a third are landscape: two buckets
        im = Image.new("RGB", (w, h), BACKGROUNDS[bg])
        d = ImageDraw.Draw(im)
        cx, cy, r = w // 2 + int(rng.integers(-6, 7)), h // 2 + int(rng.integers(-6, 7)), size // 4
        _draw(d, shape, cx, cy, r, COLORS[color])
        stem = f"img_{i + 1:02d}"
        im.save(images / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"a {color} {shape} on a {bg} background, flat illustration\n")
    (images / "dataset.toml").write_text(dataset_toml("image", (size, size)))
    return images / "dataset.toml"


def make_clips(root: Path, n: int = 12, frames: int = 9, size: tuple[int, int] = (64, 48)) -> Path:
    """`n` clips of a coloured shape moving across a background (each a folder of PNG frames, a form of
    video the dataset reader takes) with captions, and a Musubi-style dataset.toml of `frames`-frame clips."""
    videos = root / "dataset"
    videos.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        bg = list(BACKGROUNDS)[(i // len(SHAPES)) % len(BACKGROUNDS)]
        direction = ("left", "right")[i % 2]
        stem = f"clip_{i + 1:02d}"
        (videos / stem).mkdir(exist_ok=True)
        r = h // 4
        for f in range(frames):
            x = r + (w - 2 * r) * f // (frames - 1)
            cx, cy = (x if direction == "right" else w - x), h // 2
            im = Image.new("RGB", (w, h), BACKGROUNDS[bg])
            _draw(ImageDraw.Draw(im), shape, cx, cy, r, COLORS[color])
            im.save(videos / stem / f"{f:03d}.png")
        (videos / f"{stem}.txt").write_text(f"a {color} {shape} moving {direction} on a {bg} background\n")
    (videos / "dataset.toml").write_text(dataset_toml("video", size, frames))
    return videos / "dataset.toml"


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_tokenizer(folder: Path, captions: list[str]) -> Path:
    """A word-level tokenizer over the captions with umT5's special-token ids (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in captions for w in c.replace(",", " , ").split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(folder))
    return folder


def make_models(folder: Path, vocab_size: int, dtype: torch.dtype = torch.float16, task: Task = T2V) -> dict[str, Path]:
    """Random tiny models of the real architectures, written in the real files' formats and key names."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, expert in enumerate(task.experts, start=1):
        torch.manual_seed(seed)
        dit = WanTransformer3DModel(**{**TINY_DIT, "in_channels": task.in_channels})
        sd = {dit_original_name(k): v.to(dtype).contiguous() for k, v in dit.state_dict().items()}
        paths[expert] = folder / task.dit_file(expert).replace(f"_{task.size_word}_", "_tiny_")
        save_file(sd, str(paths[expert]), metadata={"format": "pt"})
    torch.manual_seed(3)
    vae = AutoencoderKLWan(**TINY_VAE)
    paths["vae"] = folder / "wan_2.1_vae_tiny.safetensors"
    save_file({vae_original_name(k): v.contiguous() for k, v in vae.state_dict().items()}, str(paths["vae"]))
    torch.manual_seed(4)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False)
    te = UMT5EncoderModel(cfg)
    paths["t5"] = folder / "models_t5_umt5-tiny-enc-bf16.pth"
    sd = {to_wan_name(k): v.to(torch.bfloat16).clone() for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"}
    torch.save(sd, paths["t5"])
    return paths


def make_demo(root: Path, task: Task = T2V) -> Path:
    """Write the whole demo (dataset, models, tokenizer, project) under `root`; return the project file."""
    root = Path(root)
    dataset_toml = make_clips(root) if task.conditioned else make_dataset(root)
    captions = [p.read_text() for p in sorted(dataset_toml.parent.glob("*.txt"))]
    tokenizer = make_tokenizer(root / "models" / "umt5-tiny-tokenizer", captions)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    models = make_models(root / "models", vocab_size=vocab, task=task)
    project = root / "wanpair.toml"
    rel = {k: v.relative_to(root).as_posix() for k, v in models.items()}
    project.write_text(
        "# wanpair project for the built-in demo. Run: wanpair train wanpair.toml\n"
        f'name = "demo_{"moving_" if task.conditioned else ""}shapes_v1"\n'
        f'model = "{task.name}"\n'
        'author = "wanpair demo"\n'
        'output_dir = "output"\n\n'
        "[models]\n"
        + "".join(f'{task.dit_key(e)} = "{rel[e]}"\n' for e in task.experts) +
        f'vae = "{rel["vae"]}"\n'
        f't5 = "{rel["t5"]}"\n'
        f'tokenizer = "{tokenizer.relative_to(root).as_posix()}"\n\n'
        "[dataset]\n"
        'config = "dataset/dataset.toml"\n\n'
        "# The recipe's settings, except a higher learning rate and fewer epochs so the tiny models\n"
        "# visibly learn in a minute on a CPU.\n"
        "[train]\n"
        "learning_rate = 2e-3\n"
        "epochs = 8\n"
    )
    return project


# A tiny Qwen2.5-VL for the captioner's tests: the real classes at toy sizes (head dim 8: M-RoPE sections 1+1+2).
TINY_CAPTIONER = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
    vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                fullatt_block_indexes=[0]),
    max_pixels=112 * 112)  # at most 16 image tokens a picture
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen's ChatML as its model card describes it: a default system turn, then each turn between <|im_start|>ROLE and
# <|im_end|>, an image as <|vision_start|><|image_pad|><|vision_end|> where it stands in the user's turn.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_captioner(folder: Path, text: dict, vision: dict, max_pixels: int, vocab_size: int | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A random Qwen2.5-VL of the given sizes, saved as the hub's folder is (config, weights, tokenizer, image
    processor, chat template). The tokenizer is byte-level over printable ASCII and Qwen's special tokens, padded
    with tokens no text encodes to to `vocab_size` (the 7B's 152064, for a benchmark)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    chars = [c for b, c in bytes_to_unicode().items() if 32 <= b < 127 or b == 10]
    filler = max(0, (vocab_size or 0) - len(chars) - len(QWEN_SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*chars, *(f"<filler_{i}>" for i in range(filler))])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    config = Qwen2_5_VLConfig(
        text_config={**text, "vocab_size": vocab_size or len(tokenizer), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, torch_dtype=dtype)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    processor.save_pretrained(folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())  # named as in Qwen's own folder
    settings.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    return folder
