"""Tier 1: the structural rule that reads target layers from a module tree, on tiny torch modules whose class
names are those of ComfyUI's layers (the host tier runs the same rule on ComfyUI's real classes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from hyperlora_core.target_scan import ModelTree, TargetScanError, lora_file_keys, read_tree, scan_targets

W = 8  # hidden width; C = 6: context width


class CrossAttention(nn.Module):  # the UNet's attention: to_q, to_k, to_v, to_out.0
    def __init__(self, context: int = W):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(W, W), nn.Linear(context, W), nn.Linear(context, W)
        self.to_out = nn.Sequential(nn.Linear(W, W), nn.Dropout(0.0))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(W, 4 * W), nn.GELU(), nn.Linear(4 * W, W))


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.ff, self.attn2 = CrossAttention(), FeedForward(), CrossAttention(context=6)


class SelfAttention(nn.Module):  # Flux / MMDiT: fused qkv, proj; a nested attention is part of it
    def __init__(self, nested: bool = False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(W, 3 * W), nn.Linear(W, W)
        if nested:
            self.inner = CrossAttention()


class Modulation(nn.Module):
    def __init__(self, mult: int):
        super().__init__()
        self.lin = nn.Linear(W, mult * W)


class DoubleStreamBlock(nn.Module):
    def __init__(self, nested: bool = False):
        super().__init__()
        self.img_mod, self.img_attn = Modulation(6), SelfAttention(nested)
        self.img_mlp = nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))
        self.txt_mod, self.txt_attn = Modulation(6), SelfAttention()
        self.txt_mlp = nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))


class SingleStreamBlock(nn.Module):  # attention inline: linear1 = qkv + mlp in, linear2 = proj + mlp out
    def __init__(self):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(W, 3 * W + 2 * W), nn.Linear(W + 2 * W, W)
        self.modulation = Modulation(3)


class Model(nn.Module):
    """A time embedder named like an MLP (not in a block), two UNet blocks, a double and a single block."""

    def __init__(self, nested: bool = False):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(W, W), nn.Linear(W, W))
        self.blocks = nn.ModuleList([BasicTransformerBlock(), BasicTransformerBlock()])
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(nested)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock()])
        self.out = nn.Linear(W, 4)


class Family:  # read_tree takes the family from the model_config's class name
    pass


def comfy_like_key_map(model: nn.Module) -> dict[str, str]:
    """What ComfyUI's key map gives every model: ``lora_unet_<path>`` and ``diffusion_model.<path>``."""
    key_map = {}
    for name in model.state_dict():
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = "diffusion_model." + name
            key_map["diffusion_model." + path] = "diffusion_model." + name
    return key_map


def tree(model: nn.Module | None = None, key_map: dict | None = None) -> ModelTree:
    model = model or Model()
    base = SimpleNamespace(diffusion_model=model, model_config=Family())
    return read_tree(base, comfy_like_key_map(model) if key_map is None else key_map)


def names(targets) -> list[str]:
    return [lin.key.removeprefix("diffusion_model.") for lin in targets.linears]


def test_attention_projections_in_registration_order():
    targets = scan_targets(tree())
    assert targets.family == "Family"
    assert [m.name for m in targets.modules] == [
        "blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2",
        "double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"]
    assert names(targets)[:4] == ["blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn1.to_v",
                                  "blocks.0.attn1.to_out.0"]
    assert names(targets)[-4:] == ["double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                                   "single_blocks.0.linear1", "single_blocks.0.linear2"]
    assert len(targets.linears) == 2 * 2 * 4 + 2 * 2 + 2
    assert targets.token_count == 2 * len(targets.linears)
    cross_k = targets.modules[1].linears[1]
    assert (cross_k.in_features, cross_k.out_features) == (6, W)  # attn2.to_k reads the context
    assert (targets.linears[-2].in_features, targets.linears[-2].out_features) == (W, 5 * W)


def test_feed_forward_is_opt_in_and_only_inside_blocks():
    plain, with_ff = scan_targets(tree()), scan_targets(tree(), feed_forward=True)
    added = [n for n in names(with_ff) if n not in names(plain)]
    assert added == ["blocks.0.ff.net.0", "blocks.0.ff.net.2", "blocks.1.ff.net.0", "blocks.1.ff.net.2",
                     "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
                     "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2"]
    assert [m.name for m in with_ff.modules][:3] == ["blocks.0.attn1", "blocks.0.ff", "blocks.0.attn2"]
    assert not any("time_mlp" in n or "mod" in n or n == "out" for n in names(with_ff))


def test_an_attention_inside_an_attention_is_part_of_the_outer_one():
    targets = scan_targets(tree(Model(nested=True)))
    img = next(m for m in targets.modules if m.name == "double_blocks.0.img_attn")
    assert [lin.key.rsplit("img_attn.", 1)[1] for lin in img.linears] == [
        "qkv", "proj", "inner.to_q", "inner.to_k", "inner.to_v", "inner.to_out.0"]
    assert len({lin.key for lin in targets.linears}) == len(targets.linears)


def test_a_linear_the_key_map_does_not_reach_is_refused():
    model = Model()
    key_map = comfy_like_key_map(model)
    key_map = {k: v for k, v in key_map.items() if v != "diffusion_model.single_blocks.0.linear2.weight"}
    with pytest.raises(TargetScanError, match="single_blocks.0.linear2.weight"):
        scan_targets(tree(model, key_map))


def test_a_model_without_attention_is_refused():
    with pytest.raises(TargetScanError, match="no attention modules"):
        scan_targets(tree(nn.Sequential(nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W))))


def test_a_tree_whose_linears_are_not_modules_is_refused():
    with pytest.raises(TargetScanError, match="not among the modules"):
        ModelTree(family="X", modules=(("", "Model"),), linears={"a.b": (1, 2)})


def test_file_keys_are_kohya_names_checked_against_the_key_map():
    model = Model()
    key_map = comfy_like_key_map(model)
    targets = scan_targets(tree(model, key_map))
    keys = lora_file_keys(targets, key_map)
    assert keys["diffusion_model.blocks.0.attn1.to_out.0"] == "lora_unet_blocks_0_attn1_to_out_0"
    assert keys["diffusion_model.single_blocks.0.linear1"] == "lora_unet_single_blocks_0_linear1"
    assert all(key_map[name] == target + ".weight" for target, name in keys.items())


def test_a_kohya_name_taken_by_another_weight_falls_back_to_a_name_that_maps_back():
    model = Model()
    key_map = comfy_like_key_map(model)
    key_map["lora_unet_blocks_0_attn1_to_q"] = "diffusion_model.blocks.0.attn1.to_k.weight"  # an alias collides
    targets = scan_targets(tree(model, key_map))
    keys = lora_file_keys(targets, key_map)
    assert keys["diffusion_model.blocks.0.attn1.to_q"] == "diffusion_model.blocks.0.attn1.to_q"
    del key_map["diffusion_model.blocks.0.attn1.to_q"]
    with pytest.raises(TargetScanError, match="no name for 'diffusion_model.blocks.0.attn1.to_q.weight'"):
        lora_file_keys(targets, key_map)


def test_sizes_come_from_the_modules():
    model = Model()
    model.blocks[0].attn1.to_q = nn.Linear(W, 3)
    targets = scan_targets(tree(model))
    assert (targets.linears[0].in_features, targets.linears[0].out_features) == (W, 3)
