"""The one place the dashboard opens files: inside the folders it was started on (its roots), and nowhere else.

The page names a file as (root index, path relative to that root), never as a path of this machine;
`Roots.resolve` refuses an absolute path, a `..` part, a NUL byte, an over-long name, or a path whose
resolved form (links followed) is not inside its root. That check only decides what to look at. What is
then read or written is checked again on the very file opened, because a link inside a root can be swapped
between a check and its use (OWASP: time-of-check to time-of-use):

- `open_inside` opens the file (a FIFO or device does not block: O_NONBLOCK), asks the kernel where the
  descriptor really is (/proc/self/fd; F_GETPATH on macOS), and refuses it unless that lies inside the
  given folders and is a regular file. Links that stay inside a root still work.
- `write_text_inside` opens the target's folder the same way, refuses a link or a non-file at the target's
  name (by name), writes a temporary file in that opened folder and renames it over the name there. A
  rename replaces a link swapped in meanwhile instead of writing through it, so the text lands as a
  regular file in the verified folder whatever happens to the path.

Every route that serves, lists or writes a file goes through these (app.py, runs.py, new_run.py, jobs.py).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Iterable

from ..errors import WanpairError

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096


class PathRefused(WanpairError):
    """A path a request named that leads outside the dashboard's roots (answered 403)."""


def _real_path(fd: int) -> Path:
    """Where an open descriptor is, as the kernel knows it (not as a path string said when it was opened)."""
    if sys.platform == "darwin":
        import fcntl

        return Path(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0").decode())
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def _inside(path: Path, folders: Iterable[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _open_verified(path: Path, folders: Iterable[Path], flags: int) -> tuple[int, Path]:
    """A descriptor of `path` (links followed) whose real location is inside one of `folders`, and that
    location; PathRefused otherwise (the descriptor closed)."""
    folders = [Path(f) for f in folders]  # as given: physical paths, fixed when found (not resolved again now)
    if not _inside(Path(os.path.realpath(path)), folders):  # the common case, before opening anything
        raise PathRefused(f"{path} leads out of {', '.join(map(str, folders))}; the dashboard reads and writes "
                          "only inside the folders it was started on.")
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        real = _real_path(fd)
        if not _inside(real, folders):  # swapped after the look above: the descriptor tells the truth
            raise PathRefused(f"{path} was changed to lead to {real}, outside the dashboard's folders; refused.")
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def open_inside(path: Path, folders: Iterable[Path]) -> BinaryIO:
    """`path` opened for reading, when it is a regular file that really lies inside one of `folders`."""
    fd, real = _open_verified(Path(path), folders, os.O_RDONLY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathRefused(f"{path} is not a regular file ({real}); the dashboard reads only files.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_text_inside(path: Path, folders: Iterable[Path], limit: int = 1 << 20) -> str | None:
    """The text of a file inside `folders` (at most `limit` bytes), or None when it is missing, not a file,
    or leads out."""
    try:
        with open_inside(path, folders) as f:
            return f.read(limit).decode("utf-8", "replace")
    except (OSError, PathRefused):
        return None


def list_inside(folder: Path, folders: Iterable[Path]) -> list[str]:
    """The names in `folder` when it really lies inside `folders` (read from the verified descriptor), else []."""
    try:
        fd, _ = _open_verified(Path(folder), folders, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, PathRefused):
        return []
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def write_text_inside(path: Path, text: str, folders: Iterable[Path]) -> None:
    """Replace `path` with `text` as a regular file of its folder, that folder really inside `folders`; a link
    or a non-file at `path` is refused by name (the dashboard never writes through a link)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise PathRefused(f"{path} names no file.")
    dfd, real = _open_verified(path.parent, folders, os.O_RDONLY | os.O_DIRECTORY)
    tmp = f".wanpair-write.{secrets.token_hex(8)}.tmp"  # short whatever the name: NAME_MAX counts bytes
    try:
        try:
            st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            target = os.readlink(path.name, dir_fd=dfd)
            raise PathRefused(f"{path} is a link (to {target}); the dashboard writes only a file of its own there, "
                              "never through a link. Remove the link, or edit the file it leads to yourself.")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise PathRefused(f"{path} is not a regular file; move it away for the dashboard to write there.")
        # created here, never followed, with the mode an ordinary write gets (0666 less the umask)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)  # a link put there meanwhile is replaced
            tmp = None
            os.fsync(dfd)
        finally:
            if tmp is not None:
                os.unlink(tmp, dir_fd=dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Roots:
    paths: tuple[Path, ...]

    @classmethod
    def of(cls, folders: list[Path]) -> "Roots":
        return cls(tuple(Path(f).resolve() for f in folders))

    def resolve(self, root, rel) -> Path:
        """The path `rel` names inside root number `root`, resolved; refused when it is not inside that root."""
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < len(self.paths):
            raise PathRefused(f"root {root!r} is not one of the dashboard's {len(self.paths)} folders (0 to "
                              f"{len(self.paths) - 1}).")
        if not isinstance(rel, str):
            raise PathRefused(f"path {rel!r} must be a path relative to {self.paths[root]}.")
        if "\0" in rel:
            raise PathRefused(f"{rel!r} holds a NUL byte; no file is named so.")
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise PathRefused(f"{rel!r} is not valid Unicode; no file is named so.") from None
        if len(rel.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in rel.split("/")):
            raise PathRefused(f"{rel[:80]!r}... is longer than a path (a name of at most {NAME_MAX} bytes, a path "
                              f"of at most {PATH_MAX}) can be.")
        if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or rel.startswith("\\"):
            raise PathRefused(f"{rel!r} is an absolute path; the dashboard takes paths relative to its folders "
                              f"({self.paths[root]}).")
        if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
            raise PathRefused(f"{rel!r} climbs out with '..'; name a path inside {self.paths[root]}.")
        try:
            path = (self.paths[root] / rel).resolve()
        except (OSError, RuntimeError) as e:  # a loop of links
            raise PathRefused(f"{rel!r} cannot be followed ({e}).") from None
        if path != self.paths[root] and self.paths[root] not in path.parents:
            raise PathRefused(f"{rel!r} leads to {path}, outside {self.paths[root]} (a link out of the folder); "
                              "the dashboard reads and writes only inside the folders it was started on.")
        return path

    def locate(self, path: Path) -> dict | None:
        """The (root, path) name of `path` for the page, or None when it is in none of the roots."""
        path = Path(path).resolve()
        for i, root in enumerate(self.paths):
            if path == root or root in path.parents:
                return {"root": i, "path": path.relative_to(root).as_posix()}
        return None

    def open(self, path: Path) -> BinaryIO:
        return open_inside(path, self.paths)

    def read_text(self, path: Path, limit: int = 1 << 20) -> str | None:
        return read_text_inside(path, self.paths, limit)

    def write_text(self, path: Path, text: str) -> None:
        write_text_inside(path, text, self.paths)
