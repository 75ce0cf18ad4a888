"""The HyperDreamBooth hypernetwork: one face photo -> LiDB weights (A_train, B_train) of every target linear.

::

    f      = face_proj(encoder(photo))                               face tokens   [b, n, d]
    t_0    = 0                                                       weight tokens [b, 2L, d]
    t_k    = t_{k-1} + delta(decoder([f ; t_{k-1} + layer_embedding])[:, n:])        k = 1 .. iterations
    A_k[l] = head_a[l](t_k[2l]),   B_k[l] = head_b[l](t_k[2l + 1])    linear heads, one per target linear

The decoder is one pre-LN transformer (open_clip's) over the concatenation of face and weight tokens, shared by
the iterations; each iteration predicts a delta of the weight tokens (``delta``: LayerNorm then Linear). The heads
are linear, so the weights after k iterations are the heads applied to ``t_k``: the sum of per-iteration weight
deltas, plus the heads' bias. ``forward`` returns every iterate, the last being the prediction.
Each target linear owns two tokens (``targets.TOKENS_PER_LINEAR``): A_train's, then B_train's.

Letters: ``b`` photos, ``n`` face tokens, ``d`` decoder width, ``e`` encoder width, ``L`` target linears,
``a``/``c`` LiDB's A_train / B_train sizes (the paper's a = 100, b = 50).
"""

from __future__ import annotations

import torch
from torch import nn

from ..targets import TOKENS_PER_LINEAR, TargetLayers
from .config import HdbConfig
from .encoder import face_tokens, tower_for, tower_image_size


class HyperDreamBooth(nn.Module):
    """Face encoder, weight tokens, refining decoder and per-linear heads for ``targets`` (LiDB sizes a, c)."""

    def __init__(self, config: HdbConfig, targets: TargetLayers, *, a: int, c: int, load_encoder: bool = True,
                 ) -> None:
        super().__init__()
        from open_clip.transformer import Transformer

        self.config, self.targets, self.a, self.c = config, targets, a, c
        self.encoder = tower_for(config, load_weights=load_encoder)
        self.image_size = tower_image_size(self.encoder)
        width = self.encoder.conv1.weight.shape[0]
        n_linears = len(targets.linears)
        d = config.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed + 1)
            self.face_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))
            self.layer_embedding = nn.Parameter(torch.randn(TOKENS_PER_LINEAR * n_linears, d) * d ** -0.5)
            self.decoder = Transformer(d, config.depth, config.heads, mlp_ratio=config.mlp_ratio)
            self.delta = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
            nn.init.zeros_(self.delta[1].weight)  # the first steps train the heads on a zero state, then refine
            self.head_a = nn.Parameter(torch.randn(n_linears, d, a) * d ** -0.5)
            self.head_c = nn.Parameter(torch.randn(n_linears, d, c) * d ** -0.5)
            self.bias_a = nn.Parameter(torch.zeros(n_linears, a))
            self.bias_c = nn.Parameter(torch.zeros(n_linears, c))
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """What the ``hdb`` stage trains: ``encoder`` (unless frozen) and ``decoder`` (projection, tokens, heads)."""
        encoder = [] if self.config.freeze_encoder else list(self.encoder.parameters())
        ids = {id(p) for p in self.encoder.parameters()}
        return {"encoder": encoder, "decoder": [p for p in self.parameters() if id(p) not in ids]}

    def heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight tokens [b, 2L, d] -> (A_train [b, L, a], B_train [b, L, c])."""
        a = torch.einsum("bld,lda->bla", tokens[:, 0::TOKENS_PER_LINEAR], self.head_a) + self.bias_a
        c = torch.einsum("bld,ldc->blc", tokens[:, 1::TOKENS_PER_LINEAR], self.head_c) + self.bias_c
        return a, c

    def forward(self, pixels: torch.Tensor, iterations: int | None = None,
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Face pixels [b, 3, s, s] -> [(A_train [b, L, a], B_train [b, L, c])] after each refinement iteration."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"HyperDreamBooth: face pixels must be [b, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(pixels.shape)}")
        faces = self.face_proj(face_tokens(self.encoder, pixels.to(self.head_a.dtype)))
        n = faces.shape[1]
        tokens = faces.new_zeros(faces.shape[0], *self.layer_embedding.shape)
        out = []
        for _ in range(iterations or self.config.iterations):
            refined = self.decoder(torch.cat([faces, tokens + self.layer_embedding], dim=1))
            tokens = tokens + self.delta(refined[:, n:])
            out.append(self.heads(tokens))
        return out
