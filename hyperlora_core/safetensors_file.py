"""Checked, lazy, memory-mapped access to one safetensors file.

The header is read and every entry checked before any tensor is touched; tensors are then views of a
private memory map (file-backed pages, no copies). Only safetensors is ever loaded: pickles are refused.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import (
    CheckpointFileMissing,
    CheckpointFormatError,
    LFSPointerError,
    NotSafetensorsError,
    TruncatedFileError,
)
from .readahead import Span, merge

MAX_HEADER_BYTES = 100_000_000  # the safetensors specification's own limit
_SAMPLE_BLOCKS = 8  # blocks of file content hashed into a fingerprint
_SAMPLE_BYTES = 1 << 16

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),  # fp8 releases of diffusion models (checked when training loads one)
    "F8_E5M2": (torch.float8_e5m2, 1),
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry."""

    dtype: str  # safetensors dtype tag, e.g. "F16"
    shape: tuple[int, ...]  # tensor shape
    start: int  # byte offset of the data, relative to the end of the header
    end: int  # end offset, exclusive


def _sniff(path: Path, head: bytes, size: int, what: str) -> None:
    """Recognise the usual impostors before trying to parse a header."""
    if head.startswith(b"version https://git-lfs"):
        raise LFSPointerError(
            f"{what}: '{path}' is a git-LFS pointer file ({size} bytes of text), not the weights. "
            "Fetch the real file (`git lfs pull` in that repository, or download the file itself) and replace it."
        )
    stripped = head.lstrip()[:15].lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml")):
        raise NotSafetensorsError(
            f"{what}: '{path}' is a web page ({size} bytes), not a safetensors file: the download failed. "
            "Download the file again."
        )
    if head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")):
        raise NotSafetensorsError(
            f"{what}: '{path}' is a PyTorch pickle. For safety only .safetensors files are loaded; "
            "use the released .safetensors file."
        )


def read_header(path: Path, what: str) -> tuple[int, dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse and check the header of ``path``; returns (file size, tensors, metadata, raw header bytes)."""
    if not path.is_file():
        raise CheckpointFileMissing(f"{what}: '{path}' is missing. Put the file there (see the README).")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
        _sniff(path, head, size, what)
        if size < 8:
            raise TruncatedFileError(f"{what}: '{path}' has only {size} bytes; it is truncated. Download it again.")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise TruncatedFileError(
                f"{what}: '{path}' declares a {n}-byte header, above the safetensors limit of {MAX_HEADER_BYTES}: "
                "the file is corrupt or not safetensors. Download it again."
            )
        if 8 + n > size:
            raise TruncatedFileError(
                f"{what}: '{path}' is truncated: its header needs {8 + n} bytes but the file has {size}. "
                "Download it again."
            )
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensorsError(f"{what}: '{path}' has an unreadable header ({exc}); it is not safetensors.") from exc
    if not isinstance(header, dict):
        raise NotSafetensorsError(f"{what}: '{path}' has a header that is not a JSON object; it is not safetensors.")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: _entry(path, what, key, value) for key, value in header.items()}
    data_end = max((t.end for t in tensors.values()), default=0)
    have = size - 8 - n
    if have < data_end:
        raise TruncatedFileError(
            f"{what}: '{path}' is truncated: the header describes {data_end} bytes of tensor data but only {have} "
            f"follow (file size {size}). The download stopped early; download it again."
        )
    if have > data_end:
        raise CheckpointFormatError(
            f"{what}: '{path}' has {have - data_end} stray bytes after its last tensor; it is corrupt. "
            "Download it again."
        )
    return size, tensors, metadata, raw


def _entry(path: Path, what: str, key: str, value: Any) -> TensorInfo:
    try:
        dtype, shape, (start, end) = value["dtype"], tuple(int(s) for s in value["shape"]), value["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise NotSafetensorsError(f"{what}: '{path}': header entry {key!r} is malformed ({exc}).") from exc
    if dtype not in DTYPES:
        raise CheckpointFormatError(f"{what}: '{path}': tensor {key!r} has unsupported dtype {dtype!r}.")
    numel = 1
    for s in shape:
        numel *= s
    if not (0 <= start <= end) or end - start != numel * DTYPES[dtype][1]:
        raise CheckpointFormatError(
            f"{what}: '{path}': tensor {key!r} claims bytes {start}..{end} for shape {list(shape)} {dtype}; "
            "the header is corrupt. Download the file again."
        )
    return TensorInfo(dtype, shape, int(start), int(end))


class SafetensorsFile:
    """A checked safetensors file whose tensors are memory-mapped on first access."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what  # the role of the file, used in messages ("resampler", ...)
        self.size, self.tensors, self.metadata, self._raw_header = read_header(self.path, what)
        self._handle = None

    @property
    def data_start(self) -> int:
        """Byte offset of the tensor data: the 8-byte length plus the header."""
        return 8 + len(self._raw_header)

    @staticmethod
    def torch_dtype(tag: str) -> torch.dtype:
        return DTYPES[tag][0]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def tensor(self, key: str) -> torch.Tensor:
        """A read-only-by-convention view of ``key`` backed by the file's pages."""
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def spans(self, keys: Iterable[str] | None = None) -> list[Span]:
        """Where the data of ``keys`` (default: every tensor) lies in the file: merged absolute byte ranges."""
        infos = self.tensors.values() if keys is None else [self.tensors[k] for k in keys]
        start = self.data_start
        return [(self.path, start + a, start + b) for a, b in merge((i.start, i.end) for i in infos)]

    def update_fingerprint(self, hasher: Any) -> None:
        """Hash the header and evenly spaced blocks of data: cheap, yet any re-trained or re-saved file differs."""
        hasher.update(self.size.to_bytes(8, "little"))
        hasher.update(self._raw_header)
        data_start = 8 + len(self._raw_header)
        span = self.size - data_start
        if span <= 0:
            return
        with open(self.path, "rb") as fh:
            for i in range(_SAMPLE_BLOCKS):
                fh.seek(data_start + (span - min(span, _SAMPLE_BYTES)) * i // max(1, _SAMPLE_BLOCKS - 1))
                hasher.update(fh.read(_SAMPLE_BYTES))

    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                ) -> Path:
    """Write a safetensors file under a temporary name in the target folder, then rename it into place.

    A save that fails (full disk, interrupt, bad tensor) leaves no partial file under ``path``, and a reader never
    sees a half-written one: the rename is atomic on one file system.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
