"""Saves are atomic, and what a file or an array declares about its own size is capped before it is believed.

- A save that fails half-way (the writer raises after some bytes) leaves neither a partial file under the target
  name nor a temporary file, and an older file of that name stays as it was.
- An identity whose compressed module-name list inflates to 100 MB is refused after at most 4 MiB of output.
- A 20000 x 20000 photo (a zero-stride view: no memory behind it) is refused before any copy is made.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hyperlora_core.safetensors_file as stf
from hyperlora_core import Identity, IdentityFormatError, save_lora
from hyperlora_core.errors import ImageFormatError
from hyperlora_core.identity import MAX_NAMES_BYTES
from hyperlora_core.images import to_rgb8


def small_identity() -> Identity:
    tokens = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    return Identity(tokens=tokens, module_names=("m0", "m1"), fingerprint="f" * 32)


def failing_writer(tensors, filename, metadata=None):
    """Writes a few bytes of a file, then fails as a full disk would."""
    with open(filename, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    raise OSError(28, "No space left on device")


SAVES = {
    "identity": lambda path: small_identity().save(path),
    "lora": lambda path: save_lora({"a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2),
                                    "a.alpha": torch.tensor(1.0)}, path),
}


@pytest.mark.parametrize("kind", sorted(SAVES))
def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, kind):
    target = tmp_path / "new.safetensors"
    monkeypatch.setattr(stf, "save_file", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        SAVES[kind](target)
    assert list(tmp_path.iterdir()) == [], [p.name for p in tmp_path.iterdir()]


@pytest.mark.parametrize("kind", sorted(SAVES))
def test_a_failed_save_keeps_the_older_file(tmp_path, monkeypatch, kind):
    target = tmp_path / "old.safetensors"
    SAVES[kind](target)
    before = target.read_bytes()
    monkeypatch.setattr(stf, "save_file", failing_writer)
    with pytest.raises(OSError):
        SAVES[kind](target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old.safetensors"]


def test_a_good_save_leaves_only_the_file(tmp_path):
    loaded = Identity.load(small_identity().save(tmp_path / "id.safetensors"))
    assert torch.equal(loaded.tokens, small_identity().tokens.half().float())
    assert [p.name for p in tmp_path.iterdir()] == ["id.safetensors"]


def test_module_names_that_inflate_past_the_cap_are_refused(tmp_path):
    bomb = zlib.compress(json.dumps(["x" * 100_000_000]).encode(), 9)  # 100 MB of names in ~100 KB
    assert len(bomb) < 200_000
    metadata = {"format": "hyperlora.identity", "version": "1", "storage": "fp16", "fingerprint": "f" * 32,
                "module_names": base64.b64encode(bomb).decode(), "meta": "{}"}
    path = tmp_path / "bomb.safetensors"
    save_file({"tokens": torch.zeros(16, 8, dtype=torch.float16)}, str(path), metadata=metadata)
    tracemalloc.start()
    with pytest.raises(IdentityFormatError, match="inflates past 4 MiB"):
        Identity.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * MAX_NAMES_BYTES, f"peak {peak / 2**20:.1f} MiB while refusing"


def test_names_just_under_the_cap_still_load(tmp_path):
    path = small_identity().save(tmp_path / "ok.safetensors")
    assert Identity.load(path).module_names == ("m0", "m1")


def test_a_huge_photo_is_refused_before_any_copy():
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.float32), (20000, 20000, 3))  # 4.8 GB if it were real
    tracemalloc.start()
    with pytest.raises(ImageFormatError, match=r"photo 4: 20000 × 20000 pixels \(400 MP\).*downscale"):
        to_rgb8(huge, index=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB while refusing"
