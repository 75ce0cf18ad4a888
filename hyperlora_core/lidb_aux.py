"""LiDB's frozen aux matrices (recipe v1 in :mod:`hyperlora_core.lidb`'s docstring): one linear's pair
(:func:`aux_pair`), every target linear's on a few threads (:func:`iter_aux`), and a bounded in-process cache
(:data:`AUX_CACHE`) so that loading a LiDB again, or another LiDB of the same layout, generates nothing. Pure torch.

Where the time went (cProfile of 8b30336, SDXL's 560 linears at a = 100, b = 50, one thread, ~5 s in all): the
float64 QR ~42 %, the Box–Muller arithmetic ~33 %, the SHAKE-256 stream ~18 %; Python's own share is small (~20
torch calls of 0.1–1 M elements per linear), so batching linears of one shape would save little, and it would move
elements across the boundaries where torch switches between its vectorised and scalar ``log``/``cos``/``sin``,
which can change the last bit. The threads instead run the very same :func:`aux_pair` per linear: the same
operations on the same shapes, with torch's process-wide thread count, so the numbers are those of a one-at-a-time
loop under the same ``torch.get_num_threads()`` (``tests/test_lidb_aux.py`` compares them with ``torch.equal``).
The SHAKE stream holds the GIL; torch releases it, so the threads overlap everything else.

The cache holds each layout's matrices (float32; SDXL at a = 100, b = 50: 427 MiB) until ``AUX_CACHE_BYTES`` would
be exceeded, dropping the least recently used layout first; a layout larger than the budget is never kept (its
users take one linear at a time). The cached tensors are shared: read them, never modify them in place.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing

import torch

from .errors import LidbMismatchError
from .targets import TargetLayers, TargetLinear

AUX_DOMAIN = "hyperlora.lidb.aux.v1"
AUX_CACHE_BYTES = 512 << 20  # room for SDXL's 560 linears at a = 100, b = 50 (427 MiB of float32)
AUX_WORKERS = max(1, min(4, os.cpu_count() or 1))  # the GIL-bound SHAKE stream (~18 %) caps the gain near 5x
Progress = Callable[[int, int], None]  # (done, total)
Key = tuple[tuple[TargetLinear, ...], int, int, int]  # (the linears in order, seed, a, b)


def _normals(seed: int, key: str, side: str, count: int) -> torch.Tensor:
    """``count`` standard normals (float64) from the recipe's SHAKE-256 stream (steps 1 and 2 of the recipe)."""
    pairs = (count + 1) // 2
    label = f"{AUX_DOMAIN}\0{seed}\0{key}\0{side}".encode()
    raw = bytearray(hashlib.shake_256(label).digest(8 * pairs))
    words = torch.frombuffer(raw, dtype=torch.uint32)  # little-endian uint32 (integers: exact in float64)
    u = (words.to(torch.float64) + 0.5) / 2.0 ** 32
    u1, u2 = u[0::2], u[1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2 * math.pi * u2
    z = torch.empty((pairs, 2), dtype=torch.float64)
    torch.mul(r, torch.cos(angle), out=z[:, 0])  # a product rounds once, wherever it is written
    torch.mul(r, torch.sin(angle), out=z[:, 1])
    return z.view(-1)[:count]


def _orthonormal_columns(m: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of ``m`` [r, c] (r ≥ c), with diag(R) > 0: unique, orthonormal columns."""
    q, r = torch.linalg.qr(m, mode="reduced")
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def check_sizes(linear: TargetLinear, a: int, b: int) -> None:
    """A row-orthonormal a × i needs a ≤ i, a column-orthonormal o × b needs b ≤ o."""
    if a < 1 or b < 1:
        raise LidbMismatchError(f"LiDB sizes a and b must be at least 1, got a={a}, b={b}")
    if a > linear.in_features or b > linear.out_features:
        raise LidbMismatchError(
            f"LiDB a={a}, b={b} do not fit linear '{linear.key}' ({linear.in_features} -> {linear.out_features}): "
            f"a must be at most its in_features and b at most its out_features. Choose smaller a and b (HyperLoRA "
            "Refine: lidb_a, lidb_b).")


def aux_pair(linear: TargetLinear, seed: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen (A_aux [a, i], B_aux [o, b]) of one linear, float32 (recipe v1). Plain tensors even when called
    under ``torch.inference_mode()`` (as ComfyUI runs nodes), so that training may use them afterwards."""
    check_sizes(linear, a, b)
    with torch.inference_mode(False), torch.no_grad():
        m = _normals(seed, linear.key, "A", linear.in_features * a).reshape(linear.in_features, a)
        n = _normals(seed, linear.key, "B", linear.out_features * b).reshape(linear.out_features, b)
        return _orthonormal_columns(m).t().contiguous().float(), _orthonormal_columns(n).contiguous().float()


def layout_bytes(targets: TargetLayers, a: int, b: int) -> int:
    """The float32 bytes of every target linear's aux matrices."""
    return 4 * sum(a * lin.in_features + lin.out_features * b for lin in targets.linears)


def iter_aux(linears: Sequence[TargetLinear], seed: int, a: int, b: int, workers: int = AUX_WORKERS,
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every linear's :func:`aux_pair`, in order, computed by ``workers`` threads at most ``2 · workers`` linears
    ahead of the consumer (close the iterator, e.g. with ``contextlib.closing``, to stop early)."""
    if workers <= 1 or len(linears) <= 1:
        yield from (aux_pair(lin, seed, a, b) for lin in linears)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="hyperlora-lidb-aux") as pool:
        todo = iter(linears)
        pending: deque[Future] = deque()
        try:
            for lin in todo:
                pending.append(pool.submit(aux_pair, lin, seed, a, b))
                if len(pending) == 2 * workers:
                    break
            while pending:
                pair = pending.popleft().result()
                lin = next(todo, None)
                if lin is not None:
                    pending.append(pool.submit(aux_pair, lin, seed, a, b))
                yield pair
        finally:
            for future in pending:  # stopped early (an error, an interrupted progress bar): drop what has not run
                future.cancel()


def _key(targets: TargetLayers, seed: int, a: int, b: int) -> Key:
    """A layout is its linears (key and sizes, in order), the seed, a and b: what the matrices depend on, whatever
    the family name or module grouping (Refine from zero names the layout after the MODEL, a LiDB file keeps its
    own)."""
    return tuple(targets.linears), int(seed), int(a), int(b)


class AuxCache:
    """Every target linear's (A_aux, B_aux) per layout (:func:`_key`), at most ``budget`` bytes, least recently
    used out first. One layout is generated at a time (a second caller of the same layout waits, then reuses it)."""

    def __init__(self, budget: int = AUX_CACHE_BYTES) -> None:
        self.budget = int(budget)
        self._entries: OrderedDict[Key, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int]] = \
            OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(entry[2] for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, layout: tuple[TargetLayers, int, int, int]) -> bool:
        """``(targets, seed, a, b) in cache``."""
        return _key(*layout) in self._entries

    def fits(self, targets: TargetLayers, a: int, b: int) -> bool:
        return layout_bytes(targets, a, b) <= self.budget

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def matrices(self, targets: TargetLayers, seed: int, a: int, b: int, progress: Progress | None = None,
                 workers: int = AUX_WORKERS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(down_aux [a, i] per linear, up_aux [o, b] per linear): new lists of the cached (shared) tensors, made
        now if absent (``progress(done, total)`` after each linear; once, at the end, when cached)."""
        key, total = _key(targets, seed, a, b), len(targets.linears)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                down, up = [], []
                with closing(iter_aux(targets.linears, key[1], key[2], key[3], workers)) as pairs:
                    for index, (d, u) in enumerate(pairs):
                        down.append(d)
                        up.append(u)
                        if progress is not None:
                            progress(index + 1, total)
                entry = (tuple(down), tuple(up), layout_bytes(targets, a, b))
                self._keep(key, entry)
            else:
                self._entries.move_to_end(key)
                if progress is not None:
                    progress(total, total)
        return list(entry[0]), list(entry[1])

    def _keep(self, key: Key, entry: tuple) -> None:
        if entry[2] > self.budget:
            return
        while self._entries and self.nbytes + entry[2] > self.budget:
            self._entries.popitem(last=False)
        self._entries[key] = entry


AUX_CACHE = AuxCache()  # the process's one cache (ComfyUI: shared by Load LiDB, Refine and HyperDreamBooth)
