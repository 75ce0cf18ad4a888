"""``python -m hyperlora_core.train lidb-preopt``: LiDB fine-tuning of every identity of a data set, the
HyperDreamBooth hypernetwork's supervision.

For each identity (the ``.cls`` labels of the prepared shards; the toy's 8 identities) a :class:`~hyperlora_core.lidb.
LidbLoRA` starts from the same seeded point (``lidb.init_seed``: A_train random, B_train zero; one start for all, so
every identity's weights live in the same coordinates and an L2 between them means something) and trains
``lidb.steps`` Adam steps of the denoising loss on that identity's images, captions with the trigger words. Each
step's images, noise and timesteps are drawn from (``run.seed``, the identity's label, the step) alone, so a result
does not depend on which rank computed it. The result is written to ``<out>/<label>.lidb.safetensors`` (fp32, via a
temporary file and a rename). Under torchrun the sorted identities are dealt round-robin (rank r takes
r, r + world, ...): disjoint sets. An identity whose file exists is skipped, so a rerun resumes where it stopped.

Letters: ``b`` images, ``L`` target linears.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..lidb import LidbAux, LidbLoRA
from .config import TrainConfig
from .denoiser import Denoiser, Factors
from .hdb_stage import aux_for, lidb_path, target_layers

log = logging.getLogger(__name__)


def identity_positions(labels: Sequence[str]) -> dict[str, list[int]]:
    """label -> the data set positions of its images, labels sorted."""
    out: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        if not label:
            raise ValueError(f"sample {position} has no identity label; LiDB pre-optimisation needs one per image "
                             "(prepare the data set with an 'identity' per row of the captions JSONL)")
        out.setdefault(label, []).append(position)
    return dict(sorted(out.items()))


def _expand(lora: LidbLoRA, b: int) -> Factors:
    out: Factors = {}
    for j, linear in enumerate(lora.aux.targets.linears):
        up, down = lora.factors(j)
        out[linear.key] = (down[None].expand(b, -1, -1), up[None].expand(b, -1, -1))  # [b, 1, i], [b, o, 1]
    return out


def preoptimise(config: TrainConfig, denoiser: Denoiser, data, positions: list[int], label: str, aux: LidbAux,
                device: torch.device) -> tuple[LidbLoRA, list[float]]:
    """LiDB fine-tuning of one identity (its data set ``positions``); (the trained LiDB, the loss of every step)."""
    lidb = config.lidb
    lora = LidbLoRA(aux, init_seed=lidb.init_seed)
    lora.place(device)
    optimizer = torch.optim.Adam([lora.a_train, lora.b_train], lr=lidb.lr)
    g = torch.Generator().manual_seed(config.run.seed * 1_000_003 + zlib.crc32(label.encode()))
    losses = []
    for _ in range(lidb.steps):
        pick = torch.randint(len(positions), (lidb.batch,), generator=g).tolist()
        batch = data.get([positions[i] for i in pick]).to(device)
        noise = torch.randn(batch.latents.shape, generator=g).to(device)
        t = torch.randint(denoiser.num_timesteps, (lidb.batch,), generator=g).to(device)
        context = denoiser.encode_text([config.stage.with_trigger(c) for c in batch.captions])
        pred = denoiser.predict(denoiser.noisy(batch.latents, noise, t), t, context, _expand(lora, lidb.batch))
        loss = (pred.float() - denoiser.target(batch.latents, noise, t).float()).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return lora, losses


def run_preopt(config: TrainConfig, denoiser: Denoiser, data, out: str | Path, *, device: torch.device | None = None,
               ) -> list[str]:
    """Pre-optimise this rank's identities of ``data`` (``data.labels()``) into ``out``; the labels it computed."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device or torch.device("cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_label = identity_positions(data.labels())
    mine = list(by_label)[rank::world]
    aux = aux_for(config, target_layers(denoiser))
    done = []
    for n, label in enumerate(mine, 1):
        path = lidb_path(out, label)
        if path.is_file():
            log.info("identity %s: %s exists, skipped", label, path)
            continue
        lora, losses = preoptimise(config, denoiser, data, by_label[label], label, aux, device)
        tail = max(1, len(losses) // 10)
        meta = {"identity": label, "steps": str(config.lidb.steps), "images": str(len(by_label[label])),
                "loss_first": f"{sum(losses[:tail]) / tail:.6g}", "loss_last": f"{sum(losses[-tail:]) / tail:.6g}"}
        lora.to_lidb(meta).save(path, storage="fp32")
        done.append(label)
        log.info("rank %d: identity %s (%d of %d): loss %s -> %s, wrote %s", rank, label, n, len(mine),
                 meta["loss_first"], meta["loss_last"], path)
    if world > 1:
        dist.barrier()
    return done
