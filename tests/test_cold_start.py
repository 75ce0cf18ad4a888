"""What the core loads when, what it gives back, and the read-ahead and threaded mixing behind a fast cold start.

- Opening a checkpoint builds no network; the first prediction builds each once; ``release_networks`` drops them
  and the next prediction builds them again, with the same result.
- ``ReadAhead`` really puts a file's pages into the page cache (checked with mincore(2) on a disk-cold file), and
  asks for the networks' files before the basis.
- Half-precision mixing runs on as many threads as torch is given, with the same bytes as on one thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time

import pytest
import torch

from hyperlora_core import load_hyperlora
from hyperlora_core import readahead as ra
from hyperlora_core.synthetic import TINY_UNET

from helpers import conditions

PAGE = mmap.PAGESIZE


def test_opening_builds_nothing_and_release_drops_the_networks(tiny_ckpt):
    hl = load_hyperlora(tiny_ckpt, unet=TINY_UNET)
    assert hl.built == () and not hl.builds
    clip, arc = conditions(2)
    first = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    assert hl.built == ("id_projector", "resampler") and dict(hl.builds) == {"id_projector": 1, "resampler": 1}
    hl.release_networks()
    assert hl.built == ()
    hl.identity_to_lora(first)  # mixing needs no network
    assert hl.built == ()
    again = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    assert dict(hl.builds) == {"id_projector": 2, "resampler": 2}
    assert torch.equal(first.tokens, again.tokens)


def test_prefetch_asks_for_the_networks_then_the_basis(tiny_ckpt):
    hl = load_hyperlora(tiny_ckpt, unet=TINY_UNET)
    files = hl.checkpoint.files
    ahead = hl.prefetch(first=[(files["resampler"].path, 0, 10)])
    assert ahead.wait(30)
    order = [path.name for path, _, _ in ahead.spans]
    assert order == ["resampler.safetensors", "id_projector.safetensors", "resampler.safetensors",
                     "base_resampler.safetensors", "hyper_lora_modules.safetensors"]
    assert ahead.spans[-1][1:] == (files["basis"].data_start, files["basis"].size)  # every basis byte, once
    basis_only = hl.prefetch(networks=False)
    assert basis_only is not ahead and [p.name for p, _, _ in basis_only.spans] == ["hyper_lora_modules.safetensors"]


def test_spans_merge_neighbours_and_cover_the_data():
    assert ra.merge([(10, 20), (0, 5), (20, 30)], gap=0) == [(0, 5), (10, 30)]
    assert ra.merge([(0, 5), (7, 9)], gap=2) == [(0, 9)]


def resident(path) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore(2) on a private map, which faults nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        pages = -(-size // PAGE)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(v & 1 for v in vec) / pages
    finally:
        mapped.close()


@pytest.fixture()
def cold_file(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("mincore(2) and posix_fadvise are Linux facts")
    path = tmp_path / "pages.bin"
    with open(path, "wb") as fh:
        fh.write(os.urandom(8 << 20))
        fh.flush()
        os.fsync(fh.fileno())  # clean pages: DONTNEED drops only those
    assert ra.evict(path)
    if resident(path) > 0.5:
        pytest.skip("this filesystem keeps its pages whatever is advised (tmpfs?): nothing to measure")
    return path


@pytest.mark.parametrize("advise", [True, False], ids=["fadvise", "read"])
def test_read_ahead_fills_the_page_cache(cold_file, monkeypatch, advise):
    monkeypatch.setattr(ra, "_ADVISE", advise)  # False: the plain-read fallback (Windows, macOS)
    before = resident(cold_file)
    ahead = ra.ReadAhead([(cold_file, 0, os.path.getsize(cold_file))])
    assert ahead.wait(30)
    deadline = time.monotonic() + 20  # WILLNEED queues the reads: give the disk a moment
    while resident(cold_file) < 0.95 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident(cold_file) >= 0.95, (before, resident(cold_file))


def test_half_precision_mixing_uses_torchs_threads_and_gives_the_same_bytes(tiny_factory):
    hl = load_hyperlora(tiny_factory(dtype=torch.float16), unet=TINY_UNET)
    clip, arc = conditions(1)
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    seen: set[str] = set()

    def progress(done, total):
        seen.update(t.name for t in threading.enumerate() if t.name.startswith("hyperlora-mix"))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hl.identity_to_lora(identity, progress=progress)
        assert not seen  # one thread: mixed inline
        torch.set_num_threads(3)
        three = hl.identity_to_lora(identity, progress=progress)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 3, seen
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)
