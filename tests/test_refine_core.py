"""Refinement, host-independent part: config checks, reference views, batches, the loss against textbook formulas,
and the loop (on a toy objective, so this tier runs without ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from hyperlora_core.finetune import CoefficientLoRA, RankRelaxed
from hyperlora_core.lora_io import lora_delta, lora_prefixes
from hyperlora_core.refine import (
    BATCH,
    MODE_LR,
    MODES,
    RefineConfig,
    RefineInputError,
    TrainingDivergedError,
    denoising_loss,
    draw_batch,
    reference_views,
    train,
    training_size,
)

from helpers import conditions

BAD_CONFIGS = [
    (dict(mode="dreambooth"), "mode must be one of"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(rank=0), "rank must be at least 1"),
    (dict(batch=0), "batch must be at least 1"),
    (dict(resolution=32), "resolution must be at least 64"),
    (dict(lr=-1e-3), "lr must be a positive number"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(mode="lidb", lidb_a=0), "lidb_a must be at least 1"),
    (dict(mode="lidb", lidb_b=0), "lidb_b must be at least 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(RefineInputError, match=message):
        RefineConfig(**kwargs)


@pytest.mark.parametrize("h,w,res,want", [(1024, 1024, 1024, (1024, 1024)), (4000, 6000, 1024, (832, 1280)),
                                          (600, 400, 1024, (1280, 832)), (64, 64, 64, (64, 64)),
                                          (100, 3000, 64, (64, 320))])
def test_training_size_keeps_area_aspect_and_multiples(h, w, res, want):
    got = training_size(h, w, res)
    assert got == want and got[0] % 64 == 0 and got[1] % 64 == 0


def _photo(h=96, w=80, c=3, seed=0):
    return torch.rand(2, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_views_flip_crop_and_are_seeded():
    x = _photo()
    config = RefineConfig(resolution=64, seed=3)
    v = reference_views(x, config)
    assert v.shape == (8, 64, 64, 3) and 0 <= float(v.min()) and float(v.max()) <= 1
    assert torch.equal(v[2:4], torch.flip(v[0:2], dims=[2]))  # the flips of the references
    assert torch.equal(v, reference_views(x, config))
    assert not torch.equal(v[4:], reference_views(x, RefineConfig(resolution=64, seed=4))[4:])
    plain = reference_views(x, RefineConfig(resolution=64, augment=False))
    assert plain.shape == (2, 64, 64, 3) and torch.equal(plain, v[:2])


def test_views_of_grey_and_rgba_photos():
    grey = _photo(c=1)
    assert torch.equal(reference_views(grey, RefineConfig(resolution=64, augment=False)),
                       reference_views(grey.expand(-1, -1, -1, 3), RefineConfig(resolution=64, augment=False)))
    rgba = torch.cat([_photo(), torch.zeros(2, 96, 80, 1)], dim=-1)  # fully transparent: mid-grey
    v = reference_views(rgba, RefineConfig(resolution=64, augment=False))
    assert torch.allclose(v, torch.full_like(v, 0.5))


@pytest.mark.parametrize("images,message", [(torch.rand(1, 40, 300, 3), "300×40 pixels"),
                                            (torch.rand(1, 96, 96, 2), "2 channels"),
                                            (torch.rand(96, 96, 3), "batch of photos")])
def test_views_refuse_unusable_photos(images, message):
    with pytest.raises(RefineInputError, match=message):
        reference_views(images, RefineConfig(resolution=64))


def test_batches_are_stratified_and_seeded():
    latents = torch.randn(5, 4, 8, 8)
    b = draw_batch(latents, torch.Generator().manual_seed(1), 4)
    assert b.x0.shape == b.noise.shape == (4, 4, 8, 8)
    assert sorted(int(p * 4) for p in b.percent) == [0, 1, 2, 3]  # one position per quarter of the schedule
    again = draw_batch(latents, torch.Generator().manual_seed(1), 4)
    assert torch.equal(b.noise, again.noise) and torch.equal(b.percent, again.percent)


def test_loss_is_the_eps_and_v_mse():
    """Independent: x0 predictions built from an ε or v output by the textbook (VP) formulas give back the MSE of
    that output against the true ε or v."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 1.0, 14.0]).view(-1, 1, 1, 1)
    x = x0 + sigma * eps  # the variance-exploding input
    eps_hat = eps + 0.1 * torch.randn(3, 4, 8, 8, generator=g)
    x0_from_eps = x - sigma * eps_hat
    assert math.isclose(float(denoising_loss(x0_from_eps, x0, sigma.flatten())),
                        float(torch.mean((eps_hat - eps) ** 2)), rel_tol=1e-4)
    alpha, s = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
    v = alpha * eps - s * x0
    v_hat = v + 0.1 * torch.randn(3, 4, 8, 8, generator=g)
    z = alpha * x  # the variance-preserving input
    x0_from_v = alpha * z - s * v_hat
    assert math.isclose(float(denoising_loss(x0_from_v, x0, s.flatten())),
                        float(torch.mean((v_hat - v) ** 2)), rel_tol=1e-4)
    # weighting matters: the plain x0-MSE is another number
    assert not math.isclose(float(torch.mean((x0_from_eps - x0) ** 2)), float(torch.mean((eps_hat - eps) ** 2)),
                            rel_tol=1e-2)


def _identity_and_lora(hl):
    clip, arc = conditions(1, seed=4)
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    return identity, hl.identity_to_lora(identity, key_format="comfy")


def _toy_loss(param, targets):
    """A toy objective: reach given per-layer deltas on the first 12 linears."""
    return lambda generator: sum(((param.delta(i) - t) ** 2).mean() for i, t in enumerate(targets))


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_loop_learns_is_seeded_and_returns_the_right_kind(tiny_hl, mode):
    identity, lora = _identity_and_lora(tiny_hl)
    prefixes = lora_prefixes(lora)
    clip, arc = conditions(1, seed=9)
    target_identity = tiny_hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    target_lora = tiny_hl.identity_to_lora(target_identity, key_format="comfy")
    targets = [lora_delta(target_lora, p) for p in prefixes[:12]]
    config = RefineConfig(mode=mode, steps=40, lr=3e-2, rank=2, seed=1)

    def make():
        if mode == "rank_relaxed":
            return RankRelaxed(lora, config.rank, seed=config.seed)
        return CoefficientLoRA(tiny_hl, identity, prefixes)

    param = make()
    losses = train(param, config, _toy_loss(param, targets))
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    result = param.result()
    again = make()
    assert train(again, config, _toy_loss(again, targets)) == losses
    if mode == "rank_relaxed":
        assert result.identity is None and len(lora_prefixes(result.lora)) == len(prefixes)
    else:
        assert result.identity.meta["refined"] == "coefficients"
        assert torch.allclose(result.identity.tokens.float().norm(dim=-1), torch.ones(len(result.identity.tokens)),
                              atol=1e-3)
        tiny_hl.identity_to_lora(result.identity)  # still an identity of this checkpoint


class _Fp16Toy:
    """One float32 parameter vector seen through an fp16 layer of small weights: its true gradients (~3e-9)
    are below half of fp16's smallest subnormal (6e-8) and flush to zero unless the loss is scaled."""

    def __init__(self) -> None:
        self.p = torch.nn.Parameter(torch.zeros(64))

    def parameters(self):
        return [self.p]

    def after_step(self) -> None:
        pass

    def loss(self, generator) -> torch.Tensor:
        h = self.p.half() * torch.full((64,), 1e-4, dtype=torch.float16)  # the fp16 "network"
        return ((h.float() - 1e-3) ** 2).mean()  # the loss itself in float32, as denoising_loss


@pytest.mark.parametrize("scaling", [False, True])
def test_loss_scaling_keeps_fp16_gradients_alive(scaling):
    toy = _Fp16Toy()
    train(toy, RefineConfig(steps=5, lr=1e-2), toy.loss, loss_scaling=scaling)
    moved = toy.p.detach()
    if scaling:
        assert bool((moved > 0).all()), moved[:4]  # every entry stepped towards the target
    else:
        assert torch.equal(moved, torch.zeros(64))  # the fp16 gradients were all zero: nothing learnt


def test_loop_stops_on_interrupt_and_on_divergence(tiny_hl):
    _, lora = _identity_and_lora(tiny_hl)
    param = RankRelaxed(lora, 2)
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        train(param, RefineConfig(steps=10), lambda g: (param.delta(0) ** 2).mean(), check_interrupt=check)
    assert len(calls) == 3
    with pytest.raises(TrainingDivergedError, match="became nan at step 1: lower lr"):
        train(param, RefineConfig(steps=2), lambda g: (param.delta(0) ** 2).mean() * float("nan"))


@pytest.mark.parametrize("mode", MODES)
def test_lr_zero_is_the_modes_own_and_batch_has_one_default(mode):
    assert RefineConfig(mode=mode).learning_rate == MODE_LR[mode]
    assert RefineConfig(mode=mode, lr=3e-4).learning_rate == 3e-4
    assert RefineConfig().batch == BATCH
