"""The HyperDreamBooth network's configuration: the ``[hdb]`` section of a training config.

One validated dataclass. The face encoder's sizes are read from the CLIP file when ``encoder`` names one (a user
never types them for ViT-L/14); the ``encoder_*`` fields size a randomly initialised encoder (tests, toy runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HyperLoRAError


class HdbConfigError(HyperLoRAError, ValueError):
    """An [hdb] value cannot be used."""


@dataclass(frozen=True)
class HdbConfig:
    """The hypernetwork (encoder, decoder, heads) and its training loss."""

    encoder: str = ""  # CLIP ViT-L/14 (HF folder or open_clip .safetensors) initialising the face encoder; "" random
    encoder_width: int = 1024  # random encoder only: token width
    encoder_layers: int = 23  # random encoder only: transformer blocks (ViT-L/14's 24 minus the last, as from a file)
    encoder_heads: int = 16  # random encoder only: attention heads
    patch_size: int = 14  # random encoder only: patch side in pixels
    image_size: int = 224  # random encoder only: input side in pixels (a file's own size wins)
    encoder_mlp_ratio: float = 4.0  # random encoder only: feed-forward width / token width (ViT-L/14: 4096 / 1024)
    encoder_quick_gelu: bool = True  # random encoder only: QuickGELU (OpenAI CLIP) rather than exact GELU
    encoder_eps: float = 1e-5  # random encoder only: LayerNorm epsilon
    freeze_encoder: bool = False  # keep the face encoder's weights fixed (train decoder and heads only)
    dim: int = 1024  # decoder width (weight tokens and projected face tokens)
    depth: int = 4  # decoder blocks
    heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # decoder feed-forward width = mlp_ratio × dim
    iterations: int = 4  # refinement iterations: each adds a decoder-predicted delta to the weight tokens
    iterate_decay: float = 0.8  # γ: iterate k of K has weight γ^(K−k) in the weight loss (0: the last one only)
    weight_loss: float = 1.0  # λ_w: weight of L2(predicted, pre-optimised LiDB weights) beside the denoising loss
    denoise_loss: float = 1.0  # weight of the denoising loss with the predicted LiDB applied (0: weights only)
    supervision: str = ""  # folder of pre-optimised LiDB files, one per identity (python -m ... lidb-preopt)
    init_seed: int = 0  # seed of the initial weights

    def __post_init__(self) -> None:
        for name in ("encoder_width", "encoder_layers", "encoder_heads", "patch_size", "image_size", "dim", "depth",
                     "heads", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise HdbConfigError(f"hdb.{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads or self.encoder_width % self.encoder_heads:
            raise HdbConfigError(f"hdb.dim ({self.dim}) and hdb.encoder_width ({self.encoder_width}) must be "
                                 f"multiples of hdb.heads ({self.heads}) and hdb.encoder_heads ({self.encoder_heads})")
        if self.image_size % self.patch_size:
            raise HdbConfigError(f"hdb.image_size {self.image_size} is not a multiple of hdb.patch_size "
                                 f"{self.patch_size}")
        if not 0 <= self.iterate_decay <= 1:
            raise HdbConfigError(f"hdb.iterate_decay must be in [0, 1], got {self.iterate_decay!r}")
        for name in ("weight_loss", "denoise_loss", "mlp_ratio", "encoder_mlp_ratio", "encoder_eps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise HdbConfigError(f"hdb.{name} must be a number >= 0, got {value!r}")
        if self.weight_loss == 0 and self.denoise_loss == 0:
            raise HdbConfigError("hdb.weight_loss and hdb.denoise_loss are both 0: nothing would train")
