"""Host tier: HyperLoRARefine's lidb mode on the tiny SDXL-topology model, in-process on the CPU: it learns, it
generalises better than the prediction, its LiDB rebuilds the LoRA it trained, and a LiDB is a starting point."""

from __future__ import annotations

import pytest
import test_refine
import torch
from comfy_server import show
from nodepack import tiny
from test_refine import _assert_untouched, _pack_module, _with_lora, node_defaults

from hyperlora_core.lora_io import lora_delta, lora_prefixes
from hyperlora_core.refine import RefineConfig

# the tiny UNet's attention linears are 64 or 128 wide: a and b at about the paper's 2:1, well below full rank
HOST_A, HOST_B = 40, 20
HELD_OUT = [101, 202, 303]
setup = test_refine.setup  # the same module-scoped fixture: tiny SDXL, VAE, CLIP, HyperLoRA and photos


def _config(**kw) -> RefineConfig:
    """The node's defaults (lr = lidb's own), resolution scaled by 1/8 like the tiny UNet, the host's a and b."""
    d = node_defaults()
    values = dict(mode="lidb", steps=d["steps"], lr=d["lr"], seed=d["seed"], batch=d["batch_size"],
                  resolution=d["resolution"] // 8, id_strength=d["id_strength"], lidb_a=HOST_A, lidb_b=HOST_B)
    return RefineConfig(**{**values, **kw})


def _held_out(comfy, s, lora, strength: float, config: RefineConfig) -> float:
    latents = s.training.encode(s.vae, s.images, RefineConfig(resolution=config.resolution, augment=False))
    model = s.model if lora is None else _with_lora(comfy, s.model, lora, strength)
    return sum(s.training.held_out_loss(model, s.positive, latents, k) for k in HELD_OUT) / len(HELD_OUT)


def _same_deltas(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(lora_prefixes(a)) == set(lora_prefixes(b))
    for p in lora_prefixes(a):
        torch.testing.assert_close(lora_delta(a, p), lora_delta(b, p), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("start", ["prediction", "zero"])
def test_lidb_learns_and_beats_the_prediction_on_held_out_noise(comfy, setup, start):
    """The mean training loss of the last 10 steps is >= 5 % below the first 10's, and the held-out loss of the
    result (at 1.0) is >= 3 % below the prediction's (at id_strength)."""
    s = setup
    config = _config()
    identity, handle = (s.identity, s.handle) if start == "prediction" else (None, None)
    result, losses = s.training.refine(s.model, s.vae, s.positive, handle, identity, s.images, config)
    _assert_untouched(comfy, s)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    predicted = s.training.make_lora(s.handle, s.identity, "id", key_format="comfy")
    base = _held_out(comfy, s, predicted, config.id_strength, config)
    ours = _held_out(comfy, s, result.lora, 1.0, config)
    untouched = _held_out(comfy, s, None, 1.0, config)
    lidb = result.lidb
    show(f"\nlidb from {start}, {lidb.a_train.numel() + lidb.b_train.numel()} trained numbers, lr "
         f"{config.learning_rate:g}: training loss first 10 {first:.5f}, last 10 {last:.5f} ({last / first - 1:+.1%});"
         f" held-out: base model {untouched:.5f}, prediction {base:.5f}, LiDB result {ours:.5f} "
         f"({ours / base - 1:+.1%} vs the prediction)")
    assert last <= 0.95 * first
    assert ours <= 0.97 * base
    assert (lidb.a, lidb.b, len(lidb.targets.linears)) == (HOST_A, HOST_B, 560)
    assert lidb.a_train.numel() + lidb.b_train.numel() == 560 * (HOST_A + HOST_B)
    assert result.identity is None and float(lidb.b_train.abs().max()) > 0
    # the LiDB alone rebuilds what was trained: the result is the prediction (at id_strength) plus the LiDB's LoRA
    combine = s.training.combine_by_rank
    rebuilt = lidb.lora() if start == "zero" else combine([(predicted, config.id_strength), (lidb.lora(), 1.0)])
    _same_deltas(result.lora, rebuilt)
    _assert_untouched(comfy, s)


def test_lidb_start_and_rank_relaxed_on_top(comfy, setup, tmp_path):
    """A saved LiDB continues training from its own numbers (mode lidb), or takes a rank-relaxed residual on top."""
    s = setup
    lidb_module = _pack_module("training").LiDB
    first, _ = s.training.refine(s.model, s.vae, s.positive, None, None, s.images, _config(steps=6))
    saved = lidb_module.load(first.lidb.save(tmp_path / "me.safetensors", storage="fp32"))
    on, _ = s.training.refine(s.model, s.vae, s.positive, None, None, s.images, _config(steps=1, lr=1e-12),
                              start=saved)
    torch.testing.assert_close(on.lidb.a_train, saved.a_train, atol=1e-9, rtol=0)  # it started from the file
    relaxed, losses = s.training.refine(s.model, s.vae, s.positive, None, None, s.images,
                                        _config(mode="rank_relaxed", steps=3, lr=1e-3, rank=2), start=saved)
    p = lora_prefixes(relaxed.lora)[0]
    assert relaxed.lora[p + ".lora_down.weight"].shape[0] == 1 + 2  # the LiDB's rank 1, then the residual's 2
    torch.testing.assert_close(relaxed.lora[p + ".lora_down.weight"][:1], saved.lora()[p + ".lora_down.weight"])
    with pytest.raises(ValueError, match="set lidb_a and lidb_b") as wrong:
        s.training.refine(s.model, s.vae, s.positive, None, None, s.images, _config(steps=1, lidb_a=8), start=saved)
    assert type(wrong.value).__name__ == "RefineInputError"
    with pytest.raises(ValueError, match="connect hyper_lora and identity"):
        s.training.refine(s.model, s.vae, s.positive, None, None, s.images, _config(mode="coefficients", steps=1))
    with pytest.raises(ValueError, match=r"This LiDB was made for SDXL and the MODEL is SD15: they do not fit\. "
                                         r"First layer that does not fit: diffusion_model\..* or a LiDB made for "
                                         r"SD15\.") as other:
        s.training.refine(tiny.tiny_sd15(), s.vae, s.positive, None, None, s.images, _config(steps=1), start=saved)
    assert type(other.value).__name__ == "LidbMismatchError"
    _assert_untouched(comfy, s)


def test_node_outputs_the_lidb(comfy, setup):
    s = setup
    node = _pack_module("refine").HyperLoRARefine
    out = node.execute(s.model, s.vae, s.positive, None, None, s.images, "lidb", 2, 0.0, 4, 0, resolution=256,
                       lidb_a=HOST_A, lidb_b=HOST_B)
    identity, lora, curve, lidb = out.result
    assert identity is None and len(lora_prefixes(lora)) == 560 and lidb.a == HOST_A
    plain = node.execute(s.model, s.vae, s.positive, s.handle, s.identity, s.images, "rank_relaxed", 2, 1e-3, 2, 0,
                         resolution=256)
    assert plain.result[3] is None
    _assert_untouched(comfy, s)
