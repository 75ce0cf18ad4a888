"""The HyperDreamBooth stage (``stage.stage = "hdb"``): the trainer's strategy object for the LiDB hypernetwork.

The loss of b samples, each a face photo of an identity whose LiDB weights were pre-optimised (``lidb-preopt``)::

    (Â_k, B̂_k) = hypernetwork(face)                              refinement iterate k = 1..K, [b, L, a] and [b, L, c]
    E_k     = mean_{b, L} ( |Â_k − A*|² + |B̂_k − B*|² )           A*, B*: the identity's stored LiDB weights
    L_w     = Σ_k γ^(K−k) E_k / Σ_k γ^(K−k)                       γ = hdb.iterate_decay (0: E_K alone)
    L_dn    = mean ( denoiser(x_t, t, caption with trigger words, LoRA of (Â_K, B̂_K)) − target )²
    loss    = hdb.weight_loss · L_w + hdb.denoise_loss · L_dn

Supervising every iterate (with weights growing towards the last, as iterative-refinement networks such as RAFT do)
is our choice: the paper does not say how the iterates are supervised, and with the last one alone the earlier ones
are not estimates of anything, so the number of iterations could not be traded at inference. The LoRA of
(Â_K, B̂_K) is LiDB's: ``down = Â_ℓ · A_aux_ℓ`` [1, i], ``up = B_aux_ℓ · B̂_ℓ`` [o, 1], alpha 1, with the
frozen aux matrices of ``[lidb]`` (``hyperlora_core.lidb``), differentiable in the prediction. Noise, timesteps and
the data order come from the trainer exactly as for the HyperLoRA stages, so DDP / FSDP, accumulation, EMA,
checkpoints, resume and validation are the same code.

Letters: ``b`` samples, ``L`` target linears, ``a``/``c`` the LiDB sizes, ``i``/``o`` a linear's widths.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import HyperLoRAError
from ..hdb.network import HyperDreamBooth
from ..lidb import LiDB, LidbAux
from ..targets import TargetLayers
from .denoiser import Batch, Denoiser, Factors

if TYPE_CHECKING:
    from .config import TrainConfig
    from .stages import Draws

SUFFIX = ".lidb.safetensors"


class SupervisionError(HyperLoRAError, ValueError):
    """The pre-optimised LiDB weights cannot supervise this run."""


def target_layers(denoiser: Denoiser) -> TargetLayers:
    """The linears the denoiser's LoRA factors address, keyed as ``Factors`` are: its ``targets``."""
    return denoiser.targets


@lru_cache(maxsize=4)
def _aux(targets: TargetLayers, seed: int, a: int, c: int) -> LidbAux:
    return LidbAux(targets, seed=seed, a=a, b=c)


def aux_for(config: TrainConfig, targets: TargetLayers) -> LidbAux:
    return _aux(targets, config.lidb.seed, config.lidb.a, config.lidb.b)


def lidb_factors(aux: LidbAux, a_train: torch.Tensor, b_train: torch.Tensor) -> Factors:
    """Per-sample LiDB LoRA factors: a_train [b, L, a], b_train [b, L, c] -> {key: (down [b, 1, i], up [b, o, 1])}."""
    out: Factors = {}
    for j, linear in enumerate(aux.targets.linears):
        down_aux = aux.down_aux[j].to(a_train.device, a_train.dtype)  # [a, i]
        up_aux = aux.up_aux[j].to(b_train.device, b_train.dtype)  # [o, c]
        down = torch.einsum("ba,ai->bi", a_train[:, j], down_aux)[:, None]
        up = torch.einsum("oc,bc->bo", up_aux, b_train[:, j])[:, :, None]
        out[linear.key] = (down, up)
    return out


def weight_error(a_pred: torch.Tensor, b_pred: torch.Tensor, a_ref: torch.Tensor, b_ref: torch.Tensor,
                 ) -> torch.Tensor:
    """Squared L2 distance of the (a + c)-vectors of each linear, averaged over linears: [b, L, ·] pairs -> [b]."""
    return ((a_pred.float() - a_ref.float()).pow(2).sum(-1) + (b_pred.float() - b_ref.float()).pow(2).sum(-1)).mean(-1)


@dataclass(frozen=True)
class HdbStage:
    """What stage "hdb" trains (the whole hypernetwork; the encoder unless ``hdb.freeze_encoder``) and its loss."""

    number: str = "hdb"
    trains: tuple[str, ...] = ("encoder", "decoder")  # HyperDreamBooth.groups() names

    def build(self, config: TrainConfig, denoiser: Denoiser, *, init: bool = True) -> HyperDreamBooth:
        """The hypernetwork; ``init=False`` skips reading CLIP weights (a checkpoint's weights follow)."""
        return HyperDreamBooth(config.hdb, target_layers(denoiser), a=config.lidb.a, c=config.lidb.b,
                               load_encoder=init)

    def loss(self, config: TrainConfig, net: torch.nn.Module, denoiser: Denoiser, batch: Batch, draws: Draws,
             ) -> tuple[torch.Tensor, dict[str, float]]:
        hdb = config.hdb
        if batch.face is None:
            raise SupervisionError("stage 'hdb' needs face pixels in every batch (Batch.face); this data set has none")
        iterates = net(batch.face)
        a_pred, b_pred = iterates[-1]
        total = a_pred.new_zeros((), dtype=torch.float32)
        stats: dict[str, float] = {}
        if hdb.weight_loss:
            if batch.lidb_a is None or batch.lidb_b is None:
                raise SupervisionError("hdb.weight_loss > 0 needs pre-optimised LiDB weights: set hdb.supervision "
                                       "to the folder written by python -m hyperlora_core.train lidb-preopt")
            k = len(iterates)
            decay = [hdb.iterate_decay ** (k - 1 - n) for n in range(k)]
            errors = [weight_error(a, b, batch.lidb_a, batch.lidb_b).mean() for a, b in iterates]
            weights = sum(w * e for w, e in zip(decay, errors, strict=True)) / sum(decay)
            total = total + hdb.weight_loss * weights
            stats["loss_weights"] = float(errors[-1].detach())
        if hdb.denoise_loss:
            x_t = denoiser.noisy(batch.latents, draws.noise, draws.t)
            target = denoiser.target(batch.latents, draws.noise, draws.t)
            context = denoiser.encode_text([config.stage.with_trigger(c) for c in batch.captions])
            lora = lidb_factors(aux_for(config, target_layers(denoiser)), a_pred, b_pred)
            denoise = (denoiser.predict(x_t, draws.t, context, lora).float() - target.float()).pow(2).mean()
            total = total + hdb.denoise_loss * denoise
            stats["loss_denoise"] = float(denoise.detach())
        stats["loss"] = float(total.detach())
        return total, stats


HDB_STAGE = HdbStage()


# -- the supervision: one LiDB file per identity ------------------------------------------------------------------
def lidb_path(folder: str | Path, label: str) -> Path:
    """Where identity ``label``'s pre-optimised LiDB lives: its label when that is a safe file name, else a
    sanitised name with the label's CRC (distinct labels never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
    if safe != label or not safe.strip("."):
        safe = f"{safe[:64]}-{zlib.crc32(label.encode()):08x}"
    return Path(folder) / f"{safe}{SUFFIX}"


class Supervision:
    """The pre-optimised LiDB weights of every identity a data set's ``labels()`` names, checked against the run."""

    def __init__(self, folder: str | Path, labels: list[str], targets: TargetLayers, *, a: int, c: int, seed: int,
                 ) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"hdb.supervision '{folder}' is not a folder; write it with python -m "
                                    "hyperlora_core.train lidb-preopt --config <this config>")
        self.index: dict[str, int] = {}
        rows_a, rows_b = [], []
        for label in sorted(set(labels)):
            path = lidb_path(folder, label)
            if not path.is_file():
                raise SupervisionError(f"identity {label!r} has no pre-optimised LiDB ('{path}' is missing); run "
                                       "lidb-preopt again (it resumes) before training")
            weights = LiDB.load(path, targets=targets, a=a, b=c)
            if weights.seed != seed:
                raise SupervisionError(f"'{path}' was pre-optimised with aux seed {weights.seed}, this run uses "
                                       f"lidb.seed = {seed}; use the config it was made with")
            self.index[label] = len(rows_a)
            rows_a.append(weights.a_train)
            rows_b.append(weights.b_train)
        self.a_train, self.b_train = torch.stack(rows_a), torch.stack(rows_b)  # [identities, L, a], [.., L, c]

    def rows(self, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.index[label] for label in labels])
        return self.a_train[rows], self.b_train[rows]


class SupervisedData:
    """A training data set whose batches carry each sample's pre-optimised LiDB weights (``Batch.lidb_a/_b``)."""

    def __init__(self, data, supervision: Supervision | None) -> None:
        self.data, self.supervision = data, supervision
        self.labels = data.labels() if supervision is not None else None

    def __len__(self) -> int:
        return len(self.data)

    def get(self, positions: list[int]) -> Batch:
        batch = self.data.get(positions)
        if self.supervision is not None:
            batch.lidb_a, batch.lidb_b = self.supervision.rows([self.labels[p % len(self.labels)] for p in positions])
        return batch


# -- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def distance_matrix(net: HyperDreamBooth, faces: torch.Tensor, labels: list[str], supervision: Supervision, *,
                    iterations: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """[n, n] mean weight error: row i = photos of the i-th identity (sorted labels), column j = identity j's
    pre-optimised weights. With ``iterations``, the prediction after that many refinement iterations."""
    order = sorted(set(labels))
    a_pred, b_pred = net(faces, iterations=iterations)[-1]
    out = torch.zeros(len(order), len(order))
    for i, row in enumerate(order):
        mine = torch.tensor([k for k, label in enumerate(labels) if label == row])
        for j, column in enumerate(order):
            a_ref, b_ref = supervision.rows([column] * len(mine))
            out[i, j] = weight_error(a_pred[mine].cpu(), b_pred[mine].cpu(), a_ref, b_ref).mean()
    return out, order


@torch.no_grad()
def heldout_lidb_loss(net: HyperDreamBooth, denoiser: Denoiser, batch: Batch, config: TrainConfig, *,
                      repeats: int = 2, seed: int = 0) -> float:
    """Mean denoising loss of held-out samples, each with the LiDB predicted from its own face photo, trigger words in
    the caption; noise and timesteps fixed by ``seed`` (any backend, any identities)."""
    g = torch.Generator().manual_seed(seed)
    x0 = batch.latents.repeat(repeats, *[1] * (batch.latents.ndim - 1))
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.randint(denoiser.num_timesteps, (len(x0),), generator=g).to(x0.device)
    context = denoiser.encode_text([config.stage.with_trigger(c) for c in batch.captions] * repeats)
    a_pred, b_pred = net(batch.face)[-1]
    lora = lidb_factors(aux_for(config, target_layers(denoiser)), a_pred.repeat(repeats, 1, 1),
                        b_pred.repeat(repeats, 1, 1))
    pred = denoiser.predict(denoiser.noisy(x0, noise, t), t, context, lora)
    return float((pred.float() - denoiser.target(x0, noise, t).float()).pow(2).mean())


def shard_hdb_validation(denoiser: Denoiser, batch: Batch, config: TrainConfig):
    """Validation of a real data set: the held-out loss with predicted LiDBs on a fixed batch of held-out samples."""
    return lambda net: {"heldout_loss": heldout_lidb_loss(net, denoiser, batch.to(next(net.parameters()).device),
                                                          config)}


def toy_hdb_validation(data, supervision: Supervision):
    """Validation of the toy backend: held-out photos' weight error to their own identity, and rows won."""
    from .validate import diagonal_wins

    held = data.get(list(range(len(data.held_index))), held_out=True)
    labels = data.labels(held_out=True)

    def validate(net: HyperDreamBooth) -> dict[str, float]:
        device = next(net.parameters()).device
        matrix, _ = distance_matrix(net, held.face.to(device), labels, supervision)
        return {"weight_error": float(matrix.diagonal().mean()), "identity_wins": float(diagonal_wins(matrix))}

    return validate
