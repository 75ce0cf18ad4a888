"""Host tier fixtures: the real ComfyUI found through COMFYUI_PATH, imported in-process on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

COMFYUI = os.environ.get("COMFYUI_PATH")
HAS_COMFYUI = bool(COMFYUI) and (Path(COMFYUI) / "comfy" / "lora.py").is_file()
SKIP_REASON = "host tier: set COMFYUI_PATH to a ComfyUI v0.3.64 checkout to run it"

# SDXL's real block structure at tiny widths (HOST.md): 140 attention modules named exactly as in SDXL.
TINY_SDXL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 32 + 1536, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's modules, CPU mode set before model management is imported."""
    if not HAS_COMFYUI:
        pytest.skip(SKIP_REASON)
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


@pytest.fixture()
def tiny_sdxl(comfy):
    """A ModelPatcher around a 23.6 M-parameter SDXL built from ComfyUI's own classes, random weights."""
    import torch

    model = comfy.supported_models.SDXL(dict(TINY_SDXL_CONFIG)).get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
