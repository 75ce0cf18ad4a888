"""Host tier: LoRAs written by the core load in ComfyUI's own LoRA path, every key, with the method's scale."""

from __future__ import annotations

import logging

import pytest
import torch
from nodepack import tiny

from hyperlora_core import lora_delta, save_lora


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    hl, identity = tiny.hyperlora_and_identity(tmp_path_factory.mktemp("ckpt"), images=2)
    return hl.identity_to_lora(identity, key_format="kohya"), hl.identity_to_lora(identity, key_format="comfy")


@pytest.mark.parametrize("key_format", ["kohya", "comfy"])
def test_every_key_loads_with_the_method_scale(comfy, tiny_sdxl, lora_pair, key_format, tmp_path, caplog):
    lora = lora_pair[0] if key_format == "kohya" else lora_pair[1]
    path = save_lora(lora, tmp_path / "id.safetensors", dtype=torch.float32)
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)  # as LoraLoader reads it
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(tiny_sdxl, None, sd, 0.8, 0.0)
    assert "lora key not loaded" not in caplog.text
    keys = [k for k in patched.patches if ".transformer_blocks." in k]
    assert len(keys) == 560 == len(patched.patches)
    assert not tiny_sdxl.patches  # the incoming model is untouched: a clone was patched
    target = "diffusion_model.output_blocks.2.1.transformer_blocks.7.attn2.to_k.weight"
    before = tiny_sdxl.model.state_dict()[target].clone()
    patched.patch_model()
    try:
        after = patched.model.state_dict()[target]
        prefix = ("lora_unet_output_blocks_2_1_transformer_blocks_7_attn2_to_k" if key_format == "kohya"
                  else "diffusion_model.output_blocks.2.1.transformer_blocks.7.attn2.to_k")
        up, down = lora[prefix + ".lora_up.weight"], lora[prefix + ".lora_down.weight"]
        expected = before + 0.8 * 0.5 * (up @ down)  # strength · alpha / rank, alpha = rank / 2
        assert torch.allclose(lora_delta(lora, prefix, 0.8), expected - before, atol=1e-7)
        assert float((after - expected).abs().max()) <= 1e-6
    finally:
        patched.unpatch_model()
    assert torch.equal(tiny_sdxl.model.state_dict()[target], before)
