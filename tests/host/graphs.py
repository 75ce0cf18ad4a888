"""API-format prompts for the host tier, built in Python.

Node ids are fixed per role, so that a re-queued prompt with one changed input lets ComfyUI's cache serve the rest.
"""

from __future__ import annotations

import numpy as np

PROMPT = "a photo of fcsks fxhks fhyks, portrait"
ANALYZER = "models/antelopev2"
# HyperLoRAFromImage's widgets at their defaults (face_index -1: the largest face)
FROM_IMAGE = dict(remove_background=True, grayscale=False, face_index=-1, on_failure="error", crop=True,
                  crop_scale_LRTB="1,1,1,1", safe_crop=True)


class Graph:
    """An API-format prompt: ``add`` returns the node id; ``out(id, i)`` is a link to output i."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, node_id: str, class_type: str, **inputs) -> str:
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id} used twice")
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]

    def prompt(self) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


def tiny_model(g: Graph, *, seed: int = 0, node_id: str = "model", **kw) -> list:
    return g.out(g.add(node_id, "HLTestTinySDXL", seed=seed, model_channels=kw.get("model_channels", 32)))


def identity(g: Graph, *, checkpoint: str = "tiny_a", image_seed: int = 1, face: bool = True,
             tag: str = "") -> tuple[list, list]:
    """LoadHyperLoRA + a face photo + HyperLoRAFromImage; returns (hyper_lora, identity) links."""
    hl = g.add(f"load{tag}", "LoadHyperLoRA", checkpoint=checkpoint, face_analyzer=ANALYZER, provider="cpu",
               dtype="fp32")
    image = g.add(f"photo{tag}", "HLTestFaceImage", seed=image_seed, face=face)
    ident = g.add(f"from_image{tag}", "HyperLoRAFromImage", hyper_lora=g.out(hl), image=g.out(image), **FROM_IMAGE)
    return g.out(hl), g.out(ident)


def apply(g: Graph, model: list, hyper_lora: list, ident: list, *, strength: float = 0.85) -> list:
    return g.out(g.add("apply", "ApplyHyperLoRA", model=model, hyper_lora=hyper_lora, identity=ident,
                       id_strength=strength, base_strength=0.0))


def conditioning(g: Graph) -> tuple[list, list]:
    """The tiny SDXL text encoders through the stock CLIPTextEncode: (positive, negative)."""
    clip = g.add("clip", "HLTestTinyCLIP", seed=0)
    pos = g.add("positive", "CLIPTextEncode", text=PROMPT, clip=g.out(clip))
    neg = g.add("negative", "CLIPTextEncode", text="blurry", clip=g.out(clip))
    return g.out(pos), g.out(neg)


def sample(g: Graph, model: list, positive: list, negative: list, *, seed: int = 1, steps: int = 2,
           size: int = 64) -> list:
    latent = g.add("latent", "EmptyLatentImage", width=size, height=size, batch_size=1)
    return g.out(g.add("sampler", "KSampler", model=model, seed=seed, steps=steps, cfg=5.0, sampler_name="euler",
                       scheduler="normal", positive=positive, negative=negative, latent_image=g.out(latent),
                       denoise=1.0))


def decode_and_save(g: Graph, latent: list, prefix: str) -> str:
    vae = g.add("vae", "HLTestTinyVAE", seed=0)
    image = g.add("decode", "VAEDecode", samples=latent, vae=g.out(vae))
    return g.add("save", "SaveImage", images=g.out(image), filename_prefix=prefix)


def generation(*, prefix: str, seed: int = 1, with_identity: bool = True, checkpoint: str = "tiny_a",
               image_seed: int = 1) -> Graph:
    """[LoadHyperLoRA -> HyperLoRAFromImage -> ApplyHyperLoRA ->] KSampler -> VAEDecode -> SaveImage."""
    g = Graph()
    model = tiny_model(g)
    if with_identity:
        hl, ident = identity(g, checkpoint=checkpoint, image_seed=image_seed)
        model = apply(g, model, hl, ident)
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, model, positive, negative, seed=seed), prefix)
    return g


def refinement(*, prefix: str, steps: int = 3, mode: str = "rank_relaxed", seed: int = 1) -> Graph:
    """LoadHyperLoRA -> HyperLoRAFromImage -> HyperLoRARefine -> LoraModelLoader -> KSampler -> SaveImage, and the
    loss curve -> SaveImage."""
    g = Graph()
    model = tiny_model(g)
    hl, ident = identity(g)
    positive, negative = conditioning(g)
    vae = g.add("vae", "HLTestTinyVAE", seed=0)
    refine = g.add("refine", "HyperLoRARefine", model=model, vae=g.out(vae), positive=positive, hyper_lora=hl,
                   identity=ident, image=g.out("photo"), mode=mode, steps=steps, lr=1e-2, rank=4, seed=0,
                   batch_size=1, resolution=256, precision="auto", gradient_checkpointing=True, id_strength=0.85)
    refined = g.add("lora_model", "LoraModelLoader", model=model, lora=g.out(refine, 1), strength_model=1.0)
    latent = sample(g, g.out(refined), positive, negative, seed=seed)
    image = g.add("decode", "VAEDecode", samples=latent, vae=g.out(vae))
    g.add("save", "SaveImage", images=g.out(image), filename_prefix=prefix)
    g.add("curve", "SaveImage", images=g.out(refine, 2), filename_prefix=prefix + "_loss")
    return g


def saved_image(server, run, node_id: str = "save") -> np.ndarray:
    """The one image a SaveImage node wrote, read from the server's output folder."""
    from PIL import Image

    images = run.outputs(node_id)["images"]
    assert len(images) == 1, run.history
    info = images[0]
    return np.asarray(Image.open(server.output / info["subfolder"] / info["filename"]))
