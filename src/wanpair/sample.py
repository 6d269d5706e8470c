"""Two-expert sampling with the LoRA pair, the way Wan 2.2 runs (Wan 2.1: one model with its LoRA).

The high-noise expert (with the HighNoise LoRA) denoises while t >= the pair's boundary (875 for T2V,
900 for I2V), the low-noise expert (with the LowNoise LoRA) below; diffusers' `WanPipeline` (text to
video) or `WanImageToVideoPipeline` (from a first frame, `--image`) does the switching (its
`boundary_ratio`), with Wan's UniPC flow solver; a Wan 2.1 model is the pipeline's one transformer.
Prompts are encoded first and the text encoder is freed before the experts run. LoRAs are applied by
adding their weight update to the expert (the same result as diffusers' own LoRA loading; see
tests/test_export.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_path, writable_from, write_text_atomic
from .errors import WanpairError
from .models.tasks import EXPERT_NAMES, T2V, Task, expert_name
from .project import Project

log = logging.getLogger(__name__)

# Wan 2.2 A14B sampling defaults: 40 steps for both pairs, and the shared sample_neg_prompt (Wan2.2
# `wan/configs/shared_config.py`); shift, guidance (and Wan 2.1's 50 steps) per model (`wanpair.models.tasks`).
DEFAULT_STEPS = T2V.sample_steps
I2V_FRAMES = 81  # an image-to-video sample is a clip (Wan2.2 `wan/image2video.py`: frame_num = 81)
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
    shift: float = T2V.sample_shift
    guidance_high: float = T2V.guidance_high  # a single model's (Wan 2.1) guidance is guidance_high
    guidance_low: float = T2V.guidance_low
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    seed: int = 42
    strength_high: float = 1.0
    strength_low: float = 1.0
    strength_full: float = 1.0  # a single model's LoRA
    image: str = ""  # the first frame (image-to-video pair)

    @classmethod
    def for_task(cls, task: Task, **given) -> "SampleSettings":
        """The model's own defaults (shift, guidance, steps; I2V: an 81-frame clip), then what the user gave."""
        defaults = dict(shift=task.sample_shift, guidance_high=task.guidance_high, guidance_low=task.guidance_low,
                        steps=task.sample_steps)
        if task.conditioned:
            defaults["frames"] = I2V_FRAMES
        return cls(**{**defaults, **given})

    @classmethod
    def for_project(cls, project: Project, clip: bool = False) -> "SampleSettings":
        """The model's defaults with the project's [sample] size, length, steps and seed. `clip`: an image-to-video
        sample where [sample] says 1 frame is an 81-frame clip (the exported workflow's), not a still."""
        s = project.sample
        frames = I2V_FRAMES if clip and project.task.conditioned and s.frames == 1 else s.frames
        return cls.for_task(project.task, width=s.width, height=s.height, frames=frames, steps=s.steps, seed=s.seed)

    def check(self, task: Task = T2V) -> None:
        problems = []
        if task.conditioned and not self.image:
            problems.append(f"the {task.name} pair makes a clip from a first frame: pass --image FRAME.png.")
        elif self.image and not task.conditioned:
            problems.append(f"--image is for the image-to-video pair (i2v-A14B); this project trains {task.title}.")
        elif self.image and not Path(self.image).is_file():
            problems.append(f"--image {self.image}: no such file.")
        if task.conditioned and self.frames == 1:
            problems.append("frames = 1 with --image would only give back the image: use 4k+1 > 1 (default 81).")
        if self.width % 16 or self.height % 16 or self.width < 16 or self.height < 16:
            problems.append(f"width/height {self.width}x{self.height} must be multiples of 16.")
        if self.frames < 1 or (self.frames - 1) % 4:
            problems.append(f"frames = {self.frames} must be 4k+1 (1, 5, ... 81): the Wan VAE packs 4 frames per latent.")
        if not self.shift > 0:
            problems.append(f"shift = {self.shift:g} must be above 0 ({task.title}'s own: {task.sample_shift:g}).")
        if problems:
            raise WanpairError("\n".join(problems))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:48] or "prompt"


def _lora_note(loras: dict[str, Path | None]) -> str:
    return "+".join(f"{e}{'Lora' if loras.get(e) else 'Base'}" for e in EXPERT_NAMES if e in loras)


def checked_loras(project: Project, loras: dict[str, Path | None], allow_mismatch: bool = False) -> dict:
    """Each LoRA read and checked against its slot -- the right expert and model, layers the base has --
    before any 28 GB base is loaded."""
    from .export.formats import read_lora
    from .export.merge import check_expert, check_layers, check_pair, layer_shapes
    from .models.dit import inspect_dit

    checked = {}
    for expert in project.task.experts:
        path = loras.get(expert)
        if not path:
            checked[expert] = None
            continue
        lora = read_lora(path)
        dit = project.dit_path(expert)
        slot = f"the {expert_name(expert)} slot ({dit.name})" if project.task.paired else dit.name
        check_expert(lora, expert, slot, allow_mismatch)
        check_pair(lora, project.task, slot, allow_mismatch)
        if inspect_dit(dit).file is not None:
            check_layers(lora, layer_shapes(dit), slot, str(path))
        checked[expert] = lora
    return checked


def check_models_and_output(project: Project, out_dir: Path) -> None:
    """Every model file the samples need, and a place to write them, checked from headers and the file system
    before minutes of loading and generating."""
    from .models.dit import dit_problems
    from .models.kinds import other_model_problems

    problems = other_model_problems(project.models)
    problems += dit_problems(project.task, {e: project.dit_path(e) for e in project.task.experts})[0]
    if not project.models.tokenizer.exists():
        problems.append(f"[models] tokenizer: {project.models.tokenizer} does not exist.")
    where, writable = writable_from(out_dir)
    if not writable:
        place = f"the samples folder {out_dir}" if where == out_dir else f"the samples go to {out_dir}, but {where}"
        problems.append(f"{place} is not a folder wanpair can write to (read-only?): pass --out with another folder.")
    if problems:
        raise WanpairError("cannot sample:\n" + "\n".join(f"- {p}" for p in problems))


def lora_delta(lora, strength: float, device: torch.device | str = "cpu"):
    """The update `load_dit(delta=...)` adds to each tensor: strength * ((alpha/rank) * up @ down + diff) to a
    weight, strength * diff_b to a bias, made on the device the expert loads to."""
    if lora is None or strength == 0:
        return None

    def delta(key: str):
        update = lora.update(key, device)
        return None if update is None else strength * update

    return delta


def expert_bytes(config: dict, bytes_per_weight: int) -> int:
    """Block weights of one expert (the rest is a few hundred MB): 8 attention projections and 2 FFN matrices."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return config["num_layers"] * (8 * dim * dim + 2 * dim * config["ffn_dim"]) * bytes_per_weight


SAMPLING_MARGIN = 8 * 2**30  # VAE decoding and the activations of one denoising step (81 frames at 832x480)


def storage_for(device: torch.device, configs: list[dict]) -> str:
    """How both experts are held for sampling: "bf16" on the GPU if both fit, else "fp8" (half the
    memory) if both fit so, else "offload" (fp8, one expert on the GPU at a time)."""
    if device.type != "cuda":
        return "bf16"
    free, _ = torch.cuda.mem_get_info(device)
    if sum(expert_bytes(c, 2) for c in configs) + SAMPLING_MARGIN <= free:
        return "bf16"
    if sum(expert_bytes(c, 1) for c in configs) + SAMPLING_MARGIN <= free:
        return "fp8"
    return "offload"


def load_expert(project: Project, expert: str, lora, strength: float, dtype: torch.dtype, device: torch.device,
                fp8: bool = False):
    """One expert straight from its file onto `device`, its LoRA merged in as the weights arrive
    (before fp8 quantisation, when `fp8`)."""
    from .models import load_dit
    from .models.fp8 import fp8_matmul_available, use_fp8_matmul

    model = load_dit(project.dit_path(expert), dtype=dtype, device=device, fp8=fp8, delta=lora_delta(lora, strength, device))
    if fp8:
        use_fp8_matmul(model, fp8_matmul_available(device))
    if lora is not None:
        log.info("merged the %s LoRA into the %s model at strength %s",
                 expert_name(lora.metadata.get("wanpair.expert", expert)), expert_name(expert), strength)
    return model


def make_pipeline(vae, models: dict, shift: float, task: Task = T2V):
    """diffusers' pipeline (WanPipeline, or WanImageToVideoPipeline for I2V) over a pair's two experts,
    switching at its boundary, or over a single model; prompts come as embeddings (no text encoder), and
    the Wan 2.2 I2V experts take no CLIP image embedding (no image encoder)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    parts = dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                 transformer=models["high"] if task.paired else models["full"], transformer_2=models.get("low"),
                 boundary_ratio=task.boundary / 1000 if task.paired else None)
    if task.conditioned:
        return WanImageToVideoPipeline(image_processor=None, image_encoder=None, **parts)
    return WanPipeline(**parts)


def build_pipeline(project: Project, loras: dict[str, Path | None], settings: SampleSettings, device: torch.device,
                   dtype: torch.dtype, allow_mismatch: bool = False):
    """A diffusers WanPipeline over the experts (or the one model) with their LoRAs merged (no text encoder),
    loaded straight to the GPU in bf16, or fp8 (or one at a time) when memory is short."""
    from .models import load_vae
    from .models.dit import inspect_dit

    checked = checked_loras(project, loras, allow_mismatch)
    storage = storage_for(device, [inspect_dit(project.dit_path(e)).config for e in project.task.experts])
    if storage != "bf16":
        log.info("sampling with the weights stored as fp8%s: in bf16 they do not fit in the GPU's free memory",
                 ", one model on the GPU at a time" if storage == "offload" else "")
    experts = {}
    for e in project.task.experts:
        experts[e] = load_expert(project, e, checked[e], getattr(settings, f"strength_{e}"), dtype, device,
                                 fp8=storage != "bf16")
        if storage == "offload":
            experts[e].to("cpu")  # converted on the GPU (fast), kept on the host until its turn
    vae = load_vae(project.models.vae, dtype=torch.float32)
    pipe = make_pipeline(vae, experts, settings.shift, project.task)
    if storage == "offload":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def prompt_embeddings(project: Project, prompts: list[str], negative: str, device: torch.device, dtype: torch.dtype):
    """Padded umT5 embeddings of the prompts and the negative prompt, from the project's text cache
    (content-keyed like the captions'): the text encoder loads only for prompts never encoded before."""
    from .cache import cached_texts, folder_fingerprint
    from .data.dataset_config import load_dataset_config
    from .models import load_text_encoder
    from .train.flow_matching import pad_text

    m = project.models
    cache_dir = load_dataset_config(project.dataset_config)[0].cache_dir
    texts = cached_texts(prompts + [negative], cache_dir, folder_fingerprint(m.t5), folder_fingerprint(m.tokenizer),
                         lambda: load_text_encoder(m.t5, m.tokenizer, dtype=dtype, device=device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [pad_text([e]) for e in texts[:-1]], pad_text([texts[-1]])


def _unused(path: Path) -> Path:
    """`path`, or with -2, -3, ... before its suffix where a sample of that name is already there: a rerun with
    another seed or strength keeps the samples it is to be compared with."""
    candidate, n = path, 2
    while candidate.exists() or candidate.with_suffix(".json").exists():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def save_output(frames: np.ndarray, path: Path, info: dict, fps: int, keep_earlier: bool = False) -> Path:
    """PNG for one frame (settings in its text chunks), MP4 for video; a .json beside either. `keep_earlier`: never
    over an earlier sample (`wanpair sample`); training's samples are named by step, and a continued run draws
    the steps it repeats anew."""
    frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    path = path.with_suffix(".png" if len(frames) == 1 else ".mp4")
    path = _unused(path) if keep_earlier else path
    if len(frames) == 1:
        png = PngInfo()
        for k, v in info.items():
            png.add_text(f"wanpair.{k}", json.dumps(v) if not isinstance(v, str) else v)
        with atomic_path(path) as tmp:
            Image.fromarray(frames[0]).save(tmp, format="PNG", pnginfo=png)
    else:
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
    """Generate one image or clip per prompt with the model's experts (or its one model); returns the files."""
    start = time.perf_counter()
    settings.check(project.task)
    if not prompts:
        raise WanpairError("no prompt given: use --prompt \"...\" or --prompts FILE (one prompt per line).")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_models_and_output(project, out_dir)  # each model file named by its [models] key, before the LoRAs' checks
    checked_loras(project, loras, allow_mismatch)  # a wrong LoRA fails now, not after the prompts and experts load
    embeds, negative = prompt_embeddings(project, prompts, settings.negative_prompt, device, dtype)
    log.info("prompts ready after %.1f s", time.perf_counter() - start)
    pipe = build_pipeline(project, loras, settings, device, dtype, allow_mismatch)
    log.info("models ready after %.1f s", time.perf_counter() - start)
    written = run_prompts(pipe, prompts, embeds, negative, settings, loras, out_dir, project, device, dtype, name_prefix,
                          keep_earlier=True)
    log.info("%d output(s) after %.1f s", len(written), time.perf_counter() - start)
    return written


def run_prompts(pipe, prompts, embeds, negative, settings: SampleSettings, loras: dict, out_dir: Path, project: Project,
                device: torch.device, dtype: torch.dtype, name_prefix: str = "",
                keep_earlier: bool = False) -> list[Path]:
    written = []
    first_frame = {"image": first_frame_image(settings)} if settings.image else {}
    for i, (prompt, emb) in enumerate(zip(prompts, embeds)):
        generator = torch.Generator().manual_seed(settings.seed + i)
        frames = pipe(**first_frame, prompt_embeds=emb.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                      height=settings.height, width=settings.width, num_frames=settings.frames,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance_high,
                      guidance_scale_2=settings.guidance_low if project.task.paired else None, generator=generator,
                      output_type="np").frames[0]
        info = {"prompt": prompt, "seed": settings.seed + i, "settings": asdict(settings),
                "loras": {k: str(v) if v else None for k, v in loras.items()}, "project": str(project.path)}
        stem = f"{name_prefix}{i:02d}_{_slug(prompt)}_{_lora_note(loras)}"
        written.append(save_output(frames, out_dir / stem, info, settings.fps, keep_earlier))
        print(f"wrote {written[-1]}")
    return written


def first_frame_image(settings: SampleSettings) -> Image.Image:
    """`--image` scaled to cover width x height and centre-cropped, as training items are to their bucket."""
    from .data.buckets import resize_and_crop
    from .data.images import load_rgb

    return Image.fromarray(resize_and_crop(load_rgb(Path(settings.image)), (settings.width, settings.height)))


class TrainingSampler:
    """Samples during training: the expert being trained (LoRA as it is now, the model already in memory)
    with the other expert as it is, or with its LoRA when this run made it (a Wan 2.1 model alone). File
    names say which (e.g. `highLora+lowBase`).

    The other expert is loaded once (fp8, its LoRA merged) and waits in host memory between samples; it
    borrows the GPU memory that training's activations leave free between steps. If even that is too
    little (a 16 GiB low-memory run), samples are skipped with a note instead of stopping the run."""

    def __init__(self, project: Project, prompts: list[str], embeds: list[torch.Tensor], negative: torch.Tensor,
                 settings: SampleSettings, device: torch.device, dtype: torch.dtype):
        from .train.flow_matching import pad_text

        self.project, self.prompts, self.settings, self.device, self.dtype = project, prompts, settings, device, dtype
        self.embeds, self.negative = [pad_text([e]) for e in embeds], pad_text([negative])
        self.others: dict[str, object] = {}
        self.vae = None
        self.skipping = False
        self.noted: set[str] = set()  # experts whose stale LoRA file was mentioned
        self.configs: dict[str, dict] = {}  # the other experts' configs, for the room check

    def _other(self, other: str, lora_path: Path | None):
        key = f"{other}:{lora_path}"
        if key not in self.others:
            lora = checked_loras(self.project, {other: lora_path})[other]
            self.others = {key: load_expert(self.project, other, lora, 1.0, self.dtype, self.device,
                                            fp8=self.device.type == "cuda").to("cpu")}
        return self.others[key]

    def _partner_lora(self, other: str, identity: dict[str, str]) -> Path | None:
        """The other expert's LoRA if this run made it (same settings and data: kept, or trained before this
        expert); else None, and the other expert samples as its base, said once. A LoRA file left by an earlier
        run under this name is not this run's."""
        from safetensors import safe_open

        from .train.metadata import same_run

        path = self.project.lora_path(other)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                found = f.metadata() or {}
        except Exception:  # a damaged or foreign file (safetensors raises several types) is not this run's
            found = {}
        if same_run(found, identity):
            return path
        if other not in self.noted:
            self.noted.add(other)
            print(f"note: samples during training use the {expert_name(other)} base model without a LoRA: "
                  f"{path.name} is not this run's (other settings or data, or unreadable).")
        return None

    def _room_for(self, other: str) -> bool:
        """Room on the GPU, between steps, for the other expert (fp8) and a sampling step? Asked before it is
        loaded there at all, from its config."""
        if self.device.type != "cuda":
            return True
        from .models.dit import inspect_dit

        torch.cuda.empty_cache()
        if other not in self.configs:  # read from its file's header once, not at every sample
            self.configs[other] = inspect_dit(self.project.dit_path(other)).config
        need = expert_bytes(self.configs[other], 1) + 2 * 2**30  # + its other weights (~0.3 GB) and a sampling
        # step's activations
        free, _ = torch.cuda.mem_get_info(self.device)
        if need <= free:
            return True
        print(f"note: samples during training are skipped: the other expert needs {need / 2**30:.1f} GiB and "
              f"the GPU has {free / 2**30:.1f} GiB free between steps. Run `wanpair sample` after training instead.")
        self.skipping = True
        return False

    def __call__(self, model, expert: str, step: int, autocast, identity: dict[str, str]) -> list[Path]:
        """Sample with `model` (the expert being trained, `identity`: its run's, `wanpair.train.metadata`)."""
        from .models import load_vae

        if self.skipping:
            return []
        models, loras, other_model = {expert: model}, {expert: "training"}, None
        if self.project.task.paired:
            other = "low" if expert == "high" else "high"
            if not self._room_for(other):
                return []
            loras[other] = self._partner_lora(other, identity)
            other_model = self._other(other, loras[other])
            models[other] = other_model.to(self.device)
        self.vae = self.vae or load_vae(self.project.models.vae, dtype=torch.float32)
        pipe = make_pipeline(self.vae, models, self.settings.shift, self.project.task).to(self.device)
        was_training = model.training
        model.eval()
        from .train.speed import eager

        try:
            with torch.no_grad(), autocast(), eager():
                written = run_prompts(pipe, self.prompts, self.embeds, self.negative, self.settings, loras,
                                      self.project.run_dir / "samples", self.project, self.device, self.dtype,
                                      name_prefix=f"{expert}-step{step:06d}_")
        finally:
            model.train(was_training)
            if other_model is not None:
                other_model.to("cpu")
            self.vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return written


def make_sampler(project: Project, prompts: list[str], prompt_paths: list[Path], device: torch.device):
    """Samples during training, from prompt embeddings cached with the captions (no text encoder kept);
    None without sampling prompts. `prompt_paths`: the prompts' cache entries, the negative prompt's last."""
    if not prompts:
        return None
    from .cache import read_entry

    embeds = [read_entry(p) for p in prompt_paths]
    settings = SampleSettings.for_project(project)  # the model's shift and guidance
    return TrainingSampler(project, prompts, embeds[:-1], embeds[-1], settings, device, project.train.compute_dtype)

