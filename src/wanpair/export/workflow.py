"""The ComfyUI workflow of a project's LoRAs: a graph to drag onto ComfyUI's canvas that samples the way
`wanpair sample` does, each LoRA on its own expert.

Wired as ComfyUI's own Wan 2.2 templates are (comfyui-workflow-templates-json 0.1.123,
`templates/video_wan2_2_14B_t2v.json` and `video_wan2_2_14B_i2v.json`), as a plain graph of the classic
nodes, without the templates' subgraph, switch and primitive nodes, so that older ComfyUI versions load it too:

    UNETLoader (high) -> LoraLoaderModelOnly (HighNoise LoRA) -> ModelSamplingSD3 -> KSamplerAdvanced
        add_noise enable, steps 0..k, return_with_leftover_noise enable      |  its latent
    UNETLoader (low)  -> LoraLoaderModelOnly (LowNoise LoRA)  -> ModelSamplingSD3 -> KSamplerAdvanced
        add_noise disable, steps k..end
    CLIPLoader (wan) -> CLIPTextEncode (positive, negative); VAELoader; EmptyHunyuanLatentVideo (text to
    video) or LoadImage -> WanImageToVideo (image to video: its conditioning and latent); VAEDecode ->
    CreateVideo -> SaveVideo (a clip) or SaveImage (a picture).

A Wan 2.1 model is one UNETLoader, one LoraLoaderModelOnly and one KSampler. The I2V template leaves
WanImageToVideo's `clip_vision_output` unconnected (the Wan 2.2 I2V experts take no CLIP image embedding), and
so does this graph. k is where wanpair's sampler hands over (`boundary_step`). Size, length, steps and seed
are the project's `[sample]`; shift, guidance and the negative prompt are `wanpair sample`'s for the model
(`SampleSettings.for_task`).

Node types, input names and slot types, and the order of widget values are read from ComfyUI's source at
Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832 (2025-10-11): nodes.py, comfy_extras/
nodes_model_advanced.py, nodes_hunyuan.py, nodes_wan.py, nodes_video.py. A seed input declared with
`control_after_generate` has a second widget value in a saved workflow ("fixed": the same seed every time),
and LoadImage's upload button one more ("image"), as the templates show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..models.tasks import Task, expert_name
from ..project import Project, read_prompts
from ..sample import SampleSettings

# ComfyUI's CLIPLoader reads umT5 in transformers' key layout only (comfy/sd.py `detect_te_model` looks for
# `encoder.block.23...`), not Wan's `.pth` that wanpair trains with; the same weights repackaged for it:
# Comfy-Org/Wan_2.1_ComfyUI_repackaged split_files/text_encoders/umt5_xxl_fp16.safetensors.
TEXT_ENCODER_FILE = "umt5_xxl_fp16.safetensors"
FIRST_FRAME = "first_frame.png"  # image to video: the LoadImage node's file, to be picked in ComfyUI
# ComfyUI's UniPC (bh2, the variant diffusers' UniPCMultistepScheduler defaults to) and its "simple" schedule
# of the shifted flow sigmas: the nearest of ComfyUI's samplers to wanpair's (Wan's UniPC flow solver).
SAMPLER, SCHEDULER = "uni_pc_bh2", "simple"
PROMPT_PLACEHOLDER = ("Write your prompt here, starting with the trigger words your captions start with "
                      "(set [sample] prompts in the project to have its first prompt here).")

# Per node type: its connectable inputs (name, type; optional ones marked), its outputs (name, type), and a
# size on the canvas. Widget inputs (strings, numbers, choices) are not slots: their values are widgets_values.
_NODES: dict[str, tuple[tuple, tuple, tuple[int, int]]] = {
    "UNETLoader": ((), (("MODEL", "MODEL"),), (360, 90)),
    "LoraLoaderModelOnly": ((("model", "MODEL"),), (("MODEL", "MODEL"),), (380, 90)),
    "ModelSamplingSD3": ((("model", "MODEL"),), (("MODEL", "MODEL"),), (260, 60)),
    "CLIPLoader": ((), (("CLIP", "CLIP"),), (360, 110)),
    "CLIPTextEncode": ((("clip", "CLIP"),), (("CONDITIONING", "CONDITIONING"),), (420, 200)),
    "VAELoader": ((), (("VAE", "VAE"),), (360, 60)),
    "EmptyHunyuanLatentVideo": ((), (("LATENT", "LATENT"),), (300, 130)),
    "LoadImage": ((), (("IMAGE", "IMAGE"), ("MASK", "MASK")), (320, 330)),
    "WanImageToVideo": ((("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                         ("clip_vision_output", "CLIP_VISION_OUTPUT", "optional"), ("start_image", "IMAGE", "optional")),
                        (("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")), (300, 210)),
    "KSamplerAdvanced": ((("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")), (("LATENT", "LATENT"),), (330, 340)),
    "KSampler": ((("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")), (("LATENT", "LATENT"),), (330, 270)),
    "VAEDecode": ((("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),), (220, 50)),
    "CreateVideo": ((("images", "IMAGE"), ("audio", "AUDIO", "optional")), (("VIDEO", "VIDEO"),), (260, 80)),
    "SaveVideo": ((("video", "VIDEO"),), (), (420, 420)),
    "SaveImage": ((("images", "IMAGE"),), (), (420, 420)),
}


def boundary_step(steps: int, shift: float, boundary: int) -> int:
    """How many of `steps` denoising steps the high-noise expert takes in `wanpair sample`: the timesteps of
    diffusers' UniPC flow schedule (sigmas linspace(1, 1/1000, steps + 1) without the last, shifted to
    shift*s / (1 + (shift - 1)*s), times 1000 as integers), and WanPipeline's rule that the high-noise expert
    runs while t >= boundary."""
    sigmas = np.linspace(1, 1 / 1000, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return int(((sigmas * 1000).astype(np.int64) >= boundary).sum())


def first_prompt(project: Project) -> str:
    """The first prompt of the project's [sample] prompts file, else a placeholder that says what to write."""
    path = project.sample.prompts
    return next(iter(read_prompts(path) if path and path.is_file() else []), PROMPT_PLACEHOLDER)


def workflow_path(project: Project) -> Path:
    """`<output_dir>/<name>_comfyui_workflow.json`, beside the LoRAs."""
    return project.output_dir / f"{project.name}_comfyui_workflow.json"


class Graph:
    """Nodes and links in ComfyUI's workflow format (what the canvas saves and loads, version 0.4)."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, widgets: list, pos: tuple[int, int], title: str | None = None) -> int:
        inputs, outputs, size = _NODES[kind]
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": i[0], "type": i[1], "link": None} | ({"shape": 7} if len(i) > 2 else {})
                           for i in inputs],
                "outputs": [{"name": name, "type": kind_, "links": [], "slot_index": slot}
                            for slot, (name, kind_) in enumerate(outputs)],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, source: int, slot: int, target: int, input_name: str) -> None:
        """Connect output `slot` of node `source` to the input `input_name` of node `target`."""
        out = self.nodes[source - 1]["outputs"][slot]
        inputs = self.nodes[target - 1]["inputs"]
        index = next(i for i, x in enumerate(inputs) if x["name"] == input_name)
        if inputs[index]["type"] != out["type"]:
            raise ValueError(f"{out['type']} cannot go into {input_name} ({inputs[index]['type']})")
        link_id = len(self.links) + 1
        self.links.append([link_id, source, slot, target, index, out["type"]])
        out["links"].append(link_id)
        inputs[index]["link"] = link_id

    def to_json(self, extra: dict) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": extra, "version": 0.4}


def _expert_model(g: Graph, project: Project, expert: str, strength: float, shift: float, row: int) -> int:
    """UNETLoader -> LoraLoaderModelOnly (this expert's LoRA) -> ModelSamplingSD3; returns the last node."""
    label = expert_name(expert).capitalize() + " expert" if project.task.paired else "Model"
    unet = g.add("UNETLoader", [project.dit_path(expert).name, "default"], (0, row), label)  # the file's dtype
    lora = g.add("LoraLoaderModelOnly", [project.lora_path(expert).name, strength], (400, row),
                 f"LoRA for the {label.lower()}")
    sampling = g.add("ModelSamplingSD3", [shift], (820, row))
    g.link(unet, 0, lora, "model")
    g.link(lora, 0, sampling, "model")
    return sampling


def build_workflow(project: Project) -> dict:
    """The graph as ComfyUI saves it (json.dumps it to a file)."""
    s = SampleSettings.for_project(project, clip=True)
    g = Graph()
    models = {e: _expert_model(g, project, e, getattr(s, f"strength_{e}"), s.shift, 140 * i)
              for i, e in enumerate(project.task.experts)}
    clip = g.add("CLIPLoader", [TEXT_ENCODER_FILE, "wan", "default"], (0, 320))  # "default": ComfyUI's device
    positive = g.add("CLIPTextEncode", [first_prompt(project)], (400, 320), "Positive prompt")
    negative = g.add("CLIPTextEncode", [s.negative_prompt], (400, 560), "Negative prompt")
    vae = g.add("VAELoader", [project.models.vae.name], (0, 470))
    for node in (positive, negative):
        g.link(clip, 0, node, "clip")
    cond, latent = _start(g, project, s, (positive, negative), vae)
    extra = {"model": project.task.name, "steps": s.steps, "shift": s.shift}
    last = _samplers(g, project.task, s, models, cond, latent, extra)
    decode = g.add("VAEDecode", [], (2060, 0))
    g.link(last, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    if s.frames > 1:
        video = g.add("CreateVideo", [s.fps], (2060, 100))
        save = g.add("SaveVideo", [f"video/{project.name}", "auto", "auto"], (2360, 0))  # ComfyUI's format, codec
        g.link(decode, 0, video, "images")
        g.link(video, 0, save, "video")
    else:
        save = g.add("SaveImage", [project.name], (2360, 0))
        g.link(decode, 0, save, "images")
    return g.to_json({"wanpair": extra})


def _start(g: Graph, project: Project, s: SampleSettings, prompts: tuple[int, int], vae: int):
    """The samplers' conditioning ((node, slot) of the positive and the negative) and their starting latent: an
    empty one for text to video; for image to video, both from WanImageToVideo, which puts the first frame into
    the conditioning that both experts see, as ComfyUI's I2V template does."""
    if not project.task.conditioned:
        latent = g.add("EmptyHunyuanLatentVideo", [s.width, s.height, s.frames, 1], (880, 320))
        return ((prompts[0], 0), (prompts[1], 0)), (latent, 0)
    image = g.add("LoadImage", [FIRST_FRAME, "image"], (0, 580), "First frame")
    i2v = g.add("WanImageToVideo", [s.width, s.height, s.frames, 1], (880, 320))
    for name, node in (("positive", prompts[0]), ("negative", prompts[1]), ("vae", vae), ("start_image", image)):
        g.link(node, 0, i2v, name)
    return ((i2v, 0), (i2v, 1)), (i2v, 2)


def _samplers(g: Graph, task: Task, s: SampleSettings, models: dict[str, int], cond, latent, extra: dict) -> int:
    """A pair: the high-noise expert's KSamplerAdvanced for the first k steps, adding the noise and handing its
    half-denoised latent to the low-noise expert's for the rest; one model: a KSampler. Returns the last one."""
    if task.paired:
        k = boundary_step(s.steps, s.shift, task.boundary)
        extra |= {"boundary": task.boundary, "high_noise_steps": k}
        samplers = [g.add("KSamplerAdvanced", ["enable", s.seed, "fixed", s.steps, s.guidance_high, SAMPLER,
                                               SCHEDULER, 0, k, "enable"], (1300, 0),
                          f"High-noise expert: steps 0-{k} (t >= {task.boundary})"),
                    # end_at_step 10000: ComfyUI's default, "to the last step"
                    g.add("KSamplerAdvanced", ["disable", s.seed, "fixed", s.steps, s.guidance_low, SAMPLER,
                                               SCHEDULER, k, 10000, "disable"], (1680, 0),
                          f"Low-noise expert: steps {k}-{s.steps}")]
    else:
        samplers = [g.add("KSampler", [s.seed, "fixed", s.steps, s.guidance_high, SAMPLER, SCHEDULER, 1.0],
                          (1300, 0))]
    for sampler, expert in zip(samplers, task.experts):
        g.link(models[expert], 0, sampler, "model")
        g.link(*cond[0], sampler, "positive")
        g.link(*cond[1], sampler, "negative")
    g.link(*latent, samplers[0], "latent_image")
    if len(samplers) == 2:
        g.link(samplers[0], 0, samplers[1], "latent_image")
    return samplers[-1]


def write_workflow(project: Project, path: Path | None = None) -> Path:
    """Write the project's workflow atomically (default: `workflow_path`); returns where."""
    path = path or workflow_path(project)
    write_text_atomic(path, json.dumps(build_workflow(project), indent=2, ensure_ascii=False) + "\n")
    return path
