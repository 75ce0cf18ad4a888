"""The face encoder: open_clip's ``VisionTransformer`` (the tower ``hyperlora_core.clip`` builds), trainable.

From a CLIP file (``hdb.encoder``) the tower is ``clip.ClipVisionEncoder``'s: the file's sizes, its weights, every
block but the last, and the penultimate tokens as features. Without a file it is a randomly initialised tower of
the ``hdb.encoder_*`` sizes. Either way ``face_tokens`` runs it with gradients (the encoder trains unless
``hdb.freeze_encoder``) and returns all tokens, class token first.

Letters: ``b`` images, ``n`` tokens (1 + grid²), ``e`` encoder width.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..clip import ClipVisionConfig, ClipVisionEncoder, build_tower
from .config import HdbConfig


def random_tower(config: HdbConfig) -> nn.Module:
    """A freshly initialised tower of the ``encoder_*`` sizes (open_clip's own initialisation), without its head."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        visual = VisionTransformer(image_size=config.image_size, patch_size=config.patch_size,
                                   width=config.encoder_width, layers=config.encoder_layers,
                                   heads=config.encoder_heads, mlp_ratio=config.encoder_mlp_ratio,
                                   act_layer=QuickGELU if config.encoder_quick_gelu else nn.GELU,
                                   norm_layer=partial(LayerNorm, eps=config.encoder_eps))
    visual.prune_intermediate_layers(indices=[config.encoder_layers - 1], prune_norm=True, prune_head=True)
    return visual


def clip_tower(path: str) -> nn.Module:
    """CLIP ViT-L/14's tower from ``path`` (checked key by key by ``clip``), fp32 on the CPU, trainable."""
    return ClipVisionEncoder.from_folder(path, device="cpu", dtype=torch.float32).visual.requires_grad_(True).train()


def tower_for(config: HdbConfig, *, load_weights: bool = True) -> nn.Module:
    """The face encoder ``config`` asks for. ``load_weights=False`` builds a CLIP-sized tower without reading its
    weights (a checkpoint's own weights replace them)."""
    if not config.encoder:
        return random_tower(config)
    if load_weights:
        return clip_tower(config.encoder)
    from ..clip import inspect_clip

    clip_config: ClipVisionConfig = inspect_clip(config.encoder)[0]
    return build_tower(clip_config, clip_config.layers - 1).to_empty(device="cpu")


def tower_image_size(visual: nn.Module) -> int:
    return int(visual.image_size[0]) if isinstance(visual.image_size, tuple) else int(visual.image_size)


def face_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [b, 3, s, s] (``clip.preprocess`` for a CLIP tower) -> tokens [b, n, e] of the tower's last block."""
    last = len(visual.transformer.resblocks) - 1
    out = visual.forward_intermediates(pixels, indices=[last], intermediates_only=True, output_fmt="NLC",
                                       output_extra_tokens=True)
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
