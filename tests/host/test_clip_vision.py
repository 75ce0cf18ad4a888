"""Host tier: the CLIP folder beside a checkpoint is loaded by ComfyUI's own comfy.clip_vision (nodes/handle.py),
and its tokens equal transformers' CLIPVisionModel ``hidden_states[-2]`` on the same weights."""

from __future__ import annotations

import pytest
import torch

from helpers import pack_module

# ComfyUI stores vision encoders in fp16 on the CPU too (text_encoder_dtype) and computes in fp32 (manual_cast):
# the reference runs in fp32 on the same fp16-rounded weights, so only summation order differs.
BOUND = 1e-4


def test_clip_folder_loads_through_comfy_clip_vision(comfy, tiny_clip_folder):
    transformers = pytest.importorskip("transformers")
    import comfy.clip_vision

    handle = pack_module("nodes.handle")
    managed = handle.ManagedClip(tiny_clip_folder)
    assert managed.clip_vision is None  # loaded on first use
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = managed.encode(pixels)
    assert isinstance(managed.clip_vision, comfy.clip_vision.ClipVisionModel)
    reference = transformers.CLIPVisionModel.from_pretrained(str(tiny_clip_folder)).eval()
    stored = managed.clip_vision.dtype
    reference = reference.to(stored).float()  # the same weight rounding as ComfyUI's storage
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert tokens.shape == expected.shape and tokens.dtype == torch.float32
    diff = (tokens - expected).abs().max().item()
    assert diff <= BOUND, diff
    # the last block is not part of the penultimate tokens: the final hidden state differs by far more
    with torch.no_grad():
        last = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert (tokens - last).abs().max().item() > 100 * BOUND


def test_clip_folder_errors_are_ours(comfy, tmp_path):
    handle = pack_module("nodes.handle")
    errors = pack_module("hyperlora_core.errors")
    with pytest.raises(errors.ClipModelMissing, match="model.safetensors"):
        handle.ManagedClip(tmp_path)
