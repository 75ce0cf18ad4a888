"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

TINY_CLIP_WIDTH = 32  # width of the tiny HF-format CLIP double written by the tiny_clip_folder fixture


def conditions(batch: int, seed: int = 0, clip_dim: int = 1024, embed_dim: int = 512):
    """Random face conditions: CLIP tokens [b, 257, clip_dim] and unit-norm ArcFace embeddings [b, embed_dim]."""
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, 257, clip_dim, generator=g)
    arc = torch.nn.functional.normalize(torch.randn(batch, embed_dim, generator=g), dim=-1)
    return clip, arc
