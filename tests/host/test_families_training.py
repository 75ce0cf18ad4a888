"""Host tier: the trainer's ComfyUI backend on the tiny model of every tested family (SD1.5, SDXL, Flux, Qwen-Image,
SD3).

A few stage-3 steps run on each, the export describes the family's linears (read from the model the trainer
loaded), its LoRA patched by ComfyUI predicts what the trainer's in-graph LoRA predicts, and the export applies in
the real ComfyUI through ``/prompt`` exactly as the stock loader applies the file Save as LoRA wrote.

Text: these tiny families have no tiny text encoders here (T5, Qwen2.5-VL), so the denoiser below feeds fixed
random text conditioning of the model's widths; the backend's own text path runs in test_train_comfy.py (SDXL).
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from comfy_server import show
from family_runs import apply_vs_stock, check, hooks_vs_patching
from nodepack import families

from hyperlora_core import load_hyperlora
from hyperlora_core.target_scan import lora_file_keys
from hyperlora_core.targets import RELEASED_FAMILY, is_extended
from hyperlora_core.train.config import TrainConfig
from hyperlora_core.train.export import export_checkpoint
from hyperlora_core.train.loop import Trainer
from hyperlora_core.train.toy import SyntheticIdentities

MODEL = dict(k=8, id_rank=4, dim=32, depth=1, heads=2, dim_head=16, id_tokens=4, clip_dim=32, up_basis_std=0.05)
NAMES = list(families.FAMILIES)


def text_free_denoiser(patcher, family: families.Family, feed_forward: bool = False):
    from train_comfy.backend import ComfyDenoiser

    class TextFree(ComfyDenoiser):
        """The comfy backend with fixed random text conditioning of the family's widths."""

        def encode_text(self, captions):
            g = torch.Generator().manual_seed(len(captions))
            context = torch.randn(len(captions), 8, family.context, generator=g)
            pooled = torch.randn(len(captions), family.pooled, generator=g) if family.pooled else None
            return {"c_crossattn": context, "y": pooled}

    return TextFree(patcher, None, resolution=64, feed_forward=feed_forward)


@pytest.fixture(scope="module", params=NAMES)
def trained(request, comfy, tmp_path_factory):
    """3 stage-3 steps on one family's tiny model and an fp32 export: (name, patcher, denoiser, net, folder, data,
    stats)."""
    name = request.param
    family = families.FAMILIES[name]
    patcher = family.build(seed=0)
    denoiser = text_free_denoiser(patcher, family)
    latent = patcher.model.latent_format
    data = SyntheticIdentities(identities=2, images=4, held_out=1, channels=latent.latent_channels, side=8,
                               clip_dim=32)
    if latent.latent_dimensions == 3:  # video-VAE latents (Qwen-Image): [b, c, t=1, h, w]
        data.latents = data.latents[:, :, None]
    tmp = tmp_path_factory.mktemp(f"train_{name}")
    config = TrainConfig().replace(model=MODEL, stage={"stage": 3}, optim={"steps": 3, "lr": 1e-3, "warmup": 1},
                                   run={"out": str(tmp / "run"), "batch": 2, "log_every": 1})
    trainer = Trainer(config, denoiser, data)
    stats = trainer.train(progress=False)
    net = trainer.net.eval()
    return name, patcher, denoiser, net, export_checkpoint(net, tmp / "export", dtype=torch.float32), data, stats


def test_training_runs_and_the_export_describes_the_family(trained):
    name, patcher, denoiser, _, folder, _, stats = trained
    family = families.FAMILIES[name]
    show(f"\n{name}: 3 steps, loss {stats['loss']:.3f}, grad norm {stats['grad_norm']:.3f}; "
         f"{len(denoiser.targets.linears)} target linears")
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert denoiser.targets.family == name
    assert len(denoiser.targets.linears) == family.attention
    listed = json.loads((folder / "hyper_lora_modules.json").read_text())
    if name == RELEASED_FAMILY:  # SDXL's attention modules are written in the released form, which means SDXL
        assert not is_extended(listed) and len(listed) == len(denoiser.targets.modules)
    else:
        assert listed == denoiser.targets.to_json()  # the extended form: the family and every linear's sizes
    hl = load_hyperlora(folder, unet=None)
    assert hl.targets.to_json() == denoiser.targets.to_json()


def test_the_export_patched_by_comfyui_predicts_like_the_trainer(comfy, trained, caplog):
    """The export's LoRA, under the family's file keys and loaded by ComfyUI's stock path, gives the prediction the
    trainer's hooks give (so what was trained is what Apply applies)."""
    name, patcher, denoiser, net, folder, data, _ = trained
    hl = load_hyperlora(folder, unet=None)
    sample = data.get([0], held_out=True)
    identity = hl.predict_identity(clip_tokens=sample.clip, id_embeds=sample.arcface)
    naming = lora_file_keys(hl.targets, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    lora = hl.identity_to_lora(identity, kind="id", key_format=naming)

    with caplog.at_level(logging.WARNING):
        runs = hooks_vs_patching(denoiser, patcher, net, sample, lora, sample.latents.shape)
    hooked, plain, stock, again, patched = (runs[k] for k in ("hooked", "plain", "stock", "again", "patched"))
    effect = float((hooked - plain).abs().max())
    worst = float((hooked - stock).abs().max())
    show(f"\n{name}: trainer hooks vs ComfyUI patching of the export: max |diff| {worst:.2e}; effect {effect:.2e}")
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(hl.targets.linears)
    assert effect > 1e-4  # the LoRA does something, so the comparison can fail
    assert worst < 1e-3 * effect
    assert torch.equal(again, plain)


def test_the_export_applies_through_prompt(comfy, server, trained):
    name, _, denoiser, _, folder, _, _ = trained
    checkpoint = f"trained_{name}"
    shutil.copytree(folder, server.models / "hyper_lora" / checkpoint)
    out = apply_vs_stock(server, name, checkpoint, tag=f"trained_{name}")
    check(out, name, len(denoiser.targets.linears))


def test_feed_forward_training_is_opt_in(comfy, tmp_path):
    """data.feed_forward: the trainer targets the feed-forward linears too (Flux: 152 + 76), trains, exports them."""
    family = families.FAMILIES["Flux"]
    config = TrainConfig().replace(model=MODEL, stage={"stage": 3}, optim={"steps": 1, "lr": 1e-3, "warmup": 1},
                                   run={"out": str(tmp_path / "run"), "batch": 2, "log_every": 1},
                                   data={"feed_forward": True})
    denoiser = text_free_denoiser(family.build(seed=0), family, feed_forward=config.data.feed_forward)
    assert len(denoiser.targets.linears) == family.attention + family.feed_forward
    data = SyntheticIdentities(identities=2, images=2, held_out=1, channels=16, side=8, clip_dim=32)
    trainer = Trainer(config, denoiser, data)
    assert math.isfinite(trainer.train(progress=False)["loss"])
    listed = json.loads((export_checkpoint(trainer.net, tmp_path / "export") / "hyper_lora_modules.json").read_text())
    linears = [lin["key"] for module in listed.values() if "linears" in module for lin in module["linears"]]
    assert len(linears) == family.attention + family.feed_forward
    assert "diffusion_model.double_blocks.0.img_mlp.0" in linears
