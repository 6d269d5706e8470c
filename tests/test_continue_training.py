"""Continuing training from an existing LoRA (wanpair's own, Musubi-Tuner's or ai-toolkit's layout)."""

from __future__ import annotations

import pytest
import torch

from conftest import set_train
from wanpair.errors import WanpairError
from wanpair.export.formats import LoraWeights, read_lora, write_lora
from wanpair.models import load_dit
from wanpair.project import TrainSettings, load_project
from wanpair.sample import lora_delta
from wanpair.train.lora import load_initial_lora
from wanpair.train.model_setup import prepare_expert
from wanpair.train.recipe import LoraPairRecipe

HIGH = "WAN2.2-HighNoise_demo_shapes_v1.safetensors"


def _out(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([930.0]),
                     encoder_hidden_states=torch.randn(1, 512, 32, generator=g), return_dict=False)[0]


@pytest.mark.parametrize("fmt", ["musubi", "comfy"])
def test_initial_lora_reproduces_the_files_effect_whatever_its_alpha(trained, tmp_path, fmt):
    base = trained / "models" / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
    src = read_lora(trained / "output" / HIGH)
    # the same update stored with alpha 4 (scale 4/16): up weights four times larger
    other = LoraWeights({m: (d.float(), u.float() * 4, 4.0) for m, (d, u, _) in src.modules.items()}, src.metadata)
    path = write_lora(other, tmp_path / "init.safetensors", fmt)
    reference = load_dit(base, dtype=torch.float32, delta=lora_delta(src, 1.0))
    model = load_dit(base, dtype=torch.float32)
    settings = TrainSettings(fp8_base=False, mixed_precision="no", gradient_checkpointing=False)
    prepare_expert(model, settings, torch.float32)
    assert load_initial_lora(model, read_lora(path), settings.rank, settings.alpha) == 20
    # peft's side layers vs the merged weights, fp32 on outputs ~1: rounding only
    assert torch.allclose(_out(model), _out(reference), rtol=0, atol=1e-4)


def test_train_continues_from_init_lora_and_refuses_the_other_experts(trained, demo, tmp_path):
    low_lora = trained / "output" / "WAN2.2-LowNoise_demo_shapes_v1.safetensors"
    set_train(demo / "wanpair.toml", epochs=1, learning_rate=1e-9, lr_scheduler="constant")
    with open(demo / "wanpair.toml", "a") as f:
        f.write(f'[experts.high]\ninit_lora = "{trained / "output" / HIGH}"\n')
    project, _ = load_project(demo / "wanpair.toml")
    (result,) = LoraPairRecipe(project, overwrite=True).run(("high",))
    start, end = read_lora(trained / "output" / HIGH), read_lora(result.lora)
    for m in start.modules:  # a vanishing learning rate: the run ends where it started
        assert torch.allclose(start.delta(m), end.delta(m), atol=1e-3)
    text = (demo / "wanpair.toml").read_text().replace(str(trained / "output" / HIGH), str(low_lora))
    (demo / "wanpair.toml").write_text(text)
    project, _ = load_project(demo / "wanpair.toml")
    with pytest.raises(WanpairError, match="trained on the low-noise expert"):
        LoraPairRecipe(project, overwrite=True).run(("high",))
