"""The Perceiver resampler and the ID projector, with the released parameter names.

Letters used in shapes: ``b`` reference images, ``q`` latent (query) tokens, ``n`` condition tokens,
``h`` heads, ``d`` channels, ``k`` basis size, ``e`` ArcFace embedding width, ``t`` identity tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import IdProjectorConfig, ResamplerConfig

NORM_EPS = 1e-8  # inside the rsqrt of the per-token L2 normalisation


class Attention(nn.Module):
    """diffusers-style attention without biases on q, k, v and out; ``to_out`` is a list as in diffusers."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents [b, q, d], context [b, n, d] -> [b, q, d]"""
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(latents), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h q d -> b q (h d)"))


class GELUProj(nn.Module):
    """``net.0`` of a diffusers FeedForward: a projection followed by exact (erf) GELU."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class PerceiverBlock(nn.Module):
    """Self-attention, cross-attention to x, (cross-attention to y), feed-forward; each pre-normed, residual."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm_attn1 = nn.LayerNorm(d)
        self.norm_attn2_l = nn.LayerNorm(d)
        self.norm_attn2_x = nn.LayerNorm(d)
        self.norm_ff = nn.LayerNorm(d)
        self.attn1 = Attention(d, config.heads, config.dim_head)
        self.attn2 = Attention(d, config.heads, config.dim_head)
        self.ff = FeedForward(d, config.ff_inner)
        self.two_conditions = config.two_conditions
        if self.two_conditions:
            self.norm_attn3_l = nn.LayerNorm(d)
            self.norm_attn3_y = nn.LayerNorm(d)
            self.attn3 = Attention(d, config.heads, config.dim_head)

    def forward(self, latents: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        """x None bypasses the cross-attention to x (training stage 2 reads CLIP only)."""
        h = self.norm_attn1(latents)
        latents = latents + self.attn1(h, h)
        if x is not None:
            latents = latents + self.attn2(self.norm_attn2_l(latents), self.norm_attn2_x(x))
        if self.two_conditions:
            latents = latents + self.attn3(self.norm_attn3_l(latents), self.norm_attn3_y(y))
        return latents + self.ff(self.norm_ff(latents))


class Resampler(nn.Module):
    """Condition tokens of B reference images -> one set of unit-norm coefficient tokens [q, k]."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.zeros(1, config.num_queries, config.dim))
        self.proj_in = nn.Linear(config.x_dim, config.dim)
        if config.two_conditions:
            self.proj_in_2 = nn.Linear(config.y_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.out_dim)
        self.layers = nn.ModuleList([PerceiverBlock(config) for _ in range(config.depth)])

    def per_image(self, x: torch.Tensor | None, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, n, dx], y [b, n', dy] -> un-averaged, un-normalised tokens [b, q, k]; x None: the x path is off."""
        latents = self.latents.expand((x if x is not None else y).shape[0], -1, -1)
        x = self.proj_in(x) if x is not None else None
        y = self.proj_in_2(y) if self.config.two_conditions else None
        for layer in self.layers:
            latents = layer(latents, x, y)
        return self.proj_out(latents)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the b images, then each token scaled to unit L2 norm: [q, k] in float32."""
        return normalize_tokens(self.per_image(x, y).float().mean(dim=0))


def normalize_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``t · rsqrt(Σ t² + 1e-8)`` over the last axis: the method's parameter-free output norm."""
    return tokens * torch.rsqrt(tokens.pow(2).sum(dim=-1, keepdim=True) + NORM_EPS)


class _Tokens(nn.Module):
    """[b, t·d] -> [b, t, d]: the parameter-free ``1`` of the released ``Sequential``."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b (t d) -> b t d", t=self.num_tokens)


class IdProjector(nn.Sequential):
    """ArcFace embeddings [b, e] -> identity tokens [b, t, d]; parameters named ``0.*`` and ``2.*`` as released."""

    def __init__(self, config: IdProjectorConfig) -> None:
        super().__init__(
            nn.Linear(config.embed_dim, config.num_tokens * config.width),
            _Tokens(config.num_tokens),
            nn.LayerNorm(config.width),
        )
        self.config = config
