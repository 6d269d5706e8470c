"""Shared fixtures: the demo's tiny models and dataset, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wanpair.demo import make_demo


# How long a test may wait for something it is sure will happen (a page to show a report, a process to reach a
# state): each wait ends as soon as its condition holds, so this only bounds a hang. Not a guess at the machine's
# speed: on two busy cores a check report took longer than the 20 s a wait once allowed.
PATIENCE_S = 600.0

@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A pristine demo tree (dataset, tiny models in the real formats, project file). Do not modify."""
    root = tmp_path_factory.mktemp("demo")
    make_demo(root)
    return root


@pytest.fixture
def demo(demo_root, tmp_path) -> Path:
    """A private copy of the demo tree that a test may change."""
    dst = tmp_path / "demo"
    shutil.copytree(demo_root, dst)
    return dst


def set_train(project: Path, **settings) -> None:
    """Replace the [train] table of a project file."""
    text = project.read_text()
    head = text.split("[train]")[0]
    body = "".join(f"{k} = {v!r}\n".replace("'", '"').replace("True", "true").replace("False", "false")
                   for k, v in settings.items())
    project.write_text(head + "[train]\n" + body)


@pytest.fixture(scope="session")
def trained(demo_root, tmp_path_factory) -> Path:
    """A demo tree with a trained LoRA pair (one epoch). Do not modify."""
    from wanpair.project import load_project
    from wanpair.train.recipe import LoraPairRecipe

    root = tmp_path_factory.mktemp("trained") / "demo"
    shutil.copytree(demo_root, root)
    set_train(root / "wanpair.toml", learning_rate=5e-3, epochs=1, lr_scheduler="constant")
    project, _ = load_project(root / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run()
    return root


@pytest.fixture(scope="session")
def trained_wan21(tmp_path_factory) -> Path:
    """The Wan 2.1 T2V 1.3B demo (one tiny model of the real architecture), its one LoRA trained for an
    epoch. Do not modify."""
    from wanpair.models.tasks import T2V_1_3B
    from wanpair.project import load_project
    from wanpair.train.recipe import LoraPairRecipe

    root = tmp_path_factory.mktemp("wan21") / "demo"
    make_demo(root, T2V_1_3B)
    set_train(root / "wanpair.toml", learning_rate=2e-3, epochs=1, validate_every_n_steps=0)
    project, _ = load_project(root / "wanpair.toml")
    LoraPairRecipe(project, overwrite=True).run()
    return root
