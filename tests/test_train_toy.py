"""Training at toy scale: the three stages learn identities, the trigger-word rule, exact resume, the round trip
through the released format. The tiny denoiser and synthetic identities are hyperlora_core/train/toy.py."""

from __future__ import annotations

import sys

import pytest
import torch

from hyperlora_core import load_hyperlora, lora_delta
from hyperlora_core.synthetic import TINY_UNET
from hyperlora_core.train.config import TrainConfig
from hyperlora_core.train.export import export_checkpoint, import_checkpoint
from hyperlora_core.train.hypernet import HyperNetwork
from hyperlora_core.train.loop import Trainer, read_weights
from hyperlora_core.train.toy import SyntheticIdentities, ToyDenoiser, pretrain
from hyperlora_core.train.validate import diagonal_wins, id_only_drift, loss_matrix

MODEL = dict(k=16, id_rank=4, dim=32, depth=2, heads=2, dim_head=16, id_tokens=4, clip_dim=32, up_basis_std=0.01)
STEPS = {1: 80, 2: 120, 3: 120}


def _show(text: str) -> None:
    sys.stdout.write("\n" + text + "\n")  # the figures, visible with -s


def toy_config(out, stage_number: int, steps: int, **sections) -> TrainConfig:
    config = TrainConfig().replace(model=MODEL, stage={"stage": stage_number},
                                   optim={"steps": steps, "lr": 3e-3, "warmup": 10},
                                   run={"out": str(out), "batch": 16, "checkpoint_every": 1000, "log_every": 1000})
    return config.replace(**sections) if sections else config


@pytest.fixture(scope="module")
def toy():
    data = SyntheticIdentities()
    return pretrain(ToyDenoiser(), data, steps=200), data


@pytest.fixture(scope="module")
def staged(toy, tmp_path_factory):
    """The three stages in a row; {stage: step folder of its last checkpoint}, and the final trainer."""
    denoiser, data = toy
    root, folders, init = tmp_path_factory.mktemp("stages"), {}, ""
    for stage, steps in STEPS.items():
        trainer = Trainer(toy_config(root / f"s{stage}", stage, steps, stage={"stage": stage, "init": init}),
                          denoiser, data)
        trainer.train(progress=False)
        init = str(trainer.save())
        folders[stage] = init
    return folders, trainer


def _net(folder, denoiser) -> HyperNetwork:
    net = HyperNetwork(TrainConfig().replace(model=MODEL).model, denoiser.targets)
    if folder is not None:
        net.load_state_dict(read_weights(folder))
    return net.eval()


def _matrix(net, toy, stage_config):
    denoiser, data = toy
    n = data.identities
    refs = [data.get(data.held_out_of(j)[:1], held_out=True) for j in range(n)]
    evals = [data.get(data.held_out_of(i)[1:], held_out=True) for i in range(n)]
    return loss_matrix(net, denoiser, refs, evals, stage_config, seed=123)


def test_three_stages_learn_identities(toy, staged):
    folders, trainer = staged
    matrix = _matrix(_net(folders[3], toy[0]), toy, trainer.config.stage)
    wins = diagonal_wins(matrix)
    _show(f"held-out loss, row = images of identity i, column = ID-LoRA of identity j\n{matrix}\n"
          f"diagonal smallest in {wins} of 8 rows")
    assert wins >= 7


def test_heldout_loss_drops_with_training(toy, staged):
    from hyperlora_core.train.validate import heldout_loss

    denoiser, data = toy
    held = data.get(list(range(len(data.held_index))), held_out=True)
    stage = staged[1].config.stage
    fresh = heldout_loss(_net(None, denoiser), denoiser, held, stage)
    trained = heldout_loss(_net(staged[0][3], denoiser), denoiser, held, stage)
    _show(f"held-out denoising loss: untrained hypernetwork {fresh:.4f}, after the three stages {trained:.4f}")
    assert trained < 0.95 * fresh


@pytest.mark.parametrize("up_std", [0.01, 0.3])
def test_untrained_hypernetwork_fails(toy, staged, up_std):
    """The same test on fresh weights (the released init, and one with large random LoRAs) does not pass."""
    net = HyperNetwork(TrainConfig().replace(model={**MODEL, "up_basis_std": up_std}).model, toy[0].targets).eval()
    matrix = _matrix(net, toy, staged[1].config.stage)
    _show(f"untrained (up_basis_std {up_std}):\n{matrix}\ndiagonal smallest in {diagonal_wins(matrix)} of 8 rows")
    assert diagonal_wins(matrix) < 7


def test_trigger_rule_brings_id_only_prediction_to_base(toy, staged, tmp_path):
    """Stage 2 starts from the stage-1 weights with a large random ID-LoRA. After stage 2, no trigger words + the
    ID-LoRA alone predicts closer to the base model than before; stage 2 without the rule (every sample
    reconstructs with trigger words) does not."""
    from safetensors.torch import save_file

    denoiser, data = toy
    weights = read_weights(staged[0][1])
    g = torch.Generator().manual_seed(7)
    for key in weights:
        if key.startswith("id_bases.groups.up_"):
            weights[key] = torch.randn(weights[key].shape, generator=g) * 0.3
    (tmp_path / "start").mkdir()
    save_file(weights, str(tmp_path / "start" / "weights.safetensors"))
    held = data.get(list(range(len(data.held_index))), held_out=True)
    before = id_only_drift(_net(tmp_path / "start", denoiser), denoiser, held)
    drift = {}
    for name, mix in (("rule", [0.5, 0.25, 0.25]), ("no rule", [1.0, 0.0, 0.0])):
        config = toy_config(tmp_path / name, 2, STEPS[2],
                            stage={"stage": 2, "init": str(tmp_path / "start"), "case_mix": mix})
        trainer = Trainer(config, denoiser, data)
        trainer.train(progress=False)
        drift[name] = id_only_drift(trainer.net.eval(), denoiser, held)
    _show(f"ID-only prediction without trigger words, mean squared distance to the base model: before stage 2 "
          f"{before:.3e}, after stage 2 {drift['rule']:.3e}, after stage 2 without the rule {drift['no rule']:.3e}")
    assert drift["rule"] < 0.5 * before
    assert drift["rule"] < 0.5 * drift["no rule"]  # the rule, not only training, brings it back


def _resume_config(out):
    return toy_config(out, 2, 12, optim={"steps": 12, "lr": 3e-3, "warmup": 3, "accumulation": 2, "ema": 0.9},
                      run={"out": str(out), "batch": 8, "checkpoint_every": 1000, "log_every": 1000})


def test_resume_gives_the_uninterrupted_parameters(toy, tmp_path):
    denoiser, data = toy
    straight = Trainer(_resume_config(tmp_path / "a"), denoiser, data)
    straight.train(progress=False)
    first = Trainer(_resume_config(tmp_path / "b"), denoiser, data)
    first.train(until=7, progress=False)
    folder = first.save()
    resumed = Trainer(_resume_config(tmp_path / "b"), denoiser, data)
    resumed.resume(folder)
    assert resumed.step == 7
    resumed.train(progress=False)
    a, b = straight.full_weights(), resumed.full_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = straight.full_weights(ema=False)
    assert not all(torch.equal(a[k], raw[k]) for k in a)  # the EMA is a different set of weights, resumed exactly
    # negative control: the same weights without the optimiser state do not reproduce the run
    weights_only = Trainer(_resume_config(tmp_path / "c"), denoiser, data)
    weights_only.net.load_state_dict(first.full_weights(ema=False))
    weights_only.step = 7
    weights_only.train(progress=False)
    c = weights_only.full_weights(ema=False)
    assert not all(torch.equal(straight.full_weights(ema=False)[k], c[k]) for k in c)


# fp16: inference rounds each mixed matrix once to the file dtype (basis.py), so down and up each carry 2^-11
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2 * 2.0**-10)])
def test_export_round_trip(toy, staged, tmp_path, dtype, tol):
    """The export loads with load_hyperlora; its identity LoRAs equal the trainer's in-graph LoRAs."""
    denoiser, data = toy
    net = _net(staged[0][3], denoiser)
    folder = export_checkpoint(net, tmp_path / "hl", dtype=dtype, training={"step": 1})
    if dtype != torch.float32:  # compare with the trainer's graph on the exported (rounded) weights
        net = import_checkpoint(_net(None, denoiser), folder)
    hl = load_hyperlora(folder, unet=TINY_UNET)
    assert hl.encoders == ("arcface", "clip") and hl.has_base
    sample = data.get([3], held_out=True)
    with torch.no_grad():
        graph = net(sample.clip, sample.arcface, sample.base_clip)
    identity = hl.predict_identity(clip_tokens=sample.clip, id_embeds=sample.arcface, base_clip_tokens=sample.base_clip)
    worst = 0.0
    for kind in ("id", "base"):
        lora = hl.identity_to_lora(identity, kind=kind, key_format="comfy")
        assert len(lora) == 3 * len(graph[kind])
        for key, (down, up) in graph[kind].items():
            delta = lora_delta(lora, key)
            worst = max(worst, float((delta - up[0] @ down[0]).abs().max() / delta.abs().max()))
    _show(f"worst relative LoRA difference, load_hyperlora vs trainer graph: {worst:.2e}")
    assert worst < tol


def test_validation_every_n_steps(toy, tmp_path):
    from hyperlora_core.train.validate import toy_validation

    denoiser, data = toy
    config = toy_config(tmp_path, 1, 6, run={"out": str(tmp_path), "batch": 4, "validate_every": 3,
                                             "checkpoint_every": 1000})
    trainer = Trainer(config, denoiser, data, validate=toy_validation(denoiser, data, config.stage))
    trainer.train(progress=False)
    rows = [r for r in trainer.history if "val/heldout_loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0 < r["val/heldout_loss"] < 10 and 0 <= r["val/identity_wins"] <= 8 for r in rows)


def test_bf16_autocast_trains_and_changes_the_arithmetic(toy, tmp_path):
    denoiser, data = toy
    weights = {}
    for precision in ("fp32", "bf16"):
        config = toy_config(tmp_path / precision, 3, 3, run={"out": str(tmp_path / precision), "batch": 4,
                                                             "precision": precision, "checkpoint_every": 1000})
        trainer = Trainer(config, denoiser, data)
        stats = trainer.train(progress=False)
        assert torch.isfinite(torch.tensor(stats["loss"]))
        weights[precision] = trainer.full_weights()
    assert all(v.dtype == torch.float32 for v in weights["bf16"].values())  # the weights stay fp32
    worst = max(float((weights["fp32"][k] - weights["bf16"][k]).abs().max()) for k in weights["fp32"])
    assert 0 < worst < 0.05
