"""Basis mixing: coefficient tokens -> the (down, up) matrices of every target linear.

A linear's LoRA is ``down = Σ_k a_k · down_basis[k]`` and ``up = Σ_k b_k · up_basis[k]``, for 1,120 basis
tensors at the released size. They are mixed in one vectorised pass over the memory-mapped file:

The data region of ``hyper_lora_modules.safetensors`` is viewed as one ``[rows, d]`` matrix, d being the
largest width that divides every tensor's size and offset (1024 in the release). Row ``s`` of the mixed
matrix of tensor j is then ``Σ_k c_jk · R[row0_j + k·n_j + s]``: a weighted bag of K rows. All bags go
through ``embedding_bag`` in a few calls, which reads each basis byte once, accumulates in float32 and
rounds once to the file dtype. For half-precision files each coefficient is split into a high and a low
half-precision part (two entries on the same row, which is then still in cache), so the coefficients keep
float32 precision and the only rounding left is that single one of the result.

Files whose layout does not allow the flat view (mixed dtypes, odd offsets) take a slower exact path that
streams tensors of equal shape through a float32 staging buffer, one :func:`mix_bases` per chunk.

Letters: ``j`` basis tensors, ``k`` basis size, ``s`` rows of a tensor in the flat view, ``d`` row width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pages import release_pages
from .safetensors_file import SafetensorsFile
from .targets import SIDES, TargetLayers, basis_keys, basis_layout

Progress = Callable[[int, int], None]  # (done, total)
MIN_ROW = 8  # a flat view with narrower rows would be slower than the staged path
STAGE_BYTES = 8 << 20  # staged path: float32 buffer per chunk, sized to stay in cache
PROGRESS_STEPS = 8


def mixing_threads(rows: torch.Tensor) -> int:
    """Threads for one mixing: as many as torch is given. Only where ``embedding_bag`` runs on one core (half
    precision on the CPU, measured with torch 2.14); in float32, and on GPUs, the kernel parallelises itself."""
    if rows.device.type != "cpu" or rows.dtype == torch.float32:
        return 1
    return max(1, torch.get_num_threads())


def mix_bases(coefs: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """The method's mixing, ``Σ_k c_k · basis[k]``, for every member at once: the one definition of it.

    coefs ``[..., j, k]`` and bases ``[j, k, a, b]`` -> ``[..., j, a, b]`` in float32. Inference's staged path and
    training call this; the flat path is an exact rewrite of it for memory-mapped files (tested equal).
    """
    return torch.einsum("...jk,jkab->...jab", coefs.float(), bases.float())


@dataclass(frozen=True)
class Member:
    """One basis tensor and where its mixed matrix goes."""

    key: str  # safetensors key, e.g. "3.to_k.id_down_basis"
    token: int  # coefficient token that mixes it
    output: tuple[int, str]  # (target linear index, "down" | "up")
    shape: tuple[int, int, int]  # (k, a, b)


def _run(fn: Callable[[int, int], int], parts: list[tuple[int, int]], workers: int) -> Iterator[int]:
    """fn over every (start, stop) part, inline or on ``workers`` threads; yields results as they complete.
    The mixing kernel releases the GIL, so each thread mixes its own bags and faults its own pages in."""
    if workers == 1:
        yield from (fn(*p) for p in parts)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="hyperlora-mix") as pool:
        yield from (future.result() for future in as_completed([pool.submit(fn, *p) for p in parts]))


class FlatRows:
    """The data region of a basis file as one ``[rows, d]`` matrix, memory-mapped (or copied to a device)."""

    def __init__(self, file: SafetensorsFile) -> None:
        infos = list(file.tensors.values())
        dtypes = {i.dtype for i in infos}
        self.ok = len(dtypes) == 1
        if not self.ok:
            return
        self.dtype = file.torch_dtype(next(iter(dtypes)))
        item = torch.empty((), dtype=self.dtype).element_size()
        sizes = [math.prod(i.shape[1:]) for i in infos] + [i.start // item for i in infos]  # row sizes, offsets
        self.d = math.gcd(*sizes)
        self.ok = self.d >= MIN_ROW and file.data_start % item == 0 and all(i.start % item == 0 for i in infos)
        if not self.ok:
            return
        self.item = item
        total = (file.size - file.data_start) // item
        self.mapping = torch.from_file(str(file.path), shared=False, size=file.size, dtype=torch.uint8)
        region = self.mapping[file.data_start: file.data_start + total // self.d * self.d * item]
        self.rows = region.view(self.dtype).view(-1, self.d)  # [rows, d], file-backed pages

    def to(self, device: torch.device) -> None:
        self.rows = self.rows.to(device)
        if self.rows.device.type != "cpu":
            self.mapping = None  # copied: the file's mapping is not needed any more


class BasisBank:
    """All bases of one kind ("id" or "base") of a checkpoint, ready to mix."""

    def __init__(self, file: SafetensorsFile, targets: TargetLayers, kind: str, flat: FlatRows | None = None,
                 ) -> None:
        self.file = file
        self.kind = kind
        self.n_linears = len(targets.linears)
        self.members = [Member(key, token, (token // 2, SIDES[token % 2]), file.shape(key))
                        for token, key in enumerate(basis_keys(basis_layout(targets), kind))]
        self.tokens = torch.tensor([m.token for m in self.members])
        self.flat = flat if flat is not None and flat.ok else None
        if self.flat is not None:
            self._index_flat()

    def _index_flat(self) -> None:
        """Rows of every bag: tensor j, row s -> [row0_j + k·n_j + s for k < K], as a [bags, 2k] index."""
        flat, parts, n_rows = self.flat, [], []
        for m in self.members:
            k, a, b = m.shape
            n = a * b // flat.d
            row0 = self.file.tensors[m.key].start // flat.item // flat.d
            parts.append(row0 + torch.arange(k).view(1, k) * n + torch.arange(n).view(n, 1))
            n_rows.append(n)
        index = torch.cat(parts)  # [bags, k]
        self.index = index.repeat_interleave(2, dim=1) if flat.dtype != torch.float32 else index
        self.rows_per_member = torch.tensor(n_rows)
        self.n_rows = n_rows

    @property
    def device(self) -> torch.device:
        return self.flat.rows.device if self.flat is not None else torch.device("cpu")

    @torch.no_grad()
    def mix(self, tokens: torch.Tensor, progress: Progress | None = None, release: bool = False,
            ) -> list[dict[str, torch.Tensor]]:
        """tokens [q, k] -> per target linear {"down": [a, r], "up": [r, b]} in float32, basis orientation.
        ``release``: each part of the memory-mapped file leaves the process's memory once mixed (for a caller
        that needs the memory next, e.g. training), instead of staying resident for the next mixing."""
        coefs = tokens.float().to(self.device)[self.tokens.to(self.device)]  # [j, k]
        if self.flat is not None:
            mixed = self._mix_flat(coefs, progress, release)
        else:
            mixed = self._mix_staged(coefs, progress)
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.n_linears)]
        for m, matrix in zip(self.members, mixed, strict=True):
            i, side = m.output
            out[i][side] = matrix.view(m.shape[1], m.shape[2])
        return out

    def _mix_flat(self, coefs: torch.Tensor, progress: Progress | None, release: bool) -> list[torch.Tensor]:
        flat = self.flat
        weights = coefs.repeat_interleave(self.rows_per_member.to(coefs.device), dim=0)  # [bags, k]
        if flat.dtype != torch.float32:
            high = weights.to(flat.dtype)
            low = (weights - high.float()).to(flat.dtype)
            weights = torch.stack([high, low], dim=-1).flatten(1)  # [bags, 2k], pairs on the same row
        index = self.index.to(coefs.device)
        bags = index.shape[0]
        out = torch.empty((bags, flat.d), dtype=torch.float32, device=coefs.device)

        inference = torch.is_inference_mode_enabled()  # thread-local, like grad mode: carried into the workers

        def part(start: int, stop: int) -> int:
            with torch.inference_mode(inference), torch.no_grad():
                out[start:stop] = F.embedding_bag(index[start:stop], flat.rows, mode="sum",
                                                  per_sample_weights=weights[start:stop])
            if release and flat.mapping is not None:
                release_pages(flat.rows[int(index[start:stop].min()): int(index[start:stop].max()) + 1],
                              flat.mapping)
            return stop - start

        workers = mixing_threads(flat.rows)
        step = -(-bags // (PROGRESS_STEPS * workers))
        parts = [(start, min(bags, start + step)) for start in range(0, bags, step)]
        mixed = 0
        for n in _run(part, parts, workers):
            mixed += n
            if progress is not None:
                progress(mixed, bags)
        return [m.flatten() for m in out.split(self.n_rows)]

    def _mix_staged(self, coefs: torch.Tensor, progress: Progress | None) -> list[torch.Tensor]:
        """Exact fallback: members of one shape go through a float32 staging buffer, one mix_bases per chunk."""
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for j, m in enumerate(self.members):
            by_shape.setdefault(m.shape, []).append(j)
        results: list[torch.Tensor | None] = [None] * len(self.members)
        done = 0
        for (k, a, b), group in by_shape.items():
            chunk = max(1, STAGE_BYTES // (k * a * b * 4))
            stage = torch.empty((min(chunk, len(group)), k, a * b), dtype=torch.float32)
            for start in range(0, len(group), chunk):
                part = group[start: start + chunk]
                for slot, j in enumerate(part):
                    stage[slot].copy_(self.file.tensor(self.members[j].key).view(k, a * b))
                mixed = mix_bases(coefs[part].cpu(), stage[: len(part)].view(len(part), k, a * b, 1)).flatten(1)
                for row, j in zip(mixed, part, strict=True):
                    results[j] = row
            done += len(group)
            if progress is not None:
                progress(done, len(self.members))
        return results
