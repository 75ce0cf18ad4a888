"""Host tier, through the real server: what the HyperLoRA holds when, and who gives it back.

- Load HyperLoRA reads headers only; a graph that applies a saved identity never builds CLIP, the resampler or the
  ID projector (and never starts the face analyzer). The same loader then fed a photo does build them: the
  counters count.
- Once the identity is predicted, CLIP and the networks leave model management and, on this CPU-only host, are
  freed; a new photo builds them again.
- With keep_networks they stay under model management, and POST /free unloads them.

"Ours" are the loaded models that are not ComfyUI's own classes: the test pack builds every other model (SDXL, its
text encoders, TAESD) from comfy.* classes. Each test loads its own copy of the checkpoint, so that ComfyUI's
cache hands it a fresh HYPER_LORA whatever ran before.
"""

from __future__ import annotations

import shutil
import time

from comfy_server import show
from graphs import ANALYZER, FROM_IMAGE, Graph, apply, conditioning, decode_and_save, sample, tiny_model
from nodepack import tiny

from hyperlora_core import load_hyperlora

from helpers import TINY_CLIP_WIDTH, conditions

NOTHING_BUILT = {"networks": [], "clip": False, "face_analyzer": False, "builds": {}}


def checkpoint_copy(server, name: str) -> str:
    hyper = server.models / "hyper_lora"
    if not (hyper / name).exists():
        shutil.copytree(hyper / "tiny_a", hyper / name)
    return name


def saved_identity(server, name: str) -> str:
    """An identity of tiny_a (and so of its copies) written into models/hyper_lora/identities by the core."""
    folder = server.models / "hyper_lora" / "identities"
    folder.mkdir(parents=True, exist_ok=True)
    hl = load_hyperlora(server.models / "hyper_lora" / "tiny_a", unet=tiny.host_unet())
    clip, arc = conditions(1, seed=5, clip_dim=TINY_CLIP_WIDTH)
    hl.predict_identity(clip_tokens=clip, id_embeds=arc).save(folder / f"{name}.safetensors")
    return f"{name}.safetensors"


def graph(checkpoint: str, *, photo_seed: int | None = None, identity_file: str | None = None,
          keep_networks: bool = False) -> Graph:
    """LoadHyperLoRA -> (a photo -> HyperLoRAFromImage | Load Identity) -> Apply -> KSampler -> save, then a
    report of the HYPER_LORA's state and of ComfyUI's loaded models after sampling."""
    g = Graph()
    hl = g.out(g.add("load", "LoadHyperLoRA", checkpoint=checkpoint, face_analyzer=ANALYZER, provider="cpu",
                     dtype="fp32", keep_networks=keep_networks))
    if identity_file is not None:
        ident = g.out(g.add("saved", "LoadHyperLoRAIdentity", identity=identity_file))
    else:
        photo = g.add("photo", "HLTestFaceImage", seed=photo_seed, face=True)
        ident = g.out(g.add("from_image", "HyperLoRAFromImage", hyper_lora=hl, image=g.out(photo), **FROM_IMAGE))
    model = apply(g, tiny_model(g), hl, ident)
    positive, negative = conditioning(g)
    latent = sample(g, model, positive, negative)
    decode_and_save(g, latent, "memory")
    g.add("state", "HLTestHyperLoRAState", hyper_lora=hl, after=latent)
    return g


def state(server, g: Graph) -> dict:
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    return run.outputs("state")["state"][0]


def test_applying_a_saved_identity_builds_nothing(server):
    checkpoint = checkpoint_copy(server, "tiny_lazy")
    name = saved_identity(server, "lazy")
    saved = state(server, graph(checkpoint, identity_file=name))
    show(f"\nload + saved identity + apply + sample: {saved}")
    assert {k: saved[k] for k in NOTHING_BUILT} == NOTHING_BUILT
    assert saved["managed"] == 0
    # the same HYPER_LORA (ComfyUI's cache keeps it: same loader inputs) given a photo: now everything is built once
    photo = state(server, graph(checkpoint, photo_seed=1))
    show(f"then a photo through the same loader: {photo}")
    assert photo["builds"] == {"id_projector": 1, "resampler": 1, "clip": 1}, photo
    assert photo["face_analyzer"]


def test_networks_are_freed_after_the_identity_and_built_again_for_new_photos(server):
    checkpoint = checkpoint_copy(server, "tiny_release")
    first = state(server, graph(checkpoint, photo_seed=1))
    show(f"\nafter a photo -> identity -> sampling: {first}")
    assert first["builds"] == {"id_projector": 1, "resampler": 1, "clip": 1}, first
    assert first["networks"] == [] and not first["clip"], first
    assert first["managed"] == 0, first
    second = state(server, graph(checkpoint, photo_seed=2))
    show(f"after a second photo: {second}")
    assert second["builds"] == {"id_projector": 2, "resampler": 2, "clip": 2}, second
    assert second["networks"] == [] and not second["clip"] and second["managed"] == 0, second


def test_keep_networks_keeps_them_under_model_management_until_free(server):
    checkpoint = checkpoint_copy(server, "tiny_keep")
    kept = state(server, graph(checkpoint, photo_seed=1, keep_networks=True))
    show(f"\nkeep_networks, after a photo -> identity -> sampling: {kept}")
    assert kept["networks"] == ["id_projector", "resampler"] and kept["clip"], kept
    assert kept["managed"] >= 1, kept  # the networks (and CLIP) are ComfyUI's to offload
    again = state(server, graph(checkpoint, photo_seed=2, keep_networks=True))
    assert again["builds"] == kept["builds"], (kept, again)  # a new photo reuses them: nothing is built again
    status, _ = server.server.post("/free", {"unload_models": True})
    assert status == 200
    deadline = time.monotonic() + 15
    while True:  # the worker applies the flag between prompts
        g = Graph()
        hl = g.out(g.add("load", "LoadHyperLoRA", checkpoint=checkpoint, face_analyzer=ANALYZER, provider="cpu",
                         dtype="fp32", keep_networks=True))
        g.add("state", "HLTestHyperLoRAState", hyper_lora=hl)
        after = state(server, g)
        if after["managed"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    show(f"after POST /free {{unload_models}}: {after}")
    assert after["managed"] == 0, after
    assert server.server.alive()
