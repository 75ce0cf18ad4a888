"""Host tier, end to end for every tested family: a synthetic HyperLoRA made for the family's tiny model (its
description read from the model) loads in the real ComfyUI, applies through ``/prompt``, and its applied weights
equal the stock LoraLoader's on the file Save HyperLoRA as LoRA wrote for that model (max |diff| 0 in fp32)."""

from __future__ import annotations

import pytest
from family_runs import SEED, apply_vs_stock, check
from nodepack import families

from hyperlora_core.synthetic import write_checkpoint
from hyperlora_core.target_scan import read_tree, scan_targets

from helpers import TINY_CLIP_WIDTH


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_apply_through_prompt_equals_the_stock_loader_on_the_saved_file(comfy, server, name):
    model = families.FAMILIES[name].build(SEED)
    targets = scan_targets(read_tree(model.model, comfy.lora.model_lora_keys_unet(model.model, {})))
    checkpoint = f"family_{name}"
    write_checkpoint(server.models / "hyper_lora" / checkpoint, targets=targets, clip_dim=TINY_CLIP_WIDTH, seed=5)
    out = apply_vs_stock(server, name, checkpoint, tag=f"fam_{name}")
    check(out, name, families.FAMILIES[name].attention)
