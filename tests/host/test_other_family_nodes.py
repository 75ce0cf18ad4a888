"""Host tier, in-process: a HyperLoRA for another family than SDXL (a synthetic checkpoint for the tiny SD1.5 built
from ComfyUI's classes, described from that model) goes through Apply, Save as LoRA, Identity to LoRA, the
Concept Slider, the Hook and Refine; a checkpoint used with a MODEL of another family is refused before mixing.

Patched weights are computed by ComfyUI's own ``comfy.lora.calculate_weight`` from each MODEL's patches, so our
Apply and the stock LoRA loader on the saved file are compared without touching the shared base weights.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from comfy_server import show
from nodepack import tiny
from safetensors.torch import load_file

from hyperlora_core import load_hyperlora, save_lora
from hyperlora_core.refine import RefineConfig
from hyperlora_core.synthetic import write_checkpoint

from helpers import conditions, pack_module

STRENGTH = 0.85


@pytest.fixture(scope="module")
def sd15(comfy, tmp_path_factory):
    model = tiny.tiny_sd15(seed=0)
    targets = pack_module("nodes.targets").describe_model(model)
    hl = load_hyperlora(write_checkpoint(tmp_path_factory.mktemp("sd15_ckpt"), targets=targets, k=8, rank=4))
    clip, arc = conditions(2, seed=1)
    ident = [hl.predict_identity(clip_tokens=clip[i:i + 1], id_embeds=arc[i:i + 1]) for i in range(2)]
    return SimpleNamespace(model=model, handle=SimpleNamespace(core=hl), identity=ident[0], other=ident[1],
                           targets=targets)


def patched_weights(comfy, patcher, keys) -> dict[str, torch.Tensor]:
    """The weight each key would have once ``patcher`` is loaded, by ComfyUI's own patch arithmetic."""
    base = patcher.model.state_dict()
    return {k: comfy.lora.calculate_weight(patcher.patches[k], base[k].float().clone(), k) if k in patcher.patches
            else base[k].float() for k in keys}


def test_description_of_the_tiny_sd15(sd15):
    """SD1.5's 16 transformer blocks (6 down, 1 mid, 9 up) x attn1/attn2 x q, k, v, out."""
    assert sd15.targets.family == "SD15"
    assert len(sd15.targets.modules) == 32 and len(sd15.targets.linears) == 128
    assert sd15.handle.core.targets.to_json() == sd15.targets.to_json()  # (two copies of the classes: compare data)


def test_apply_equals_the_stock_loader_on_the_saved_file(comfy, sd15, tmp_path, caplog):
    apply, storage = pack_module("nodes.apply"), pack_module("nodes.storage")
    ours = apply.apply_identity(sd15.model, sd15.handle, sd15.identity, STRENGTH)
    naming = storage.lora_file_naming(sd15.handle, sd15.model)
    lora = apply.make_lora(sd15.handle, sd15.identity, "id", key_format=naming)
    path = save_lora(lora, tmp_path / "sd15_identity.safetensors", dtype=apply.lora_dtype(sd15.handle))
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(sd15.model, None, load_file(str(path)), STRENGTH, 0.0)
    assert "lora key not loaded" not in caplog.text
    keys = [lin.key + ".weight" for lin in sd15.targets.linears]
    assert sorted(stock.patches) == sorted(ours.patches) == sorted(keys)
    mine, theirs = patched_weights(comfy, ours, keys), patched_weights(comfy, stock, keys)
    base = sd15.model.model.state_dict()
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in keys)
    changed = sum(not torch.equal(mine[k], base[k].float()) for k in keys)
    show(f"\nSD1.5 HyperLoRA: Apply vs LoraLoader on the saved file: max |diff| {worst} over {len(keys)} weights, "
         f"{changed} changed; file keys like {next(iter(naming.values()))}")
    assert worst == 0.0 and changed == len(keys)
    assert not sd15.model.patches  # the incoming MODEL is never patched


def test_identity_to_lora_slider_and_hook(comfy, sd15):
    apply, slider, hook = pack_module("nodes.apply"), pack_module("nodes.slider"), pack_module("nodes.hook")
    (lora,) = apply.HyperLoRAToLoRA.execute(sd15.handle, sd15.identity, "id").args
    assert len(lora) == 3 * 128 and all(k.startswith("diffusion_model.") for k in lora)
    model, slider_lora = slider.ConceptSlider.execute(sd15.handle, "weight", 1.0, start_identity=sd15.identity,
                                                      end_identity=sd15.other, model=sd15.model).args
    assert len(model.patches) == 128 and len(slider_lora) == 3 * 128
    hooks = hook.identity_hooks(sd15.handle, sd15.identity, 1.0, 0.0, 0.5)
    (weight_hook,) = hooks.hooks
    patches = comfy.lora.load_lora(weight_hook.weights, comfy.lora.model_lora_keys_unet(sd15.model.model, {}))
    assert sorted(patches) == sorted(lin.key + ".weight" for lin in sd15.targets.linears)


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_refine_runs_on_the_sd15(comfy, sd15, mode):
    training = pack_module("nodes.training")
    clip = tiny.tiny_clip(seed=0)  # 64-wide context, as the tiny SD1.5 reads
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of fcsks fxhks fhyks"))
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    config = RefineConfig(mode=mode, steps=2, lr=1e-3, rank=2, seed=0, batch=2, resolution=64)
    result, losses = training.refine(sd15.model, tiny.tiny_vae(seed=0, scale=1.0), positive, sd15.handle,
                                     sd15.identity, images, config)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert len([k for k in result.lora if k.endswith(".lora_down.weight")]) == 128
    if mode == "coefficients":  # the refined identity is still one of this checkpoint's (2 tokens per linear)
        assert result.identity.tokens.shape == sd15.identity.tokens.shape == (256, 8)
        assert not torch.equal(result.identity.tokens, sd15.identity.tokens)


@pytest.fixture(scope="module")
def sdxl_checkpoint(comfy, tmp_path_factory):
    hl, ident = tiny.hyperlora_and_identity(tmp_path_factory.mktemp("sdxl_ckpt"))
    return SimpleNamespace(core=hl), ident


def test_a_model_of_another_family_is_refused_before_mixing(comfy, sd15, sdxl_checkpoint):
    apply = pack_module("nodes.apply")
    ModuleMismatchError = pack_module("hyperlora_core.errors").ModuleMismatchError  # noqa: N806 - the pack's class
    handle, ident = sdxl_checkpoint
    with pytest.raises(ModuleMismatchError) as err:
        apply.apply_identity(sd15.model, handle, ident, STRENGTH)
    text = str(err.value)
    show(f"\nSDXL HyperLoRA on the SD1.5 MODEL: {text}")
    weights = sd15.model.model.state_dict()
    first = next(lin.key for lin in handle.core.targets.linears  # the tiny SDXL's widths match SD1.5's in places
                 if tuple(getattr(weights.get(lin.key + ".weight"), "shape", ())) != lin.weight_shape)
    assert "made for SDXL and the MODEL is SD15" in text
    assert f"First layer that does not fit: {first} " in text
    assert not handle.core._banks  # refused before any mixing
    with pytest.raises(ModuleMismatchError, match="made for SD15 and the MODEL is SDXL"):
        apply.apply_identity(tiny.tiny_sdxl(seed=0), sd15.handle, sd15.identity, STRENGTH)
