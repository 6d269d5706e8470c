"""Do wanpair's LoRA files load, strictly, in the reference trainer's own network code for their task?

    PYTHONPATH=src python bench/musubi_lora_check.py MUSUBI_DIR OFFICIAL_DIR [--model t2v-A14B|i2v-A14B|t2v-14B|t2v-1.3B]

MUSUBI_DIR: Musubi-Tuner at the recipe's commit d0a1930 (`git archive`); OFFICIAL_DIR: the official
`wan/modules` of the model's own code, Wan2.2 for the pairs and Wan2.1 for t2v-14B / t2v-1.3B (see
bench/parity_official.py). Neither is a dependency we can declare, so this is
run by hand. It writes the built-in demo for the model (tiny experts of the real architecture), trains
it one epoch with `wanpair train`, builds the official `WanModel` of the same shapes (Musubi's networks
find their targets by the official block class, `WanAttentionBlock`), puts Musubi's `networks.lora_wan`
network on it with the LoRA's rank, and loads each LoRA file into that network with `strict=True`:
every key must have its place and every place its key.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from parity_official import official_model_module  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("musubi_dir", type=Path)
    ap.add_argument("official_dir", type=Path)
    ap.add_argument("--model", default="i2v-A14B", choices=("t2v-A14B", "i2v-A14B", "t2v-14B", "t2v-1.3B"))
    args = ap.parse_args()
    sys.path.insert(0, str(args.musubi_dir / "src"))
    from musubi_tuner.networks import lora_wan

    from wanpair.demo import TINY_DIT, make_demo
    from wanpair.models.tasks import TASKS
    from wanpair.project import load_project
    from wanpair.train.recipe import LoraPairRecipe

    task = TASKS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        project_file = make_demo(Path(tmp), task)
        text = project_file.read_text().replace("epochs = 8", "epochs = 1")
        project_file.write_text(text)
        project, _ = load_project(project_file)
        results = LoraPairRecipe(project, overwrite=True).run()
        official = official_model_module(args.official_dir)
        c = TINY_DIT
        for r in results:
            model = official.WanModel(model_type=args.model[:3], in_dim=task.in_channels,
                                      dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                                      freq_dim=c["freq_dim"], text_dim=c["text_dim"], out_dim=16,
                                      num_heads=c["num_attention_heads"], num_layers=c["num_layers"])
            network = lora_wan.create_arch_network(1.0, project.train.rank, project.train.alpha, None, [], model)
            network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
            weights = load_file(str(r.lora))
            result = network.load_state_dict(weights, strict=True)
            print(f"{r.lora.name}: {len(weights)} tensors loaded strictly into Musubi's lora_wan network on the "
                  f"official {args.model} WanModel ({len(network.unet_loras)} modules): {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
