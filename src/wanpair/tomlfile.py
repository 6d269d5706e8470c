"""Reading the TOML files users write (wanpair.toml, dataset.toml) with errors that point at the fix."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import WanpairError


def read_toml(path: str | Path, missing: str, text: str | None = None) -> tuple[Path, dict]:
    """(resolved path, parsed table); `missing` is the sentence to add when the file does not exist; `text`: the
    file's text as the caller already read it (the dashboard, from a descriptor it checked), parsed instead."""
    path = Path(path).expanduser().resolve()
    if text is None and path.is_dir():
        inside = sorted(p.name for p in path.glob("*.toml"))
        raise WanpairError(f"{path} is a folder; give a .toml file" + (
            f" in it: {', '.join(str(path / n) for n in inside[:3])}" if inside else f". {missing}"))
    if text is None and not path.is_file():
        raise WanpairError(f"{path} does not exist. {missing}")
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise WanpairError(f"{path} is not valid TOML: {e}") from None


def did_you_mean(key: str, valid) -> str:
    """' Did you mean 'x'?' for the closest valid key, else the list of valid keys."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else f" Valid keys: {', '.join(sorted(valid))}."
