"""Page-cache hints for the memory-mapped checkpoint files.

The 3 GB basis is needed for sure once a photo arrives, but its first mixing would otherwise fault every page in
from disk *after* face analysis, CLIP and the resampler have finished. ``ReadAhead`` asks the kernel for the
pages in a background thread (``posix_fadvise(WILLNEED)``, which queues the reads and returns; a plain read into
a small buffer where the call does not exist), so the disk works while the CPU encodes the faces. Nothing is
mapped or copied into the process: the pages land in the page cache, which the kernel may reclaim at any time.

``evict`` drops a file's clean cached pages (``DONTNEED``): benchmarks use it to start disk-cold.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 32 << 20  # bytes per hint or read: small enough that the reads stay in order and a stop is quick
Span = tuple[Path, int, int]  # file, start byte, end byte (exclusive)

_ADVISE = hasattr(os, "posix_fadvise")


def merge(spans: Iterable[tuple[int, int]], gap: int = 1 << 20) -> list[tuple[int, int]]:
    """Byte ranges sorted and joined where they touch or lie within ``gap`` of each other."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _advise(path: Path, start: int, end: int, stop: threading.Event) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(start, end, CHUNK):
            if stop.is_set():
                return
            os.posix_fadvise(fd, offset, min(CHUNK, end - offset), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _read(path: Path, start: int, end: int, stop: threading.Event, buffer: bytearray) -> None:
    """Where posix_fadvise does not exist (Windows, macOS): read the range through a reused buffer."""
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        for offset in range(start, end, CHUNK):
            if stop.is_set():
                return
            fh.readinto(memoryview(buffer)[: min(CHUNK, end - offset)])


class ReadAhead:
    """Pages of ``spans`` requested in order by one daemon thread; ``wait`` joins it, ``stop`` cuts it short."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self.spans = [s for s in spans if s[2] > s[1]]
        self.bytes = sum(end - start for _, start, end in self.spans)  # how much was asked for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hyperlora-readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = None if _ADVISE else bytearray(CHUNK)
        for path, start, end in self.spans:
            try:
                if buffer is None:
                    _advise(path, start, end, self._stop)
                else:
                    _read(path, start, end, self._stop, buffer)
            except OSError as exc:  # e.g. a file removed since it was opened: the mixing itself will say so
                log.debug("read-ahead of %s stopped: %s", path, exc)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """True once every hint has been given (the reads themselves may still be in flight)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()


def evict(path: str | os.PathLike) -> bool:
    """Drop the clean cached pages of ``path`` (not those another process has mapped); False where unsupported."""
    if not _ADVISE:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True
