"""Reading weight files safely: validation, cheap fingerprints, and streamed tensors.

Every loader goes through here so that a missing, truncated or mistaken file is reported with its
path before anything large is read.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from ..errors import DamagedFile, WanpairError

log = logging.getLogger(__name__)

# Fingerprint: files up to _FULL_HASH_LIMIT are hashed whole (well under a second); larger ones by
# their first MiB (the header) plus evenly spaced samples -- a few MB read on a 28 GB file, yet any
# re-download, re-quantisation or retrain changes it.
_FULL_HASH_LIMIT = 256 * 2**20
_SAMPLES = 64
_SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class WeightFile:
    """What we know about a weight file before loading it."""

    path: Path
    size: int
    fingerprint: str
    metadata: dict[str, str]
    keys: tuple[str, ...]
    dtypes: tuple[str, ...]

    def describe(self) -> str:
        dtypes = ",".join(self.dtypes) or "?"
        return f"{self.path} ({self.size / 2**30:.2f} GiB, {dtypes}, fingerprint {self.fingerprint})"


def fingerprint(path: Path) -> str:
    """A content fingerprint that reads at most a few MB of a large file."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


HEADER_LIMIT = 100 * 2**20  # far above any real header (a 14B expert's is ~0.1 MB): larger is no model file


def safetensors_header(path: Path, opened: BinaryIO | None = None, limit: int = HEADER_LIMIT) -> dict:
    """The parsed header (with `__data_start__`, where tensor bytes begin), validated against the file size.
    `opened`: the file already open (the dashboard reads only a descriptor it has checked; `path` names it).
    `limit`: the largest header read (the dashboard reads files others may plant: only as much as a LoRA has)."""
    with (contextlib.nullcontext(opened) if opened is not None else open(path, "rb")) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > HEADER_LIMIT:
            raise DamagedFile(f"{path} is not a valid safetensors file (header claims {n} bytes, file has {size}): "
                              "it is truncated or not a safetensors file.")
        if n > limit:
            raise DamagedFile(f"{path} has a {n}-byte header, more than the {limit} read here: not read.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedFile(f"{path} has a corrupt safetensors header ({e}).") from None
        except RecursionError:  # nested deeper than Python's parser goes: no header a writer makes
            raise DamagedFile(f"{path} has a corrupt safetensors header (nested too deep).") from None
    tensors_ok = isinstance(header, dict) and all(
        isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
        and all(isinstance(o, int) for o in v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not tensors_ok or not (meta is None or isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise DamagedFile(f"{path} has a corrupt safetensors header (not a table of tensors with offsets and a "
                          "metadata table of strings): it is not a safetensors file, or it was damaged.")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise DamagedFile(f"{path} is truncated: its header describes {8 + n + data_end} bytes but the file has "
                          f"{size}; the download or copy did not finish.")
    header["__data_start__"] = 8 + n
    return header


def safetensors_metadata(path: Path, opened: BinaryIO | None = None, limit: int = HEADER_LIMIT) -> dict[str, str]:
    """A safetensors file's `__metadata__` (a LoRA's: what `wanpair.train.metadata.lora_metadata` wrote)."""
    return safetensors_header(path, opened, limit).get("__metadata__") or {}


def inspect_weight_file(path: str | Path) -> WeightFile:
    """Validate a weight file (safetensors or torch .pth) and list its tensors without loading them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WanpairError(f"{path} does not exist. Check the path in your project file.")
    if path.is_dir():
        raise WanpairError(f"{path} is a folder, but a single weight file was expected here.")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        header = safetensors_header(path)
        header.pop("__data_start__")
        meta = header.pop("__metadata__", None) or {}
        keys = tuple(header)
        dtypes = tuple(sorted({v["dtype"] for v in header.values()}))
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = _torch_load(path)
        meta, keys = {}, tuple(sd)
        dtypes = tuple(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
    else:
        raise WanpairError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors or .pth.")
    return WeightFile(path, size, fingerprint(path), meta, keys, dtypes)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt archives
        raise DamagedFile(f"{path} could not be read as a PyTorch checkpoint ({e}).") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WanpairError(f"{path} is not a plain state dict of tensors.")
    return sd


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path, keys) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors with plain file reads, one at a time.

    Not memory-mapped on purpose: pages of a mapped file count towards the process's resident
    memory, so mapping a 28 GB checkpoint shows ~28 GB RSS even when each tensor is dropped at once.
    """
    header = safetensors_header(path)
    header.pop("__metadata__", None)
    start = header.pop("__data_start__")
    with open(path, "rb", buffering=0) as f:
        for key in keys if keys is not None else header:
            info = header[key]
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)  # uninitialised: no time spent zeroing
            f.seek(start + begin)
            if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise WanpairError(f"{path}: tensor {key} could not be read whole; the file is damaged.")
            yield key, buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def iter_tensors(path: Path, keys: Iterator[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream tensors one at a time, so a 28 GB file never sits in RAM whole."""
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path, keys)
    else:
        sd = _torch_load(path)
        for k in keys if keys is not None else list(sd):
            yield k, sd[k]


# Tensors being read ahead while the GPU converts the current one: enough to keep the disk (or page
# cache) and the host-to-device copies busy at once, and only a few hundred MB of pinned memory.
READERS = 4
READ_AHEAD = 8


def tensors_to_device(path: Path, keys: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_tensors`, delivered on `device`. For a safetensors file and a CUDA device, READERS threads read
    the next tensors straight into page-locked buffers while earlier ones are copied to the GPU (without
    blocking) and converted there, so disk, copy engine and GPU work at the same time instead of in turn.
    Elsewhere (CPU, .pth files) tensors are read one by one and moved."""
    if device.type != "cuda" or path.suffix != ".safetensors":
        for key, tensor in iter_tensors(path, keys):
            yield key, tensor.to(device)
        return
    header = safetensors_header(path)
    start = header.pop("__data_start__")

    def read(key: str) -> torch.Tensor:
        begin, end = header[key]["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8, pin_memory=True)  # torch's host allocator reuses these
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise WanpairError(f"{path}: tensor {key} could not be read whole; the file is damaged.")
        return buf

    with ThreadPoolExecutor(READERS, thread_name_prefix="wanpair-read") as pool:
        pending = collections.deque()
        todo = iter(keys)
        for key in todo:
            pending.append((key, pool.submit(read, key)))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            key, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            info = header[key]
            yield key, future.result().to(device, non_blocking=True).view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def strip_prefix(keys: tuple[str, ...]) -> str:
    """ComfyUI files sometimes prefix every key with `model.diffusion_model.`; return that prefix."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""
