"""Host tier, differential: ApplyHyperLoRA's patched weights equal the stock LoraLoader's on SaveHyperLoRA's file."""

from __future__ import annotations

import safetensors
import torch
from comfy_server import show
from graphs import Graph, apply, identity, tiny_model

STRENGTH = 0.85


def dump(g: Graph, node_id: str, model: list, name: str) -> str:
    return g.add(node_id, "HLTestDumpWeights", model=model, name=name, load=True)


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_apply_equals_stock_loraloader_on_the_saved_file(server):
    log_start = len(server.server.log_text())
    g = Graph()
    model = tiny_model(g, seed=3, node_id="diff_model")
    hl, ident = identity(g, image_seed=5)
    dump(g, "dump_ours", apply(g, model, hl, ident, strength=STRENGTH), "diff_ours")
    dump(g, "dump_base", model, "diff_base")
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix="hyperlora/diff")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    saved = sorted((server.models / "loras").rglob("diff_*.safetensors"))
    assert len(saved) == 1, saved
    lora_name = saved[0].relative_to(server.models / "loras").as_posix()

    g = Graph()
    stock = g.add("stock", "LoraLoaderModelOnly", model=tiny_model(g, seed=3, node_id="diff_model"),
                  lora_name=lora_name, strength_model=STRENGTH)
    dump(g, "dump_stock", g.out(stock), "diff_stock")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)

    ours, ours_meta = read(server.output / "diff_ours.safetensors")
    stock, stock_meta = read(server.output / "diff_stock.safetensors")
    base, _ = read(server.output / "diff_base.safetensors")
    assert len(ours) == len(stock) == len(base) == 560
    assert ours_meta["patched_targets"] == ours_meta["patches"] == stock_meta["patches"] == "560"
    assert all(v.dtype == torch.float32 for v in ours.values())
    worst = max(float((ours[k] - stock[k]).abs().max()) for k in ours)
    changed = sum(not torch.equal(ours[k], base[k]) for k in ours)
    show(f"\nApplyHyperLoRA vs LoraLoader({lora_name}): max |diff| {worst} over 560 weights; {changed} changed")
    assert worst == 0.0
    assert changed == 560
    assert "lora key not loaded" not in server.server.log_text()[log_start:]
