"""The target layers of a ComfyUI MODEL, read from the model itself (see hyperlora_core.target_scan for the rule).

Host seam: ComfyUI gives the module tree and its LoRA key map (``comfy.lora.model_lora_keys_unet``); the core
turns them into a ``TargetLayers`` and into the LoRA file key of each target.
"""

from __future__ import annotations

import comfy.lora

from ..hyperlora_core.target_scan import lora_file_keys, read_tree, scan_targets
from ..hyperlora_core.targets import TargetLayers


def key_map(model) -> dict[str, object]:
    """ComfyUI's LoRA key map of a MODEL (``ModelPatcher``) or its ``BaseModel``: file key -> weight key."""
    base = getattr(model, "model", model)
    return comfy.lora.model_lora_keys_unet(base, {})  # pass a fresh dict: the default one is shared


def describe_model(model, feed_forward: bool = False) -> TargetLayers:
    """The linears a HyperLoRA targets in ``model`` (a MODEL or its BaseModel), grouped into modules in token
    order; the attention projections, plus the feed-forward linears if ``feed_forward``."""
    base = getattr(model, "model", model)
    return scan_targets(read_tree(base, key_map(base)), feed_forward=feed_forward)


def file_keys(model, targets: TargetLayers) -> dict[str, str]:
    """{target key: LoRA file key} in the convention ComfyUI's LoraLoader and the family's trainers use."""
    return lora_file_keys(targets, key_map(model))
