"""Giving a memory-mapped file's pages back: the resident pages of a view leave this process's memory (Linux
``madvise(MADV_DONTNEED)``) and are read again from the page cache, or the file, the next time they are used.

Only views of a *private, never written* file mapping made by ``torch.from_file(..., shared=False)`` qualify: for
such a mapping, dropping a page loses nothing. The caller passes the mapping itself, and a view whose storage is
not that mapping's is left alone, so anonymous memory (whose pages would be zeroed) is never touched.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

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


def release_pages(view: torch.Tensor, mapping: torch.Tensor) -> bool:
    """Drop the resident pages under the contiguous ``view`` of ``mapping`` (whole pages, rounded outwards: a
    neighbour's page is read again when next used). Returns whether pages were dropped."""
    storage = mapping.untyped_storage()
    if (_LIBC is None or view.device.type != "cpu" or view.numel() == 0
            or view.untyped_storage().data_ptr() != storage.data_ptr() or not view.is_contiguous()):
        return False
    base, page = storage.data_ptr(), mmap.PAGESIZE
    start = max(base, view.data_ptr() // page * page)
    end = min(base + storage.nbytes(), view.data_ptr() + view.numel() * view.element_size())
    end = -(-end // page) * page
    return _LIBC.madvise(start, end - start, MADV_DONTNEED) == 0
