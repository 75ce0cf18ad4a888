"""Host tier: the trainer's ComfyUI backend on the tiny SDXL built from ComfyUI's classes. Its LoRA hooks target
the linears our Apply node patches: a prediction with the trainer's in-graph LoRA equals ComfyUI's own LoRA
patching (load_lora_for_models, as ApplyHyperLoRA does) of the exported checkpoint's LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_server import show
from family_runs import hooks_vs_patching
from nodepack import tiny

from hyperlora_core import load_hyperlora
from hyperlora_core.train.config import TrainConfig
from hyperlora_core.train.export import export_checkpoint
from hyperlora_core.train.loop import Trainer
from hyperlora_core.train.toy import SyntheticIdentities

MODEL = dict(k=8, id_rank=4, dim=32, depth=1, heads=2, dim_head=16, id_tokens=4, clip_dim=32, up_basis_std=0.05)


@pytest.fixture(scope="module")
def backend(comfy):
    from train_comfy.backend import ComfyDenoiser

    patcher = tiny.tiny_sdxl(seed=0)
    return patcher, ComfyDenoiser(patcher, tiny.tiny_clip(0), resolution=64)


def test_targets_are_the_140_sdxl_modules(backend):
    """Read from the model: its family and SDXL's 140 attention modules at the tiny widths, in SGM order."""
    from hyperlora_core.targets import released_target_layers
    from hyperlora_core.topology import sdxl_modules

    _, denoiser = backend
    assert denoiser.targets == released_target_layers(sdxl_modules(), tiny.host_unet())
    assert denoiser.targets.family == "SDXL"


@pytest.fixture(scope="module")
def trained(backend, tmp_path_factory):
    """Stages 1 and 3 (3 steps each) on the tiny SDXL; (hypernetwork, fp32 export folder, data)."""
    _, denoiser = backend
    tmp = tmp_path_factory.mktemp("train_comfy")
    data = SyntheticIdentities(identities=2, images=4, held_out=1, channels=4, side=8, clip_dim=32)
    init, losses = "", []
    for stage in (1, 3):
        config = TrainConfig().replace(model=MODEL, stage={"stage": stage, "init": init},
                                       optim={"steps": 3, "lr": 1e-3, "warmup": 1},
                                       run={"out": str(tmp / f"s{stage}"), "batch": 2, "log_every": 1})
        trainer = Trainer(config, denoiser, data)
        losses.append(trainer.train(progress=False))
        init = str(trainer.save())
    assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in losses)
    net = trainer.net.eval()
    return net, export_checkpoint(net, tmp / "export", dtype=torch.float32), data


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(backend, trained):
    """With checkpointing, the UNet blocks run again in backward and the hypernetwork's gradients are unchanged."""
    _, denoiser = backend
    net, _, data = trained
    sample = data.get([0, 1])
    t = torch.tensor([300, 700])
    noise = torch.randn(sample.latents.shape, generator=torch.Generator().manual_seed(0))
    context = denoiser.encode_text(sample.captions)
    grads = {}
    for on in (False, True):
        denoiser.gradient_checkpointing, before = on, denoiser.recomputed
        net.zero_grad()
        factors = net(sample.clip, sample.arcface, None)["id"]
        pred = denoiser.predict(denoiser.noisy(sample.latents, noise, t), t, context, factors)
        pred.pow(2).mean().backward()
        grads[on] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        grads[f"recomputed {on}"] = denoiser.recomputed - before
    denoiser.gradient_checkpointing = False
    worst = float((grads[True] - grads[False]).abs().max() / grads[False].abs().max())
    show(f"\ncheckpointing: {grads['recomputed True']} block forwards recomputed; gradient difference {worst:.1e}")
    assert grads["recomputed False"] == 0 and grads["recomputed True"] >= 20
    assert worst < 1e-5


def test_the_export_patches_like_apply(comfy, backend, trained):
    patcher, denoiser = backend
    net, folder, data = trained
    hl = load_hyperlora(folder, unet=tiny.host_unet())
    sample = data.get([0], held_out=True)
    identity = hl.predict_identity(clip_tokens=sample.clip, id_embeds=sample.arcface)
    lora = hl.identity_to_lora(identity, kind="id", key_format="comfy")

    runs = hooks_vs_patching(denoiser, patcher, net, sample, lora, (1, 4, 8, 8))
    hooked, plain, stock, again = (runs[k] for k in ("hooked", "plain", "stock", "again"))
    effect = float((hooked - plain).abs().max())
    worst = float((hooked - stock).abs().max())
    show(f"\ntrainer hooks vs ComfyUI LoRA patching of the export: max |diff| {worst:.2e}; LoRA effect {effect:.2e}")
    assert effect > 1e-4  # the LoRA does something, so the comparison can fail
    assert worst < 1e-3 * effect
    assert torch.equal(again, plain)  # unpatched: the shared model is back as it was


def test_the_export_runs_in_our_nodes(server, trained):
    """The exported folder in models/hyper_lora: LoadHyperLoRA -> HyperLoRAFromImage -> ApplyHyperLoRA -> KSampler
    over /prompt in the real ComfyUI, and the identity changes the picture."""
    import shutil

    import numpy as np
    from graphs import generation, saved_image

    shutil.copytree(trained[1], server.models / "hyper_lora" / "trained_tiny")
    run = server.server.run(generation(prefix="trained_identity", seed=1, checkpoint="trained_tiny").prompt())
    assert run.status == "success", (run.error, run.response)
    assert {"load", "from_image", "apply", "sampler"} <= set(run.executed)
    plain = server.server.run(generation(prefix="trained_plain", seed=1, with_identity=False).prompt())
    assert plain.status == "success", (plain.error, plain.response)
    changed = np.abs(saved_image(server, run).astype(int) - saved_image(server, plain).astype(int))
    show(f"\ntrained export vs no identity: {np.mean(changed > 0):.1%} of pixel values differ, max {changed.max()}")
    assert changed.max() > 0


def test_prepared_shards_feed_a_training_step(comfy, backend, tiny_clip_folder, tmp_path):
    """prepare (face doubles) -> tar shards -> the comfy backend's encoder (ComfyUI VAE, our CLIP tower) -> Batch
    -> a stage-3 step on the tiny SDXL."""
    import numpy as np
    from PIL import Image

    from hyperlora_core.clip import ClipVisionEncoder
    from hyperlora_core.train.cli import main
    from hyperlora_core.train.shards import ShardDataset
    from train_comfy.backend import shard_encoder

    from face_doubles import centred_box, paint_face, write_antelopev2
    from helpers import TINY_CLIP_WIDTH

    images = tmp_path / "images"
    images.mkdir()
    for n in range(2):
        photo = np.zeros((640, 640, 3), np.uint8)
        Image.fromarray(paint_face(photo, centred_box(320, 320, 150), seed=n)).save(images / f"p{n}.png")
        (images / f"p{n}.txt").write_text(f"portrait {n}")
    antelope = write_antelopev2(tmp_path / "antelopev2")
    assert main(["prepare", "--images", str(images), "--out", str(tmp_path / "shards"), "--insightface",
                 str(antelope), "--per-shard", "1", "--min-face", "100", "--resolution", "64", "--provider",
                 "cpu"]) == 0
    _, denoiser = backend
    encode = shard_encoder(tiny.tiny_vae(0), ClipVisionEncoder.from_folder(tiny_clip_folder), resolution=64,
                           device="cpu")
    data = ShardDataset(tmp_path / "shards", encode=encode)
    batch = data.get([0, 1])
    assert batch.latents.shape[:2] == (2, 4) and batch.clip.shape == (2, 257, TINY_CLIP_WIDTH)
    assert batch.captions == ["portrait 0", "portrait 1"] and batch.arcface.shape == (2, 512)
    assert not torch.equal(batch.clip, batch.base_clip)  # the Base crop (face blurred) is another image
    config = TrainConfig().replace(model={**MODEL, "clip_dim": TINY_CLIP_WIDTH}, stage={"stage": 3},
                                   optim={"steps": 1, "lr": 1e-3, "warmup": 1},
                                   run={"out": str(tmp_path / "run"), "batch": 2})
    stats = Trainer(config, denoiser, data).train(progress=False)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
