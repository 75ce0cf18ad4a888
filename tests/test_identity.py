"""Identity files: exact fp16 round trip, bounded int8 error, released-size budgets, refusal of strangers."""

from __future__ import annotations

import pytest
import torch

from hyperlora_core import Identity, IdentityFormatError, IdentityMismatchError, load_hyperlora, save_lora
from hyperlora_core.resampler import normalize_tokens
from hyperlora_core.synthetic import TINY_UNET
from hyperlora_core.topology import sdxl_modules

from helpers import conditions

RELEASED_TOKENS, RELEASED_K = 8 * 140, 128


def released_size_identity(seed=0, base=False):
    g = torch.Generator().manual_seed(seed)
    tokens = normalize_tokens(torch.randn(RELEASED_TOKENS, RELEASED_K, generator=g))
    base_tokens = normalize_tokens(torch.randn(RELEASED_TOKENS, RELEASED_K, generator=g)) if base else None
    names = tuple(m.name("kohya_diffusers") for m in sdxl_modules())
    return Identity(tokens=tokens, module_names=names, fingerprint="f" * 32, base_tokens=base_tokens)


@pytest.mark.parametrize("storage,limit", [("fp16", 300_000), ("int8", 150_000)])
def test_released_size_budget(tmp_path, storage, limit):
    path = released_size_identity().save(tmp_path / f"id_{storage}.safetensors", storage=storage)
    assert path.stat().st_size <= limit, f"{storage}: {path.stat().st_size} bytes"


def test_fp16_round_trip_is_exact(tmp_path):
    identity = released_size_identity(base=True)
    identity.meta["source"] = "unit test"
    loaded = Identity.load(identity.save(tmp_path / "a.safetensors", storage="fp16"))
    assert torch.equal(loaded.tokens, identity.tokens.half().float())
    assert torch.equal(loaded.base_tokens, identity.base_tokens.half().float())
    assert loaded.module_names == identity.module_names and loaded.fingerprint == identity.fingerprint
    assert loaded.meta == {"source": "unit test"}
    fp32 = Identity.load(identity.save(tmp_path / "b.safetensors", storage="fp32"))
    assert torch.equal(fp32.tokens, identity.tokens)


def test_int8_error_is_within_the_stated_bound(tmp_path):
    identity = released_size_identity(seed=3)
    loaded = Identity.load(identity.save(tmp_path / "q.safetensors", storage="int8"))
    err = (loaded.tokens - identity.tokens).abs()
    bound = identity.tokens.abs().amax(dim=-1, keepdim=True) / 254 * 1.002  # half a step, fp16 scale rounding
    assert bool((err <= bound).all())
    # the README states: max abs error <= 2e-3 and cosine >= 0.9999 per token at released size
    assert float(err.max()) <= 2e-3
    cos = torch.nn.functional.cosine_similarity(loaded.tokens, identity.tokens, dim=-1)
    assert float(cos.min()) >= 0.9999
    # ...and it is not lossless, so the bound is really being exercised
    assert float(err.max()) > 0


def test_not_an_identity_file(tmp_path):
    path = save_lora({"x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(IdentityFormatError, match="not a HyperLoRA identity"):
        Identity.load(path)


def test_loaded_identity_refused_by_another_checkpoint(tiny_factory, tmp_path):
    a = load_hyperlora(tiny_factory(seed=0), unet=TINY_UNET)
    b = load_hyperlora(tiny_factory(seed=1), unet=TINY_UNET)
    c = load_hyperlora(tiny_factory(seed=0, naming="kohya_sgm"), unet=TINY_UNET)
    clip, arc = conditions(1)
    saved = a.predict_identity(clip_tokens=clip, id_embeds=arc).save(tmp_path / "id.safetensors")
    identity = Identity.load(saved)
    assert len(a.identity_to_lora(identity)) == 3 * 560
    with pytest.raises(IdentityMismatchError, match="made by checkpoint"):
        b.identity_to_lora(identity)
    with pytest.raises(IdentityMismatchError, match="modules that differ"):
        c.identity_to_lora(identity)


def test_bad_token_shape_is_refused():
    with pytest.raises(IdentityFormatError, match=r"\[2 per target linear of 2 modules, K\]"):
        Identity(tokens=torch.zeros(15, 4), module_names=("a", "b"), fingerprint="x")
