"""The paper's three training stages as small strategy objects, and their losses.

Every stage minimises the mean squared error between the frozen denoiser's prediction, with LoRA factors from
the hypernetwork applied, and a target in the model's own loss space (epsilon, v, ... as ``Denoiser.target``):

* stage 1, Base-LoRA: Base conditions (face-blurred crops) -> base resampler -> Base-LoRA; caption without
  trigger words; target = the denoising target of the image. The face encoder is bypassed.
* stage 2, ID-LoRA from CLIP (the resampler's x path bypassed, the Base-LoRA frozen). Each sample draws a case
  with probabilities ``StageConfig.case_mix``:
  0 reconstruct: caption with trigger words, ID + Base-LoRA on, target = the denoising target;
  1 match base: caption without, ID-LoRA only, target = the frozen base model's prediction (same noisy latent);
  2 match Base-LoRA: caption without, ID + Base-LoRA on, target = the base model + Base-LoRA prediction.
* stage 3, ID-LoRA from ArcFace: as stage 2, with the ID projector and the x path joining and the resampler's
  CLIP branch frozen.
* stage "hdb", the HyperDreamBooth hypernetwork (its own network and loss: ``hdb_stage.py``).

Each stage object builds its network (``build``) and computes its loss (``loss``); the trainer calls only those.

Letters: ``b`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HDB, StageConfig, TrainConfig
from .denoiser import Batch, Denoiser, combine
from .hdb_stage import HDB_STAGE
from .hypernet import HyperNetwork

RECONSTRUCT, MATCH_BASE, MATCH_BASE_LORA = 0, 1, 2


@dataclass(frozen=True)
class Stage:
    """What a stage trains and which conditions it reads."""

    number: int
    trains: tuple[str, ...]  # HyperNetwork.groups() names
    reads_arcface: bool  # the x path (ID projector) is on
    reads_clip: bool  # the CLIP branch is on
    id_lora: bool  # the ID-LoRA is predicted (stages 2, 3) or not (stage 1)

    def build(self, config: TrainConfig, denoiser: Denoiser, *, init: bool = True) -> HyperNetwork:
        return HyperNetwork(config.model, denoiser.targets)

    def loss(self, config: TrainConfig, net: torch.nn.Module, denoiser: Denoiser, batch: Batch, draws: Draws,
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return stage_loss(self, config.stage, net, denoiser, batch, draws)


STAGES = {
    1: Stage(1, ("base",), reads_arcface=False, reads_clip=False, id_lora=False),
    2: Stage(2, ("id_clip", "id_shared", "id_bases"), reads_arcface=False, reads_clip=True, id_lora=True),
    3: Stage(3, ("id_x", "id_shared", "id_bases"), reads_arcface=True, reads_clip=True, id_lora=True),
    HDB: HDB_STAGE,
}


@dataclass
class Draws:
    """The random part of b samples: fixed by (seed, step, sample position), whatever the rank layout."""

    noise: torch.Tensor  # like the latents
    t: torch.Tensor  # [b] timesteps
    case: torch.Tensor  # [b] 0, 1 or 2 (stages 2, 3)


def draw(seed: int, step: int, positions: list[int], shape: tuple[int, ...], num_timesteps: int,
         case_mix: tuple[float, float, float]) -> Draws:
    """One generator per sample, seeded by (seed, step, position): the same sample draws the same noise on any
    number of ranks and after a resume."""
    noises, ts, cases = [], [], []
    cum = torch.tensor(case_mix).cumsum(0)
    for p in positions:
        g = torch.Generator().manual_seed(hash((seed, step, p)) & 0x7FFF_FFFF_FFFF_FFFF)
        noises.append(torch.randn(shape, generator=g))
        ts.append(int(torch.randint(num_timesteps, (1,), generator=g)))
        u = float(torch.rand(1, generator=g))
        cases.append(min(int((cum <= u).sum()), 2))
    return Draws(torch.stack(noises), torch.tensor(ts), torch.tensor(cases))


def stage_loss(stage: Stage, config: StageConfig, net: torch.nn.Module, denoiser: Denoiser, batch: Batch,
               draws: Draws) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss of the b samples (``net`` is the hypernetwork, possibly wrapped by DDP / FSDP)."""
    x_t = denoiser.noisy(batch.latents, draws.noise, draws.t)
    target = denoiser.target(batch.latents, draws.noise, draws.t)
    if not stage.id_lora:
        factors = net(None, None, batch.base_clip)
        pred = denoiser.predict(x_t, draws.t, denoiser.encode_text(batch.captions), factors["base"])
        loss = (pred.float() - target.float()).pow(2).mean()
        return loss, {"loss": float(loss.detach())}
    factors = net(batch.clip if stage.reads_clip else None, batch.arcface if stage.reads_arcface else None,
                  batch.base_clip)
    base = factors.get("base")
    if base is not None:
        base = {k: (d.detach(), u.detach()) for k, (d, u) in base.items()}  # frozen in stages 2 and 3
    case = draws.case.to(x_t.device)
    captions = [config.with_trigger(c) if int(k) == RECONSTRUCT else c for c, k in zip(batch.captions, case.tolist(),
                                                                                         strict=True)]
    context = denoiser.encode_text(captions)
    pred = denoiser.predict(x_t, draws.t, context, combine((factors["id"], None), (base, (case != MATCH_BASE).float())))
    teachers = case != RECONSTRUCT
    if bool(teachers.any()):
        with torch.no_grad():
            teacher = denoiser.predict(x_t, draws.t, context, combine((base, (case == MATCH_BASE_LORA).float())))
        target = torch.where(teachers.view(-1, *[1] * (target.ndim - 1)), teacher, target)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    loss = per_sample.mean()
    stats = {"loss": float(loss.detach())}
    for k, name in ((RECONSTRUCT, "loss_reconstruct"), (MATCH_BASE, "loss_match_base"),
                    (MATCH_BASE_LORA, "loss_match_base_lora")):
        if bool((case == k).any()):
            stats[name] = float(per_sample[case == k].detach().mean())
    return loss, stats
