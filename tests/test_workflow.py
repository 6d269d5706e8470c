"""The ComfyUI workflow of a project: a well-formed graph of ComfyUI's own nodes, each LoRA on its own expert,
the steps split where wanpair's sampler splits them; written by `wanpair export --workflow` and by training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanpair.cli import main
from wanpair.export.workflow import PROMPT_PLACEHOLDER, boundary_step, build_workflow, workflow_path
from wanpair.models.tasks import I2V, T2V, T2V_1_3B, T2V_14B, Task
from wanpair.project import load_project
from wanpair.sample import WAN_NEGATIVE_PROMPT, make_pipeline

# What ComfyUI declares for each node the workflow uses, written from its source (Comfy-Org/ComfyUI a125cd8:
# nodes.py, comfy_extras/nodes_model_advanced.py, nodes_hunyuan.py, nodes_wan.py, nodes_video.py): the
# connectable inputs with their types, the output types, and how many widget values a saved workflow holds
# (its widget inputs in declared order, plus the seed's `control_after_generate` and LoadImage's upload button).
COMFYUI = {
    "UNETLoader": ({}, ["MODEL"], 2),  # unet_name, weight_dtype
    "LoraLoaderModelOnly": ({"model": "MODEL"}, ["MODEL"], 2),  # lora_name, strength_model
    "ModelSamplingSD3": ({"model": "MODEL"}, ["MODEL"], 1),  # shift
    "CLIPLoader": ({}, ["CLIP"], 3),  # clip_name, type, device (optional)
    "CLIPTextEncode": ({"clip": "CLIP"}, ["CONDITIONING"], 1),  # text
    "VAELoader": ({}, ["VAE"], 1),  # vae_name
    "EmptyHunyuanLatentVideo": ({}, ["LATENT"], 4),  # width, height, length, batch_size
    "LoadImage": ({}, ["IMAGE", "MASK"], 2),  # image, upload
    "WanImageToVideo": ({"positive": "CONDITIONING", "negative": "CONDITIONING", "vae": "VAE",
                         "clip_vision_output": "CLIP_VISION_OUTPUT", "start_image": "IMAGE"},
                        ["CONDITIONING", "CONDITIONING", "LATENT"], 4),  # width, height, length, batch_size
    # add_noise, noise_seed, control_after_generate, steps, cfg, sampler_name, scheduler, start_at_step,
    # end_at_step, return_with_leftover_noise
    "KSamplerAdvanced": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                          "latent_image": "LATENT"}, ["LATENT"], 10),
    # seed, control_after_generate, steps, cfg, sampler_name, scheduler, denoise
    "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT"}, ["LATENT"], 7),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"], 0),
    "CreateVideo": ({"images": "IMAGE", "audio": "AUDIO"}, ["VIDEO"], 1),  # fps
    "SaveVideo": ({"video": "VIDEO"}, [], 3),  # filename_prefix, format, codec
    "SaveImage": ({"images": "IMAGE"}, [], 1),  # filename_prefix
}
OPTIONAL = {("WanImageToVideo", "clip_vision_output"), ("CreateVideo", "audio")}


def _project(tmp_path: Path, task: Task = T2V, sample: str = "", prompts: list[str] | None = None):
    """A project file with the recipe's file names (the files need not exist to write a workflow)."""
    files = {key: f"models/{task.dit_file(e)}" for key, e in zip(task.dit_keys, task.experts)}
    files |= {"vae": "models/wan_2.1_vae.safetensors", "t5": "models/models_t5_umt5-xxl-enc-bf16.pth",
              "tokenizer": "models/umt5-xxl-tokenizer"}
    if prompts:
        (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        sample += '\nprompts = "prompts.txt"'
    (tmp_path / "wanpair.toml").write_text(
        f'name = "my_character_v1"\nmodel = "{task.name}"\n[models]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in files.items())
        + f'[dataset]\nconfig = "dataset/dataset.toml"\n[sample]\n{sample}\n', encoding="utf-8")
    project, _ = load_project(tmp_path / "wanpair.toml")
    return project


def _by_type(workflow: dict, kind: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def _source(workflow: dict, node: dict, input_name: str) -> tuple[dict, int]:
    """The node (and its output slot) that feeds `input_name` of `node`."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    _, origin, slot, _, _, _ = next(link for link in workflow["links"] if link[0] == link_id)
    return next(n for n in workflow["nodes"] if n["id"] == origin), slot


def _chain(workflow: dict, sampler: dict) -> tuple[str, str]:
    """(the LoRA, the diffusion model) behind a sampler's model input."""
    sampling, _ = _source(workflow, sampler, "model")
    lora, _ = _source(workflow, sampling, "model")
    unet, _ = _source(workflow, lora, "model")
    assert (sampling["type"], lora["type"], unet["type"]) == ("ModelSamplingSD3", "LoraLoaderModelOnly", "UNETLoader")
    return lora["widgets_values"][0], unet["widgets_values"][0]


@pytest.mark.parametrize("task, sample", [(T2V, ""), (T2V, "frames = 81"), (I2V, ""), (T2V_14B, "frames = 5"),
                                          (T2V_1_3B, "")])
def test_the_graph_is_well_formed_with_the_nodes_comfyui_declares(tmp_path, task, sample):
    workflow = json.loads(json.dumps(build_workflow(_project(tmp_path, task, sample))))  # as the file holds it
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"]) == len(workflow["links"])
    for node in nodes.values():
        sockets, outputs, widgets = COMFYUI[node["type"]]
        assert {i["name"]: i["type"] for i in node["inputs"]} == sockets, node["type"]
        assert [o["type"] for o in node["outputs"]] == outputs, node["type"]
        assert len(node["widgets_values"]) == widgets, node["type"]
        for i in node["inputs"]:  # every input that ComfyUI requires is connected
            assert i["link"] is not None or (node["type"], i["name"]) in OPTIONAL, (node["type"], i["name"])
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        out, inp = nodes[origin]["outputs"][slot], nodes[target]["inputs"][target_slot]
        assert out["type"] == inp["type"] == kind
        assert link_id in out["links"] and inp["link"] == link_id
    assert sum(len(o["links"]) for n in nodes.values() for o in n["outputs"]) == len(workflow["links"])
    assert not _by_type(workflow, "CLIPVisionLoader")  # ComfyUI's Wan 2.2 I2V template uses none either
    (clip,) = _by_type(workflow, "CLIPLoader")
    assert clip["widgets_values"][1] == "wan"


def test_each_lora_goes_on_its_own_expert_and_the_high_one_starts_from_noise(tmp_path):
    project = _project(tmp_path)
    workflow = build_workflow(project)
    high, low = _by_type(workflow, "KSamplerAdvanced")
    assert high["widgets_values"][0] == "enable" and high["widgets_values"][9] == "enable"  # add noise; leave some
    assert low["widgets_values"][0] == "disable" and low["widgets_values"][9] == "disable"
    assert _chain(workflow, high) == ("WAN2.2-HighNoise_my_character_v1.safetensors",
                                      "wan2.2_t2v_high_noise_14B_fp16.safetensors")
    assert _chain(workflow, low) == ("WAN2.2-LowNoise_my_character_v1.safetensors",
                                     "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    assert _source(workflow, low, "latent_image")[0] is high  # the low expert finishes what the high one began
    assert _source(workflow, high, "latent_image")[0]["type"] == "EmptyHunyuanLatentVideo"
    # wanpair sample's settings for this model: shift 12, guidance 4 / 3
    assert {n["widgets_values"][0] for n in _by_type(workflow, "ModelSamplingSD3")} == {T2V.sample_shift}
    assert (high["widgets_values"][4], low["widgets_values"][4]) == (T2V.guidance_high, T2V.guidance_low)
    (save,) = _by_type(workflow, "SaveImage")  # [sample] frames = 1: a picture
    assert _source(workflow, save, "images")[0]["type"] == "VAEDecode"


@pytest.mark.parametrize("steps", [1, 2, 8, 20, 40, 50])
@pytest.mark.parametrize("task, shift", [(T2V, T2V.sample_shift), (I2V, I2V.sample_shift), (T2V, 5.0), (I2V, 1.0)])
def test_the_steps_split_where_wanpairs_sampler_hands_over(steps, task, shift):
    pipe = make_pipeline(None, {"high": None, "low": None}, shift, task)  # what `wanpair sample` runs
    pipe.scheduler.set_timesteps(steps)
    on_high = sum(int(t) >= pipe.config.boundary_ratio * 1000 for t in pipe.scheduler.timesteps)
    assert boundary_step(steps, shift, task.boundary) == on_high


def test_the_workflow_uses_the_projects_sample_settings_and_first_prompt(tmp_path):
    project = _project(tmp_path, sample="steps = 20\nwidth = 640\nheight = 368\nframes = 33\nseed = 7",
                       prompts=["", "sks person waves at the camera", "another prompt"])
    workflow = build_workflow(project)
    k = boundary_step(20, T2V.sample_shift, T2V.boundary)
    high, low = _by_type(workflow, "KSamplerAdvanced")
    assert high["widgets_values"][1:4] == [7, "fixed", 20] and high["widgets_values"][7:9] == [0, k]
    assert low["widgets_values"][3] == 20 and low["widgets_values"][7:9] == [k, 10000]
    assert _by_type(workflow, "EmptyHunyuanLatentVideo")[0]["widgets_values"] == [640, 368, 33, 1]
    positive, _ = _source(workflow, high, "positive")
    negative, _ = _source(workflow, high, "negative")
    assert positive["widgets_values"] == ["sks person waves at the camera"]
    assert negative["widgets_values"] == [WAN_NEGATIVE_PROMPT]
    assert _by_type(workflow, "CreateVideo")[0]["widgets_values"] == [16]  # a clip: wanpair's 16 fps
    assert _by_type(workflow, "SaveVideo")
    (tmp_path / "plain").mkdir()
    without = build_workflow(_project(tmp_path / "plain"))  # no prompts file
    assert _by_type(without, "CLIPTextEncode")[0]["widgets_values"] == [PROMPT_PLACEHOLDER]


def test_image_to_video_starts_from_a_loaded_first_frame(tmp_path):
    workflow = build_workflow(_project(tmp_path, I2V))
    assert not _by_type(workflow, "EmptyHunyuanLatentVideo")
    (i2v,) = _by_type(workflow, "WanImageToVideo")
    assert _source(workflow, i2v, "start_image")[0]["type"] == "LoadImage"
    assert i2v["widgets_values"][2] == 81  # an I2V sample is a clip, as in `wanpair sample`
    high, low = _by_type(workflow, "KSamplerAdvanced")
    assert _source(workflow, high, "latent_image") == (i2v, 2)
    for sampler in (high, low):  # both experts see the first frame through the conditioning
        assert _source(workflow, sampler, "positive") == (i2v, 0)
        assert _source(workflow, sampler, "negative") == (i2v, 1)
    assert _chain(workflow, high)[1] == "wan2.2_i2v_high_noise_14B_fp16.safetensors"
    k = boundary_step(I2V.sample_steps, I2V.sample_shift, I2V.boundary)
    assert high["widgets_values"][7:9] == [0, k] and low["widgets_values"][7] == k
    assert _by_type(workflow, "SaveVideo")


@pytest.mark.parametrize("task", [T2V_14B, T2V_1_3B])
def test_wan21_is_one_model_with_its_one_lora(tmp_path, task):
    workflow = build_workflow(_project(tmp_path, task))
    assert len(_by_type(workflow, "UNETLoader")) == len(_by_type(workflow, "LoraLoaderModelOnly")) == 1
    assert not _by_type(workflow, "KSamplerAdvanced")
    (sampler,) = _by_type(workflow, "KSampler")
    assert _chain(workflow, sampler) == (task.lora_file("full", "my_character_v1"), task.dit_file("full"))
    assert sampler["widgets_values"][3] == task.guidance_high


def test_cli_export_workflow_writes_it_beside_the_loras(tmp_path, capsys):
    project = _project(tmp_path)
    assert main(["export", str(project.path), "--workflow"]) == 0
    path = workflow_path(project)
    assert path == tmp_path / "output" / "my_character_v1_comfyui_workflow.json"
    assert json.loads(path.read_text(encoding="utf-8")) == build_workflow(project)
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "not trained yet" in out
    assert main(["export", str(project.path), "--workflow"]) == 0  # its own file: written anew
    other = tmp_path / "mine.json"
    other.write_text("{}")
    assert main(["export", str(project.path), "--workflow", "--out", str(other)]) == 2  # a file of the user's
    assert main(["export", str(project.path), "--workflow", "--out", str(other), "--overwrite"]) == 0
    assert json.loads(other.read_text(encoding="utf-8"))["nodes"]
    assert main(["export", str(project.path)]) == 2  # converting a LoRA needs --format
    assert "--format is required" in capsys.readouterr().err


def test_a_trained_run_writes_the_workflow_of_its_pair(trained):
    path = trained / "output" / "demo_shapes_v1_comfyui_workflow.json"
    workflow = json.loads(path.read_text(encoding="utf-8"))
    high, low = _by_type(workflow, "KSamplerAdvanced")
    for sampler, expert in ((high, "high"), (low, "low")):
        lora, unet = _chain(workflow, sampler)
        assert (trained / "output" / lora).is_file()
        assert (trained / "models" / unet).is_file() and f"_{expert}_noise_" in unet
