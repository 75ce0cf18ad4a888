"""Sliders and identity arithmetic against direct computations of the weight deltas."""

from __future__ import annotations

import pytest
import torch

from hyperlora_core import IdentityMismatchError, average, interpolate, load_hyperlora, lora_delta, lora_difference
from hyperlora_core.lora_io import lora_prefixes
from hyperlora_core.synthetic import TINY_UNET

from helpers import conditions


@pytest.fixture()
def pair(tiny_hl):
    ids = []
    for seed in (10, 11):
        clip, arc = conditions(1, seed=seed)
        ids.append(tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc))
    return ids


@pytest.mark.parametrize("strength", [1.0, 0.7, -2.0])
def test_weight_difference_is_exact(tiny_hl, pair, strength):
    a, b = (tiny_hl.identity_to_lora(i) for i in pair)
    diff = lora_difference(a, b, strength)
    prefixes = lora_prefixes(a)
    assert len(prefixes) == 560 and lora_prefixes(diff) == prefixes
    assert diff[prefixes[0] + ".lora_down.weight"].shape[0] == 8  # rank 4 + 4
    worst = max(float((lora_delta(diff, p) - strength * (lora_delta(a, p) - lora_delta(b, p))).abs().max())
                for p in prefixes)
    assert worst <= 1e-6


def test_interpolation_endpoints_and_norm(pair):
    a, b = pair
    assert (interpolate(a, b, 0.0).tokens - a.tokens).abs().max() <= 1e-6
    assert (interpolate(a, b, 1.0).tokens - b.tokens).abs().max() <= 1e-6
    for t in (0.5, 1.5, -0.5):
        mid = interpolate(a, b, t).tokens
        assert torch.allclose(mid.norm(dim=-1), torch.ones(mid.shape[0]), atol=1e-6)
    expected = torch.nn.functional.normalize(a.tokens * -0.5 + b.tokens * 1.5, dim=-1, eps=0)
    assert (interpolate(a, b, 1.5).tokens - expected).abs().max() <= 1e-5


def test_weighted_average(pair):
    a, b = pair
    assert (average([a, a, b]).tokens - interpolate(a, b, 1 / 3).tokens).abs().max() <= 1e-6
    assert (average([a, b], weights=[3, 1]).tokens - interpolate(a, b, 0.25).tokens).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="one weight per identity"):
        average([a, b], weights=[1])


def test_mixing_identities_of_two_checkpoints_is_refused(tiny_factory, pair):
    other = load_hyperlora(tiny_factory(seed=5), unet=TINY_UNET)
    clip, arc = conditions(1)
    c = other.predict_identity(clip_tokens=clip, id_embeds=arc)
    with pytest.raises(IdentityMismatchError, match="different checkpoints"):
        interpolate(pair[0], c, 0.5)
