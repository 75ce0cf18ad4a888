"""Validation on held-out images: the denoising loss with predicted LoRAs, and the identity loss matrix.

``loss_matrix[i, j]`` is the mean denoising loss of identity i's held-out images (captions with the trigger
words, each image's own Base-LoRA) when the ID-LoRA is the one predicted from identity j's reference. A trained
hypernetwork has its smallest entry of each row on the diagonal. Noise and timesteps are fixed by ``seed`` and
shared by every column, so the columns differ only by the LoRA. Letters: ``b`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import StageConfig
from .denoiser import Batch, Denoiser, Factors, combine
from .hypernet import HyperNetwork


def _expand(factors: Factors, b: int) -> Factors:
    return {k: (d.expand(b, -1, -1), u.expand(b, -1, -1)) for k, (d, u) in factors.items()}


@torch.no_grad()
def loss_matrix(net: HyperNetwork, denoiser: Denoiser, references: Sequence[Batch], evaluations: Sequence[Batch],
                stage: StageConfig, *, repeats: int = 8, seed: int = 0, use_arcface: bool = True) -> torch.Tensor:
    """[n, n] losses: row i evaluates ``evaluations[i]``, column j uses the ID-LoRA of ``references[j]`` (1 sample)."""
    n = len(references)
    ids = [net(r.clip, r.arcface if use_arcface else None, None)["id"] for r in references]
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, n)
    for i, batch in enumerate(evaluations):
        x0 = batch.latents.repeat(repeats, *[1] * (batch.latents.ndim - 1))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(denoiser.num_timesteps, (len(x0),), generator=g)
        context = denoiser.encode_text([stage.with_trigger(c) for c in batch.captions] * repeats)
        base = net(None, None, batch.base_clip.repeat(repeats, 1, 1)).get("base")
        x_t, target = denoiser.noisy(x0, noise, t), denoiser.target(x0, noise, t)
        for j in range(n):
            pred = denoiser.predict(x_t, t, context, combine((_expand(ids[j], len(x0)), None), (base, None)))
            out[i, j] = (pred - target).pow(2).mean()
    return out


def diagonal_wins(matrix: torch.Tensor) -> int:
    """Rows whose diagonal entry is strictly below every other entry of the row."""
    n = matrix.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    others = matrix.masked_fill(eye, float("inf")).min(dim=1).values
    return int((matrix.diagonal() < others).sum())


@torch.no_grad()
def id_only_drift(net: HyperNetwork, denoiser: Denoiser, batch: Batch, *, repeats: int = 4, seed: int = 0,
                  use_arcface: bool = False) -> float:
    """Mean squared distance between the ID-LoRA-only prediction without trigger words and the base model's:
    what the trigger-word rule drives towards zero."""
    g = torch.Generator().manual_seed(seed)
    x0 = batch.latents.repeat(repeats, *[1] * (batch.latents.ndim - 1))
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(denoiser.num_timesteps, (len(x0),), generator=g)
    context = denoiser.encode_text(list(batch.captions) * repeats)
    x_t = denoiser.noisy(x0, noise, t)
    factors = net(batch.clip.repeat(repeats, 1, 1), batch.arcface.repeat(repeats, 1) if use_arcface else None,
                  None)["id"]
    return float((denoiser.predict(x_t, t, context, factors) - denoiser.predict(x_t, t, context, None)).pow(2).mean())


@torch.no_grad()
def heldout_loss(net: HyperNetwork, denoiser: Denoiser, batch: Batch, stage: StageConfig, *, repeats: int = 2,
                 seed: int = 0) -> float:
    """Mean denoising loss of held-out samples, each with its own predicted ID-LoRA (and Base-LoRA), trigger words
    in the caption; noise and timesteps fixed by ``seed`` (any backend)."""
    g = torch.Generator().manual_seed(seed)
    x0 = batch.latents.repeat(repeats, *[1] * (batch.latents.ndim - 1))
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.randint(denoiser.num_timesteps, (len(x0),), generator=g).to(x0.device)
    context = denoiser.encode_text([stage.with_trigger(c) for c in batch.captions] * repeats)
    factors = net(batch.clip.repeat(repeats, 1, 1), batch.arcface.repeat(repeats, 1),
                  batch.base_clip.repeat(repeats, 1, 1))
    pred = denoiser.predict(denoiser.noisy(x0, noise, t), t, context,
                            combine((factors["id"], None), (factors.get("base"), None)))
    return float((pred.float() - denoiser.target(x0, noise, t).float()).pow(2).mean())


def shard_validation(denoiser: Denoiser, batch: Batch, stage: StageConfig,
                     ) -> Callable[[HyperNetwork], dict[str, float]]:
    """Validation of a real data set: the held-out loss on a fixed batch of held-out samples."""
    return lambda net: {"heldout_loss": heldout_loss(net, denoiser, batch, stage)}


def toy_validation(denoiser: Denoiser, data, stage: StageConfig) -> Callable[[HyperNetwork], dict[str, float]]:
    """Validation of the toy backend: held-out denoising loss (own ID-LoRA) and rows won by the diagonal."""
    n = data.identities
    refs = [data.get(data.held_out_of(j)[:1], held_out=True) for j in range(n)]
    evals = [data.get(data.held_out_of(i)[1:], held_out=True) for i in range(n)]

    def validate(net: HyperNetwork) -> dict[str, float]:
        matrix = loss_matrix(net, denoiser, refs, evals, stage, repeats=2)
        return {"heldout_loss": float(matrix.diagonal().mean()), "identity_wins": float(diagonal_wins(matrix))}

    return validate
