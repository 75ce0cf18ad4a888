"""HyperDreamBooth at toy scale: LiDB pre-optimisation of the 8 synthetic identities, then the hypernetwork trained
through the same trainer on (weight L2 + denoising). Held-out photos must land on their own identity's weights,
more refinement iterations must lower the held-out weight error, and the weight term must matter. The tiny denoiser
and identities are hyperlora_core/train/toy.py; the figures print with -s."""

from __future__ import annotations

import sys

import pytest
import torch

from hyperlora_core.config import TRIGGER_WORDS
from hyperlora_core.lidb import LiDB
from hyperlora_core.train.config import TrainConfig
from hyperlora_core.train.hdb_stage import (
    SupervisedData,
    Supervision,
    aux_for,
    distance_matrix,
    heldout_lidb_loss,
    lidb_factors,
    lidb_path,
    target_layers,
    toy_hdb_validation,
)
from hyperlora_core.train.loop import Trainer
from hyperlora_core.train.preopt import run_preopt
from hyperlora_core.train.toy import SyntheticIdentities, ToyDenoiser, pretrain
from hyperlora_core.train.validate import diagonal_wins

HDB = dict(encoder_width=32, encoder_layers=1, encoder_heads=2, patch_size=4, image_size=16, dim=32, depth=1, heads=2,
           iterations=3, iterate_decay=0.5)
LIDB = dict(a=8, b=4, steps=40, lr=3e-2, batch=6)
STEPS = 120


def _show(text: str) -> None:
    sys.stdout.write("\n" + text + "\n")


def hdb_config(out, supervision, steps: int = STEPS, **hdb) -> TrainConfig:
    return TrainConfig().replace(stage={"stage": "hdb"}, hdb={**HDB, "supervision": str(supervision), **hdb},
                                 lidb=LIDB, optim={"steps": steps, "lr": 3e-3, "warmup": 10},
                                 run={"out": str(out), "batch": 8, "checkpoint_every": 1000, "log_every": 1000})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The frozen toy denoiser, the identities, and every identity's pre-optimised LiDB."""
    data = SyntheticIdentities()
    denoiser = pretrain(ToyDenoiser(), data, steps=100)
    folder = tmp_path_factory.mktemp("lidb")
    config = hdb_config(folder / "unused", folder)
    done = run_preopt(config, denoiser, data, folder)
    supervision = Supervision(folder, data.labels(), target_layers(denoiser), a=LIDB["a"], c=LIDB["b"], seed=0)
    return denoiser, data, folder, supervision, done


def _train(world, out, **hdb) -> Trainer:
    denoiser, data, folder, supervision, _ = world
    config = hdb_config(out, folder, **hdb)
    config = config.replace(run={"validate_every": STEPS})
    trainer = Trainer(config, denoiser, SupervisedData(data, supervision),
                      validate=toy_hdb_validation(data, supervision))
    trainer.train(progress=False)
    return trainer


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    return _train(world, tmp_path_factory.mktemp("hdb"))


def _held(world):
    _, data, _, supervision, _ = world
    return data.get(list(range(len(data.held_index))), held_out=True).face, data.labels(held_out=True), supervision


@torch.no_grad()
def _lidb_loss_matrix(world, repeats: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """[8, 8] held-out denoising loss of identity i's photos with identity j's pre-optimised LiDB, and [8] without
    any LoRA; the same noise and timesteps in every column."""
    denoiser, data, _, supervision, _ = world
    aux = aux_for(hdb_config("x", "x"), target_layers(denoiser))
    g = torch.Generator().manual_seed(5)
    matrix, plain = torch.zeros(8, 8), torch.zeros(8)
    for i in range(8):
        batch = data.get(data.held_out_of(i), held_out=True)
        x0 = batch.latents.repeat(repeats, 1, 1, 1)
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(1000, (len(x0),), generator=g)
        context = denoiser.encode_text([f"{TRIGGER_WORDS}, {c}" for c in batch.captions] * repeats)
        x_t = denoiser.noisy(x0, noise, t)
        plain[i] = (denoiser.predict(x_t, t, context, None) - noise).pow(2).mean()
        for j in range(8):
            a, b = supervision.rows([str(j)] * len(x0))
            matrix[i, j] = (denoiser.predict(x_t, t, context, lidb_factors(aux, a, b)) - noise).pow(2).mean()
    return matrix, plain


def test_preopt_wrote_every_identity_and_learned_it(world):
    """Each identity's LiDB lowers the held-out loss of that identity's photos, more than the others' LiDBs do."""
    denoiser, _, folder, _, done = world
    assert done == [str(i) for i in range(8)]
    for label in done:
        weights = LiDB.load(lidb_path(folder, label), targets=target_layers(denoiser), a=LIDB["a"], b=LIDB["b"])
        assert weights.meta["identity"] == label and float(weights.b_train.abs().max()) > 0
    matrix, plain = _lidb_loss_matrix(world)
    wins = diagonal_wins(matrix)
    _show(f"held-out denoising loss, row = photos of identity i, column = pre-optimised LiDB of identity j\n{matrix}\n"
          f"without a LoRA: {plain}\ndiagonal smallest in {wins} of 8 rows")
    assert wins >= 7 and bool((matrix.diagonal() < plain).all())


def test_predicted_weights_identify_the_person(world, trained):
    faces, labels, supervision = _held(world)
    matrix, _ = distance_matrix(trained.net.eval(), faces, labels, supervision)
    wins = diagonal_wins(matrix)
    _show(f"held-out weight error, row = photos of identity i, column = pre-optimised LiDB of identity j\n{matrix}\n"
          f"diagonal smallest in {wins} of 8 rows")
    assert wins >= 7
    validated = [r for r in trained.history if "val/weight_error" in r]
    assert validated and validated[-1]["val/identity_wins"] == wins  # the trainer's validation saw the same
    denoiser, data = world[0], world[1]
    held = data.get(list(range(len(data.held_index))), held_out=True)
    fresh = trained.stage.build(trained.config, denoiser).eval()
    loss = {name: heldout_lidb_loss(net, denoiser, held, trained.config) for name, net in
            (("trained", trained.net.eval()), ("untrained", fresh))}
    _show(f"held-out denoising loss with the LiDB predicted from each photo: untrained {loss['untrained']:.4f}, "
          f"trained {loss['trained']:.4f}")
    assert loss["trained"] < loss["untrained"]


@pytest.mark.parametrize("start", ["as initialised", "random refinement"])
def test_untrained_hypernetwork_fails(world, trained, start):
    """Fresh weights (the zero-start refinement, whose prediction is the same for every face, and one whose
    refinement step is random, so each face gets its own weights) do not pass the same test."""
    faces, labels, supervision = _held(world)
    fresh = trained.stage.build(trained.config, world[0]).eval()
    if start == "random refinement":
        with torch.no_grad():
            fresh.delta[1].weight.copy_(torch.randn(fresh.delta[1].weight.shape,
                                                    generator=torch.Generator().manual_seed(3)) * 0.3)
    matrix, _ = distance_matrix(fresh, faces, labels, supervision)
    _show(f"untrained hypernetwork ({start}):\n{matrix}\ndiagonal smallest in {diagonal_wins(matrix)} of 8 rows")
    assert diagonal_wins(matrix) < 7


def test_more_iterations_lower_the_weight_error(world, trained):
    faces, labels, supervision = _held(world)
    errors = [float(distance_matrix(trained.net.eval(), faces, labels, supervision, iterations=k)[0].diagonal().mean())
              for k in range(1, HDB["iterations"] + 1)]
    _show(f"held-out weight error after 1..{HDB['iterations']} refinement iterations: "
          f"{', '.join(f'{e:.4f}' for e in errors)}")
    assert errors[1] < errors[0] and errors[-1] < 0.85 * errors[0]


def test_weight_loss_lowers_the_weight_error(world, trained, tmp_path):
    faces, labels, supervision = _held(world)
    without = _train(world, tmp_path, weight_loss=0.0)
    error = {name: float(distance_matrix(t.net.eval(), faces, labels, supervision)[0].diagonal().mean())
             for name, t in (("with", trained), ("without", without))}
    _show(f"held-out weight error after {STEPS} steps: with the weight-L2 term {error['with']:.4f}, "
          f"denoising loss only {error['without']:.4f}")
    assert error["with"] < 0.5 * error["without"]


def test_hdb_stage_resumes_exactly(world, tmp_path):
    """Interrupted at step 3 of 6 and resumed (optimiser state, EMA, step), the hdb stage ends where an
    uninterrupted run does."""
    denoiser, data, folder, supervision, _ = world

    def config(out):
        return hdb_config(out, folder, steps=6).replace(optim={"accumulation": 2, "ema": 0.9}, run={"batch": 4})

    straight = Trainer(config(tmp_path / "a"), denoiser, SupervisedData(data, supervision))
    straight.train(progress=False)
    first = Trainer(config(tmp_path / "b"), denoiser, SupervisedData(data, supervision))
    first.train(until=3, progress=False)
    resumed = Trainer(config(tmp_path / "b"), denoiser, SupervisedData(data, supervision))
    resumed.resume(first.save())
    resumed.train(progress=False)
    a, b = straight.full_weights(), resumed.full_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = Trainer(config(tmp_path / "c"), denoiser, SupervisedData(data, supervision)).full_weights()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)  # the six steps did change the weights


def test_checkpoint_round_trip_predicts_the_same_lidb(world, trained, tmp_path):
    """The exported file loads into a network that predicts the trainer's LiDB; its LoRA is LiDB's."""
    from hyperlora_core.hdb.checkpoint import load_hdb, predict_lidb, save_hdb

    faces, _, _ = _held(world)
    path = save_hdb(trained.net, tmp_path / "hdb.safetensors", seed=0, dtype=torch.float32)
    net, seed = load_hdb(path)
    lidb = predict_lidb(net, faces[:1], seed=seed)
    a, b = trained.net.eval()(faces[:1])[-1]
    assert seed == 0 and torch.allclose(lidb.a_train, a[0], atol=1e-6) and torch.allclose(lidb.b_train, b[0], atol=1e-6)
    lora = lidb.lora()
    assert len(lora) == 3 * len(lidb.targets.linears)
    size = path.stat().st_size
    assert LiDB.load(lidb.save(tmp_path / "one.safetensors")).a_train.shape == (24, LIDB["a"])
    _show(f"toy HyperDreamBooth file: {size} bytes (fp32)")


def test_face_encoder_starts_from_the_clip_file(tmp_path):
    """With hdb.encoder naming a CLIP ViT (HF layout), the face encoder's tokens are transformers' hidden_states[-2]
    of the same weights; it trains (unless frozen); the exported file loads without the CLIP file. A randomly
    initialised encoder of the same sizes gives other tokens (the comparison can fail)."""
    transformers = pytest.importorskip("transformers")
    from hyperlora_core.hdb.checkpoint import load_hdb, save_hdb
    from hyperlora_core.hdb.config import HdbConfig
    from hyperlora_core.hdb.encoder import face_tokens
    from hyperlora_core.hdb.network import HyperDreamBooth

    torch.manual_seed(0)
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14,
        hidden_act="quick_gelu")).eval()
    reference.save_pretrained(tmp_path / "clip")
    targets = target_layers(ToyDenoiser())
    small = dict(dim=16, depth=1, heads=2, iterations=2)
    net = HyperDreamBooth(HdbConfig(encoder=str(tmp_path / "clip"), **small), targets, a=4, c=2)
    random = HyperDreamBooth(HdbConfig(encoder_width=32, encoder_layers=2, encoder_heads=4, patch_size=14,
                                       image_size=28, **small), targets, a=4, c=2)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        ours, other = face_tokens(net.encoder, pixels), face_tokens(random.encoder, pixels)
    worst = float((ours - expected).abs().max())
    _show(f"face encoder from the CLIP file vs transformers' hidden_states[-2]: {worst:.1e}; random encoder: "
          f"{float((other - expected).abs().max()):.1e}")
    assert worst < 1e-4 < float((other - expected).abs().max())
    assert all(p.requires_grad for p in net.encoder.parameters()) and net.groups()["encoder"]
    frozen = HyperDreamBooth(HdbConfig(encoder=str(tmp_path / "clip"), freeze_encoder=True, **small), targets, a=4,
                             c=2)
    assert not frozen.groups()["encoder"] and not any(p.requires_grad for p in frozen.encoder.parameters())
    shell = HyperDreamBooth(HdbConfig(encoder=str(tmp_path / "clip"), **small), targets, a=4, c=2, load_encoder=False)
    shell.load_state_dict(net.state_dict(), strict=True)  # how validation and export rebuild a trained network
    with torch.no_grad():
        assert torch.equal(shell.eval()(pixels)[-1][0], net.eval()(pixels)[-1][0])
    path = save_hdb(net, tmp_path / "hdb.safetensors", seed=0, dtype=torch.float32)
    (tmp_path / "clip" / "model.safetensors").unlink()  # the file describes its encoder by its sizes
    loaded, _ = load_hdb(path)
    with torch.no_grad():
        assert torch.allclose(loaded(pixels)[-1][0], net.eval()(pixels)[-1][0], atol=1e-6)
