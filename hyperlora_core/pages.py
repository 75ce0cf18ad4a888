"""Giving a memory-mapped file's pages back: the resident pages of a view leave this process's memory (Linux
``madvise(MADV_DONTNEED)``) and are read again from the page cache, or the file, the next time they are used.

Only views of a *private, never written* file mapping made by ``torch.from_file(..., shared=False)`` qualify: for
such a mapping, dropping a page loses nothing. The caller passes the mapping itself; it is checked once against
``/proc/self/maps`` to be a file's mapping, and a view whose storage is not the mapping's is left alone, so
anonymous memory (whose pages would be zeroed) is never touched.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import weakref
from pathlib import Path

import torch

MADV_DONTNEED = 4  # Linux


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()
_FILE_BACKED: dict[int, bool] = {}  # id of a live mapping tensor -> whether it maps a file (checked once)


def _maps_a_file(address: int) -> bool:
    """Whether ``address`` lies in a mapping of a file (a path and an inode in /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/")
    return False


def _is_file_mapping(mapping: torch.Tensor) -> bool:
    key = id(mapping)
    if key not in _FILE_BACKED:
        _FILE_BACKED[key] = _maps_a_file(mapping.untyped_storage().data_ptr())
        weakref.finalize(mapping, _FILE_BACKED.pop, key, None)
    return _FILE_BACKED[key]


def release_pages(view: torch.Tensor, mapping: torch.Tensor) -> bool:
    """Drop the resident pages under the contiguous ``view`` of ``mapping`` (whole pages, rounded outwards: a
    neighbour's page is read again when next used). Returns whether pages were dropped."""
    storage = mapping.untyped_storage()
    if (_LIBC is None or view.device.type != "cpu" or view.numel() == 0
            or view.untyped_storage().data_ptr() != storage.data_ptr() or not view.is_contiguous()
            or not _is_file_mapping(mapping)):
        return False
    base, page = storage.data_ptr(), mmap.PAGESIZE
    start = max(base, view.data_ptr() // page * page)
    end = min(base + storage.nbytes(), view.data_ptr() + view.numel() * view.element_size())
    end = -(-end // page) * page
    return _LIBC.madvise(start, end - start, MADV_DONTNEED) == 0
