"""The model card of a trained pair: the README.md that `wanpair push` puts beside the LoRAs on the Hub.

It is the pair's manual. First, which file goes on which expert and on which timesteps -- the field's most
common mistake is the HighNoise LoRA on the low-noise model, which does nothing useful -- read from each file's
own metadata (`wanpair.expert`, `modelspec.timestep_range`), never from its name. Then the trigger words, the
base files by the recipe's names, what trained each expert (from the files' recorded settings, `wanpair.settings`,
so a project edited since cannot make the card wrong), the validation loss, the samples, and how to load the pair
in ComfyUI and in diffusers.

The front matter is the Hub's model-card metadata (rendered by huggingface_hub's `ModelCardData`): `base_model`
with `base_model_relation: adapter`, `tags`, `license`, `library_name`, `pipeline_tag`; plus the two keys the
Hub's LoRA cards use for a gallery and trigger words, as diffusers' training scripts write them
(examples/dreambooth `save_model_card`): `widget` entries `{text: prompt, output: {url: file in the repo}}`
shown by `<Gallery />`, and `instance_prompt`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..models.tasks import Task, expert_name
from ..project import Project

# The official repositories of each model (the Hub's base_model), and their diffusers-format twins, which
# diffusers' Wan pipelines load (Wan-AI on huggingface.co).
BASE_REPOS = {
    "t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B",
    "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
    "t2v-14B": "Wan-AI/Wan2.1-T2V-14B",
    "t2v-1.3B": "Wan-AI/Wan2.1-T2V-1.3B",
}
# diffusers' Wan 2.2 pipelines: `transformer` is the high-noise expert, `transformer_2` the low-noise one, and
# `load_lora_weights(..., load_into_transformer_2=True)` loads a LoRA into the latter (diffusers
# src/diffusers/loaders/lora_pipeline.py, WanLoraLoaderMixin.load_lora_weights).
DIFFUSERS_COMPONENT = {"high": "transformer", "low": "transformer_2", "full": "transformer"}


@dataclass(frozen=True)
class Sample:
    """A sample in the repository, and the prompt that made it."""

    path: str  # in the repository, e.g. samples/00_a_red_circle_highLora+lowLora.png
    prompt: str


def _window(meta: dict[str, str]) -> str:
    """`875,1000` -> `875–1000`."""
    low, _, high = meta.get("modelspec.timestep_range", meta.get("wanpair.timestep_window", "?,?")).partition(",")
    return f"{low}–{high}"


def _settings(project: Project, expert: str, meta: dict[str, str]) -> dict:
    """What trained `expert`'s file, as the file recorded it; what it does not record, from the project."""
    try:
        recorded = json.loads(meta.get("wanpair.settings", "{}"))
    except json.JSONDecodeError:
        recorded = {}
    return {**asdict(project.settings(expert)), **(recorded if isinstance(recorded, dict) else {})}


def front_matter(project: Project, gallery: list[Sample]) -> str:
    from huggingface_hub import ModelCardData

    task, m = project.task, project.metadata
    pipeline = "image-to-video" if task.conditioned else "text-to-video"
    tags = list(dict.fromkeys(["lora", pipeline, f"wan{task.version}", "diffusers", "wanpair", *m.tags]))
    data = ModelCardData(
        base_model=BASE_REPOS[task.name], base_model_relation="adapter", library_name="diffusers",
        pipeline_tag=pipeline, tags=tags, license=m.license or None,
        instance_prompt=", ".join(m.trigger_words) or None,
        widget=[{"text": s.prompt, "output": {"url": s.path}} for s in gallery] or None)
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(project: Project, repo: str, loras: dict[str, dict[str, str]], gallery: list[Sample],
               workflows: list[str]) -> str:
    """The card's Markdown, front matter first. `loras`: each expert's file metadata (its safetensors header's),
    `gallery`: the samples to show, `workflows`: ComfyUI workflow files in the repository."""
    task, m = project.task, project.metadata
    files = {e: project.lora_path(e).name for e in loras}
    title = m.title or project.name
    what = (f"A LoRA pair for **{task.title}**: Wan {task.version} runs two experts one after the other, the "
            f"high-noise expert on the first, noisiest steps (timesteps {task.boundary}–1000: layout and motion) "
            f"and the low-noise expert on the rest (0–{task.boundary}: detail), so a LoRA for it is two files, one "
            "per expert." if task.paired else
            f"A LoRA for **{task.title}**: one model for every timestep, one file.")
    parts = [front_matter(project, gallery), f"# {title}\n", *([m.description.strip() + "\n"] if m.description else []),
             *(["<Gallery />\n"] if gallery else []), what + "\n",
             _which_file(project, loras, files), _trigger_words(project), _training(project, loras),
             _comfyui(project, files, workflows), _diffusers(project, repo, files)]
    if gallery:
        parts.append("## Samples\n\n" + "\n".join(_embed(s) for s in gallery) + "\n")
    meta = next(iter(loras.values()))
    parts.append(f"---\n\nTrained with wanpair {meta.get('wanpair.version', '')} on {meta.get('modelspec.date', '?')[:10]}"
                 + (f" by {project.author}" if project.author else "") + ".\n")
    return "\n".join(parts)


def _base_files(task: Task, expert: str) -> str:
    """The base file by the recipe's name, and its fp8 twin where Comfy-Org publishes one (not for the 1.3B)."""
    fp8 = "" if task.size_word == "1.3B" else f" (or `{task.dit_file(expert, 'fp8_scaled')}`)"
    return f"`{task.dit_file(expert)}`{fp8}"


def _which_file(project: Project, loras: dict[str, dict[str, str]], files: dict[str, str]) -> str:
    task = project.task
    if not task.paired:
        (expert, meta), = loras.items()
        return (f"## The file\n\n| File | Load it on | Timesteps |\n|---|---|---|\n| [`{files[expert]}`]({files[expert]}) "
                f"| {_base_files(task, expert)} | {_window(meta)} |\n")
    rows = []
    for expert, meta in loras.items():
        recorded = meta.get("wanpair.expert", expert)
        rows.append(f"| [`{files[expert]}`]({files[expert]}) | the **{expert_name(recorded)}** expert: "
                    f"{_base_files(task, recorded)} | `{DIFFUSERS_COMPONENT[recorded]}` | {_window(meta)} |")
    return ("## Which file goes on which expert\n\n"
            "| File | Load it on | diffusers component | Timesteps |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Each LoRA belongs on its own expert: the HighNoise file on the high-noise model, the LowNoise file on the "
            "low-noise model. Swapped, or one file on both, the pair does nothing useful. Both experts also need the "
            "Wan 2.1 VAE (`wan_2.1_vae.safetensors`) and the umT5-XXL text encoder.\n")


def _trigger_words(project: Project) -> str:
    words = project.metadata.trigger_words
    if not words:
        return "## Trigger words\n\nNone recorded: prompt as the training captions did.\n"
    return ("## Trigger words\n\n" + ", ".join(f"`{w}`" for w in words)
            + " — the words the training captions use for the subject; put them in your prompt.\n")


def _number(value) -> str:
    """3e-4, "0.0003" -> "0.0003"; 16.0 -> "16"."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _training(project: Project, loras: dict[str, dict[str, str]]) -> str:
    experts = list(loras)
    settings = {e: _settings(project, e, loras[e]) for e in experts}
    head = "| | " + " | ".join(expert_name(e) for e in experts) + " |\n|---|" + "---|" * len(experts) + "\n"

    def row(name: str, value) -> str:
        return f"| {name} | " + " | ".join(value(e) for e in experts) + " |"

    def validation(e: str) -> str:
        meta = loras[e]
        if "wanpair.validation_loss" not in meta:
            return "—"
        kind = meta.get("wanpair.validation_kind", "")
        return (f"{float(meta['wanpair.validation_loss']):.4f} at step {meta.get('wanpair.validation_step', '?')}"
                + (f" ({kind})" if kind else ""))

    rows = [row("LoRA rank / alpha", lambda e: f"{loras[e].get('ss_network_dim', settings[e]['rank'])} / "
                                                 f"{_number(loras[e].get('ss_network_alpha', settings[e]['alpha']))}"),
            row("learning rate", lambda e: _number(loras[e].get("ss_learning_rate", settings[e]["learning_rate"]))),
            row("steps (epochs)", lambda e: f"{loras[e].get('ss_steps', '?')} ({loras[e].get('ss_epoch', '?')})"),
            row("validation loss", validation),
            row("trained on", lambda e: f"`{loras[e].get('wanpair.base_model', project.task.dit_file(e))}`")]
    s = settings[experts[0]]
    shared = [f"optimizer {s['optimizer']}" + (f" ({', '.join(s['optimizer_args'])})" if s["optimizer_args"] else "")
              + f", weight decay {_number(s['weight_decay'])}",
              f"learning-rate schedule {s['lr_scheduler']}" + (f" (power {_number(s['lr_scheduler_power'])})"
                                                               if s["lr_scheduler"] == "polynomial" else ""),
              f"mixed precision {s['mixed_precision']}" + (", fp8 base weights" if s.get("fp8_base") else ""),
              f"timestep sampling {s['timestep_sampling']}" + (f" (shift {_number(s['discrete_flow_shift'])})"
                                                               if s["timestep_sampling"] == "shift" else ""),
              f"{loras[experts[0]].get('ss_num_train_images', '?')} training items, seed {s['seed']}"
              + (f", gradient accumulation {s['gradient_accumulation_steps']}" if s["gradient_accumulation_steps"] > 1
                 else "")]
    return ("## Training\n\n" + head + "\n".join(rows) + "\n\n"
            + ("Shared by both experts: " if project.task.paired else "Also: ") + "; ".join(shared) + ".\n")


def _comfyui(project: Project, files: dict[str, str], workflows: list[str]) -> str:
    task = project.task
    text = "## ComfyUI\n\nPut the LoRA file" + ("s" if len(files) > 1 else "") + " in `ComfyUI/models/loras/`. "
    if task.paired:
        text += ("In a Wan 2.2 workflow (ComfyUI's own template has the two model loaders and two KSamplerAdvanced "
                 "nodes), add a **LoraLoaderModelOnly** node after each **Load Diffusion Model** (UNETLoader):\n\n"
                 f"- `{task.dit_file('high')}` → LoraLoaderModelOnly `{files['high']}` → the sampler of the first "
                 "steps\n"
                 f"- `{task.dit_file('low')}` → LoraLoaderModelOnly `{files['low']}` → the sampler of the last steps\n\n"
                 "Strength 1.0 is what was trained; users of rank-16 pairs often prefer 0.5–0.8.\n")
    else:
        text += (f"Add a **LoraLoaderModelOnly** node with `{files['full']}` after the **Load Diffusion Model** "
                 f"(UNETLoader) of `{task.dit_file('full')}`.\n")
    if workflows:
        text += ("\nOr open " + ", ".join(f"[`{w}`]({w})" for w in workflows)
                 + " in ComfyUI (drag it onto the canvas): the workflow with "
                 + ("each LoRA on its expert" if task.paired else "the LoRA") + " already in place.\n")
    return text


def _diffusers(project: Project, repo: str, files: dict[str, str]) -> str:
    task = project.task
    pipeline = "WanImageToVideoPipeline" if task.conditioned else "WanPipeline"
    imports = f"from diffusers import {pipeline}\nfrom diffusers.utils import export_to_video" + (
        ", load_image" if task.conditioned else "")
    prompt = ", ".join(project.metadata.trigger_words) or "your prompt"
    lines = ["import torch", imports, "",
             f'pipe = {pipeline}.from_pretrained("{BASE_REPOS[task.name]}-Diffusers", torch_dtype=torch.bfloat16)',
             'pipe.to("cuda")']
    if task.paired:
        lines += ["# transformer = the high-noise expert, transformer_2 = the low-noise expert",
                  f'pipe.load_lora_weights("{repo}", weight_name="{files["high"]}", adapter_name="high_noise")',
                  f'pipe.load_lora_weights("{repo}", weight_name="{files["low"]}", adapter_name="low_noise",',
                  "                       load_into_transformer_2=True)"]
        guidance = f"guidance_scale={task.guidance_high}, guidance_scale_2={task.guidance_low}"
    else:
        lines.append(f'pipe.load_lora_weights("{repo}", weight_name="{files["full"]}")')
        guidance = f"guidance_scale={task.guidance_high}"
    image = 'image=load_image("first_frame.png"), ' if task.conditioned else ""
    lines += [f'frames = pipe({image}prompt="{prompt} ...", num_frames=81, {guidance}).frames[0]',
              'export_to_video(frames, "output.mp4", fps=16)']
    return ("## diffusers\n\n" + ("Each file loads into its own expert:\n\n" if task.paired else "")
            + "```python\n" + "\n".join(lines) + "\n```\n")


def _embed(sample: Sample) -> str:
    """A sample shown in the card, its prompt below it (Markdown's own characters in the prompt escaped)."""
    prompt = "".join(f"\\{c}" if c in "\\`*_[]<>" else c for c in sample.prompt)
    if sample.path.endswith(".mp4"):
        return f'<video src="{sample.path}" controls muted loop></video>\n\n*{prompt}*\n'
    return f"![sample]({sample.path})\n\n*{prompt}*\n"
