"""Host tier: base_strength on Apply HyperLoRA moves the patched weights by exactly the Base-LoRA, in ComfyUI.

In-process on the tiny SDXL built from ComfyUI's own classes, with a synthetic checkpoint that has a base
resampler. An identity without Base tokens leaves the weights as they are and says why in the log.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from nodepack import tiny

from hyperlora_core import load_hyperlora, lora_delta
from hyperlora_core.synthetic import write_checkpoint

from helpers import pack_module

TARGET = "diffusion_model.output_blocks.2.1.transformer_blocks.7.attn2.to_k"


@pytest.fixture(scope="module")
def base_setup(comfy, tmp_path_factory):
    unet = tiny.host_unet()
    hl = load_hyperlora(write_checkpoint(tmp_path_factory.mktemp("ckpt"), unet=unet, base=True), unet=unet)
    g = torch.Generator().manual_seed(4)
    clip = torch.randn(2, 257, 1024, generator=g)
    arc = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
    with_base = hl.predict_identity(clip_tokens=clip, id_embeds=arc, base_clip_tokens=torch.randn(2, 257, 1024,
                                                                                                  generator=g))
    without = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    return SimpleNamespace(apply=pack_module("nodes.apply"), handle=SimpleNamespace(core=hl), with_base=with_base,
                           without=without)


def patched_weight(s, model, identity, base_strength: float) -> torch.Tensor:
    patched = s.apply.apply_identity(model, s.handle, identity, 0.85, base_strength)
    patched.patch_model()
    try:
        return patched.model.state_dict()[TARGET + ".weight"].clone().float()
    finally:
        patched.unpatch_model()


def test_base_strength_changes_the_weights_by_the_base_lora(base_setup, tiny_sdxl):
    s = base_setup
    assert s.with_base.base_tokens is not None
    off = patched_weight(s, tiny_sdxl, s.with_base, 0.0)
    on = patched_weight(s, tiny_sdxl, s.with_base, 0.7)
    base_lora = s.apply.make_lora(s.handle, s.with_base, "base")
    expected = lora_delta(base_lora, TARGET, 0.7).float()
    assert float(expected.abs().max()) > 1e-4  # the Base-LoRA is not zero here
    assert float((on - off - expected).abs().max()) <= 1e-5 * max(1.0, float(off.abs().max()))


def test_identity_without_base_tokens_warns_and_changes_nothing(base_setup, tiny_sdxl, caplog):
    s = base_setup
    off = patched_weight(s, tiny_sdxl, s.without, 0.0)
    with caplog.at_level(logging.WARNING):
        on = patched_weight(s, tiny_sdxl, s.without, 0.7)
    assert torch.equal(on, off)
    assert "base_strength 0.70 ignored: this identity has no Base tokens" in caplog.text
