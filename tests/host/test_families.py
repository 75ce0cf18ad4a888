"""Host tier: target layers read from tiny models of every tested family (ComfyUI's own classes, real block counts);
LoRAs on them, written with our file keys, load through ComfyUI's stock LoRA path, every key, exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_server import show
from nodepack import families, tiny

from hyperlora_core.lora_io import ALPHA_PER_RANK, save_lora
from hyperlora_core.target_scan import lora_file_keys, read_tree, scan_targets
from hyperlora_core.targets import sdxl_target_layers

RANK = 2
STRENGTH = 0.8
NAMES = list(families.FAMILIES)


@pytest.fixture(scope="module")
def built(comfy):
    """{family: (ModelPatcher, ComfyUI's key map)}, built once per module."""
    out = {}
    for name, family in families.FAMILIES.items():
        model = family.build(seed=1)
        out[name] = (model, comfy.lora.model_lora_keys_unet(model.model, {}))
    return out


def describe(built, name: str, feed_forward: bool = False):
    model, key_map = built[name]
    return scan_targets(read_tree(model.model, key_map), feed_forward=feed_forward)


@pytest.mark.parametrize("name", NAMES)
def test_the_description_lists_the_expected_linears(built, name):
    family = families.FAMILIES[name]
    attention, with_ff = describe(built, name), describe(built, name, feed_forward=True)
    show(f"\n{name}: {len(attention.linears)} attention linears in {len(attention.modules)} modules; "
         f"{len(with_ff.linears)} with feed-forward")
    assert attention.family == with_ff.family == name
    assert len(attention.linears) == family.attention
    assert len(with_ff.linears) == family.attention + family.feed_forward
    assert {lin.key for lin in attention.linears} < {lin.key for lin in with_ff.linears}
    weights = built[name][0].model.state_dict()
    for lin in with_ff.linears:  # every size is the weight's, [out, in]
        assert tuple(weights[lin.key + ".weight"].shape) == (lin.out_features, lin.in_features), lin.key


def plain(targets) -> tuple:
    """A TargetLayers as tuples (the node package imports its own copy of the dataclasses)."""
    return targets.family, tuple((m.name, tuple((lin.key, lin.in_features, lin.out_features) for lin in m.linears))
                                 for m in targets.modules)


def test_the_node_layer_reads_a_model_patcher(built):
    """nodes/targets.py: describe_model on a MODEL (ModelPatcher) or its BaseModel, and the file keys."""
    from helpers import pack_module

    targets_node = pack_module("nodes.targets")
    model, key_map = built["Flux"]
    scanned = describe(built, "Flux", feed_forward=True)
    assert plain(targets_node.describe_model(model, feed_forward=True)) == plain(scanned)
    assert plain(targets_node.describe_model(model.model)) == plain(describe(built, "Flux"))
    assert targets_node.file_keys(model, scanned) == lora_file_keys(scanned, key_map)


@pytest.mark.parametrize("name", NAMES)
def test_the_released_size_has_the_counted_linears(comfy, name):
    """The real configs (SD3 medium: 24 blocks) built on the meta device: the counts from the config, sizes from
    the weights; SDXL's description is exactly the released layout (keys, sizes, token order)."""
    base = families.real_size_on_meta(name)
    targets = scan_targets(read_tree(base, comfy.lora.model_lora_keys_unet(base, {})))
    attention, _ = families.COUNTS[name](families.REAL_CONFIGS[name])
    params = sum(p.numel() for p in base.parameters())
    show(f"\n{name} at released size ({params / 1e9:.2f} G parameters): {len(targets.linears)} attention linears in "
         f"{len(targets.modules)} modules")
    assert targets.family == name
    assert len(targets.linears) == attention
    weights = base.state_dict()
    assert all(tuple(weights[lin.key + ".weight"].shape) == lin.weight_shape for lin in targets.linears)
    if name == "SDXL":
        assert targets.linears == sdxl_target_layers().linears
        assert [m.name for m in targets.modules] == [m.name for m in sdxl_target_layers().modules]


def test_sdxl_gives_exactly_the_released_layout(built):
    scanned, released = describe(built, "SDXL"), sdxl_target_layers(tiny.host_unet())
    assert [m.name for m in scanned.modules] == [m.name for m in released.modules]
    assert scanned.linears == released.linears  # keys, sizes and token order
    assert len(scanned.linears) == 560


def random_lora(targets, file_keys: dict[str, str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for lin in targets.linears:
        key = file_keys[lin.key]
        lora[key + ".lora_down.weight"] = torch.randn(RANK, lin.in_features, generator=g)
        lora[key + ".lora_up.weight"] = torch.randn(lin.out_features, RANK, generator=g)
        lora[key + ".alpha"] = torch.tensor(RANK * ALPHA_PER_RANK)
    return lora


def load_stock(comfy, model, lora, tmp_path, caplog):
    """Save ``lora`` and load it the way LoraLoader does: (patched clone, log text)."""
    path = save_lora(lora, tmp_path / "family.safetensors", dtype=torch.float32)
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, STRENGTH, 0.0)
    return patched, caplog.text


@pytest.mark.parametrize("feed_forward", [False, True], ids=["attention", "feed_forward"])
@pytest.mark.parametrize("name", NAMES)
def test_a_lora_with_our_keys_loads_every_key_exactly(comfy, built, name, feed_forward, tmp_path, caplog):
    model, key_map = built[name]
    targets = describe(built, name, feed_forward)
    file_keys = lora_file_keys(targets, key_map)
    lora = random_lora(targets, file_keys, seed=7)
    patched, log = load_stock(comfy, model, lora, tmp_path, caplog)
    assert "lora key not loaded" not in log
    assert sorted(patched.patches) == sorted(lin.key + ".weight" for lin in targets.linears)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched.patch_model()
    try:
        after = patched.model.state_dict()
        worst = 0.0
        for lin in targets.linears:  # the method's delta, written from DESIGN.md: strength · alpha / r · up @ down
            prefix = file_keys[lin.key]
            up, down = lora[prefix + ".lora_up.weight"], lora[prefix + ".lora_down.weight"]
            scale = STRENGTH * (float(lora[prefix + ".alpha"]) / RANK)
            expected = before[lin.key + ".weight"] + scale * (up @ down)
            worst = max(worst, float((after[lin.key + ".weight"] - expected).abs().max()))
        untouched = [k for k in before if k not in patched.patches and not torch.equal(before[k], after[k])]
    finally:
        patched.unpatch_model()
    show(f"\n{name} ({'with' if feed_forward else 'no'} feed-forward): {len(targets.linears)} keys loaded, "
         f"max |applied - reference| {worst}")
    assert worst == 0.0
    assert not untouched
    assert not model.patches  # a clone was patched


def test_the_log_capture_sees_a_key_comfyui_does_not_load(comfy, built, tmp_path, caplog):
    """Negative control: a key in a naming ComfyUI does not map for SDXL (PEFT's ``unet.…attn1.to_q``) is logged
    as not loaded and patches nothing, so the test above would catch a wrong naming."""
    model, key_map = built["SDXL"]
    targets = describe(built, "SDXL")
    file_keys = lora_file_keys(targets, key_map)
    first = targets.linears[0].key
    file_keys[first] = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    patched, log = load_stock(comfy, model, random_lora(targets, file_keys, seed=7), tmp_path, caplog)
    assert "lora key not loaded" in log
    assert len(patched.patches) == len(targets.linears) - 1
    assert first + ".weight" not in patched.patches
