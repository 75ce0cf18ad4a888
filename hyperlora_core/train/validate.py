"""Validation on held-out images: the denoising loss with predicted LoRAs, the identity loss matrix, and the
face-similarity score of pictures sampled with the predicted LoRAs.

``loss_matrix[i, j]`` is the mean denoising loss of identity i's held-out images (captions with the trigger
words, each image's own Base-LoRA) when the ID-LoRA is the one predicted from identity j's reference. A trained
hypernetwork has its smallest entry of each row on the diagonal. Noise and timesteps are fixed by ``seed`` and
shared by every column, so the columns differ only by the LoRA.

The face score (``face_score``) is the papers' ID metric: for each held-out identity, the ID-LoRA and Base-LoRA
predicted from its first sample generate ``validation.images`` pictures (``Denoiser.sample``: the base model's own
sampler and decoder) with that sample's caption and the trigger words, and
:func:`~hyperlora_core.evaluate.face_similarity` compares the faces found in them with the identity's photos
(ArcFace cosine; a picture without a face scores 0). The toy backend's samples are latents without faces, so it
logs no face score; ``sample_margin`` measures the same thing in its latent space instead (see there).
Letters: ``b`` samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluate import face_similarity
from ..images import to_rgb8
from .config import StageConfig, ValidationConfig
from .denoiser import Batch, Denoiser, Factors, combine
from .hypernet import HyperNetwork

log = logging.getLogger(__name__)


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


@dataclass
class HeldOutIdentity:
    """One held-out identity as validation samples it."""

    label: str  # the identity label of the shards (a sample's key when the shards have none)
    condition: Batch  # its first held-out sample (batch 1): the conditions the LoRAs are predicted from
    references: list[np.ndarray]  # its held-out photos, HxWx3 uint8 RGB: what the sampled faces are compared with


def predicted_lora(net: HyperNetwork, condition: Batch) -> Factors | None:
    """ID-LoRA + Base-LoRA (when the net has one) predicted from one sample's conditions, as inference applies
    them together."""
    factors = net(condition.clip, condition.arcface, condition.base_clip)
    return combine((factors["id"], None), (factors.get("base"), None))


@torch.no_grad()
def face_score(net: HyperNetwork, denoiser: Denoiser, identities: Sequence[HeldOutIdentity], stage: StageConfig,
               settings: ValidationConfig, analyzer) -> dict[str, float]:
    """{"face_similarity": mean ArcFace cosine of the sampled pictures' faces to their identity's photos (0 for a
    picture without a face), "face_missing": the fraction of pictures without a face}. ``analyzer``: a
    FaceAnalyzer (or anything with its ``analyze``)."""
    scores, missing = [], 0
    for ident in identities:
        caption = stage.with_trigger(ident.condition.captions[0])
        images = denoiser.sample([caption] * settings.images, predicted_lora(net, ident.condition), settings)
        pictures = [to_rgb8(image, i) for i, image in enumerate(images)]
        result = face_similarity(analyzer, pictures, ident.references)
        scores.extend(result.scores)
        missing += len(result.missing)
    return {"face_similarity": float(np.mean(scores)), "face_missing": missing / len(scores)}


def held_out_identities(dataset, samples: int, identities: int) -> list[HeldOutIdentity]:
    """The first ``identities`` identities among the first ``samples`` samples of a ShardDataset (grouped by their
    ``.cls`` label; unlabelled samples are an identity each), each with its photos and first sample's conditions."""
    from .shards import decode_sample

    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    for i in range(min(samples, len(dataset))):
        decoded = decode_sample(dataset.read(i))
        label = decoded["identity"] or dataset.keys[i]
        if label in groups or len(groups) < identities:
            groups.setdefault(label, []).append((i, decoded["image"]))
    return [HeldOutIdentity(label, dataset.get([rows[0][0]]), [photo for _, photo in rows])
            for label, rows in groups.items()]


def check_references(analyzer, identities: Sequence[HeldOutIdentity]) -> None:
    """Fail before training when a reference photo has no face the analysis finds (it would fail every validation).
    Raises FaceNotFoundError naming the identity."""
    from ..errors import FaceNotFoundError

    for ident in identities:
        try:
            face_similarity(analyzer, ident.references[:1], ident.references)
        except FaceNotFoundError as exc:
            raise FaceNotFoundError(f"validation identity '{ident.label}': {exc} (the validation shards' photos "
                                    "must show the face that prepare found)") from exc


def shard_validation(denoiser: Denoiser, batch: Batch, stage: StageConfig, *,
                     identities: Sequence[HeldOutIdentity] = (), settings: ValidationConfig | None = None,
                     analyzer=None) -> Callable[[HyperNetwork], dict[str, float]]:
    """Validation of a real data set: the held-out loss on a fixed batch of held-out samples and, with an
    ``analyzer`` and ``identities``, the face score of pictures sampled with the predicted LoRAs."""
    if analyzer is None or not identities:
        log.info("validation: held-out denoising loss only (no face score: set validation.insightface and "
                 "data.validation_shards)")

    def validate(net: HyperNetwork) -> dict[str, float]:
        values = {"heldout_loss": heldout_loss(net, denoiser, batch, stage)}
        if analyzer is not None and identities:
            values.update(face_score(net, denoiser, identities, stage, settings or ValidationConfig(), analyzer))
        return values

    return validate


@torch.no_grad()
def sample_margin(net: HyperNetwork, denoiser: Denoiser, references: Sequence[Batch], held_out: Sequence[Batch],
                  stage: StageConfig, settings: ValidationConfig) -> float:
    """The toy's stand-in for the face score, in latent space: pictures sampled with identity j's predicted LoRAs
    (trigger words on) are compared by cosine with the mean of each identity's held-out latents; the margin is the
    cosine to j's own mean minus the mean cosine to the other identities' means, averaged over the first
    ``settings.identities`` j (0: the LoRA does not steer the samples towards the identity)."""
    means = F.normalize(torch.stack([b.latents.mean(0).flatten() for b in held_out]), dim=-1)  # [n, chw]
    n, margins = len(references), []
    for j, ref in enumerate(references[:settings.identities]):
        images = denoiser.sample([stage.with_trigger(ref.captions[0])] * settings.images, predicted_lora(net, ref),
                                 settings)
        latents = F.normalize(images.permute(0, 3, 1, 2).flatten(1).float(), dim=-1)  # channel-last back to chw
        cos = (latents @ means.T).mean(0)  # [n]
        margins.append(float(cos[j] - (cos.sum() - cos[j]) / (n - 1)))
    return float(np.mean(margins))


def toy_validation(denoiser: Denoiser, data, stage: StageConfig, settings: ValidationConfig | None = None,
                   ) -> Callable[[HyperNetwork], dict[str, float]]:
    """Validation of the toy backend: held-out denoising loss (own ID-LoRA), rows won by the diagonal, and the
    latent-space sample margin (no face score: the toy's samples hold no faces)."""
    n = data.identities
    settings = settings or ValidationConfig()
    refs = [data.get(data.held_out_of(j)[:1], held_out=True) for j in range(n)]
    evals = [data.get(data.held_out_of(i)[1:], held_out=True) for i in range(n)]

    def validate(net: HyperNetwork) -> dict[str, float]:
        matrix = loss_matrix(net, denoiser, refs, evals, stage, repeats=2)
        return {"heldout_loss": float(matrix.diagonal().mean()), "identity_wins": float(diagonal_wins(matrix)),
                "sample_margin": sample_margin(net, denoiser, refs, evals, stage, settings)}

    return validate
