"""The Wan 2.2 I2V A14B pair: what is trained is what inference feeds, one command end to end, and the
mistakes of mixing the pairs refused before anything loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import set_train
from wanpair.cli import main
from wanpair.demo import make_demo
from wanpair.errors import WanpairError
from wanpair.models import load_vae
from wanpair.models.tasks import I2V, T2V
from wanpair.project import load_project
from wanpair.train.recipe import LoraPairRecipe


@pytest.fixture(scope="module")
def i2v_demo(tmp_path_factory):
    """The I2V demo (12 clips of 9 frames, tiny 36-channel experts), trained for an epoch. Do not modify."""
    root = tmp_path_factory.mktemp("i2v") / "demo"
    make_demo(root, I2V)
    set_train(root / "wanpair.toml", learning_rate=2e-3, epochs=1, validate_every_n_steps=0)
    project, _ = load_project(root / "wanpair.toml")
    recipe = LoraPairRecipe(project, overwrite=True)
    recipe.run()
    return root, project, recipe


def test_training_conditions_the_experts_exactly_as_the_inference_pipeline_does(i2v_demo):
    """The mask + first-frame latent the trained expert saw for a clip equals what diffusers'
    WanImageToVideoPipeline builds from that clip's first frame (same VAE, fp32): equal up to the float
    rounding of two ways of scaling pixels to [-1, 1]."""
    from diffusers import WanImageToVideoPipeline

    from wanpair.train.data import CachedData

    root, project, recipe = i2v_demo
    data: CachedData = recipe.cached_data()
    latents, _, conds = data.load()
    i = next(k for k, it in enumerate(data.items) if it.image.name == "clip_01")
    assert latents[i].shape == (16, 3, 6, 8) and conds[i].shape == (20, 3, 6, 8)  # 9 frames of 64x48
    vae = load_vae(project.models.vae)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None, image_processor=None,
                                   image_encoder=None, transformer=None, transformer_2=None, boundary_ratio=0.9)
    first = pipe.video_processor.preprocess(Image.open(root / "dataset" / "clip_01" / "000.png"), height=48, width=64)
    with torch.no_grad():
        _, condition = pipe.prepare_latents(first, 1, 16, 48, 64, 9, torch.float32, torch.device("cpu"),
                                            torch.Generator().manual_seed(0))
    assert condition.shape == (1, 20, 3, 6, 8)
    assert torch.equal(conds[i][:4], condition[0, :4])  # the mask: latent frame 0 given, the others not
    assert (conds[i][4:] - condition[0, 4:]).abs().max().item() < 1e-4  # the first frame's latent


def test_the_i2v_pair_trains_and_samples_from_a_first_frame_in_one_command_each(i2v_demo, tmp_path):
    root, project, recipe = i2v_demo
    assert project.task is I2V and [project.experts[e].min_timestep for e in ("high", "low")] == [900, 0]
    entry = load_file(str(recipe.cache_plan.latent_paths[0]))["value"]
    assert entry.shape[0] == 32  # the clip's latent and its first frame's, encoded together
    for expert, window in (("high", "900,1000"), ("low", "0,900")):
        lora = project.lora_path(expert)
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            meta = f.metadata()
        assert meta["wanpair.architecture"] == "wan2.2-i2v-a14b" and meta["modelspec.timestep_range"] == window
    out = tmp_path / "samples"
    assert main(["sample", str(project.path), "--prompt", "a red circle moving left", "--image",
                 str(root / "dataset" / "clip_01" / "000.png"), "--frames", "5", "--steps", "3", "--width", "64",
                 "--height", "48", "--out", str(out)]) == 0
    (clip,) = out.glob("*.mp4")
    import av

    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)


def test_the_pair_follows_from_the_files_and_a_wrong_model_line_names_the_fix(i2v_demo, tmp_path):
    root, _, _ = i2v_demo
    text = (root / "wanpair.toml").read_text()
    project_file = tmp_path / "wanpair.toml"
    project_file.write_text(text.replace('model = "i2v-A14B"\n', "").replace('"models/', f'"{root}/models/')
                            .replace('"dataset/', f'"{root}/dataset/'))
    project, _ = load_project(project_file)
    assert project.task is I2V  # read from the high-noise file's 36 input channels
    project_file.write_text(project_file.read_text().replace("[models]", 'model = "t2v-A14B"\n\n[models]'))
    project, _ = load_project(project_file)
    with pytest.raises(WanpairError, match=r'is a Wan 2.2 I2V A14B \(image to video\) expert .*Set model = "i2v-A14B"'):
        LoraPairRecipe(project).preflight(("high", "low"))


def test_still_images_are_refused_for_i2v_with_the_reason(demo, tmp_path):
    """The T2V demo's images under 36-channel experts: an I2V run with nothing to learn."""
    i2v = tmp_path / "i2v"
    make_demo(i2v, I2V)
    text = (demo / "wanpair.toml").read_text()
    for expert in ("high", "low"):
        text = text.replace(f"models/wan2.2_t2v_{expert}_noise_tiny_fp16.safetensors",
                            str(i2v / "models" / f"wan2.2_i2v_{expert}_noise_tiny_fp16.safetensors"))
    (demo / "wanpair.toml").write_text(text.replace('model = "t2v-A14B"', 'model = "i2v-A14B"'))
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match="a still image is its own first frame.*Use video clips"):
        LoraPairRecipe(project).preflight(("high", "low"))


def test_a_lora_of_the_other_pair_is_refused_for_sampling_and_merging(i2v_demo, trained, tmp_path):
    root, i2v_project, _ = i2v_demo
    t2v_lora = trained / "output" / "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
    with pytest.raises(WanpairError, match="trained on Wan 2.2 T2V A14B .* but .* belongs to Wan 2.2 I2V"):
        main_or_raise(["sample", str(i2v_project.path), "--prompt", "x", "--image",
                       str(root / "dataset" / "clip_01" / "000.png"), "--lora-high", str(t2v_lora)])
    i2v_lora = i2v_project.lora_path("high")
    with pytest.raises(WanpairError, match="trained on Wan 2.2 I2V A14B .* but .* belongs to Wan 2.2 T2V"):
        main_or_raise(["merge", "--base", str(trained / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"),
                       "--lora", str(i2v_lora), "--out", str(tmp_path / "merged.safetensors")])
    assert not (tmp_path / "merged.safetensors").exists()


def test_sampling_an_i2v_project_needs_a_first_frame_and_t2v_refuses_one(i2v_demo, trained):
    root, i2v_project, _ = i2v_demo
    with pytest.raises(WanpairError, match="pass --image FRAME.png"):
        main_or_raise(["sample", str(i2v_project.path), "--prompt", "x"])
    with pytest.raises(WanpairError, match="--image is for the image-to-video pair"):
        main_or_raise(["sample", str(trained / "wanpair.toml"), "--prompt", "x", "--image",
                       str(root / "dataset" / "clip_01" / "000.png")])


def test_sampling_defaults_are_each_pairs_own():
    from wanpair.sample import SampleSettings

    t2v, i2v = SampleSettings.for_task(T2V), SampleSettings.for_task(I2V, steps=20)
    assert (t2v.shift, t2v.guidance_high, t2v.guidance_low, t2v.frames) == (12.0, 4.0, 3.0, 1)
    assert (i2v.shift, i2v.guidance_high, i2v.guidance_low, i2v.frames, i2v.steps) == (5.0, 3.5, 3.5, 81, 20)


def test_other_wan_models_are_refused_naming_what_they_are(tmp_path):
    from diffusers import WanTransformer3DModel

    from wanpair.demo import TINY_DIT
    from wanpair.models.dit import inspect_dit, to_original_name
    from wanpair.models.tasks import check_task
    from safetensors.torch import save_file

    def saved(name, **config):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**TINY_DIT, **config})
        save_file({to_original_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / name))
        return inspect_dit(tmp_path / name)

    wan21_i2v = saved("wan2.1_i2v.safetensors", in_channels=36, image_dim=32, added_kv_proj_dim=128)
    with pytest.raises(WanpairError, match="Wan 2.1 image-to-video model"):
        check_task(wan21_i2v.config, wan21_i2v.path, I2V, "high_noise")
    ti2v = saved("ti2v.safetensors", in_channels=48, out_channels=48)
    with pytest.raises(WanpairError, match="TI2V-5B"):
        check_task(ti2v.config, ti2v.path, T2V, "high_noise")
    # Wan 2.1's single T2V models in a pair's slot: the 14B has the experts' layers and is told apart by its
    # file name, the 1.3B by its shapes; each is named with the project line that trains it
    wan21 = saved("wan2.1_t2v_14B_fp16.safetensors")
    with pytest.raises(WanpairError, match='named as a Wan 2.1 model: one model for all timesteps.*model = "t2v-14B"'):
        check_task(wan21.config, wan21.path, T2V, "high_noise")
    shapes_1_3b = {**wan21.config, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    with pytest.raises(WanpairError, match=r'shapes of a 1.3B model \(Wan 2.1 T2V 1.3B\).*model = "t2v-1.3B"'):
        check_task(shapes_1_3b, tmp_path / "my_model.safetensors", T2V, "high_noise")


def main_or_raise(argv):
    """`wanpair ARGV`, with its error raised instead of printed (so the test reads the message)."""
    import wanpair.cli

    args = wanpair.cli.build_parser().parse_args(argv)
    return args.func(args)
