"""The properties that make the method what it is, checked on tiny checkpoints in the released format."""

from __future__ import annotations

import pytest
import torch

from hyperlora_core import load_hyperlora, lora_delta
from hyperlora_core.synthetic import TINY_UNET
from hyperlora_core.topology import NAMINGS

from helpers import conditions


def test_tokens_are_unit_norm(tiny_hl):
    clip, arc = conditions(3)
    tokens = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc).tokens
    assert tokens.shape == (8 * 140, 16)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[0]), atol=1e-6)


def test_repeated_image_equals_single(tiny_hl):
    clip, arc = conditions(1, seed=1)
    one = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc).tokens
    four = tiny_hl.predict_identity(clip_tokens=clip.repeat(4, 1, 1), id_embeds=arc.repeat(4, 1)).tokens
    assert (one - four).abs().max() <= 1e-6


def test_image_order_does_not_matter(tiny_hl):
    clip, arc = conditions(4, seed=2)
    perm = torch.tensor([2, 0, 3, 1])
    a = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc).tokens
    b = tiny_hl.predict_identity(clip_tokens=clip[perm], id_embeds=arc[perm]).tokens
    assert (a - b).abs().max() <= 1e-6
    # and the average really depends on every image: dropping one changes the result
    c = tiny_hl.predict_identity(clip_tokens=clip[:3], id_embeds=arc[:3]).tokens
    assert (a - c).abs().max() > 1e-3


def test_zero_coefficients_give_zero_lora(tiny_hl):
    clip, arc = conditions(1)
    identity = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    zero = identity.with_tokens(torch.zeros_like(identity.tokens))
    lora = tiny_hl.identity_to_lora(zero)
    weights = [v for k, v in lora.items() if not k.endswith(".alpha")]
    assert len(weights) == 2 * 560
    assert all(float(w.abs().max()) == 0.0 for w in weights)


@pytest.mark.parametrize("order", ["diffusers", "reversed"])
def test_json_order_is_token_order(tiny_factory, order):
    """Same network listed in another json order: the same LoRA per layer; tokens permuted with the json."""
    clip, arc = conditions(2, seed=3)
    ref_hl = load_hyperlora(tiny_factory(order="sgm"), unet=TINY_UNET)
    hl = load_hyperlora(tiny_factory(order=order), unet=TINY_UNET)
    assert hl.module_names != ref_hl.module_names
    ref = ref_hl.identity_to_lora(ref_hl.predict_identity(clip_tokens=clip, id_embeds=arc))
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    got = hl.identity_to_lora(identity)
    assert got.keys() == ref.keys()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5
    # reading tokens in SGM order instead of json order would give another LoRA
    wrong = identity.with_tokens(ref_hl.predict_identity(clip_tokens=clip, id_embeds=arc).tokens)
    bad = hl.identity_to_lora(wrong)
    assert max(float((bad[k] - ref[k]).abs().max()) for k in ref) > 1e-3


@pytest.mark.parametrize("naming", NAMINGS)
def test_every_naming_maps_to_the_same_layers(tiny_factory, naming):
    hl = load_hyperlora(tiny_factory(naming=naming), unet=TINY_UNET)
    clip, arc = conditions(1)
    lora = hl.identity_to_lora(hl.predict_identity(clip_tokens=clip, id_embeds=arc), key_format="comfy")
    assert len(lora) == 3 * 560
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in lora
    assert "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_out.0.lora_up.weight" in lora
    assert lora["diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.lora_down.weight"].shape == (4, 24)


def test_lora_delta_scale_is_half(tiny_hl):
    clip, arc = conditions(1)
    lora = tiny_hl.identity_to_lora(tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc))
    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert float(lora[p + ".alpha"]) == 2.0  # rank 4 -> alpha 2
    expected = 0.5 * lora[p + ".lora_up.weight"] @ lora[p + ".lora_down.weight"]
    assert torch.equal(lora_delta(lora, p), expected)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_paths_stay_close(tiny_ckpt, dtype):
    clip, arc = conditions(2)
    ref = load_hyperlora(tiny_ckpt, unet=TINY_UNET).predict_identity(clip_tokens=clip, id_embeds=arc).tokens
    got = load_hyperlora(tiny_ckpt, unet=TINY_UNET, dtype=dtype).predict_identity(clip_tokens=clip, id_embeds=arc)
    cos = torch.nn.functional.cosine_similarity(got.tokens, ref, dim=-1)
    assert got.tokens.dtype == torch.float32 and float(cos.min()) > 0.99
