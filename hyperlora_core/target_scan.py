"""Read a model family's target linears from its module tree: one structural rule, no name table per family.

The host reads a :class:`ModelTree` from a loaded diffusion model (module paths with their class names, the
sizes of every linear, and ComfyUI's LoRA key map) and :func:`scan_targets` turns it into a
:class:`~hyperlora_core.targets.TargetLayers`. The rule, in registration (token) order:

* an **attention module** is a module whose class name ends in ``Attention`` (the UNet's ``CrossAttention``,
  MMDiT's and Flux's ``SelfAttention``, Qwen-Image's ``Attention``); its linears are its q/k/v (separate or fused)
  and output projections, and form one target module (SD1.5/SDXL: ``to_q, to_k, to_v, to_out.0`` of attn1/attn2;
  Flux double blocks: ``img_attn.qkv, img_attn.proj`` and the txt ones; Qwen-Image: ``to_q`` ... ``to_add_out``);
* a **single-stream block** (class name ends in ``SingleStreamBlock``: Flux, Chroma, HunyuanVideo) computes its
  attention inline; its own linears (Flux: ``linear1`` = q/k/v fused with the MLP's input, ``linear2`` = the
  output projection fused with the MLP's output) form one target module;
* with ``feed_forward=True``, a **feed-forward** module is a sibling of an attention module whose attribute name
  is ``ff`` or ends in ``mlp`` (``ff``, ``img_mlp``, ``txt_mlp``, ``mlp``, ``ff_context``); its linears form one
  more target module, in the model's order.

Every target is named by the weight key ComfyUI's key map patches (``diffusion_model.<path>``), so that a LoRA on
it loads through ComfyUI's own LoRA path; a linear the key map does not reach is refused (the check is skipped
when the tree carries no key map).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import HyperLoRAError
from .targets import TargetLayers, TargetLinear, TargetModule

PREFIX = "diffusion_model."  # ComfyUI's state-dict prefix of the diffusion model (BaseModel.diffusion_model)
ATTENTION_SUFFIX = "Attention"  # class-name suffix of an attention module
SINGLE_STREAM_SUFFIX = "SingleStreamBlock"  # class-name suffix of a block that computes attention inline
FEED_FORWARD_NAME = re.compile(r"^(ff|\w*mlp)(_context)?$")  # attribute name of a block's feed-forward child
KOHYA_PREFIX = "lora_unet_"  # kohya's prefix of a diffusion-model LoRA key (ComfyUI maps it for every family)


class TargetScanError(HyperLoRAError, ValueError):
    """The model's module tree yields no usable target layers."""


@dataclass(frozen=True)
class ModelTree:
    """What the host reads from a diffusion model; plain data, so the rule is tested without ComfyUI."""

    family: str  # the model family, e.g. "SDXL", "SD15", "Flux" (ComfyUI's model_config class name)
    modules: tuple[tuple[str, str], ...]  # (path below the diffusion model, class name), registration order
    linears: Mapping[str, tuple[int, int]]  # path of every linear -> (in_features, out_features)
    key_map: Mapping[str, object] = field(default_factory=dict)  # ComfyUI's LoRA key map: name -> weight key
    # (or (weight key, slice) for partial weights), as comfy.lora.model_lora_keys_unet returns it

    def __post_init__(self) -> None:
        if not self.family:
            raise TargetScanError("ModelTree: the model family is empty; pass the model_config's class name")
        unknown = [p for p in self.linears if p not in dict(self.modules)]
        if unknown:
            raise TargetScanError(f"ModelTree: linears {unknown[:3]} are not among the modules; read both from "
                                  "the same named_modules() walk")


def _children(modules: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """parent path -> child paths, registration order ("" is the root)."""
    children: dict[str, list[str]] = {}
    for path, _ in modules:
        if path:
            children.setdefault(path.rpartition(".")[0], []).append(path)
    return children


def _linears_below(path: str, tree: ModelTree, children: dict[str, list[str]], direct: bool) -> list[str]:
    """The linears under ``path`` in registration order (only its direct children if ``direct``)."""
    found = []
    for child in children.get(path, []):
        if child in tree.linears:
            found.append(child)
        elif not direct:
            found.extend(_linears_below(child, tree, children, direct=False))
    return found


def _group_roots(tree: ModelTree, children: dict[str, list[str]], feed_forward: bool) -> list[tuple[str, bool]]:
    """(module path, direct linears only) of every target module, registration order."""
    attention = {p for p, cls in tree.modules if cls.endswith(ATTENTION_SUFFIX) and p}
    roots: dict[str, bool] = {}
    for path, cls in tree.modules:
        if path in attention and not any(path.startswith(a + ".") for a in attention):
            roots[path] = False
        elif cls.endswith(SINGLE_STREAM_SUFFIX):
            roots[path] = True
    if feed_forward:
        blocks = {a.rpartition(".")[0] for a in attention}
        for block in blocks:
            for child in children.get(block, []):
                if FEED_FORWARD_NAME.match(child.rpartition(".")[2]) and child not in tree.linears:
                    roots[child] = False
    order = {path: i for i, (path, _) in enumerate(tree.modules)}
    return sorted(roots.items(), key=lambda item: order[item[0]])


def scan_targets(tree: ModelTree, *, feed_forward: bool = False) -> TargetLayers:
    """The target layers of the model ``tree`` describes (see the module docstring for the rule)."""
    children = _children(tree.modules)
    patched = _whole_weights(tree.key_map)
    modules = []
    for path, direct in _group_roots(tree, children, feed_forward):
        linears = []
        for lin in _linears_below(path, tree, children, direct):
            key = PREFIX + lin
            if tree.key_map and key + ".weight" not in patched:
                raise TargetScanError(f"{tree.family}: ComfyUI's LoRA key map does not reach '{key}.weight'; "
                                      "a LoRA on it would not load. Report the model family.")
            fan_in, fan_out = tree.linears[lin]
            linears.append(TargetLinear(key, fan_in, fan_out))
        if linears:
            modules.append(TargetModule(path, tuple(linears)))
    if not modules:
        raise TargetScanError(f"{tree.family}: the diffusion model has no attention modules (no module class "
                              f"ending in '{ATTENTION_SUFFIX}' or '{SINGLE_STREAM_SUFFIX}'); HyperLoRA cannot "
                              "target this model family")
    return TargetLayers(tree.family, tuple(modules))


def read_tree(base_model, key_map: Mapping[str, object]) -> ModelTree:
    """The :class:`ModelTree` of a host model object that has ``diffusion_model`` (a torch module) and
    ``model_config`` (whose class name is the family), as ComfyUI's ``BaseModel`` has; ``key_map`` is
    ``comfy.lora.model_lora_keys_unet(base_model, {})``. Duck-typed: no host import here."""
    diffusion = base_model.diffusion_model
    modules, linears = [], {}
    for path, module in diffusion.named_modules():
        modules.append((path, type(module).__name__))
        if isinstance(module, torch.nn.Linear):
            linears[path] = (int(module.in_features), int(module.out_features))
    return ModelTree(family=type(base_model.model_config).__name__, modules=tuple(modules), linears=linears,
                     key_map=dict(key_map))


def _whole_weights(key_map: Mapping[str, object]) -> set[str]:
    """The weight keys the key map patches whole (not through a slice)."""
    return {value for value in key_map.values() if isinstance(value, str)}


def lora_file_keys(targets: TargetLayers, key_map: Mapping[str, object]) -> dict[str, str]:
    """{target key: the LoRA file key to write it under}: kohya's ``lora_unet_<path with _>`` (what kohya's
    scripts write for SDXL, Flux and SD3 and what ComfyUI, A1111/Forge load), checked against ComfyUI's key map so
    that the loader maps it back onto the same weight. If that name is taken by another weight, any other name the
    key map gives the weight, else the ComfyUI key itself (``diffusion_model.<path>``, which ComfyUI always maps).
    """
    names: dict[str, list[str]] = {}
    for name, value in key_map.items():
        if isinstance(value, str):
            names.setdefault(value, []).append(name)
    out: dict[str, str] = {}
    for lin in targets.linears:
        weight = lin.key + ".weight"
        kohya = KOHYA_PREFIX + lin.key.removeprefix(PREFIX).replace(".", "_")
        candidates = names.get(weight, [])
        if key_map.get(kohya) == weight:
            out[lin.key] = kohya
        elif key_map.get(lin.key) == weight:
            out[lin.key] = lin.key
        elif candidates:
            out[lin.key] = candidates[0]
        else:
            raise TargetScanError(f"{targets.family}: ComfyUI's LoRA key map has no name for '{weight}'; "
                                  "this target cannot be saved as a LoRA that ComfyUI loads")
    if len(set(out.values())) != len(out):
        raise TargetScanError(f"{targets.family}: two targets map to the same LoRA key; report the model family")
    return out
