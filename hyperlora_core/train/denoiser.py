"""The seam between the trainer and a frozen base model, and what a training sample is.

The trainer only needs :class:`Denoiser`: the target modules (named as our Apply node patches them), the text
encoder, the model's noising and loss space, and a prediction with per-sample LoRA factors applied. The toy
denoiser (``toy.py``) and the ComfyUI backend implement it.

Letters: ``b`` samples, ``n`` tokens, ``i``/``o`` a linear's in/out width, ``r`` rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F

from ..targets import TargetLayers

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # comfy key -> (down [b, r, i], up [b, o, r]); delta up@down


class Denoiser(Protocol):
    """A frozen base model the hypernetwork's LoRAs are trained on."""

    targets: TargetLayers  # the linears the LoRAs adapt (keys, sizes, family), in the hypernetwork's token order
    num_timesteps: int  # discrete training timesteps

    def encode_text(self, captions: Sequence[str]) -> object: ...  # frozen text conditioning, opaque to the trainer

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...  # eps, v, ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: object,
                lora: Factors | None) -> torch.Tensor: ...


@dataclass
class Batch:
    """b training samples: the image (as the model's latents) and what the hypernetwork reads."""

    latents: torch.Tensor  # [b, c, h, w] clean latents at the training resolution
    captions: list[str]  # captions without trigger words
    clip: torch.Tensor  # [b, n, dc] CLIP tokens of the ID crop
    arcface: torch.Tensor  # [b, e] normed ArcFace embeddings
    base_clip: torch.Tensor  # [b, n, dc] CLIP tokens of the face-blurred Base crop
    identity: torch.Tensor | None = None  # [b] integer identity labels (validation splits only)
    face: torch.Tensor | None = None  # [b, 3, s, s] face pixels for a trainable face encoder (stage "hdb")
    lidb_a: torch.Tensor | None = None  # [b, L, a] pre-optimised LiDB A_train of each sample's identity (stage "hdb")
    lidb_b: torch.Tensor | None = None  # [b, L, c] pre-optimised LiDB B_train of each sample's identity (stage "hdb")

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def combine(*parts: tuple[Factors, torch.Tensor | None]) -> Factors | None:
    """Several LoRAs on one model as one: factors concatenated along the rank, each up scaled per sample by its gate
    ([b] weights, None = 1). The delta is exactly Σ gate · up @ down."""
    parts = [(f, g) for f, g in parts if f is not None]
    if not parts:
        return None
    out: Factors = {}
    for key in parts[0][0]:
        downs, ups = [], []
        for factors, gate in parts:
            down, up = factors[key]
            downs.append(down)
            ups.append(up if gate is None else up * gate.to(up.dtype).view(-1, 1, 1))
        out[key] = (torch.cat(downs, dim=1), torch.cat(ups, dim=2))
    return out


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``x W^T + b + (x down^T) up^T`` per sample: x [b, n, i] -> [b, n, o]."""
    out = F.linear(x, weight, bias)
    if factors is None:
        return out
    down, up = factors
    hidden = torch.einsum("bni,bri->bnr", x, down.to(x.dtype))
    return out + torch.einsum("bnr,bor->bno", hidden, up.to(x.dtype))
