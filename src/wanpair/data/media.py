"""The media of a dataset folder and where their captions are: one rule for training and `wanpair check`
(`wanpair.data.items`), `wanpair init`, `wanpair caption` and the dashboard.

A folder trains on images (png, jpg, ...) or on videos (video files, or folders of frames), never both: that
is its kind, the `image_directory` / `video_directory` of its `[[datasets]]` entry. A folder of images
beside image files is not a clip (an `originals/` folder in an image dataset), so a folder without a
dataset.toml is an image dataset when it holds image files (`media_kind`). Each medium's caption is the file
of the same name with the dataset's `caption_extension` (`.txt` by default; Musubi-Tuner's convention):
`img_01.png` -> `img_01.txt`, the frame folder `clip_01/` -> `clip_01.txt`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import WanpairError
from .images import IMAGE_EXTENSIONS
from .video import VIDEO_EXTENSIONS, is_video

CAPTION_EXTENSION = ".txt"
NOT_MEDIA = {"cache"}  # the folder the latent and text caches go to by default


def caption_path(media: Path, extension: str = CAPTION_EXTENSION) -> Path:
    """The caption the dataset reads for `media`: the same name (a frame folder's own name) + `extension`."""
    return media.with_name((media.name if media.is_dir() else media.stem) + extension)


def media_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, videos) directly in `folder`, sorted; a video is a file or a folder of frames. Hidden
    entries and the cache folder are not media."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in NOT_MEDIA)
    return ([p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS],
            [p for p in entries if is_video(p)])


def dataset_media(folder: Path, kind: str) -> list[Path]:
    """What a dataset of `kind` ("image" or "video") in `folder` trains on."""
    images, videos = media_in(folder)
    return images if kind == "image" else videos


def media_kind(folder: Path) -> str:
    """'image' or 'video', from what the folder holds: image files make it an image dataset (folders of images
    beside them are not clips); video files beside image files are refused."""
    images, videos = media_in(folder)
    files = [v for v in videos if v.is_file()]
    if images and files:
        raise WanpairError(f"{folder} holds both images ({len(images)}) and videos ({len(files)}); put them in two "
                           "folders and list both under [[datasets]] in one dataset.toml.")
    if not images and not videos:
        raise WanpairError(f"{folder} holds no images ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) or "
                           f"videos ({', '.join(sorted(e[1:] for e in VIDEO_EXTENSIONS))}, or folders of frames); "
                           "point at the folder with your media and their .txt captions.")
    return "image" if images else "video"
