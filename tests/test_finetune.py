"""Refinement building blocks: exact rank concatenation, zero-initialised residuals, differentiable tokens."""

from __future__ import annotations

import torch

from hyperlora_core import lora_delta
from hyperlora_core.finetune import CoefficientLoRA, ResidualLoRA, concat_by_rank
from hyperlora_core.lora_io import lora_prefixes

from helpers import conditions


def _identity_and_lora(hl):
    clip, arc = conditions(1, seed=4)
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    return identity, hl.identity_to_lora(identity, key_format="comfy")


def test_concat_by_rank_adds_the_deltas(tiny_hl):
    _, a = _identity_and_lora(tiny_hl)
    shapes = {p: tuple((a[p + ".lora_up.weight"] @ a[p + ".lora_down.weight"]).shape) for p in lora_prefixes(a)}
    residual = ResidualLoRA(shapes, rank=3, seed=1)
    with torch.no_grad():
        for up in residual.up:
            up.normal_()
    b = residual.state_dict_lora()
    both = concat_by_rank(a, b)
    worst = max(float((lora_delta(both, p) - lora_delta(a, p) - lora_delta(b, p)).abs().max())
                for p in lora_prefixes(a))
    assert worst <= 1e-5 and both[lora_prefixes(a)[0] + ".lora_down.weight"].shape[0] == 4 + 3


def test_residual_starts_at_zero(tiny_hl):
    _, a = _identity_and_lora(tiny_hl)
    shapes = {p: (a[p + ".lora_up.weight"].shape[0], a[p + ".lora_down.weight"].shape[1]) for p in lora_prefixes(a)}
    residual = ResidualLoRA(shapes, rank=4)
    assert all(float(residual.delta(i).detach().abs().max()) == 0.0 for i in range(len(shapes)))
    assert float(residual.down[0].detach().abs().max()) > 0  # down is random, so gradients reach up


def test_coefficients_reproduce_the_prediction_and_train(tiny_hl):
    identity, lora = _identity_and_lora(tiny_hl)
    prefixes = lora_prefixes(lora)
    coef = CoefficientLoRA(tiny_hl, identity, prefixes)
    worst = max(float((coef.delta(i).detach() - lora_delta(lora, p)).abs().max()) for i, p in enumerate(prefixes[:40]))
    assert worst <= 1e-5
    loss = sum(coef.delta(i).pow(2).sum() for i in range(8))
    loss.backward()
    assert coef.tokens.grad is not None and float(coef.tokens.grad[:32].abs().max()) > 0
    with torch.no_grad():
        coef.tokens -= 0.5 * coef.tokens.grad
    coef.renormalize()
    assert torch.allclose(coef.tokens.norm(dim=-1), torch.ones(coef.tokens.shape[0]), atol=1e-6)
    refined = coef.to_identity()
    assert refined.meta["refined"] == "coefficients" and not torch.equal(refined.tokens, identity.tokens)
    assert "refined" not in identity.meta
