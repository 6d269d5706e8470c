"""The Wan models wanpair trains LoRAs for, and what differs between them.

- The Wan 2.2 A14B pairs: two 14B experts of one architecture that split the timesteps at a boundary,
  so one LoRA per expert, each on its side. The image-to-video pair's experts take 36 input channels
  instead of 16: the noisy latent (16), a 4-channel mask saying which latent frames are given, and the
  VAE latent of the given first frame followed by zeros (16) (`wanpair.models.i2v`).
- Wan 2.1's text-to-video models, 14B and 1.3B: one model for every timestep, so one LoRA over 0-1000.
  The 14B has the layers of a Wan 2.2 expert (only the file name tells them apart), the 1.3B its own.

Constants are the official ones: Wan2.2 `wan/configs/wan_{t2v,i2v}_A14B.py` and Wan2.1
`wan/configs/wan_t2v_{14B,1_3B}.py` (as Musubi-Tuner d0a1930 carries them: boundary, sample_shift,
sample_steps, sample_guide_scale as (low, high), dim / num_layers / ffn_dim).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import WanpairError

A14B_SIZE = (5120, 40, 13824)  # (width, blocks, FFN width) of a Wan 2.2 A14B expert and of Wan 2.1 T2V 14B
WAN21_1_3B_SIZE = (1536, 30, 8960)
PAIR = ("high", "low")
SINGLE = ("full",)  # the one LoRA of a single-model task, over all timesteps
EXPERT_NAMES = {"high": "high-noise", "low": "low-noise", "full": "full-range"}


def expert_name(expert: str) -> str:
    """"high-noise", "low-noise", or "full-range" (a single model's one LoRA): progress bars, plots, logs."""
    return EXPERT_NAMES[expert]


def expert_noun(expert: str) -> str:
    """What is being trained, in a sentence: "the high-noise expert", or "the model" (Wan 2.1)."""
    return "the model" if expert == "full" else f"the {expert_name(expert)} expert"


@dataclass(frozen=True)
class Task:
    name: str  # as `model = "..."` in wanpair.toml, and as the reference trainer's --task names it
    title: str
    in_channels: int
    boundary: int | None  # 0..1000: the high-noise expert runs at t >= boundary; None: one model for all t
    sample_shift: float
    guidance_high: float  # a single model's one guidance scale is guidance_high
    guidance_low: float
    sample_steps: int
    version: str  # "2.2" or "2.1"
    size: tuple[int, int, int] = A14B_SIZE
    size_word: str = "14B"  # in the file names: wan2.2_t2v_high_noise_14B_fp16, wan2.1_t2v_1.3B_fp16

    @property
    def conditioned(self) -> bool:
        """The experts see a given first frame beside the noisy latent."""
        return self.in_channels != 16

    @property
    def paired(self) -> bool:
        return self.boundary is not None

    @property
    def experts(self) -> tuple[str, ...]:
        return PAIR if self.paired else SINGLE

    @property
    def dit_keys(self) -> tuple[str, ...]:
        """The `[models]` keys of the DiT file(s)."""
        return ("high_noise", "low_noise") if self.paired else ("dit",)

    def dit_key(self, expert: str) -> str:
        return "dit" if expert == "full" else f"{expert}_noise"

    @property
    def kind_word(self) -> str:
        return "i2v" if self.conditioned else "t2v"

    def dit_file(self, expert: str, kind: str = "fp16") -> str:
        """The Comfy-Org repackaged file name, e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors."""
        middle = f"_{expert}_noise" if self.paired else ""
        return f"wan{self.version}_{self.kind_word}{middle}_{self.size_word}_{kind}.safetensors"

    def lora_file(self, expert: str, name: str) -> str:
        """The recipe's names, WAN2.2-HighNoise_<name> / WAN2.2-LowNoise_<name>; WAN2.1-14B_<name> for one model."""
        if not self.paired:
            return f"WAN{self.version}-{self.size_word}_{name}.safetensors"
        return f"WAN2.2-{'HighNoise' if expert == 'high' else 'LowNoise'}_{name}.safetensors"

    def window(self, expert: str) -> tuple[int, int]:
        if not self.paired:
            return 0, 1000
        return (self.boundary, 1000) if expert == "high" else (0, self.boundary)

    @property
    def architecture(self) -> str:
        return f"wan{self.version}-{self.name.lower()}"


T2V = Task("t2v-A14B", "Wan 2.2 T2V A14B (text to video)", 16, 875, 12.0, 4.0, 3.0, 40, "2.2")
I2V = Task("i2v-A14B", "Wan 2.2 I2V A14B (image to video)", 36, 900, 5.0, 3.5, 3.5, 40, "2.2")
T2V_14B = Task("t2v-14B", "Wan 2.1 T2V 14B (text to video, one model)", 16, None, 5.0, 5.0, 5.0, 50, "2.1")
T2V_1_3B = Task("t2v-1.3B", "Wan 2.1 T2V 1.3B (text to video, one model)", 16, None, 5.0, 5.0, 5.0, 50, "2.1",
                WAN21_1_3B_SIZE, "1.3B")
TASKS = {t.name: t for t in (T2V, I2V, T2V_14B, T2V_1_3B)}
SIZES = {A14B_SIZE: "14B", WAN21_1_3B_SIZE: "1.3B"}  # the full sizes; the tests' tiny models are neither


def by_name(name: str) -> Task | None:
    return next((t for t in TASKS.values() if t.name.lower() == str(name).lower()), None)


def by_architecture(architecture: str | None) -> Task | None:
    """The task a LoRA was trained on, from the `wanpair.architecture` it carries."""
    return next((t for t in TASKS.values() if t.architecture == architecture), None)


def _named_wan21(path: Path) -> bool:
    return re.search(r"wan[_\- ]?2[._]1", path.name.lower()) is not None


def _named_wan22(path: Path) -> bool:
    return re.search(r"wan[_\- ]?2[._]2|high[_\- ]?noise|low[_\- ]?noise", path.name.lower()) is not None


def _shapes(dit: Path) -> tuple[int, tuple[int, int, int]] | None:
    """(input channels, (width, blocks, FFN width)) from a safetensors header or config.json, no weights."""
    from .files import safetensors_header

    try:
        if dit.is_dir():
            c = json.loads((dit / "config.json").read_text())
            return c["in_channels"], (c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["ffn_dim"])
        header = safetensors_header(dit)
        patch = next(v["shape"] for k, v in header.items() if k.endswith("patch_embedding.weight"))
        blocks = {int(m.group(1)) for k in header if (m := re.search(r"blocks\.(\d+)\.", k))}
        ffn = next(v["shape"][0] for k, v in header.items() if re.search(r"blocks\.0\.ffn\.(0|net\.0\.proj)\.weight$", k))
        return patch[1], (patch[0], len(blocks), ffn)
    except (OSError, ValueError, KeyError, StopIteration, IndexError, TypeError, WanpairError):
        return None


def identify_task(in_channels: int, size: tuple[int, int, int], path: Path, single: bool = False) -> Task:
    """What a DiT file most likely is, from its input channels, its size and its name: the 1.3B's shapes
    Wan 2.1 1.3B; the one file of a project (`single`) or a `wan2.1` name Wan 2.1 14B; 36 channels an I2V
    expert; else a T2V A14B expert. `check_task` then says what does not fit."""
    if size == WAN21_1_3B_SIZE:
        return T2V_1_3B
    if single or _named_wan21(path):
        return T2V_14B
    return I2V if in_channels == I2V.in_channels else T2V


def detect_task(models: dict, resolve) -> Task | None:
    """The task of the `[models]` files, when the project has no `model = ...` line: a `dit` alone is Wan
    2.1, `high_noise` a pair (read from the files' headers). None when that cannot be read here (the
    preflight reports the file's problem)."""
    single = isinstance(models.get("dit"), str) and "high_noise" not in models
    key = "dit" if single else "high_noise"
    if not isinstance(models.get(key), str):
        return None
    path = resolve(models[key])
    found = _shapes(path)
    if found is None:
        return T2V_14B if single else None
    return identify_task(*found, path, single)


def _files(task: Task) -> str:
    """The task's files, as a user looks for them: "the wan2.2_t2v_{high,low}_noise_14B_* experts"."""
    if task.paired:
        return f"the {task.dit_file('{high,low}', '*')} experts"
    return f"{task.dit_file('full', '*')} (Comfy-Org repackaged)"


def check_task(config: dict, path: Path, task: Task, key: str) -> None:
    """Refuse a DiT of another model or size before any training starts, naming what it is and what to do.
    `key` is the `[models]` key that names it (a pair's expert slot, or `dit`)."""
    c = config
    size = (c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["ffn_dim"])
    pairs = "Set model = \"t2v-A14B\" (or \"i2v-A14B\") with [models] high_noise and low_noise for a Wan 2.2 pair"
    if c.get("image_dim") or c.get("added_kv_proj_dim"):
        raise WanpairError(
            f"{path} is a Wan 2.1 image-to-video model (it has CLIP image layers), which wanpair does not train. "
            "Use a Wan 2.2 pair (wan2.2_t2v_* or wan2.2_i2v_* experts) or a Wan 2.1 text-to-video model.")
    if c["in_channels"] not in (16, 36):
        raise WanpairError(
            f"{path} takes {c['in_channels']} latent channels: it is the Wan 2.2 TI2V-5B model, which pairs with "
            "the 48-channel Wan 2.2 VAE and which wanpair does not train. The A14B experts and Wan 2.1 take 16 "
            "(text to video) or 36 (image to video).")
    if c["in_channels"] != task.in_channels:
        found = f"a {I2V.title} expert" if c["in_channels"] == I2V.in_channels else "a text-to-video model"
        fix = I2V.name if c["in_channels"] == I2V.in_channels else T2V.name
        raise WanpairError(
            f"{path} is {found} ({c['in_channels']} input channels) but the project trains {task.title}. Set "
            f"model = \"{fix}\" in the project file (or remove the model line: it follows from the files), or point "
            f"[models] {key} at {_files(task)}.")
    if size in SIZES and size != task.size:
        found = T2V_1_3B if size == WAN21_1_3B_SIZE else T2V_14B
        what = "Wan 2.1 T2V 1.3B" if found is T2V_1_3B else "Wan 2.1 T2V 14B or a Wan 2.2 expert"
        raise WanpairError(
            f"{path} has the shapes of a {SIZES[size]} model ({what}) but the project trains {task.title}. " + (
                f"Set model = \"{found.name}\" with [models] dit = this file." if found is T2V_1_3B else
                f"Point [models] {key} at {_files(task)}, or set model = \"t2v-14B\" for the 14B model."))
    if task.paired and _named_wan21(path):
        raise WanpairError(
            f"{path} is named as a Wan 2.1 model: one model for all timesteps, not an expert of a pair. Train it with "
            f"model = \"t2v-14B\" and [models] dit = this file (one LoRA over 0-1000), or point [models] {key} at "
            f"{_files(task)}.")
    if not task.paired and _named_wan22(path) and not _named_wan21(path):
        raise WanpairError(
            f"{path} is named as a Wan 2.2 expert, which runs on one side of its pair's boundary only; a LoRA over "
            f"0-1000 on it would be trained where the expert never runs. {pairs}, or point [models] dit at "
            f"{_files(task)}.")
