"""The user guide (docs/, built by mkdocs.yml) covers what a user can set and run, and `--help` points into it.

Nothing here builds the site (CI's `mkdocs build --strict` checks links and anchors): these tests read the
Markdown and what docs/gen_reference.py writes from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from wanpair.cli import build_parser
from wanpair.project import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_reference = _load_generator()


def _guide() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices


def _pages_named(text: str) -> list[str]:
    return re.findall(r"docs/([\w-]+\.md)", text)


def test_the_generated_tables_are_what_the_code_makes_now():
    stale = gen_reference.stale_pages()
    assert not stale, f"{[p.name for p in stale]}: run `python docs/gen_reference.py` to write their tables anew"


def test_every_train_setting_is_in_the_reference_with_its_default():
    reference = _guide()["reference.md"]
    for f in dataclasses.fields(TrainSettings):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        row = next((line for line in reference.splitlines() if f"`{f.name}`" in line and line.startswith("|")), None)
        assert row is not None, f"[train] {f.name} has no row in docs/reference.md"
        assert f"`{gen_reference.toml_value(default)}`" in row, f"[train] {f.name}: default {default!r} not in {row}"


def test_a_setting_without_a_meaning_stops_the_reference(monkeypatch):
    monkeypatch.setitem(gen_reference.MEANING, "train", {k: v for k, v in gen_reference.MEANING["train"].items()
                                                         if k != "rank"})
    with pytest.raises(ValueError, match="'rank' has no meaning"):
        gen_reference.render("train")
    monkeypatch.setitem(gen_reference.MEANING, "train", {**gen_reference.MEANING["train"], "no_such_key": "x"})
    with pytest.raises(ValueError, match="no_such_key, which the code no longer reads"):
        gen_reference.render("train")


def test_every_command_is_in_the_guide_and_its_help_names_pages_that_cover_it():
    guide = _guide()
    commands = _commands(build_parser())
    for name, parser in commands.items():
        assert f"`wanpair {name}" in guide["commands.md"], f"`wanpair {name}` has no row in docs/commands.md"
        pages = _pages_named(parser.format_help())
        assert pages, f"`wanpair {name} --help` names no guide page"
        for page in pages:
            assert page in guide, f"`wanpair {name} --help` names docs/{page}, which does not exist"
            assert f"wanpair {name}" in guide[page], f"docs/{page} (named by `wanpair {name} --help`) never says wanpair {name}"


def test_the_main_help_and_the_readme_point_at_pages_that_exist():
    guide = _guide()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in _pages_named(build_parser().format_help()) + _pages_named(readme):
        assert page in guide, f"docs/{page} does not exist"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in guide:
        assert f": {page}" in nav, f"docs/{page} is not in the nav of mkdocs.yml"


def test_the_readme_stays_short_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10 * 1024, "README.md is over 10 KB: move the detail into docs/"
    test_command = next(line for line in readme.splitlines() if "-m pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
