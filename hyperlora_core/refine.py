"""Fast refinement, the host-independent part: configuration, reference views, training batches, loss, loop.

The host (the ComfyUI node) supplies the denoiser and the model's sampling maths; everything here is pure torch
and deterministic for a given seed. Letters: ``b`` batch, ``c`` channels, ``h``/``w`` height and width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import HyperLoRAError
from .finetune import Parametrisation
from .lidb import LIDB_A, LIDB_B
from .lora_io import ID_STRENGTH

MODES = ("coefficients", "rank_relaxed", "lidb")
# each mode's own AdamW learning rate (lr = 0 picks it): unit-norm coefficient tokens need larger steps than the
# zero-initialised residual LoRA to move as far in 50 steps; a LiDB's up side has only b numbers per linear
MODE_LR = {"coefficients": 1e-2, "rank_relaxed": 1e-3, "lidb": 5e-3}
MIN_SIDE = 64  # pixels: below this a reference photo holds too little of a face to learn from
BATCH = 1  # latents per step by default, everywhere (node, workflow, benches)


class RefineInputError(HyperLoRAError, ValueError):
    """A refinement input (photos, settings) cannot be used."""


class TrainingDivergedError(HyperLoRAError, RuntimeError):
    """The loss stopped being a finite number: the learning rate is too high for this model."""


@dataclass(frozen=True)
class RefineConfig:
    """One refinement run; the same config and seed give the same result on the same device."""

    mode: str = "rank_relaxed"  # "coefficients" (the identity's tokens), "rank_relaxed" (residual LoRA), "lidb"
    steps: int = 50  # optimiser steps
    lr: float = 0.0  # AdamW learning rate; 0: the mode's own (MODE_LR)
    rank: int = 4  # rank of the residual LoRA (rank_relaxed)
    seed: int = 0  # noise, timesteps, augmentation and the residual's initialisation
    batch: int = BATCH  # latents per step; their timesteps are stratified over the schedule
    resolution: int = 1024  # references are resized to about resolution² pixels (aspect kept, sides ÷ 64)
    augment: bool = True  # add a horizontal flip and two small seeded crops of each reference
    weight_decay: float = 0.0  # AdamW weight decay (the residual starts at zero; decay would pull it back)
    id_strength: float = ID_STRENGTH  # the weight the identity is applied at; the prediction is trained in at it
    lidb_a: int = LIDB_A  # LiDB's down-side size a (mode lidb): A_train is 1 × a
    lidb_b: int = LIDB_B  # LiDB's up-side size b (mode lidb): B_train is b × 1

    @property
    def learning_rate(self) -> float:
        """The learning rate the run uses: ``lr``, or the mode's own where ``lr`` is 0."""
        return self.lr or MODE_LR[self.mode]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RefineInputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, low in (("steps", 1), ("rank", 1), ("batch", 1), ("resolution", MIN_SIDE), ("lidb_a", 1),
                          ("lidb_b", 1)):
            if int(getattr(self, name)) < low:
                raise RefineInputError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise RefineInputError(f"lr must be a positive number (or 0 for the mode's own), got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise RefineInputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.id_strength) and self.id_strength != 0):
            raise RefineInputError(f"id_strength must be a non-zero number, got {self.id_strength}")


def training_size(height: int, width: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """(h, w) with about resolution² pixels, the photo's aspect ratio, both sides multiples of ``multiple``."""
    scale = resolution / math.sqrt(height * width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """[b, h, w, 3] float in 0..1 from a [b, h, w, c] IMAGE with 1 (grey), 3 or 4 (RGBA on mid-grey) channels."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise RefineInputError(f"image must be a batch of photos [B, H, W, C], got shape {list(images.shape)}")
    c = images.shape[-1]
    x = images.float()
    if c == 1:
        return x.expand(*x.shape[:3], 3)
    if c == 4:
        alpha = x[..., 3:].clamp(0, 1)
        return x[..., :3] * alpha + 0.5 * (1 - alpha)
    if c != 3:
        raise RefineInputError(f"image has {c} channels; use a grey, RGB or RGBA photo")
    return x.clamp(0, 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[b, h, w, c] -> [b, H, W, c], antialiased when shrinking."""
    if tuple(x.shape[1:3]) == size:
        return x
    y = F.interpolate(x.movedim(-1, 1), size=size, mode="bicubic", align_corners=False, antialias=True)
    return y.movedim(1, -1).clamp(0, 1)


def reference_views(images: torch.Tensor, config: RefineConfig) -> torch.Tensor:
    """The training views [v·b, H, W, 3]: the references at training size and (``augment``) their horizontal
    flips and two seeded crops of 85–95 % of each side, scaled back up and flipped at random."""
    x = _rgb(images)
    h, w = x.shape[1:3]
    if min(h, w) < MIN_SIDE:
        raise RefineInputError(f"the reference photos are {w}×{h} pixels; refinement needs at least "
                               f"{MIN_SIDE}×{MIN_SIDE} (use photos of 512 pixels or more)")
    size = training_size(h, w, config.resolution)
    views = [_resize(x, size)]
    if config.augment:
        g = torch.Generator().manual_seed(config.seed)
        views.append(torch.flip(views[0], dims=[2]))
        for _ in range(2):
            scale = 0.85 + 0.1 * float(torch.rand(1, generator=g))
            ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
            top = int(torch.randint(h - ch + 1, (1,), generator=g))
            left = int(torch.randint(w - cw + 1, (1,), generator=g))
            crop = _resize(x[:, top:top + ch, left:left + cw], size)
            views.append(torch.flip(crop, dims=[2]) if float(torch.rand(1, generator=g)) < 0.5 else crop)
    return torch.cat(views)


@dataclass
class TrainingBatch:
    """One step's draw: which latents, their noise, and where on the schedule (0 = pure noise, 1 = clean)."""

    x0: torch.Tensor  # [b, c, h, w] clean latents
    noise: torch.Tensor  # [b, c, h, w] standard normal
    percent: torch.Tensor  # [b] schedule positions in (0, 1), one per stratum


def draw_batch(latents: torch.Tensor, generator: torch.Generator, batch: int) -> TrainingBatch:
    """Random latents, seeded noise and stratified schedule positions; drawn on the CPU, so devices agree."""
    index = torch.randint(latents.shape[0], (batch,), generator=generator)
    noise = torch.randn((batch, *latents.shape[1:]), generator=generator)
    percent = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    percent = percent[torch.randperm(batch, generator=generator)].clamp(1e-3, 1 - 1e-3)
    return TrainingBatch(latents[index.to(latents.device)], noise.to(latents.device, latents.dtype), percent)


def denoising_loss(x0_pred: torch.Tensor, x0: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """The MSE in the model's own output space (ε for eps models, v for v-prediction, velocity for flow).

    ``out_scale`` [b] is d(denoised)/d(model output) at each sigma (σ for eps, σ·σd/√(σ²+σd²) for v); the output
    error is the x0 error divided by it, so this equals the textbook ε- or v-MSE exactly.
    """
    scale = out_scale.to(torch.float32).view(-1, *([1] * (x0.ndim - 1)))
    return torch.mean(((x0_pred.float() - x0.float()) / scale) ** 2)


def train(param: Parametrisation, config: RefineConfig, step_loss: Callable[[torch.Generator], torch.Tensor], *,
          on_step: Callable[[int, float], None] | None = None,
          check_interrupt: Callable[[], None] | None = None, loss_scaling: bool = False) -> list[float]:
    """``config.steps`` AdamW steps on ``step_loss(generator)``; returns the loss of every step.

    ``check_interrupt`` runs before each step and may raise to stop; ``on_step(step, loss)`` after each.
    ``loss_scaling``: dynamic loss scaling (torch.amp.GradScaler) for fp16 compute, whose small gradients would
    otherwise flush to zero; a step whose scaled gradients overflow is skipped and the scale halved. The
    parameters themselves stay float32.
    """
    params = list(param.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(params[0].device.type, enabled=loss_scaling)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    for step in range(config.steps):
        if check_interrupt is not None:
            check_interrupt()
        loss = step_loss(generator)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(f"the refinement loss became {value} at step {step + 1}: lower lr "
                                        f"(it was {config.learning_rate:g}) or use precision fp32")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        param.after_step()
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    return losses
