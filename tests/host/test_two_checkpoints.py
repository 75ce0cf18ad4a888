"""Host tier: two HyperLoRA checkpoints and two identities on one server never mix.

Four combinations (checkpoint tiny_a / tiny_b x photo 1 / photo 2) are first run each alone; then prompts alternate
between them (a1, b2, a2, b1, ...), and finally one prompt holds two branches at once (tiny_a with photo 1 and
tiny_b with photo 2 on the same cached MODEL). Every output must equal its combination's output run alone, and the
four alone-outputs must differ from each other (or the comparison would prove nothing).
"""

from __future__ import annotations

import numpy as np
from comfy_server import show
from graphs import FROM_IMAGE, Graph, conditioning, generation, saved_image, tiny_model
from verdicts import explain

COMBOS = (("tiny_a", 1), ("tiny_b", 2), ("tiny_a", 2), ("tiny_b", 1))
SEED = 77


def alone(checkpoint: str, photo: int, prefix: str) -> dict:
    return generation(prefix=prefix, seed=SEED, checkpoint=checkpoint, image_seed=photo).prompt()


def branch(g: Graph, model: list, positive: list, negative: list, checkpoint: str, photo: int, tag: str) -> str:
    """One identity branch with its own node ids: load, photo, identity, apply, sample, decode, save."""
    hl = g.add(f"load{tag}", "LoadHyperLoRA", checkpoint=checkpoint, face_analyzer="models/antelopev2",
               provider="cpu", dtype="fp32")
    image = g.add(f"photo{tag}", "HLTestFaceImage", seed=photo, face=True)
    ident = g.add(f"from_image{tag}", "HyperLoRAFromImage", hyper_lora=g.out(hl), image=g.out(image), **FROM_IMAGE)
    applied = g.add(f"apply{tag}", "ApplyHyperLoRA", model=model, hyper_lora=g.out(hl), identity=g.out(ident),
                    id_strength=0.85, base_strength=0.0)
    latent = g.add(f"latent{tag}", "EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.add(f"sampler{tag}", "KSampler", model=g.out(applied), seed=SEED, steps=2, cfg=5.0,
                    sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                    latent_image=g.out(latent), denoise=1.0)
    vae = g.add(f"vae{tag}", "HLTestTinyVAE", seed=0)
    decoded = g.add(f"decode{tag}", "VAEDecode", samples=g.out(sampled), vae=g.out(vae))
    return g.add(f"save{tag}", "SaveImage", images=g.out(decoded), filename_prefix=f"both{tag}")


def test_alternating_checkpoints_and_identities_never_mix(server):
    s = server.server
    reference = {}
    for checkpoint, photo in COMBOS:
        run = s.run(alone(checkpoint, photo, f"alone_{checkpoint}_{photo}"))
        assert run.status == "success", explain(run)
        reference[checkpoint, photo] = saved_image(server, run)
    distinct = {a: {b: int(np.abs(reference[a].astype(int) - reference[b].astype(int)).max()) for b in reference}
                for a in reference}
    show(f"\nmax pixel difference between the four alone-outputs: {distinct}")
    assert all(distinct[a][b] > 0 for a in reference for b in reference if a != b), distinct

    order = [COMBOS[i % len(COMBOS)] for i in (0, 1, 2, 3, 1, 0, 3, 2)]
    for n, (checkpoint, photo) in enumerate(order):
        run = s.run(alone(checkpoint, photo, f"alternating_{n}"))
        assert run.status == "success", explain(run)
        assert np.array_equal(saved_image(server, run), reference[checkpoint, photo]), (n, checkpoint, photo)

    g = Graph()
    model = tiny_model(g)
    positive, negative = conditioning(g)
    branch(g, model, positive, negative, "tiny_a", 1, "_x")
    branch(g, model, positive, negative, "tiny_b", 2, "_y")
    run = s.run(g.prompt())
    assert run.status == "success", explain(run)
    assert np.array_equal(saved_image(server, run, "save_x"), reference["tiny_a", 1])
    assert np.array_equal(saved_image(server, run, "save_y"), reference["tiny_b", 2])
    show(f"{len(order)} alternating prompts and one two-branch prompt: every output equals its run alone")
