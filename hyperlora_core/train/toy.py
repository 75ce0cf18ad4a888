"""A tiny pure-torch denoiser and synthetic identities: the trainer's toy-scale world (tests, bench, CPU demos).

The denoiser has the SDXL naming of its six attention modules (attn1/attn2 of three transformer blocks at the
two SDXL widths, scaled down), an epsilon-prediction DDPM schedule and a hashed word-embedding text encoder.
An identity is a latent template (its structure) plus per-image variation; its synthetic ArcFace and CLIP
conditions are noisy projections of a hidden identity code, and the Base conditions see only the per-image part
(as face-blurred crops do). Each image also has a small synthetic face photo (another noisy projection of the
code, plus pixel noise) for the HyperDreamBooth face encoder.
Letters: ``b`` samples, ``c`` channels, ``s`` side, ``n`` tokens, ``w`` width.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..synthetic import TINY_UNET
from ..targets import released_target_layers
from ..topology import LINEARS, AttnModule, comfy_key, sdxl_modules
from .denoiser import Batch, Factors, lora_linear

TOY_BLOCKS = ("input_blocks.4.1.transformer_blocks.0", "middle_block.1.transformer_blocks.0",
              "output_blocks.3.1.transformer_blocks.0")
CAPTIONS = ("a photo of a person", "a portrait, studio light", "a close-up photo", "a person outdoors")
CONTEXT_TOKENS = 8  # words kept from a caption


def toy_modules() -> tuple[AttnModule, ...]:
    by_name = {m.sgm: m for m in sdxl_modules()}
    return tuple(by_name[f"{block}.attn{a}"] for block in TOY_BLOCKS for a in (1, 2))


class ToyAttention(nn.Module):
    def __init__(self, module: AttnModule, width: int, context: int, heads: int = 2) -> None:
        super().__init__()
        self.keys = [comfy_key(module, linear) for linear, _, _ in LINEARS]
        source = context if module.cross else width
        self.heads = heads
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(source, width, bias=False)
        self.to_v = nn.Linear(source, width, bias=False)
        self.to_out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, context: torch.Tensor, lora: Factors | None) -> torch.Tensor:
        f = (lambda k: lora.get(k)) if lora else (lambda k: None)
        q = lora_linear(h, self.to_q.weight, None, f(self.keys[0]))
        k = lora_linear(context, self.to_k.weight, None, f(self.keys[1]))
        v = lora_linear(context, self.to_v.weight, None, f(self.keys[2]))
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        return lora_linear(out, self.to_out.weight, self.to_out.bias, f(self.keys[3]))


class ToyBlock(nn.Module):
    def __init__(self, block: str, width: int, context: int) -> None:
        super().__init__()
        by_name = {m.sgm: m for m in sdxl_modules()}
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(3)])
        self.attn1 = ToyAttention(by_name[f"{block}.attn1"], width, context)
        self.attn2 = ToyAttention(by_name[f"{block}.attn2"], width, context)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, context: torch.Tensor, lora: Factors | None) -> torch.Tensor:
        x = self.norms[0](h)
        h = h + self.attn1(x, x, lora)
        h = h + self.attn2(self.norms[1](h), context, lora)
        return h + self.ff(self.norms[2](h))


class ToyDenoiser(nn.Module):
    """Epsilon prediction on [b, c, s, s] latents; frozen after :func:`pretrain`. Implements ``Denoiser``."""

    num_timesteps = 1000

    def __init__(self, channels: int = 8, side: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.unet = TINY_UNET
        self.targets = released_target_layers(toy_modules(), TINY_UNET)  # its own: 6 SDXL-named modules
        w0, w1 = self.unet.level_widths
        ctx = self.unet.context_dim
        self.gradient_checkpointing = False
        self._words: dict[str, torch.Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proj_in = nn.Linear(channels, w0)
            self.pos = nn.Parameter(torch.randn(side * side, w0) * 0.1)
            self.time = nn.Sequential(nn.Linear(16, w0), nn.SiLU(), nn.Linear(w0, w0))
            self.blocks = nn.ModuleList([ToyBlock(TOY_BLOCKS[0], w0, ctx), ToyBlock(TOY_BLOCKS[1], w1, ctx),
                                         ToyBlock(TOY_BLOCKS[2], w0, ctx)])
            self.up, self.down = nn.Linear(w0, w1), nn.Linear(w1, w0)
            self.proj_out = nn.Linear(w0, channels)
        betas = torch.linspace(1e-4, 0.02, self.num_timesteps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Each word -> a fixed random vector (seeded by its CRC); [b, 8, context]; zeros pad."""
        ctx = self.unet.context_dim
        out = torch.zeros(len(captions), CONTEXT_TOKENS, ctx)
        for i, caption in enumerate(captions):
            words = caption.replace(",", " ").split()[:CONTEXT_TOKENS]
            for j, word in enumerate(words):
                if word not in self._words:
                    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
                    self._words[word] = torch.randn(ctx, generator=g)
                out[i, j] = self._words[word]
        return out.to(self.alphas_cumprod.device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, device=t.device) / 8)
        angles = t.float().view(-1, 1) * freqs
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                lora: Factors | None) -> torch.Tensor:
        side = x_t.shape[-1]
        h = self.proj_in(rearrange(x_t, "b c s z -> b (s z) c")) + self.pos + self._time(t)[:, None]
        for i, block in enumerate(self.blocks):
            if i == 1:
                h = self.up(h)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, context, lora, use_reentrant=False)
            else:
                h = block(h, context, lora)
            if i == 1:
                h = self.down(h)
        return rearrange(self.proj_out(h), "b (s z) c -> b c s z", s=side)


class SyntheticIdentities:
    """n identities × m images (train) + held-out images, with correlated ArcFace / CLIP / Base conditions."""

    def __init__(self, identities: int = 8, images: int = 12, held_out: int = 4, *, channels: int = 8,
                 side: int = 4, clip_dim: int = 32, clip_tokens: int = 4, embed_dim: int = 512, face_side: int = 16,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        code = 16
        self.templates = torch.randn(identities, channels, side, side, generator=g)
        codes = torch.randn(identities, code, generator=g)
        to_arc = torch.randn(code, embed_dim, generator=g)
        to_clip = torch.randn(code, clip_tokens * clip_dim, generator=g) / math.sqrt(code)
        to_base = torch.randn(channels * side * side, clip_tokens * clip_dim, generator=g) / side
        per = images + held_out
        ids = torch.arange(identities).repeat_interleave(per)
        variation = 0.3 * torch.randn(len(ids), channels, side, side, generator=g)
        self.latents = self.templates[ids] + variation
        noisy_code = codes[ids] + 0.2 * torch.randn(len(ids), code, generator=g)
        self.arcface = F.normalize(noisy_code @ to_arc, dim=-1)
        clip_code = codes[ids] + 0.2 * torch.randn(len(ids), code, generator=g)
        self.clip = (clip_code @ to_clip).view(-1, clip_tokens, clip_dim)
        self.base_clip = (variation.flatten(1) @ to_base).view(-1, clip_tokens, clip_dim)
        self.captions = [CAPTIONS[int(i)] for i in torch.randint(len(CAPTIONS), (len(ids),), generator=g)]
        self.ids = ids
        slot = torch.arange(len(ids)) % per
        self.train_index = torch.nonzero(slot < images).flatten().tolist()
        self.held_index = torch.nonzero(slot >= images).flatten().tolist()
        self.identities = identities
        self.faces = self._faces(codes, ids, face_side, seed)

    @staticmethod
    def _faces(codes: torch.Tensor, ids: torch.Tensor, side: int, seed: int) -> torch.Tensor:
        """[N, 3, side, side] face photos: a noisy projection of the identity code, plus pixel noise. A generator
        of its own, so the other conditions stay what they were."""
        g = torch.Generator().manual_seed(seed + 7919)
        to_face = torch.randn(codes.shape[1], 3 * side * side, generator=g) / math.sqrt(codes.shape[1])
        noisy = codes[ids] + 0.3 * torch.randn(len(ids), codes.shape[1], generator=g)
        pixels = noisy @ to_face + 0.3 * torch.randn(len(ids), 3 * side * side, generator=g)
        return pixels.view(-1, 3, side, side)

    def labels(self, held_out: bool = False) -> list[str]:
        """The identity label of every sample position of the split (as a prepared data set's ``.cls``)."""
        table = self.held_index if held_out else self.train_index
        return [str(int(self.ids[i])) for i in table]

    def __len__(self) -> int:
        return len(self.train_index)

    def get(self, positions: Sequence[int], held_out: bool = False) -> Batch:
        """Training (or held-out) samples by position in their split."""
        table = self.held_index if held_out else self.train_index
        idx = [table[p] for p in positions]
        return Batch(latents=self.latents[idx], captions=[self.captions[i] for i in idx], clip=self.clip[idx],
                     arcface=self.arcface[idx], base_clip=self.base_clip[idx], identity=self.ids[idx],
                     face=self.faces[idx])

    def held_out_of(self, identity: int) -> list[int]:
        return [p for p, i in enumerate(self.held_index) if int(self.ids[i]) == identity]


def pretrain(denoiser: ToyDenoiser, data: SyntheticIdentities, steps: int = 300, batch: int = 16,
             lr: float = 3e-3, seed: int = 0) -> ToyDenoiser:
    """Teach the toy base model generic denoising of the whole data set, then freeze it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    for _ in range(steps):
        pos = torch.randint(len(data), (batch,), generator=g).tolist()
        b = data.get(pos)
        noise = torch.randn(b.latents.shape, generator=g)
        t = torch.randint(denoiser.num_timesteps, (batch,), generator=g)
        pred = denoiser.predict(denoiser.noisy(b.latents, noise, t), t, denoiser.encode_text(b.captions), None)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return denoiser.eval().requires_grad_(False)
