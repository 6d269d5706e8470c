"""`wanpair caption`: a `.txt` caption beside every image and clip of a folder, written by a vision-language model.

Why: the recipe trains on one caption per image, and writing them is the step people skip or do badly. Wan
was trained on dense English paragraphs (subject, action, setting, camera, lighting), so that is what the
prompt asks for; a LoRA's trigger words go first. The prompt is `DEFAULT_PROMPT` below, the one place to
change it (or `--prompt FILE` for a run). Captions already there are never replaced without `force`.

The model is Qwen2.5-VL-7B-Instruct, the captioner of the field (Musubi-Tuner's
`caption_images_by_qwen_vl.py` uses the same model), loaded with transformers' own
`Qwen2_5_VLForConditionalGeneration`, its tokenizer and its image processor. transformers' combined
`Qwen2_5_VLProcessor` cannot be built without torchvision (its video half needs it, in 5.x), which wanpair
does not depend on; so the model's input is put together here from the same pieces the processor uses:
the folder's own chat template, `<|image_pad|>` repeated once per 2x2 merged patch of each image (Qwen2-VL's
scheme, transformers' `Qwen2VLProcessor.replace_image_token`), and the image processor's patches. A clip is
`CLIP_FRAMES` frames spread across it, given in order as images: no video processor is needed either.

Memory: on a GPU the weights are bf16 (16.6 GB for the 7B) when they fit with `HEADROOM` to spare, else the
language model's Linears are stored as fp8 with a scale per row (`wanpair.models.fp8`, weight-only: each is
dequantised to bf16 for its matmul, so the activations are never quantised), 10 GB in all. Captioning runs
before training, so it has the GPU to itself. A model over `CPU_LIMIT` parameters is refused on the CPU
(minutes per image); the tests' tiny model runs there.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .atomic import write_text_atomic
from .data.images import IMAGE_EXTENSIONS, load_rgb
from .data.media import CAPTION_EXTENSION, caption_path, dataset_media, media_in
from .errors import WanpairError

log = logging.getLogger(__name__)

CAPTIONER_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
CAPTIONER_DIR = "Qwen2.5-VL-7B-Instruct"  # the folder `wanpair download --captioner` fills under models/

DEFAULT_PROMPT = """\
Write a caption of this picture for training a text-to-video model. Write one paragraph of plain English, \
60 to 120 words: no lists, no headings, no line breaks, no quotation marks. Describe, in this order: the main \
subject (who or what, appearance, clothing, expression), what the subject is doing, the setting and the \
background, the camera (shot size, angle, lens, any camera movement), and the lighting and colours. When you \
are shown several frames of one video clip, describe the clip as a whole and say what moves and how: the \
subject's motion and the camera's. Say only what can be seen; do not guess names, and do not mention that \
this is a picture, a frame or a caption."""

IMAGE_PIXELS = 1280 * 1280  # larger images are scaled down to this area first (Musubi-Tuner's --max_size 1280)
CLIP_FRAMES = 8  # frames spread across a clip, first to last
FRAME_PIXELS = 448 * 448  # each frame's area: 8 frames cost about what one 1280x1280 image does
MAX_NEW_TOKENS = 300  # a 120-word paragraph is about 160 tokens
CPU_LIMIT = 1e9  # parameters; above this the CPU is refused
HEADROOM = 4 << 30  # GPU bytes beyond the weights: activations, the KV cache of a batch, CUDA's own


def has_caption(media: Path, extension: str = CAPTION_EXTENSION) -> bool:
    """A caption file with some text in it (an empty one is what `wanpair check` calls missing)."""
    path = caption_path(media, extension)
    try:
        return path.is_file() and bool(path.read_bytes().strip())
    except OSError:
        return False


def to_caption(folder: Path) -> tuple[list[Path], str]:
    """(media, caption extension) of `folder`, so that the captions written are the ones training reads: its
    dataset.toml's entry for this folder when there is one (the media of its kind, its `caption_extension`),
    else every image and video with `.txt`, where a folder of images beside image files is not a clip (an
    image dataset's `originals/`; `wanpair.data.media`)."""
    from .data.dataset_config import load_dataset_config

    toml = folder / "dataset.toml"
    if toml.is_file():
        specs = [s for s in load_dataset_config(toml) if not s.from_jsonl and s.source.resolve() == folder.resolve()]
        if specs:
            media = dataset_media(folder, specs[0].kind)
            if not media:
                raise WanpairError(f"{toml} trains {folder} as {specs[0].kind}s ({specs[0].kind}_directory), and it "
                                   "holds none; fix that [[datasets]] entry.")
            return media, specs[0].caption_extension
    images, videos = media_in(folder)
    media = sorted(images + [v for v in videos if v.is_file() or not images])
    if not media:
        raise WanpairError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or video clips to caption.")
    return media, CAPTION_EXTENSION


def read_prompt(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise WanpairError(f"--prompt {path}: cannot be read as UTF-8 text ({e}); give a text file holding the "
                           "instruction for the captioner.") from None
    if not text:
        raise WanpairError(f"--prompt {path} is empty; write the instruction for the captioner in it (the default "
                           "is DEFAULT_PROMPT in wanpair/caption.py).")
    return text


def project_captioner(project: Path) -> Path | None:
    """The `[models] captioner` a project file names (relative to the file), or None."""
    from .tomlfile import read_toml

    path, raw = read_toml(project, "Give a wanpair.toml project file.")
    models = raw.get("models")
    value = models.get("captioner") if isinstance(models, dict) else None
    return (path.parent / Path(value).expanduser()).resolve() if isinstance(value, str) and value.strip() else None


def find_captioner(project: Path, models_dir: Path) -> Path:
    """The captioner folder: the project's `[models] captioner` when it names one, else where
    `wanpair download --captioner --dir MODELS_DIR` puts it."""
    return (project.is_file() and project_captioner(project)) or (models_dir / CAPTIONER_DIR).resolve()


def fit_area(image: Image.Image, pixels: int) -> Image.Image:
    """`image` scaled down (aspect kept) to at most `pixels` in area; smaller images as they are."""
    w, h = image.size
    if w * h <= pixels:
        return image
    scale = math.sqrt(pixels / (w * h))
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def spread(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included (all of them when fewer)."""
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def sample_frames(path: Path, count: int = CLIP_FRAMES) -> list[Image.Image]:
    """`count` frames spread across a clip (a video file, or a folder of frames sorted by name), as RGB."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return [load_rgb(files[i]) for i in spread(len(files), count)]
    import av

    try:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        picks = set(spread(total, count))
        with av.open(str(path)) as container:
            frames = [f.to_image().convert("RGB") for i, f in enumerate(container.decode(video=0)) if i in picks]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode video ({e})") from None
    if not frames:
        raise ValueError("the video has no frames")
    return frames


def load_media(path: Path) -> list[Image.Image]:
    """What the captioner sees of one file: an image (scaled to `IMAGE_PIXELS`), or a clip's frames."""
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [fit_area(load_rgb(path), IMAGE_PIXELS)]
    return [fit_area(frame, FRAME_PIXELS) for frame in sample_frames(path)]


def clean_caption(text: str, cut: bool = False) -> str:
    """One plain paragraph from what the model wrote: no markdown, labels, quotes, line breaks or control
    characters. `cut`: the token limit stopped it, so an unfinished last sentence is dropped."""
    text = re.sub(r"```\w*", " ", text)
    lines = [re.sub(r"^\s*(?:#+|[-*\u2022]|\d+[.)])\s+", "", line) for line in text.splitlines()]
    text = " ".join(lines).replace("**", "").replace("__", "").replace("`", "")
    text = "".join(c for c in text if c.isprintable())
    text = re.sub(r"^\s*(?:caption|description)\s*:\s*", "", " ".join(text.split()), flags=re.IGNORECASE)
    text = text.strip().strip("\"'\u201c\u201d\u2018\u2019").strip()
    if cut and not text.endswith((".", "!", "?")):
        end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        if end > 0:
            text = text[:end + 1]
    return text


def with_trigger(caption: str, trigger: str) -> str:
    """The trigger words first ("sks person, a woman ..."), once."""
    trigger = trigger.strip().rstrip(",").strip()
    if not trigger or caption.lower().startswith(trigger.lower()):
        return caption
    return f"{trigger}, {caption}"


class Captioner:
    """A loaded Qwen2.5-VL and what it needs to caption a batch: `caption([[image], [frame, frame, ...]])`."""

    def __init__(self, folder: str | Path, device: str = "auto", precision: str = "auto",
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int | None = None, min_new_tokens: int = 0):
        """Check everything that can be checked (the folder, the device, the memory), then load. Nothing
        loads when a check fails. `precision`: auto (bf16 when it fits, else fp8 weights), bf16 or fp8."""
        import torch

        self.folder = Path(folder)
        config = self._config()
        self.device = pick_device(device)
        total, fp8_able = parameter_counts(config)
        self.precision = pick_precision(precision, self.device, total, fp8_able, self.folder)
        self.prompt, self.max_new_tokens, self.min_new_tokens = prompt, max_new_tokens or MAX_NEW_TOKENS, min_new_tokens
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.image_token_id = config.image_token_id
        log.info("captioner: %s on %s, %s weights (%s parameters)", self.folder, self.device, self.precision,
                 f"{total:,}")
        self._load()

    def _config(self):
        from transformers import AutoConfig

        if not (self.folder / "config.json").is_file():
            raise WanpairError(f"no captioner in {self.folder} (no config.json): run `wanpair download --captioner` "
                               f"to fetch {CAPTIONER_REPO} (16.6 GB) into models/{CAPTIONER_DIR}, or pass --captioner "
                               "with the folder you keep it in.")
        try:
            config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WanpairError(f"{self.folder / 'config.json'} cannot be read ({e}); run `wanpair download "
                               "--captioner` again.") from None
        if config.model_type != "qwen2_5_vl":
            raise WanpairError(f"{self.folder} holds a {config.model_type!r} model; the captioner is Qwen2.5-VL "
                               f"({CAPTIONER_REPO}): run `wanpair download --captioner`.")
        return config

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
            self.template = chat_template(self.folder, self.tokenizer)
            on_device = self.precision != "fp8"  # fp8: read on the host, then layer by layer to the GPU
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                self.folder, torch_dtype=self.dtype, local_files_only=True,
                device_map=str(self.device) if on_device and self.device.type == "cuda" else None)
        except (OSError, ValueError) as e:
            raise WanpairError(f"the captioner in {self.folder} cannot be loaded ({e}); run `wanpair download "
                               "--captioner` again: it fetches what is missing or damaged.") from None
        if self.precision == "fp8":
            store_fp8(model, self.device, self.dtype)
        self.model = model.to(self.device).eval()
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.wants_token_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters

    def inputs(self, batch: list[list[Image.Image]]) -> dict:
        """The model's input for a batch: the prompt in the chat template with each image's tokens, left padded."""
        messages = [[{"role": "user", "content": [*({"type": "image"} for _ in images),
                                                  {"type": "text", "text": self.prompt}]}] for images in batch]
        texts = [self.tokenizer.apply_chat_template(m, chat_template=self.template, tokenize=False,
                                                    add_generation_prompt=True) for m in messages]
        pixels = self.image_processor(images=[im for images in batch for im in images], return_tensors="pt")
        per_image = iter((pixels["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist())

        def expand(text: str) -> str:  # each image's one placeholder -> as many as its merged patches
            first, *rest = text.split(self.image_token)
            return first + "".join(self.image_token * next(per_image) + part for part in rest)

        texts = [expand(t) for t in texts]
        encoded = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        inputs = {**encoded, "pixel_values": pixels["pixel_values"].to(self.dtype),
                  "image_grid_thw": pixels["image_grid_thw"]}
        if self.wants_token_types:  # transformers 5 places the image tokens in 3D by this mask
            inputs["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return {k: v.to(self.device) for k, v in inputs.items()}

    def caption(self, batch: list[list[Image.Image]]) -> list[str]:
        """One cleaned caption per item (each item: an image, or a clip's frames), by greedy decoding."""
        import torch

        inputs = self.inputs(batch)
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      min_new_tokens=self.min_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [clean_caption(t, cut=len(row) == self.max_new_tokens and not stops & set(row.tolist()))
                for t, row in zip(texts, new)]


def chat_template(folder: Path, tokenizer) -> str:
    """The model's chat template: the processor's (`chat_template.jinja` / `.json`, where Qwen keeps it), else the
    tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise WanpairError(f"{folder} has no chat template (chat_template.json); run `wanpair download --captioner` again.")


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WanpairError("--device cuda: torch sees no CUDA GPU here (`wanpair doctor` says why).")
    return torch.device(device)


def decoder_linears(model) -> list[tuple[str, object]]:
    """The language model's Linears (names and modules): 85 % of the 7B's weights, the ones fp8 stores."""
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, those in the language model's Linears), from the config alone (a model on the meta device)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    return (sum(p.numel() for p in model.parameters()),
            sum(m.weight.numel() for _, m in decoder_linears(model)))


def pick_precision(precision: str, device, total: int, fp8_able: int, folder: Path) -> str:
    """bf16, or fp8 weights when bf16 would not fit in the GPU's free memory; the CPU only for a small model."""
    import torch

    from .sizes import human_bytes

    if device.type == "cpu":
        if total > CPU_LIMIT:
            raise WanpairError(f"the captioner in {folder} has {total / 1e9:.1f} B parameters: on the CPU it would "
                               "take minutes per image. Caption on a machine with a CUDA GPU (16 GB is enough: the "
                               "weights go to fp8 when bf16 does not fit), or write the .txt files by hand.")
        return "fp8" if precision == "fp8" else "fp32"
    if precision != "auto":
        return precision
    free, _ = torch.cuda.mem_get_info(device)
    bf16, fp8 = 2 * total + HEADROOM, fp8_able + 2 * (total - fp8_able) + HEADROOM
    if bf16 <= free:
        return "bf16"
    if fp8 <= free:
        return "fp8"
    raise WanpairError(f"the captioner needs {human_bytes(fp8)} of GPU memory even with fp8 weights, and "
                       f"{human_bytes(free)} is free on {device}. Stop what else runs on the GPU (captioning runs "
                       "before training), or use a larger GPU.")


def store_fp8(model, device, dtype) -> None:
    """The language model's Linears as fp8 on `device`, one decoder layer at a time (the host holds bf16)."""
    import torch

    from .models.fp8 import to_fp8_linears

    for layer in model.get_decoder().layers:
        layer.to(device)
        to_fp8_linears(layer, dtype, [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)])


@dataclass
class CaptionReport:
    """What `caption_folder` did, file by file."""

    written: list[Path] = field(default_factory=list)  # the caption files
    skipped: list[Path] = field(default_factory=list)  # caption files that were there already
    failed: dict[Path, str] = field(default_factory=dict)  # media file -> why
    dry_run: bool = False

    def render(self) -> str:
        def names(paths) -> str:
            return ", ".join(p.name for p in paths)

        lines = [f"{'would write' if self.dry_run else 'written'} {len(self.written)}"
                 + (f": {names(self.written)}" if self.written else "")]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} (a caption is there; --force replaces it): {names(self.skipped)}")
        lines.append(f"failed {len(self.failed)}" + (":" if self.failed else ""))
        lines += [f"  {path.name}: {why}" for path, why in self.failed.items()]
        return "\n".join(lines)


def caption_folder(folder: str | Path, captioner: str | Path | Captioner, trigger: str = "",
                   prompt: str = DEFAULT_PROMPT, force: bool = False, dry_run: bool = False, device: str = "auto",
                   precision: str = "auto", batch_size: int = 8, out=None) -> CaptionReport:
    """Caption every image and clip in `folder` that has no caption (all of them with `force`); `captioner`:
    its folder (loaded with `device`, `precision` and `prompt` only when there is something to caption), or a
    loaded `Captioner`. A file that cannot be read or captioned is reported and the rest go on. `out`: where the
    lines go (default stdout). The dashboard calls this, or runs `wanpair caption`."""
    from tqdm.auto import tqdm

    out = out or sys.stdout
    folder = Path(folder)
    if not folder.is_dir():
        raise WanpairError(f"{folder} is not a folder; give the folder with your images (or video clips).")
    media, extension = to_caption(folder)
    videos = any(m.is_dir() or m.suffix.lower() not in IMAGE_EXTENSIONS for m in media)
    report = CaptionReport(dry_run=dry_run)
    todo = [m for m in media if force or not has_caption(m, extension)]
    report.skipped = [caption_path(m, extension) for m in media if m not in todo]
    if not todo:
        return report
    if not isinstance(captioner, Captioner):
        captioner = Captioner(captioner, device, precision, prompt)
    bar = tqdm(total=len(todo), unit="img" if not videos else "file", desc="captioning", file=sys.stderr)

    def done(path: Path, caption: str) -> None:
        caption = with_trigger(caption, trigger)
        target = caption_path(path, extension)
        if not force and has_caption(path, extension):  # written meanwhile (by hand, in the dashboard): kept
            report.skipped.append(target)
            return
        if dry_run:
            bar.write(f"would write {target.name}: {caption}", file=out)
        else:
            write_text_atomic(target, caption + "\n")
            bar.write(f"wrote {target.name}: {caption[:100]}{'...' if len(caption) > 100 else ''}", file=out)
        report.written.append(target)

    def run(batch: list[tuple[Path, list[Image.Image]]]) -> None:
        try:
            captions = captioner.caption([frames for _, frames in batch])
        except Exception as e:  # noqa: BLE001 -- one file's failure (memory, a shape) is reported, the rest go on
            if len(batch) > 1:  # find which one: each alone
                for item in batch:
                    run([item])
                return
            report.failed[batch[0][0]] = f"the captioner failed ({type(e).__name__}: {e})"
            return
        for (path, _), caption in zip(batch, captions):
            if caption:
                done(path, caption)
            else:
                report.failed[path] = "the captioner returned no text; try again or write this caption by hand"

    batch: list[tuple[Path, list[Image.Image]]] = []
    for i, path in enumerate(todo):
        try:
            batch.append((path, load_media(path)))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
            report.failed[path] = f"cannot be read ({e}); re-export or remove it"
            bar.update(1)
        if batch and (len(batch) == batch_size or i == len(todo) - 1):
            run(batch)
            bar.update(len(batch))
            batch = []
    bar.close()
    return report
