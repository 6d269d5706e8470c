"""Shared fixtures: the demo's tiny models and dataset, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wanpair.demo import make_demo


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
