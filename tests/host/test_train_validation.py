"""Host tier: validation's face-similarity score on ComfyUI's tiny SDXL. Pictures are sampled with the predicted
LoRAs through ComfyUI's own sampler and decoded by a VAE; the face analysis is the antelopev2 doubles
(tests/face_doubles.py). The tiny random SDXL draws no faces, so the decoder here is the tiny VAE followed by a
painter that darkens each decoded picture and (for some runs) paints a face double into it: the score must follow
what the sampled pictures hold (the identity's own face, another face, no face) and reach the training log."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from comfy_server import show
from nodepack import tiny

from hyperlora_core.train.config import TrainConfig, ValidationConfig
from hyperlora_core.train.loop import Trainer
from hyperlora_core.train.toy import SyntheticIdentities
from hyperlora_core.train.validate import check_references, held_out_identities, shard_validation

from face_doubles import centred_box, paint_face, write_antelopev2
from helpers import TINY_CLIP_WIDTH

MODEL = dict(k=8, id_rank=4, dim=32, depth=1, heads=2, dim_head=16, id_tokens=4, clip_dim=TINY_CLIP_WIDTH,
             up_basis_std=0.05)
SIDE = 128  # validation pictures and stored photos (px): faces of ~30 px, which the detector double finds
SETTINGS = ValidationConfig(identities=2, images=2, steps=2, resolution=SIDE, cfg=2.0, sampler="euler",
                            scheduler="normal", seed=5)
LOW = 200  # the face doubles' darkest block: more texture, so two faces embed further apart
FACE_SEEDS = {"anna": 1, "ben": 2}  # identity -> the face double painted in its photos


class PaintingVAE:
    """The tiny VAE's decode, darkened (the detector double needs a dark surround) and, when ``face`` is a seed,
    with that face double painted in the middle. Records every latent it decodes."""

    def __init__(self, vae, face: int | None) -> None:
        self.vae, self.face, self.decoded = vae, face, []

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.decoded.append(latents.clone())
        pictures = (self.vae.decode(latents).float() * 0.15).numpy()
        if self.face is not None:
            for picture in pictures:
                paint_face(picture, centred_box(SIDE / 2, SIDE / 2, SIDE / 4), seed=self.face, low=LOW)
        return torch.from_numpy(pictures)


@pytest.fixture(scope="module")
def world(comfy, tiny_clip_folder, tmp_path_factory):
    """(denoiser, held-out shards, face analyzer, antelopev2 folder): two held-out identities with two photos
    each, prepared by `prepare` with the face doubles."""
    from PIL import Image

    from hyperlora_core.clip import ClipVisionEncoder
    from hyperlora_core.face import FaceAnalyzer
    from hyperlora_core.train.cli import main
    from hyperlora_core.train.shards import ShardDataset
    from train_comfy.backend import ComfyDenoiser, shard_encoder

    tmp = tmp_path_factory.mktemp("validation")
    images, rows = tmp / "images", []
    images.mkdir()
    for label, seed in FACE_SEEDS.items():
        for n, cx in enumerate((300, 340)):
            photo = np.random.default_rng(seed * 10 + n).integers(0, 30, (640, 640, 3), dtype=np.uint8)
            paint_face(photo, centred_box(cx, 320, 150), seed=seed, low=LOW)
            Image.fromarray(photo).save(images / f"{label}{n}.png")
            rows.append({"file": f"{label}{n}.png", "caption": f"portrait of {label}", "identity": label})
    (tmp / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    antelope = write_antelopev2(tmp / "antelopev2")
    assert main(["prepare", "--images", str(images), "--out", str(tmp / "held"), "--insightface", str(antelope),
                 "--captions", str(tmp / "captions.jsonl"), "--per-shard", "2", "--min-face", "100",
                 "--resolution", str(SIDE), "--provider", "cpu"]) == 0
    denoiser = ComfyDenoiser(tiny.tiny_sdxl(seed=0), tiny.tiny_clip(0), resolution=SIDE)
    encode = shard_encoder(tiny.tiny_vae(0), ClipVisionEncoder.from_folder(tiny_clip_folder), resolution=SIDE,
                           device="cpu")
    return denoiser, ShardDataset(tmp / "held", encode=encode), FaceAnalyzer(antelope, providers="cpu")


def _trainer(denoiser, out, validate) -> Trainer:
    data = SyntheticIdentities(identities=2, images=4, held_out=1, channels=4, side=SIDE // 8, clip_dim=32)
    config = TrainConfig().replace(model=MODEL, stage={"stage": 3}, optim={"steps": 1, "lr": 1e-3, "warmup": 1},
                                   run={"out": str(out), "batch": 2, "validate_every": 1, "log_every": 1},
                                   validation=asdict(SETTINGS))
    return Trainer(config, denoiser, data, validate=validate)


def test_held_out_identities_group_by_label(world):
    _, held, analyzer = world
    identities = held_out_identities(held, samples=16, identities=2)
    assert [i.label for i in identities] == list(FACE_SEEDS)
    assert [len(i.references) for i in identities] == [2, 2]
    assert all(r.shape == (SIDE, SIDE, 3) for i in identities for r in i.references)
    assert identities[0].condition.captions == ["portrait of anna"]
    check_references(analyzer, identities)  # every stored photo shows its face to the analysis
    assert [i.label for i in held_out_identities(held, samples=16, identities=1)] == ["anna"]


def test_the_face_score_is_computed_from_the_sampled_pictures(world, tmp_path):
    """One validation per decoder: the identity's own face painted, another face, no face. The score follows the
    pictures, and the sampler decoded identities × images latents of the configured size."""
    denoiser, held, analyzer = world
    identities = held_out_identities(held, samples=16, identities=SETTINGS.identities)
    batch = held.get(list(range(len(held))))
    found = {}
    for name, face in (("own", "own"), ("other", 7), ("none", None)):
        scores, missing = [], []
        for ident in identities:  # one identity at a time, so the painted face can be the identity's own
            denoiser.vae = PaintingVAE(tiny.tiny_vae(0), FACE_SEEDS[ident.label] if face == "own" else face)
            validate = shard_validation(denoiser, batch, TrainConfig().stage, identities=[ident], settings=SETTINGS,
                                        analyzer=analyzer)
            values = _trainer(denoiser, tmp_path / f"{name}_{ident.label}", validate).validate()
            scores.append(values["val/face_similarity"])
            missing.append(values["val/face_missing"])
            decoded = denoiser.vae.decoded
            assert len(decoded) == SETTINGS.images and all(d.shape == (1, 4, SIDE // 8, SIDE // 8) for d in decoded)
        found[name] = (float(np.mean(scores)), float(np.mean(missing)))
    denoiser.vae = None
    show("\nface score of the sampled pictures (mean ArcFace cosine, fraction without a face): "
         + ", ".join(f"{k} face {v[0]:.3f} ({v[1]:.0%})" for k, v in found.items()))
    assert found["own"][1] == 0 and found["other"][1] == 0 and found["none"] == (0.0, 1.0)
    assert found["own"][0] > 0.25  # measured 0.337 (own face), 0.202 (another face)
    assert found["own"][0] > found["other"][0] + 0.05


def test_the_predicted_lora_reaches_the_sampler(world, tmp_path):
    """The same noise sampled with the predicted LoRA and without it gives other latents (CFG on: the LoRA of
    batch 1 covers both halves of the guidance batch)."""
    denoiser, held, _ = world
    ident = held_out_identities(held, samples=16, identities=1)[0]
    from hyperlora_core.train.validate import predicted_lora

    net = _trainer(denoiser, tmp_path, None).net.eval()
    painter = PaintingVAE(tiny.tiny_vae(0), None)
    denoiser.vae = painter
    try:
        with torch.no_grad():
            lora = predicted_lora(net, ident.condition)
        caption = ["fcsks fxhks fhyks, portrait"]
        denoiser.sample(caption, lora, SETTINGS)
        denoiser.sample(caption, None, SETTINGS)
        denoiser.sample(caption, None, SETTINGS)
    finally:
        denoiser.vae = None
    with_lora, plain, again = painter.decoded
    change = float((with_lora - plain).abs().max() / plain.abs().max())
    show(f"\nsampled latents with vs without the predicted LoRA: max relative difference {change:.2e}")
    assert torch.equal(plain, again)  # sampling is deterministic, so the difference is the LoRA's
    assert change > 1e-3


def test_the_face_score_reaches_tensorboard(world, tmp_path):
    """Training with validate_every=1: the face score is in the returned metrics, the history and TensorBoard's
    event file, beside the held-out denoising loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    denoiser, held, analyzer = world
    identities = held_out_identities(held, samples=16, identities=SETTINGS.identities)
    denoiser.vae = PaintingVAE(tiny.tiny_vae(0), FACE_SEEDS["anna"])
    try:
        validate = shard_validation(denoiser, held.get([0, 1]), TrainConfig().stage, identities=identities,
                                    settings=SETTINGS, analyzer=analyzer)
        trainer = _trainer(denoiser, tmp_path, validate)
        trainer.train(progress=False)
    finally:
        denoiser.vae = None
    row = next(r for r in trainer.history if "val/face_similarity" in r)
    assert row["step"] == 1 and 0 < row["val/face_similarity"] <= 1 and "val/heldout_loss" in row
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert {"val/face_similarity", "val/face_missing", "val/heldout_loss", "loss"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("val/face_similarity")
    assert [(e.step, e.value) for e in logged] == [(1, pytest.approx(row["val/face_similarity"]))]
