"""Giving a memory-mapped file's pages back (hyperlora_core.pages): the resident set shrinks, the data stays the
same, and memory that is not the file's mapping is never touched. Linux only (madvise, /proc)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hyperlora_core.pages import release_pages

from helpers import conditions

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
MIB = 1 << 20


def _rss_file() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssFile"))


def test_a_mapped_views_pages_leave_and_read_back_the_same(tmp_path):
    path = tmp_path / "data.bin"
    data = torch.randn(32 * MIB // 4, generator=torch.Generator().manual_seed(0))
    path.write_bytes(data.numpy().tobytes())
    mapping = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    view = mapping.view(torch.float32)
    before = _rss_file()
    assert torch.equal(view, data)  # every page read: resident
    read = _rss_file() - before
    assert release_pages(view[: view.numel() // 2], mapping)
    half = _rss_file() - before
    assert release_pages(view, mapping)
    gone = _rss_file() - before
    assert read > 30 * MIB and 14 * MIB < read - half < 18 * MIB and gone < 2 * MIB, (read, half, gone)
    assert torch.equal(view, data)  # read again from the page cache, unchanged


def test_memory_that_is_not_the_mapping_is_never_touched(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 * MIB))
    mapping = torch.from_file(str(path), shared=False, size=4 * MIB, dtype=torch.uint8)
    anonymous = torch.ones(4 * MIB, dtype=torch.uint8)  # dropping its pages would zero them
    assert not release_pages(anonymous, mapping)  # not a view of the mapping
    assert not release_pages(anonymous[:MIB], anonymous)  # passed as its own "mapping": not a file's
    assert int(anonymous.sum()) == 4 * MIB
    assert release_pages(mapping, mapping)


def test_mixing_with_release_gives_the_same_lora_and_leaves_no_basis_pages(tiny_hl):
    clip, arc = conditions(2)
    identity = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    kept = tiny_hl.identity_to_lora(identity)
    tiny_hl.release_bases()
    before = _rss_file()
    released = tiny_hl.identity_to_lora(identity, release=True)
    after = _rss_file()
    tiny_hl.release_bases()
    assert kept.keys() == released.keys() and all(torch.equal(kept[k], released[k]) for k in kept)
    assert tiny_hl.bank("id").flat is not None
    size = tiny_hl.checkpoint.files["basis"].size
    assert after - before < 0.25 * size, (after - before, size)
