"""The Wan 2.2 A14B pairs wanpair trains, and what differs between them.

Both are two 14B experts of the same architecture that split the timesteps at a boundary. The image-to-
video pair's experts take 36 input channels instead of 16: the noisy latent (16), then a 4-channel mask
saying which latent frames are given, then the VAE latent of the given first frame followed by zeros (16)
(`wanpair.models.i2v`). The constants are the official ones (Wan2.2 `wan/configs/wan_t2v_A14B.py` and
`wan/configs/wan_i2v_A14B.py`: boundary, sample_shift, sample_steps, sample_guide_scale as (low, high)).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import WanpairError


@dataclass(frozen=True)
class Task:
    name: str  # as `model = "..."` in wanpair.toml, and as the reference trainer's --task names it
    title: str
    in_channels: int
    boundary: int  # on the 0..1000 timestep scale: the high-noise expert runs at t >= boundary
    sample_shift: float
    guidance_high: float
    guidance_low: float
    file_word: str  # in the Comfy-Org file names: wan2.2_<file_word>_high_noise_14B_fp16.safetensors

    @property
    def conditioned(self) -> bool:
        """The experts see a given first frame beside the noisy latent."""
        return self.in_channels != 16

    @property
    def architecture(self) -> str:
        return f"wan2.2-{self.file_word}-a14b"


# Wan 2.1 T2V 1.3B (Wan2.1 `wan/configs/wan_t2v_1_3B.py`): width 1536, 30 blocks, FFN 8960 -- refused by its shapes
WAN21_1_3B = (1536, 30, 8960)
T2V = Task("t2v-A14B", "Wan 2.2 T2V A14B (text to video)", 16, 875, 12.0, 4.0, 3.0, "t2v")
I2V = Task("i2v-A14B", "Wan 2.2 I2V A14B (image to video)", 36, 900, 5.0, 3.5, 3.5, "i2v")
TASKS = {t.name: t for t in (T2V, I2V)}


def task_of_channels(in_channels: int) -> Task | None:
    return next((t for t in TASKS.values() if t.in_channels == in_channels), None)


def detect_task(dit: Path) -> Task | None:
    """The pair a DiT file or diffusers folder belongs to, from its patch embedding's input channels, read
    from the safetensors header or config.json alone (no weights); None when that cannot be read here (the
    preflight reports the file's problem)."""
    from .files import safetensors_header

    try:
        if dit.is_dir():
            return task_of_channels(json.loads((dit / "config.json").read_text())["in_channels"])
        header = safetensors_header(dit)
    except (OSError, ValueError, KeyError, WanpairError):
        return None
    shape = next((v.get("shape") for k, v in header.items() if k.endswith("patch_embedding.weight")), None)
    return task_of_channels(shape[1]) if shape and len(shape) > 1 else None


def check_task(config: dict, path: Path, task: Task) -> None:
    """Refuse a DiT of another task or size before any training starts, naming what it is and what to do."""
    c = config
    wan21 = "Wan 2.1's single text-to-video model (one model for all timesteps, not an expert of a pair)"
    if (c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["ffn_dim"]) == WAN21_1_3B:
        raise WanpairError(f"{path} has the shapes of the Wan 2.1 T2V 1.3B model: {wan21}. wanpair trains the "
                           "Wan 2.2 A14B pairs; point [models] at wan2.2_t2v_* (or wan2.2_i2v_*) experts.")
    if c.get("image_dim") or c.get("added_kv_proj_dim"):
        raise WanpairError(
            f"{path} is a Wan 2.1 image-to-video model (it has CLIP image layers); wanpair trains the Wan 2.2 "
            "A14B pairs. Use the wan2.2_t2v_* or wan2.2_i2v_* experts.")
    if re.search(r"wan[_\- ]?2[._]1", path.name.lower()):
        raise WanpairError(f"{path} is named as a Wan 2.1 model: {wan21}. "
                           "wanpair trains the Wan 2.2 A14B pairs; point [models] at wan2.2_t2v_* (or wan2.2_i2v_*) "
                           "experts.")
    found = task_of_channels(c["in_channels"])
    if found is None:
        raise WanpairError(
            f"{path} takes {c['in_channels']} latent channels: it is the Wan 2.2 TI2V-5B model, which pairs with "
            "the 48-channel Wan 2.2 VAE. The A14B experts take 16 (text to video) or 36 (image to video).")
    if found is not task:
        raise WanpairError(
            f"{path} is a {found.title} expert ({c['in_channels']} input channels) but the project trains "
            f"{task.title}. Set model = \"{found.name}\" in the project file (or remove the model line: it "
            f"follows from the high-noise file), or point [models] at wan2.2_{task.file_word}_* files.")
