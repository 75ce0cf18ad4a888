"""Refinement building blocks: exact rank concatenation, zero-initialised residuals, differentiable tokens."""

from __future__ import annotations

import torch

from hyperlora_core import lora_delta
from hyperlora_core.finetune import CoefficientLoRA, RankRelaxed, ResidualLoRA, concat_by_rank
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


def test_both_modes_start_from_the_prediction_at_id_strength(tiny_hl):
    """The delta training starts from is id_strength × the prediction's delta (the residual starts at zero)."""
    identity, lora = _identity_and_lora(tiny_hl)
    prefixes = lora_prefixes(lora)
    for param in (CoefficientLoRA(tiny_hl, identity, prefixes, strength=0.85), RankRelaxed(lora, 4, strength=0.85)):
        worst = max(float((param.delta(i).detach() - 0.85 * lora_delta(lora, p)).abs().max())
                    for i, p in enumerate(prefixes[:40]))
        off = max(float((param.delta(i).detach() - lora_delta(lora, p)).abs().max())
                  for i, p in enumerate(prefixes[:40]))
        assert worst <= 1e-5 < off


def test_token_gradients_equal_a_plain_einsum_and_bases_are_file_backed(tiny_hl):
    """The basis mix saves the basis by reference; its gradients equal autograd through a float64 einsum on
    bases read with safetensors (an independent reference), and the bases are views of the file, not copies."""
    from safetensors import safe_open

    identity, lora = _identity_and_lora(tiny_hl)
    prefixes = lora_prefixes(lora)
    coef = CoefficientLoRA(tiny_hl, identity, prefixes)
    (sum(coef.delta(i).pow(2).sum() for i in range(12))).backward()
    file = tiny_hl.checkpoint.files["basis"]
    tokens = identity.tokens.detach().double().clone().requires_grad_(True)
    total = 0
    with safe_open(str(file.path), framework="pt") as f:
        for i in range(12):
            module, j = divmod(i, 4)
            linear = ("to_q", "to_k", "to_v", "to_out")[j]
            d_basis = f.get_tensor(f"{module}.{linear}.id_down_basis").double()
            u_basis = f.get_tensor(f"{module}.{linear}.id_up_basis").double()
            down = torch.einsum("k,kir->ir", tokens[8 * module + 2 * j], d_basis)
            up = torch.einsum("k,kro->ro", tokens[8 * module + 2 * j + 1], u_basis)
            total = total + (0.5 * up.t() @ down.t()).pow(2).sum()
    total.backward()
    assert torch.allclose(coef.tokens.grad.double(), tokens.grad, rtol=1e-4, atol=1e-6)
    assert float(tokens.grad.abs().max()) > 0
    assert coef._downs[0].untyped_storage().nbytes() == file.size  # a view of the whole mapped file


def test_memory_lean_mixing_equals_the_core_mixing():
    """finetune.mix_basis (a custom gradient that saves the fp16 basis, not a float32 copy) is basis.mix_bases."""
    from hyperlora_core.basis import mix_bases
    from hyperlora_core.finetune import mix_basis

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, 6, 3, generator=g).half()
    coefs = torch.randn(16, generator=g)
    ours_c = coefs.clone().requires_grad_(True)
    ref_c = coefs.clone().requires_grad_(True)
    ours = mix_basis(ours_c, basis)
    ref = mix_bases(ref_c[None, None], basis[None])[0, 0]
    assert torch.allclose(ours, ref, atol=1e-6)
    weight = torch.randn(6, 3, generator=g)
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.allclose(ours_c.grad, ref_c.grad, atol=1e-5)
