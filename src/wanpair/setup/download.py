"""`wanpair download`: exactly the recipe's weight files, fetched with huggingface_hub and verified.

The Hub's other users in wanpair are `wanpair push` and `[hub]` (`wanpair.hub`, `wanpair.export.hub`). Transfers,
resuming (`Range` on the `.incomplete`
file), tokens (`HF_TOKEN`, `hf auth login`), `HF_ENDPOINT` mirrors and progress bars are
huggingface_hub's own (`hf_hub_download` into a local folder, as the recipe's `huggingface-cli
download --local-dir` does). What this module adds is the recipe's file table, a disk check before
the first byte, and verification: every file is checked against the hub's own hash (sha256 for
large files, the git blob id for small ones) after it arrives and whenever it changed since, so a
truncated or corrupted file is fetched again rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..caption import CAPTIONER_DIR, CAPTIONER_REPO
from ..errors import WanpairError
from ..hub import endpoint as hub_endpoint
from ..models.tasks import T2V, T2V_1_3B, TASKS
from ..sizes import human_bytes

# Where the recipe's files live (../shared/reference/wan22-lora-recipe.md, section 3). The tokenizer is the
# `google/umt5-xxl` folder that the official Wan checkpoints carry (the Wan configs' t5_tokenizer).
COMFY_WAN22 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMFY_WAN21 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
WAN_I2V = "Wan-AI/Wan2.1-I2V-14B-720P"
TOKENIZER_DIR = "google/umt5-xxl"


@dataclass(frozen=True)
class HubFile:
    """One file of the recipe: the `[models]` key it fills, where it is on the hub, and for which variant."""

    role: str
    repo: str
    path: str
    variant: str = ""  # "" = every variant
    model: str = ""  # "" = every pair (`wanpair.models.tasks`)
    into: str = ""  # the folder under the models folder it goes into ("": its path in the repository, as is)

    @property
    def key(self) -> str:
        """Where it goes, relative to the models folder (also its row in the verified-hashes file)."""
        return f"{self.into}/{self.path}" if self.into else self.path


RECIPE_FILES = (
    # the experts of each pair (Comfy-Org's names: wan2.2_{t2v,i2v}_{high,low}_noise_14B_{fp16,fp8_scaled}) and
    # Wan 2.1's single models (wan2.1_t2v_14B_{fp16,fp8_scaled}; the 1.3B only as fp16, 2.8 GB)
    *(HubFile(t.dit_key(e), COMFY_WAN22 if t.paired else COMFY_WAN21,
              f"split_files/diffusion_models/{t.dit_file(e, 'fp16' if t is T2V_1_3B else kind)}", variant, t.name)
      for t in TASKS.values() for variant, kind in (("fp16", "fp16"), ("fp8", "fp8_scaled")) for e in t.experts),
    HubFile("vae", COMFY_WAN21, "split_files/vae/wan_2.1_vae.safetensors"),
    HubFile("t5", WAN_I2V, "models_t5_umt5-xxl-enc-bf16.pth"),
    *(HubFile("tokenizer", WAN_I2V, f"{TOKENIZER_DIR}/{name}")
      for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
)
# The captioner (`wanpair caption`), fetched alone by `wanpair download --captioner`: the files transformers
# loads Qwen2.5-VL-7B-Instruct from (its config, tokenizer, image processor and chat template, and the five
# bf16 shards), into models/Qwen2.5-VL-7B-Instruct/.
CAPTIONER_FILES = tuple(
    HubFile("captioner", CAPTIONER_REPO, name, into=CAPTIONER_DIR)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
                 "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "model.safetensors.index.json",
                 *(f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6))))
VARIANTS = ("fp16", "fp8")
VERIFIED = ".wanpair-verified.json"  # in the models folder: what was hashed, at which size and mtime
DISK_MARGIN = 1 << 30  # keep 1 GiB free beyond what the files need


def files_for(variant: str, model: str = T2V.name) -> list[HubFile]:
    return [f for f in RECIPE_FILES if f.variant in ("", variant) and f.model in ("", model)]


def model_paths(folder: Path, variant: str, model: str = T2V.name) -> dict[str, Path]:
    """The `[models]` table the files of `variant` make, once downloaded into `folder`."""
    paths = {}
    for f in files_for(variant, model):
        local = folder / f.key
        paths[f.role] = local.parent if f.role == "tokenizer" else local
    return paths


@dataclass
class Remote:
    """What the hub says of a file: its size and the hash to check it against."""

    size: int
    sha256: str | None  # large (LFS) files
    git_oid: str | None  # small files: the git blob id


def file_hash(path: Path, remote: Remote) -> str:
    """The local file's hash in the form the hub gives for it (sha256, or git's blob sha1)."""
    h = hashlib.sha256() if remote.sha256 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class Verified:
    """Hashes already checked, kept by (size, mtime), so an unchanged 28 GB file is not hashed every run."""

    def __init__(self, folder: Path):
        self.path = folder / VERIFIED
        try:
            self.rows = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.rows = {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def matches(self, path: Path, key: str, expected: str | None = None) -> bool:
        """Hashed before (to `expected`, when the hub's hash is known) and not changed since."""
        row = self.rows.get(key)
        return bool(row) and path.is_file() and expected in (None, row["hash"]) and row["stamp"] == self._stamp(path)

    def remember(self, path: Path, key: str, digest: str) -> None:
        self.rows[key] = {"hash": digest, "stamp": self._stamp(path)}
        write_text_atomic(self.path, json.dumps(self.rows, indent=1))


class HubUnreachable(WanpairError):
    """The hub (or the network) did not answer, as opposed to answering no."""


def _hub_error(e: Exception, f: HubFile, endpoint: str) -> WanpairError:
    """The hub's refusal, said as what the user does about it."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{endpoint}/{f.repo}"
    if isinstance(e, GatedRepoError):
        return WanpairError(f"{f.repo} is gated: accept its terms at {page} while logged in, then set HF_TOKEN (or run "
                            "`hf auth login`) with that account's token.")
    if isinstance(e, RepositoryNotFoundError):
        return WanpairError(f"the hub refused {f.repo} (not found, or private and your token may not read it). Check "
                            "HF_TOKEN / `hf auth login`; if the repository was renamed, download the files by hand and "
                            "set the paths under [models].")
    if isinstance(e, (EntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError)):
        return WanpairError(f"{f.path} is no longer in {f.repo} (renamed or removed upstream). Find its new name at "
                            f"{page}, download it by hand and set [models] {f.role} to it.")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return WanpairError(f"the hub refused {f.repo}/{f.path} ({status}): your token is missing, wrong or expired. "
                            "Set HF_TOKEN or run `hf auth login`.")
    return HubUnreachable(f"cannot fetch {f.path} from {endpoint} ({type(e).__name__}: {e}). Check the network "
                        "connection (or HF_ENDPOINT, if you use a mirror) and run the same command again: finished files "
                        "are kept and a partial one resumes.")


def _remote_info(files: list[HubFile], endpoint: str) -> dict[HubFile, Remote]:
    from huggingface_hub import HfApi

    api, info = HfApi(endpoint=endpoint), {}
    for repo in dict.fromkeys(f.repo for f in files):
        mine = [f for f in files if f.repo == repo]
        try:
            found = {x.path: x for x in api.get_paths_info(repo, [f.path for f in mine])}
        except Exception as e:  # the hub's errors, and the network's (httpx / OS errors)
            raise _hub_error(e, mine[0], endpoint) from None
        for f in mine:
            x = found.get(f.path)
            if x is None or not hasattr(x, "size"):
                from huggingface_hub.errors import EntryNotFoundError

                raise _hub_error(EntryNotFoundError(f.path), f, endpoint)
            lfs = getattr(x, "lfs", None)
            info[f] = Remote(size=x.size, sha256=lfs.sha256 if lfs else None, git_oid=None if lfs else x.blob_id)
    return info


def download(folder: Path, variant: str = "fp16", model: str = T2V.name, captioner: bool = False) -> dict[str, Path]:
    """Fetch the recipe's files of `variant` for the `model` pair into `folder` (`captioner`: the captioner's
    files instead); returns the `[models]` paths. Files already there and matching the hub's hash are kept;
    everything is checked before and after."""
    from huggingface_hub import hf_hub_download

    if variant not in VARIANTS:
        raise WanpairError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
    if model not in TASKS:
        raise WanpairError(f"--model {model!r}: choose one of {', '.join(TASKS)}.")
    folder.mkdir(parents=True, exist_ok=True)
    endpoint = hub_endpoint()  # a mirror, if the user set one
    files = list(CAPTIONER_FILES) if captioner else files_for(variant, model)
    paths = {"captioner": folder / CAPTIONER_DIR} if captioner else model_paths(folder, variant, model)
    verified = Verified(folder)
    try:
        remote = _remote_info(files, endpoint)
    except HubUnreachable:
        if not all(verified.matches(folder / f.key, f.key) for f in files):
            raise
        print(f"the hub is not reachable; all {len(files)} files in {folder} were verified before and are unchanged")
        return paths
    todo = []
    for f in files:
        local, expected = folder / f.key, remote[f].sha256 or remote[f].git_oid
        if local.is_file() and local.stat().st_size == remote[f].size:
            if verified.matches(local, f.key, expected):
                print(f"ok      {f.key} (verified before, unchanged)")
                continue
            print(f"verify  {f.key} ({human_bytes(remote[f].size)}) ...", flush=True)
            digest = file_hash(local, remote[f])
            if digest == expected:
                verified.remember(local, f.key, digest)
                print(f"ok      {f.key} (matches the hub's hash)")
                continue
            print(f"damaged {f.key}: its hash is not the hub's; fetching it again")
        elif local.exists():
            print(f"damaged {f.key}: {human_bytes(local.stat().st_size)} instead of {human_bytes(remote[f].size)}; "
                  "fetching it again")
        if local.exists():
            local.unlink()
        todo.append(f)
    need = sum(remote[f].size for f in todo)
    free = shutil.disk_usage(folder).free
    if todo and need + DISK_MARGIN > free:
        raise WanpairError(f"not enough disk space in {folder}: the {len(todo)} files to fetch need "
                           f"{human_bytes(need)} (plus 1 GiB to spare), and {human_bytes(free)} is free. Free some "
                           "space or pass --dir on a larger disk.")
    if todo:
        print(f"fetching {len(todo)} files, {human_bytes(need)}, from {endpoint} into {folder}")
    for f in todo:
        print(f"fetch   {f.repo}: {f.path} ({human_bytes(remote[f].size)})", flush=True)
        try:
            hf_hub_download(f.repo, f.path, local_dir=folder / f.into, endpoint=endpoint)
        except Exception as e:  # the hub's errors, and the network's
            raise _hub_error(e, f, endpoint) from None
        local, expected = folder / f.key, remote[f].sha256 or remote[f].git_oid
        digest = file_hash(local, remote[f])
        if digest != expected:
            local.unlink()
            raise WanpairError(f"{f.key} arrived damaged (its hash is not the hub's); it was removed. Run the same "
                               "command again to fetch it once more.")
        verified.remember(local, f.key, digest)
    return paths
