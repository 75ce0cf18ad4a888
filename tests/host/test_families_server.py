"""Host tier, end to end for every tested family: a synthetic HyperLoRA made for the family's tiny model (its
description read from the model) loads in the real ComfyUI, applies through ``/prompt``, and its applied weights
equal the stock LoraLoader's on the file Save HyperLoRA as LoRA wrote for that model (max |diff| 0 in fp32)."""

from __future__ import annotations

import pytest
import safetensors
import torch
from comfy_server import show
from graphs import Graph, apply, identity
from nodepack import families

from hyperlora_core.synthetic import write_checkpoint
from hyperlora_core.target_scan import read_tree, scan_targets

from helpers import TINY_CLIP_WIDTH

STRENGTH = 0.85
SEED = 3


def family_checkpoint(comfy, server, name: str) -> tuple[str, int]:
    """A random HyperLoRA for ``name``'s tiny model in the server's models/hyper_lora: (its name, its linears)."""
    model = families.FAMILIES[name].build(SEED)
    targets = scan_targets(read_tree(model.model, comfy.lora.model_lora_keys_unet(model.model, {})))
    checkpoint = f"family_{name}"
    write_checkpoint(server.models / "hyper_lora" / checkpoint, targets=targets, clip_dim=TINY_CLIP_WIDTH, seed=5)
    return checkpoint, len(targets.linears)


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_apply_through_prompt_equals_the_stock_loader_on_the_saved_file(comfy, server, name):
    checkpoint, n = family_checkpoint(comfy, server, name)
    log_start = len(server.server.log_text())
    g = Graph()
    model = g.out(g.add("fam_model", "HLTestTinyFamily", family=name, seed=SEED))
    hl, ident = identity(g, checkpoint=checkpoint, image_seed=5)
    g.add("dump_ours", "HLTestDumpTargets", model=apply(g, model, hl, ident, strength=STRENGTH),
          name=f"fam_{name}_ours", feed_forward=False)
    g.add("dump_base", "HLTestDumpTargets", model=model, name=f"fam_{name}_base", feed_forward=False)
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix=f"hyperlora/fam_{name}",
          model=model)
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    saved = sorted((server.models / "loras").rglob(f"fam_{name}_*.safetensors"))
    assert len(saved) == 1, saved
    lora_name = saved[0].relative_to(server.models / "loras").as_posix()

    g = Graph()
    stock = g.add("stock", "LoraLoaderModelOnly", model=g.out(g.add("fam_model", "HLTestTinyFamily", family=name,
                                                                    seed=SEED)),
                  lora_name=lora_name, strength_model=STRENGTH)
    g.add("dump_stock", "HLTestDumpTargets", model=g.out(stock), name=f"fam_{name}_stock", feed_forward=False)
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)

    ours, ours_meta = read(server.output / f"fam_{name}_ours.safetensors")
    stock, stock_meta = read(server.output / f"fam_{name}_stock.safetensors")
    base, _ = read(server.output / f"fam_{name}_base.safetensors")
    file_keys, _ = read(saved[0])
    assert len(ours) == len(stock) == len(base) == n == families.FAMILIES[name].attention
    assert ours_meta["family"] == stock_meta["family"] == name
    assert ours_meta["patches"] == stock_meta["patches"] == str(n)
    assert len(file_keys) == 3 * n  # down, up, alpha per target
    worst = max(float((ours[k] - stock[k]).abs().max()) for k in ours)
    changed = sum(not torch.equal(ours[k], base[k]) for k in ours)
    show(f"\n{name}: ApplyHyperLoRA vs LoraLoader({lora_name}): max |diff| {worst} over {n} weights; "
         f"{changed} changed; file keys like {sorted(file_keys)[0]}")
    assert worst == 0.0
    assert changed == n
    assert "lora key not loaded" not in server.server.log_text()[log_start:]
