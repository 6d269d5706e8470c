"""Write files so that a crash never leaves a half-written file under its final name.

A file is written to a temporary name in the same folder, flushed to disk, given the mode an ordinary
`open(path, "w")` would have given it (0644 under the usual umask 022: a ComfyUI or inference server
running as another user must be able to read a LoRA we report as saved), renamed over the final
name, and then the folder itself is synced so that the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (`/proc/self/status`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (process-wide, but only for this instant)
    os.umask(mask)
    return mask


def sync_folder(folder: Path) -> None:
    """fsync a directory, so the names created or renamed in it are on disk (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it over `final` only on success. `mode`: the
    file's mode (default: an ordinary write's, 0666 less the umask)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask() if mode is None else mode)  # mkstemp made it 0600
        os.replace(tmp_path, final)
        sync_folder(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(final: str | os.PathLike, text: str, mode: int | None = None) -> None:
    with atomic_path(final, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def writable_from(folder: Path) -> tuple[Path, bool]:
    """Where writing into `folder` would begin (the folder, or its nearest parent that exists: the rest is made)
    and whether this process may write there; access(2) also says no on a read-only mount. Nothing is made, so a
    check leaves no folder behind."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    return existing, existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
