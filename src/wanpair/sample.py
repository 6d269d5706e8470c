"""Two-expert sampling with the LoRA pair, the way Wan 2.2 T2V runs.

The high-noise expert (with the HighNoise LoRA) denoises while t >= 0.875 * 1000, the low-noise
expert (with the LowNoise LoRA) below; diffusers' `WanPipeline` does the switching (its
`boundary_ratio`), with Wan's UniPC flow solver. Prompts are encoded first and the text encoder is
freed before the experts run. LoRAs are applied by adding their weight update to the expert
(the same result as diffusers' own LoRA loading; see tests/test_export.py).
"""

from __future__ import annotations

import gc
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_path, write_text_atomic
from .errors import WanpairError
from .project import BOUNDARY, Project

log = logging.getLogger(__name__)

# Wan 2.2 T2V A14B sampling defaults (Wan2.2 `wan/configs/wan_t2v_A14B.py`: sample_shift 12.0,
# sample_steps 40, sample_guide_scale (3.0 low, 4.0 high), and the shared sample_neg_prompt).
DEFAULT_SHIFT = 12.0
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE_HIGH = 4.0
DEFAULT_GUIDANCE_LOW = 3.0
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class SampleSettings:
    width: int = 832
    height: int = 480
    frames: int = 1
    fps: int = 16
    steps: int = DEFAULT_STEPS
    shift: float = DEFAULT_SHIFT
    guidance_high: float = DEFAULT_GUIDANCE_HIGH
    guidance_low: float = DEFAULT_GUIDANCE_LOW
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    seed: int = 42
    strength_high: float = 1.0
    strength_low: float = 1.0

    def check(self) -> None:
        problems = []
        if self.width % 16 or self.height % 16 or self.width < 16 or self.height < 16:
            problems.append(f"width/height {self.width}x{self.height} must be multiples of 16.")
        if self.frames < 1 or (self.frames - 1) % 4:
            problems.append(f"frames = {self.frames} must be 4k+1 (1, 5, ... 81): the Wan VAE packs 4 frames per latent.")
        if self.steps < 1:
            problems.append("steps must be at least 1.")
        if problems:
            raise WanpairError("\n".join(problems))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:48] or "prompt"


def _lora_note(loras: dict[str, Path | None]) -> str:
    return "+".join(f"{e}{'Lora' if loras.get(e) else 'Base'}" for e in ("high", "low"))


def load_expert(project: Project, expert: str, lora_path: Path | None, strength: float, dtype: torch.dtype,
                allow_mismatch: bool = False):
    """One expert from its file, with its LoRA applied at `strength` (refused if made for the other expert)."""
    from .export.formats import read_lora
    from .export.merge import apply_lora, check_expert
    from .models import load_dit

    path = project.dit_path(expert)
    model = load_dit(path, dtype=dtype, device="cpu")
    if lora_path:
        lora = read_lora(lora_path)
        check_expert(lora, expert, f"the {expert}-noise slot ({path.name})", allow_mismatch)
        apply_lora(model, lora, strength)
        log.info("applied %s to the %s-noise expert at strength %s", lora_path, expert, strength)
    return model


def make_pipeline(project: Project, high, low, shift: float):
    """diffusers' WanPipeline over two experts, switching at the T2V boundary; prompts come as embeddings."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from .models import load_vae

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=load_vae(project.models.vae, dtype=torch.float32),
                       scheduler=scheduler, transformer=high, transformer_2=low, boundary_ratio=BOUNDARY / 1000)


def build_pipeline(project: Project, loras: dict[str, Path | None], settings: SampleSettings, device: torch.device,
                   dtype: torch.dtype, allow_mismatch: bool = False):
    """A diffusers WanPipeline over both experts with their LoRAs applied (no text encoder)."""
    experts = {e: load_expert(project, e, loras.get(e), getattr(settings, f"strength_{e}"), dtype, allow_mismatch)
               for e in ("high", "low")}
    pipe = make_pipeline(project, experts["high"], experts["low"], settings.shift)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = sum(p.numel() * p.element_size() for m in experts.values() for p in m.parameters())
        if need > 0.8 * free:  # both experts don't fit: keep only the active one on the GPU
            pipe.enable_model_cpu_offload(device=device)
            return pipe
    return pipe.to(device)


def encode_prompts(project: Project, prompts: list[str], negative: str, device: torch.device, dtype: torch.dtype):
    from .models import load_text_encoder
    from .models.text_encoder import encode_text
    from .train.flow_matching import pad_text

    te, tok = load_text_encoder(project.models.t5, project.models.tokenizer, dtype=dtype, device=device)
    embeds = [pad_text([e]) for e in encode_text(te, tok, prompts)]
    negative_embeds = pad_text(encode_text(te, tok, [negative]))
    del te, tok
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds, negative_embeds


def save_output(frames: np.ndarray, path: Path, info: dict, fps: int) -> Path:
    """PNG for one frame (settings in its text chunks), MP4 for video; a .json beside either."""
    frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if len(frames) == 1:
        path = path.with_suffix(".png")
        png = PngInfo()
        for k, v in info.items():
            png.add_text(f"wanpair.{k}", json.dumps(v) if not isinstance(v, str) else v)
        with atomic_path(path) as tmp:
            Image.fromarray(frames[0]).save(tmp, format="PNG", pnginfo=png)
    else:
        path = path.with_suffix(".mp4")
        try:
            import av
        except ImportError:
            raise WanpairError("writing MP4 video needs PyAV: pip install av") from None
        with atomic_path(path) as tmp:
            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frames.shape[1], frames.shape[2]
                stream.pix_fmt = "yuv420p"
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
    write_text_atomic(path.with_suffix(".json"), json.dumps(info, indent=2, ensure_ascii=False))
    return path


def sample(project: Project, prompts: list[str], settings: SampleSettings, loras: dict[str, Path | None],
           out_dir: Path, device: torch.device | None = None, allow_mismatch: bool = False,
           name_prefix: str = "") -> list[Path]:
    """Generate one image or clip per prompt with both experts; returns the files written."""
    settings.check()
    if not prompts:
        raise WanpairError("no prompt given: use --prompt \"...\" or --prompts FILE (one prompt per line).")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embeds, negative = encode_prompts(project, prompts, settings.negative_prompt, device, dtype)
    pipe = build_pipeline(project, loras, settings, device, dtype, allow_mismatch)
    return run_prompts(pipe, prompts, embeds, negative, settings, loras, out_dir, project, device, dtype, name_prefix)


def run_prompts(pipe, prompts, embeds, negative, settings: SampleSettings, loras: dict, out_dir: Path, project: Project,
                device: torch.device, dtype: torch.dtype, name_prefix: str = "") -> list[Path]:
    written = []
    for i, (prompt, emb) in enumerate(zip(prompts, embeds)):
        generator = torch.Generator().manual_seed(settings.seed + i)
        frames = pipe(prompt_embeds=emb.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                      height=settings.height, width=settings.width, num_frames=settings.frames,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance_high,
                      guidance_scale_2=settings.guidance_low, generator=generator, output_type="np").frames[0]
        info = {"prompt": prompt, "seed": settings.seed + i, "settings": asdict(settings),
                "loras": {k: str(v) if v else None for k, v in loras.items()}, "project": str(project.path)}
        stem = f"{name_prefix}{i:02d}_{_slug(prompt)}_{_lora_note(loras)}"
        written.append(save_output(frames, out_dir / stem, info, settings.fps))
        print(f"wrote {written[-1]}")
    return written


class TrainingSampler:
    """Samples during training: the expert being trained (LoRA as it is now) with the other expert as it is,
    or with its LoRA when this run already trained it. File names say which (e.g. `highLora+lowBase`)."""

    def __init__(self, project: Project, prompts: list[str], embeds: list[torch.Tensor], negative: torch.Tensor,
                 settings: SampleSettings, device: torch.device, dtype: torch.dtype):
        from .train.flow_matching import pad_text

        self.project, self.prompts, self.settings, self.device, self.dtype = project, prompts, settings, device, dtype
        self.embeds, self.negative = [pad_text([e]) for e in embeds], pad_text([negative])
        self.others: dict[str, object] = {}

    def __call__(self, model, expert: str, step: int, autocast, writer=None) -> list[Path]:
        other = "low" if expert == "high" else "high"
        other_lora = self.project.lora_path(other) if self.project.lora_path(other).exists() else None
        key = f"{other}:{other_lora}"
        if key not in self.others:
            self.others = {key: load_expert(self.project, other, other_lora, 1.0, self.dtype)}
        other_model = self.others[key].to(self.device)
        pipe = make_pipeline(self.project, *((model, other_model) if expert == "high" else (other_model, model)),
                             self.settings.shift).to(self.device)
        loras = {expert: "training", other: other_lora}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast():
                written = run_prompts(pipe, self.prompts, self.embeds, self.negative, self.settings, loras,
                                      self.project.run_dir / "samples", self.project, self.device, self.dtype,
                                      name_prefix=f"{expert}-step{step:06d}_")
        finally:
            model.train(was_training)
            self.others[key] = other_model.to("cpu")
        if writer is not None:
            for i, path in enumerate(written):
                if path.suffix == ".png":
                    writer.add_image(f"samples/{expert}/{i:02d}", np.asarray(Image.open(path)), step, dataformats="HWC")
        return written
