"""Both CPU mixing paths agree, half-precision bases keep float32 coefficients, and the fingerprint is stable."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from hyperlora_core import load_hyperlora
from hyperlora_core.basis import BasisBank
from hyperlora_core.synthetic import TINY_UNET

from helpers import conditions


def _identity(hl, seed=0):
    clip, arc = conditions(2, seed=seed)
    return hl.predict_identity(clip_tokens=clip, id_embeds=arc)


@pytest.mark.parametrize("kind", ["id", "base"])
def test_flat_and_staged_paths_agree(tiny_hl, kind):
    clip, arc = conditions(2)
    identity = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc, base_clip_tokens=clip)
    tokens = identity.tokens if kind == "id" else identity.base_tokens
    flat_bank = tiny_hl.bank(kind)
    assert flat_bank.flat is not None  # the released layout takes the flat path
    staged_bank = BasisBank(tiny_hl.checkpoint.files["basis"], tiny_hl.checkpoint.targets, kind, flat=None)
    flat, staged = flat_bank.mix(tokens), staged_bank.mix(tokens)
    assert len(flat) == len(staged) == 560
    worst = max(float((f[s] - g[s]).abs().max()) for f, g in zip(flat, staged, strict=True) for s in ("down", "up"))
    assert worst <= 1e-6


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_basis_rounds_only_the_result(tiny_factory, dtype, bound):
    """Each mixed weight equals the exact mix of the stored half weights, rounded once (plus fp32 noise)."""
    folder = tiny_factory(dtype=dtype)
    hl = load_hyperlora(folder, unet=TINY_UNET)
    identity = _identity(hl)
    mixed = hl.bank("id").mix(identity.tokens)
    basis = load_file(str(folder / "hyper_lora_modules.safetensors"))
    tokens = identity.tokens.double()
    worst = 0.0
    for i in (0, 57, 139):
        for j, linear in enumerate(("to_q", "to_k", "to_v", "to_out")):
            for s, side in enumerate(("down", "up")):
                b = basis[f"{i}.{linear}.id_{side}_basis"].double()
                exact = torch.einsum("k,kab->ab", tokens[8 * i + 2 * j + s], b)
                rel = (mixed[4 * i + j][side].double() - exact).abs() / exact.abs().clamp_min(1e-3)
                worst = max(worst, float(rel.max()))
    assert worst <= bound * 1.01
    assert worst > 0  # the bound is really exercised: the result is rounded


def test_fingerprint_is_content_based(tiny_factory, tmp_path):
    a = tiny_factory(seed=0)
    shutil.copytree(a, tmp_path / "copy")
    same = load_hyperlora(tmp_path / "copy", unet=TINY_UNET).fingerprint
    assert same == load_hyperlora(a, unet=TINY_UNET).fingerprint
    assert same != load_hyperlora(tiny_factory(seed=1), unet=TINY_UNET).fingerprint
