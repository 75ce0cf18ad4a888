"""Basis mixing: coefficient tokens -> the (down, up) matrices of every target linear.

A linear's LoRA is ``down = Σ_k a_k · down_basis[k]`` and ``up = Σ_k b_k · up_basis[k]``. Tensors of equal
shape form a group and are mixed together by one batched matmul. On the CPU the bases stay memory-mapped
in their file dtype; a group is streamed through a small float32 staging buffer sized to stay in cache, so
the 3 GB are read once and never copied whole. On an accelerator each group is stacked once into one
device tensor and mixed in a single ``bmm``.

Letters: ``g`` tensors in a group, ``k`` basis size, ``x`` flattened matrix (in·r or r·out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .safetensors_file import SafetensorsFile
from .topology import LINEARS, TOKENS_PER_MODULE

STAGE_BYTES = 8 << 20  # float32 staging buffer per chunk: a few MiB stays in the CPU's cache

Progress = Callable[[int, int], None]  # (done, total), tqdm-compatible in spirit


@dataclass
class BasisGroup:
    """Basis tensors of one shape: ``[k, a, b]`` each, stacked along a new first axis when on a device."""

    shape: tuple[int, int, int]  # (k, a, b) of every member
    keys: list[str] = field(default_factory=list)  # safetensors keys, in member order
    tokens: list[int] = field(default_factory=list)  # coefficient token of each member
    outputs: list[tuple[int, str, str]] = field(default_factory=list)  # (module index, linear, "down"|"up")
    stacked: torch.Tensor | None = None  # [g, k, a·b] on the compute device, when stacked

    def nbytes(self, itemsize: int) -> int:
        k, a, b = self.shape
        return len(self.keys) * k * a * b * itemsize


class BasisBank:
    """All bases of one kind ("id" or "base") of a checkpoint, grouped by shape."""

    def __init__(self, file: SafetensorsFile, n_modules: int, kind: str) -> None:
        self.file = file
        self.kind = kind
        groups: dict[tuple[int, int, int], BasisGroup] = {}
        for i in range(n_modules):
            for j, (linear, _, _) in enumerate(LINEARS):
                for side_index, side in enumerate(("down", "up")):
                    key = f"{i}.{linear}.{kind}_{side}_basis"
                    shape = file.shape(key)
                    group = groups.setdefault(shape, BasisGroup(shape))
                    group.keys.append(key)
                    group.tokens.append(i * TOKENS_PER_MODULE + 2 * j + side_index)
                    group.outputs.append((i, linear, side))
        self.groups = list(groups.values())
        self.n_tensors = sum(len(g.keys) for g in self.groups)

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Stack every group on ``device`` (one copy of the bases); CPU mixing never needs this."""
        for group in self.groups:
            k, a, b = group.shape
            stacked = torch.empty((len(group.keys), k, a * b), device=device, dtype=dtype)
            for slot, key in enumerate(group.keys):
                stacked[slot].copy_(self.file.tensor(key).reshape(k, a * b), non_blocking=True)
            group.stacked = stacked

    def release_device(self) -> None:
        for group in self.groups:
            group.stacked = None

    @torch.no_grad()
    def mix(self, tokens: torch.Tensor, progress: Progress | None = None) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """tokens [q, k] -> {(module, linear): {"down": [a, r], "up": [r, b]}} in float32, basis orientation."""
        out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        done = 0
        for group in self.groups:
            k, a, b = group.shape
            coefs = tokens[group.tokens].float()  # [g, k]
            if group.stacked is not None:
                mixed = torch.bmm(coefs.to(group.stacked).unsqueeze(1), group.stacked).squeeze(1).float()
            else:
                mixed = self._mix_streamed(group, coefs)
            for (i, linear, side), matrix in zip(group.outputs, mixed.view(-1, a, b), strict=True):
                out.setdefault((i, linear), {})[side] = matrix
            done += len(group.keys)
            if progress is not None:
                progress(done, self.n_tensors)
        return out

    def _mix_streamed(self, group: BasisGroup, coefs: torch.Tensor) -> torch.Tensor:
        """Stream memory-mapped members through a float32 staging buffer, one bmm per chunk: [g, a·b]."""
        k, a, b = group.shape
        width = a * b
        chunk = max(1, STAGE_BYTES // (k * width * 4))
        stage = torch.empty((min(chunk, len(group.keys)), k, width), dtype=torch.float32)
        mixed = torch.empty((len(group.keys), 1, width), dtype=torch.float32)
        coefs = coefs.to("cpu").unsqueeze(1)  # [g, 1, k]
        for start in range(0, len(group.keys), chunk):
            stop = min(start + chunk, len(group.keys))
            for slot, key in enumerate(group.keys[start:stop]):
                stage[slot].copy_(self.file.tensor(key).view(k, width))
            torch.bmm(coefs[start:stop], stage[: stop - start], out=mixed[start:stop])
        return mixed.squeeze(1)
