"""Wan's umT5-XXL text encoder as transformers' `UMT5EncoderModel`, plus its tokenizer.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` in its own key layout. umT5 (per-layer
relative position bias, gated-GELU feed-forward, eps 1e-6) is exactly transformers' UMT5, so the
file loads by renaming keys; the head count is read from the position-bias table's shape.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer, UMT5Config, UMT5EncoderModel

from ..errors import WanpairError
from .files import inspect_weight_file, iter_tensors
from .kinds import identify

log = logging.getLogger(__name__)

# Wan's text length: prompts are tokenized to at most 512 tokens, EOS included, and the DiT
# cross-attends over a 512-token context zero-padded past the prompt (Wan2.2 `wan/configs`: text_len=512).
TEXT_LEN = 512
# Wan's T5 uses relative-position buckets with max distance 128 (Wan2.2 `wan/modules/t5.py`).
_MAX_DISTANCE = 128

# (Wan T5 key prefix, transformers UMT5 key prefix); {i} = layer index, {p} = projection q/k/v/o.
_KEY_PAIRS = [
    ("token_embedding.", "shared."),
    ("norm.", "encoder.final_layer_norm."),
    ("blocks.{i}.norm1.", "encoder.block.{i}.layer.0.layer_norm."),
    ("blocks.{i}.attn.{p}.", "encoder.block.{i}.layer.0.SelfAttention.{p}."),
    ("blocks.{i}.pos_embedding.embedding.", "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{i}.norm2.", "encoder.block.{i}.layer.1.layer_norm."),
    ("blocks.{i}.ffn.gate.0.", "encoder.block.{i}.layer.1.DenseReluDense.wi_0."),
    ("blocks.{i}.ffn.fc1.", "encoder.block.{i}.layer.1.DenseReluDense.wi_1."),
    ("blocks.{i}.ffn.fc2.", "encoder.block.{i}.layer.1.DenseReluDense.wo."),
]


def _rename(key: str, forward: bool) -> str:
    for wan, hf in _KEY_PAIRS:
        src, dst = (wan, hf) if forward else (hf, wan)
        regex = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkvo])")
        m = re.match(regex, key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end():]
    raise KeyError(key)


def to_transformers_name(key: str) -> str:
    """Wan T5 key -> transformers UMT5 key."""
    return _rename(key, forward=True)


def to_wan_name(key: str) -> str:
    """transformers UMT5 key -> Wan T5 key (used to write Wan-format files)."""
    return _rename(key, forward=False)


def config_from_wan_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> UMT5Config:
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_attn = shapes["blocks.0.attn.q.weight"][0]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
        num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    except KeyError as e:
        raise WanpairError(
            f"{path} lacks {e}: it is not Wan's T5 encoder with per-layer position bias (umT5)."
        ) from None
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=d_attn // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=_MAX_DISTANCE, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WanpairError(
            f"tokenizer {path} is not a folder. Give the umT5 tokenizer folder (with tokenizer.json "
            "and/or spiece.model), e.g. the `tokenizer/` folder of Wan2.2-T2V-A14B-Diffusers or google/umt5-xxl."
        )
    configured = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    try:
        if not configured and (path / "spiece.model").is_file():
            # A bare SentencePiece model (some downloads carry only that): umT5's tokenizer is a T5Tokenizer
            # (google/umt5-xxl's tokenizer_config.json, which Wan loads); without a config AutoTokenizer
            # cannot tell which class to build.
            return T5Tokenizer.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable folders
        raise WanpairError(f"could not load a tokenizer from {path}: {e}") from None


def load_text_encoder(
    path: str | Path, tokenizer_path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerBase]:
    """Load umT5 from Wan's `.pth` (or a transformers `text_encoder/` folder) and its tokenizer."""
    path = Path(path).expanduser()
    tokenizer = load_tokenizer(tokenizer_path)
    if path.is_dir():
        log.info("loading text encoder (transformers folder) from %s", path)
        model = UMT5EncoderModel.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    else:
        wf = inspect_weight_file(path)
        identify(wf, expected="t5")
        log.info("loading text encoder from %s", wf.describe())
        sd = dict(iter_tensors(path))
        if "shared.weight" in sd:
            raise WanpairError(f"{path} uses transformers key names; point at its `text_encoder/` folder instead.")
        config = config_from_wan_shapes({k: tuple(v.shape) for k, v in sd.items()}, path)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        converted = {to_transformers_name(k): v.to(dtype) for k, v in sd.items()}
        converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
        model.load_state_dict(converted, strict=True, assign=True)
        model.tie_weights()
    if len(tokenizer) > model.config.vocab_size:
        raise WanpairError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the text encoder {path} only "
            f"{model.config.vocab_size}: they do not belong together (umT5-XXL needs the umT5 tokenizer)."
        )
    return model.to(device).eval().requires_grad_(False), tokenizer


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: HTML entities unescaped, runs of white space collapsed.

    (Wan2.2 `wan/modules/tokenizers.py`, clean='whitespace'; its optional ftfy mojibake repair is skipped.)
    """
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_text(
    model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> list[torch.Tensor]:
    """Encode prompts to umT5 hidden states, each cut to its true length (EOS included)."""
    batch = tokenizer(
        [clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=TEXT_LEN,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    device = next(model.parameters()).device
    mask = batch.attention_mask.to(device)
    hidden = model(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state
    return [h[: int(n)].cpu() for h, n in zip(hidden, mask.sum(1))]


def token_count(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """How many tokens a prompt takes, EOS included, before truncation to TEXT_LEN."""
    return len(tokenizer(clean_prompt(prompt), add_special_tokens=True).input_ids)
