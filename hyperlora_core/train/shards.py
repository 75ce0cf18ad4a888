"""Reading prepared tar shards: each rank indexes only its own shards (``shards[rank::world]``).

The index holds each sample's member offsets (tar headers only are read), so a sample is one seek per member.
``get`` turns samples into a :class:`Batch` through ``encode``, the backend's frozen encoders (VAE for the
photo, CLIP for the two crops); the ArcFace embedding is stored ready. Sizes read from a shard are capped.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import HyperLoRAError
from .denoiser import Batch

MAX_MEMBER = 64 << 20  # bytes: a larger member is refused (a 1024² JPEG is well under 1 MB)
MAX_LABEL = 1024  # bytes: an identity label (.cls) longer than this is refused


class ShardError(HyperLoRAError, ValueError):
    """A shard folder or a shard member cannot be used."""


class ShardDataset:
    """Samples of this rank's shards: ``keys`` in shard order, ``read(i)`` -> {suffix: bytes}."""

    def __init__(self, folder: str | Path, *, rank: int = 0, world: int = 1,
                 encode: Callable[[list[dict[str, bytes]]], Batch] | None = None) -> None:
        folder = Path(folder)
        shards = sorted(folder.glob("shard-*.tar"))
        if not shards:
            raise ShardError(f"no shard-*.tar in '{folder}'; run python -m hyperlora_core.train prepare first")
        if len(shards) < world:
            raise ShardError(f"{len(shards)} shard(s) in '{folder}' for {world} processes: each process needs its "
                             "own; prepare with a smaller --per-shard")
        self.shards = shards[rank::world]
        self.encode = encode
        self.keys: list[str] = []
        self._members: list[tuple[int, dict[str, tuple[int, int]]]] = []  # (shard, suffix -> (offset, size))
        for s, path in enumerate(self.shards):
            by_key: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, suffix = info.name.partition(".")
                    by_key.setdefault(key, {})[suffix] = (info.offset_data, info.size)
            for key, members in by_key.items():
                self.keys.append(key)
                self._members.append((s, members))

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> dict[str, bytes]:
        shard, members = self._members[index]
        out = {}
        with open(self.shards[shard], "rb") as f:
            for suffix, (offset, size) in members.items():
                if size > MAX_MEMBER:
                    raise ShardError(f"'{self.shards[shard]}': member {self.keys[index]}.{suffix} is {size} bytes, "
                                     f"above the {MAX_MEMBER} cap")
                f.seek(offset)
                out[suffix] = f.read(size)
        return out

    def labels(self) -> list[str]:
        """The identity label (``.cls``) of every sample, "" where there is none (LiDB pre-optimisation, stage hdb)."""
        out = []
        for index, (shard, members) in enumerate(self._members):
            if "cls" not in members:
                out.append("")
                continue
            offset, size = members["cls"]
            if size > MAX_LABEL:
                raise ShardError(f"'{self.shards[shard]}': member {self.keys[index]}.cls is {size} bytes, above the "
                                 f"{MAX_LABEL} cap of an identity label")
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                out.append(f.read(size).decode("utf-8", errors="replace").strip())
        return out

    def get(self, positions: Sequence[int]) -> Batch:
        if self.encode is None:
            raise ShardError("this ShardDataset has no encode function (the backend's VAE and CLIP)")
        return self.encode([self.read(i % len(self)) for i in positions])


def decode_sample(sample: dict[str, bytes]) -> dict[str, object]:
    """Member bytes -> photo and crops (uint8 RGB arrays), ArcFace [512] float32, caption, identity."""
    from PIL import Image

    def image(name: str) -> np.ndarray:
        with Image.open(io.BytesIO(sample[name])) as im:
            return np.asarray(im.convert("RGB"))

    return {"image": image("jpg"), "id_crop": image("id.png"), "base_crop": image("base.png"),
            "arcface": np.load(io.BytesIO(sample["arcface.npy"]), allow_pickle=False).astype(np.float32),
            "caption": sample.get("txt", b"").decode(), "identity": sample.get("cls", b"").decode() or None}
