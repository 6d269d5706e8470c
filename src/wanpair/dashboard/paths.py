"""The folders the dashboard may read and write: the roots given on its command line, and nothing else.

The page names a file as (root index, path relative to that root), never as a path of this machine. Every
such name passes `Roots.resolve` before anything is read or written: an absolute path, a `..` part, or a
path whose resolved form (symlinks followed) is not inside its root is refused. A link inside a root that
leads out of it is therefore as closed as `../..`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import WanpairError


class PathRefused(WanpairError):
    """A path a request named that leads outside the dashboard's roots (answered 403)."""


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
        if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or rel.startswith("\\"):
            raise PathRefused(f"{rel!r} is an absolute path; the dashboard takes paths relative to its folders "
                              f"({self.paths[root]}).")
        if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
            raise PathRefused(f"{rel!r} climbs out with '..'; name a path inside {self.paths[root]}.")
        path = (self.paths[root] / rel).resolve()
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
