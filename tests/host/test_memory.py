"""Host tier: after a generation, ComfyUI's model management can unload the HyperLoRA networks (POST /free).

The networks are the loaded models that are not ComfyUI's own classes: the test pack builds every other model
(SDXL, its text encoders, TAESD) from comfy.* classes.
"""

from __future__ import annotations

import time

from comfy_server import show
from graphs import generation


def report(server, tag: str) -> dict:
    g = generation(prefix="memory", seed=21)
    g.add("report", "HLTestLoadedModels", tag=tag, after=["sampler", 0])
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    result = run.outputs("report")["report"][0]
    stats = server.server.get_json("/system_stats")
    result["ram_free"] = stats["system"]["ram_free"]
    return result


def hyperlora_models(result: dict) -> list[dict]:
    return [m for m in result["models"] if not m["class"].startswith("comfy.")]


def describe(result: dict) -> str:
    models = ", ".join(f"{m['class'].rsplit('.', 1)[-1]} {m['bytes'] / 2**20:.2f} MiB" for m in result["models"])
    return (f"{len(result['models'])} loaded [{models}]; server RSS {result['rss'] / 2**20:.0f} MiB, "
            f"RAM free {result['ram_free'] / 2**30:.2f} GiB")


def test_unload_frees_the_hyperlora_networks(server):
    before = report(server, "after a generation")
    show(f"\nafter a generation: {describe(before)}")
    assert hyperlora_models(before), f"no HyperLoRA network is under model management: {describe(before)}"
    status, _ = server.server.post("/free", {"unload_models": True})
    assert status == 200
    deadline = time.monotonic() + 15
    while True:  # the worker applies the flag between prompts
        after = report(server, "after /free")
        if len(after["models"]) < len(before["models"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    show(f"after POST /free {{unload_models}}: {describe(after)}")
    assert len(after["models"]) < len(before["models"])
    assert not hyperlora_models(after), describe(after)
    assert server.server.alive()
