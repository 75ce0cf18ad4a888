"""Host tier: HyperLoRAHook + ConditioningSetProperties puts the identity on one conditioning for a step range.

A recorder wraps the UNet and saves one attention weight at every model call: the hooked (positive) calls of the
scheduled steps carry exactly the identity's delta; the negative's calls and the later steps carry none; the
weight is back to its value afterwards.
"""

from __future__ import annotations

import safetensors
import torch
from comfy_server import show
from graphs import Graph, conditioning, identity, sample, tiny_model

from hyperlora_core import lora_delta

STEPS, END = 4, 0.5
KEY = "output_blocks.2.1.transformer_blocks.7.attn2.to_k.weight"
KOHYA = "lora_unet_output_blocks_2_1_transformer_blocks_7_attn2_to_k"


def load(path) -> tuple[torch.Tensor, dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return f.get_tensor("weight"), f.metadata() or {}


def test_hook_acts_only_on_its_conditioning_and_steps(server):
    g = Graph()
    model = tiny_model(g, seed=7, node_id="hook_model")  # a model no other prompt has patched
    hl, ident = identity(g, image_seed=1)
    hooks = g.add("hook", "HyperLoRAHook", hyper_lora=hl, identity=ident, strength=1.0, start_percent=0.0,
                  end_percent=END)
    positive, negative = conditioning(g)
    hooked = g.add("props", "ConditioningSetProperties", cond_NEW=positive, strength=1.0, set_cond_area="default",
                   hooks=g.out(hooks))
    recorder = g.add("recorder", "HLTestRecordWeights", model=model, key=KEY, name="hook_calls")
    latent = sample(g, g.out(recorder), g.out(hooked), negative, steps=STEPS)
    g.add("after", "HLTestDumpWeights", model=model, name="hook_after", load=False, after=latent)
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix="hyperlora/hook")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)

    folder = server.output / "hook_calls"
    before, _ = load(folder / "before.safetensors")
    lora_file = sorted((server.models / "loras").rglob("hook_*.safetensors"))[-1]
    with safetensors.safe_open(str(lora_file), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys() if k.startswith(KOHYA)}
    delta = lora_delta(lora, KOHYA, 1.0).float()
    assert float(delta.abs().max()) > 1e-3

    calls = []
    for path in sorted(folder.glob("call_*.safetensors")):
        weight, meta = load(path)
        if torch.equal(weight, before):
            state = "base"
        elif float((weight - before - delta).abs().max()) <= 1e-5:
            state = "identity"
        else:
            state = f"other (max |w - base - delta| {float((weight - before - delta).abs().max()):.2e})"
        calls.append((float(meta["sigma"]), meta["cond_or_uncond"], state))
    table = "\n".join(f"  sigma {s:8.4f}  cond_or_uncond {c:>4}  {st}" for s, c, st in calls)
    show(f"\nmodel calls ({STEPS} steps, hook on the positive until {END:.0%}):\n{table}")

    assert len(calls) == 2 * STEPS, table  # cond and uncond run apart: they carry different hooks
    positive_calls = [st for _, c, st in calls if c == "0"]
    negative_calls = [st for _, c, st in calls if c == "1"]
    assert negative_calls == ["base"] * STEPS, table
    assert positive_calls == ["identity"] * (STEPS // 2) + ["base"] * (STEPS // 2), table

    with safetensors.safe_open(str(server.output / "hook_after.safetensors"), "pt") as f:
        after = f.get_tensor(KEY)
    assert torch.equal(after, before), "the hook's patch stayed in the weights after sampling"
