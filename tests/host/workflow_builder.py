"""Builds the example workflows: example_workflows/<name>.json (UI / LiteGraph format), <name>.jpg (the template
browser's thumbnail) and example_workflows/api/<name>.json (API format), all from one description per workflow.

Run ``python tests/host/workflow_builder.py`` from the repository root after changing a workflow here; the host
tier (tests/host/test_workflows.py) checks the files against the live server's /object_info and runs the API twins.
Only core nodes and ours; each workflow has a Note naming its models and the trigger words.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the core's constants (download sources, the doctor's command)
    sys.path.insert(0, str(ROOT))

from hyperlora_core.doctor import COMMAND as DOCTOR_COMMAND  # noqa: E402
from hyperlora_core.refine import RefineConfig  # noqa: E402
from hyperlora_core.sources import ANTELOPEV2, SOURCES  # noqa: E402

REFINE = RefineConfig()  # the refine node's defaults

OUT = ROOT / "example_workflows"
TRIGGER = "fcsks fxhks fhyks"
CONTROL = "control_after_generate"  # frontend-only widget after a seed: not in the API format
UPLOAD = "upload"  # LoadImage's frontend-only upload button ("image")
FRONTEND_ONLY = {CONTROL, UPLOAD}
OURS = {"LoadHyperLoRA", "HyperLoRAFromImage", "ApplyHyperLoRA", "ConceptSlider", "HyperLoRAToLoRA", "SaveHyperLoRA",
        "SaveHyperLoRAIdentity", "LoadHyperLoRAIdentity", "HyperLoRAHook", "HyperLoRARefine", "SaveLiDB", "LoadLiDB",
        "LoadHyperDreamBooth", "HyperDreamBoothFromImage"}


@dataclass(frozen=True)
class Spec:
    """One node type as the frontend lays it out: socket inputs, widgets in order, outputs."""

    title: str  # display name
    inputs: tuple[tuple[str, str, bool], ...] = ()  # (name, type, optional) of the sockets, in schema order
    widgets: tuple[str, ...] = ()  # widget names in widgets_values order, frontend-only ones included
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)


def _s(title, inputs="", widgets="", outputs=""):
    """Spec from short strings: inputs 'name:TYPE name?:TYPE' (? = optional), outputs 'name:TYPE'."""
    ins = tuple((n.rstrip("?"), t, n.endswith("?")) for n, t in (x.split(":") for x in inputs.split()))
    outs = tuple(tuple(x.split(":")) for x in outputs.split())
    return Spec(title, ins, tuple(widgets.split()), outs)


SPECS = {
    "CheckpointLoaderSimple": _s("Load Checkpoint", "", "ckpt_name", "MODEL:MODEL CLIP:CLIP VAE:VAE"),
    "LoadImage": _s("Load Image", "", f"image {UPLOAD}", "IMAGE:IMAGE MASK:MASK"),
    "ImageScale": _s("Upscale Image", "image:IMAGE", "upscale_method width height crop", "IMAGE:IMAGE"),
    "ImageBatch": _s("Batch Images", "image1:IMAGE image2:IMAGE", "", "IMAGE:IMAGE"),
    "CLIPSetLastLayer": _s("CLIP Set Last Layer", "clip:CLIP", "stop_at_clip_layer", "CLIP:CLIP"),
    "CLIPTextEncode": _s("CLIP Text Encode (Prompt)", "clip:CLIP", "text", "CONDITIONING:CONDITIONING"),
    "EmptyLatentImage": _s("Empty Latent Image", "", "width height batch_size", "LATENT:LATENT"),
    "KSampler": _s("KSampler", "model:MODEL positive:CONDITIONING negative:CONDITIONING latent_image:LATENT",
                   f"seed {CONTROL} steps cfg sampler_name scheduler denoise", "LATENT:LATENT"),
    "VAEDecode": _s("VAE Decode", "samples:LATENT vae:VAE", "", "IMAGE:IMAGE"),
    "SaveImage": _s("Save Image", "images:IMAGE", "filename_prefix"),
    "PreviewImage": _s("Preview Image", "images:IMAGE"),
    "ControlNetLoader": _s("Load ControlNet Model", "", "control_net_name", "CONTROL_NET:CONTROL_NET"),
    "ControlNetApplyAdvanced": _s(
        "Apply ControlNet", "positive:CONDITIONING negative:CONDITIONING control_net:CONTROL_NET image:IMAGE vae?:VAE",
        "strength start_percent end_percent", "positive:CONDITIONING negative:CONDITIONING"),
    "SolidMask": _s("SolidMask", "", "value width height", "MASK:MASK"),
    "MaskComposite": _s("MaskComposite", "destination:MASK source:MASK", "x y operation", "MASK:MASK"),
    "ConditioningSetProperties": _s("Cond Set Props",
                                    "cond_NEW:CONDITIONING mask?:MASK hooks?:HOOKS timesteps?:TIMESTEPS_RANGE",
                                    "strength set_cond_area", "CONDITIONING:CONDITIONING"),
    "ConditioningCombine": _s("Conditioning (Combine)", "conditioning_1:CONDITIONING conditioning_2:CONDITIONING", "",
                              "CONDITIONING:CONDITIONING"),
    "LoadHyperLoRA": _s("HyperLoRA", "clip_vision?:CLIP_VISION",
                        "checkpoint face_analyzer provider dtype keep_networks", "hyper_lora:HYPER_LORA"),
    "HyperLoRAFromImage": _s("HyperLoRA Face", "hyper_lora:HYPER_LORA image:IMAGE",
                             "remove_background grayscale face_index on_failure crop crop_scale_LRTB safe_crop",
                             "identity:HYPER_LORA_IDENTITY face_crops:IMAGE"),
    "ApplyHyperLoRA": _s("Apply HyperLoRA", "model:MODEL hyper_lora:HYPER_LORA identity:HYPER_LORA_IDENTITY",
                         "id_strength base_strength", "MODEL:MODEL trigger_words:STRING"),
    "ConceptSlider": _s("HyperLoRA Concept Slider", "hyper_lora:HYPER_LORA start_image?:IMAGE end_image?:IMAGE "
                        "start_identity?:HYPER_LORA_IDENTITY end_identity?:HYPER_LORA_IDENTITY model?:MODEL",
                        "mode strength", "MODEL:MODEL lora:LORA_MODEL"),
    "HyperLoRAHook": _s("HyperLoRA Identity Hook", "hyper_lora:HYPER_LORA identity:HYPER_LORA_IDENTITY",
                        "strength start_percent end_percent", "hooks:HOOKS"),
    "SaveHyperLoRA": _s("Save HyperLoRA as LoRA", "hyper_lora:HYPER_LORA identity:HYPER_LORA_IDENTITY",
                        "filename_prefix", "lora_name:STRING"),
    "SaveHyperLoRAIdentity": _s("Save HyperLoRA Identity", "identity:HYPER_LORA_IDENTITY",
                                "filename_prefix storage", "identity_name:STRING"),
    "HyperLoRARefine": _s("HyperLoRA Refine", "model:MODEL vae:VAE positive:CONDITIONING image:IMAGE "
                          "hyper_lora?:HYPER_LORA identity?:HYPER_LORA_IDENTITY lidb?:LIDB",
                          f"mode steps lr rank seed {CONTROL} batch_size resolution precision gradient_checkpointing "
                          "id_strength lidb_a lidb_b",
                          "identity:HYPER_LORA_IDENTITY lora:LORA_MODEL loss_curve:IMAGE lidb:LIDB"),
    "SaveLiDB": _s("Save LiDB", "lidb:LIDB", "filename_prefix storage", "lidb_name:STRING"),
    "LoadLiDB": _s("Load LiDB", "", "lidb", "lidb:LIDB lora:LORA_MODEL"),
    "LoadHyperDreamBooth": _s("Load HyperDreamBooth", "", "hdb", "hdb:HYPER_DREAMBOOTH"),
    "HyperDreamBoothFromImage": _s("HyperDreamBooth Identity from Image", "hdb:HYPER_DREAMBOOTH image:IMAGE",
                                   "face_analyzer provider remove_background face_index on_failure",
                                   "lidb:LIDB lora:LORA_MODEL face_crops:IMAGE"),
    "LoraModelLoader": _s("Load LoRA Model", "model:MODEL lora:LORA_MODEL", "strength_model", "MODEL:MODEL"),
    "SaveLoRANode": _s("Save LoRA Weights", "lora:LORA_MODEL steps?:INT", "prefix"),
    "Note": _s("Note", "", "text"),
}
MULTILINE = {"CLIPTextEncode", "Note"}
IMAGE_NODES = {"LoadImage", "PreviewImage", "SaveImage"}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    values: dict  # widget name -> value (frontend-only widgets included)
    title: str | None = None
    size: tuple[float, float] | None = None
    color: tuple[str, str] | None = None  # (color, bgcolor)

    @property
    def spec(self) -> Spec:
        return SPECS[self.type]

    def out(self, name: str) -> tuple[Node, int]:
        return self, [n for n, _ in self.spec.outputs].index(name)


@dataclass
class Workflow:
    name: str  # the file name: ComfyUI 0.3.64 / frontend 1.27.10 show it as the template card's title
    title: str  # what the thumbnail says
    description: str = ""  # one line under the title on the thumbnail (the card's own text is the file name)
    nodes: list[Node] = field(default_factory=list)
    links: list[tuple[int, int, int, int, int, str]] = field(default_factory=list)  # id, from, slot, to, slot, type
    groups: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)

    def add(self, type_: str, pos, title: str | None = None, size=None, **values) -> Node:
        spec = SPECS[type_]
        missing = [w for w in spec.widgets if w not in values]
        unknown = [w for w in values if w not in spec.widgets]
        if missing or unknown:
            raise ValueError(f"{type_}: widgets missing {missing}, unknown {unknown}")
        node = Node(len(self.nodes) + 1, type_, pos, {w: values[w] for w in spec.widgets}, title, size)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(420, 300)) -> Node:
        node = self.add("Note", pos, title="Read me: models and trigger words", size=size, text=text)
        node.color = ("#432", "#653")
        return node

    def connect(self, source: tuple[Node, int], target: Node, name: str) -> None:
        src, slot = source
        names = [n for n, _, _ in target.spec.inputs]
        if name not in names:
            raise ValueError(f"{target.type} has no socket {name}")
        kind = src.spec.outputs[slot][1]
        if kind != target.spec.inputs[names.index(name)][1]:
            raise ValueError(f"{src.type}.{src.spec.outputs[slot][0]} ({kind}) -> {target.type}.{name}")
        self.links.append((len(self.links) + 1, src.id, slot, target.id, names.index(name), kind))

    # -- the two formats ------------------------------------------------------------------------------------------
    def _order(self) -> dict[int, int]:
        """Topological execution order, as LiteGraph's 'order' field."""
        deps = {n.id: {f for _, f, _, t, _, _ in self.links if t == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(deps):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
            for i in ready:
                order[i] = len(order)
            done |= set(ready)
        return order

    def _size(self, node: Node) -> list[float]:
        if node.size:
            return list(node.size)
        spec = node.spec
        rows = max(len(spec.inputs), len(spec.outputs))
        height = 30 + 22 * rows + 26 * len([w for w in spec.widgets if w != UPLOAD])
        if node.type in MULTILINE:
            height += 110
        if node.type in IMAGE_NODES:
            height += 240
        return [400 if node.type in MULTILINE else 320, height]

    def ui(self) -> dict:
        order = self._order()
        nodes = []
        for node in self.nodes:
            spec = node.spec
            inputs = []
            for slot, (name, kind, optional) in enumerate(spec.inputs):
                link = next((lk[0] for lk in self.links if lk[3] == node.id and lk[4] == slot), None)
                inputs.append({"name": name, "type": kind, "link": link} | ({"shape": 7} if optional else {}))
            outputs = [{"name": name, "type": kind, "links": [lk[0] for lk in self.links
                                                              if lk[1] == node.id and lk[2] == slot],
                        "slot_index": slot} for slot, (name, kind) in enumerate(spec.outputs)]
            entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": self._size(node), "flags": {},
                     "order": order[node.id], "mode": 0, "inputs": inputs, "outputs": outputs}
            if node.title:
                entry["title"] = node.title
            entry["properties"] = {} if node.type == "Note" else {"Node name for S&R": node.type}
            entry["widgets_values"] = list(node.values.values())
            if node.color:
                entry["color"], entry["bgcolor"] = node.color
            nodes.append(entry)
        groups = [{"id": i + 1, "title": t, "bounding": list(b), "color": "#3f789e", "font_size": 24, "flags": {}}
                  for i, (t, b) in enumerate(self.groups)]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": [list(lk) for lk in self.links], "groups": groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [60, 60]}}, "version": 0.4}

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.type == "Note":
                continue
            inputs: dict = {}
            for slot, (name, _, _) in enumerate(node.spec.inputs):
                link = next((lk for lk in self.links if lk[3] == node.id and lk[4] == slot), None)
                if link:
                    inputs[name] = [str(link[1]), link[2]]
            inputs.update({k: v for k, v in node.values.items() if k not in FRONTEND_ONLY})
            prompt[str(node.id)] = {"inputs": dict(sorted(inputs.items(), key=lambda kv: _rank(node, kv[0]))),
                                    "class_type": node.type, "_meta": {"title": node.title or node.spec.title}}
        return prompt


def _rank(node: Node, name: str) -> int:
    """Inputs in the schema's order (sockets and widgets interleaved as ComfyUI's own export does roughly)."""
    names = [n for n, _, _ in node.spec.inputs] + list(node.spec.widgets)
    return names.index(name)


# -- shared pieces ------------------------------------------------------------------------------------------------
CHECKPOINT = "sd_xl_base_1.0.safetensors"
HYPER = "sdxl_hyper_id_lora_v1_fidelity"
ANALYZER = "models/antelopev2"
NEGATIVE = "blurry, lowres, deformed face, bad anatomy, watermark, text"
POSITIVE = f"{TRIGGER}, a close-up portrait photo of a person, soft window light, 85mm, detailed skin"

MODELS = "\n".join(["Models (download them, put them here, then press R to refresh the lists):",
                    *(f"- {source.line()}" for source in SOURCES)])
CLIP_SKIP = -2  # the authors trained with stop_at_clip_layer = -2
SDXL = ("- an SDXL checkpoint: models/checkpoints/ (SDXL only: SD1.5, SD3 and Flux cannot use HyperLoRA)\n\n"
        f"CLIP skip: CLIP Set Last Layer at {CLIP_SKIP} sits between the checkpoint and the prompts, as HyperLoRA "
        "was trained; keep it.")
TRIGGERS = (f"The prompt MUST contain the trigger words  {TRIGGER}  or the identity does nothing. "
            f"LoRA weight 0.75-0.85. Check everything, from ComfyUI's folder: {DOCTOR_COMMAND}")


def note_text(what: str, *extra: str) -> str:
    return "\n".join([what, "", MODELS, *extra, "", TRIGGERS])


def hyper_lora_loader(w: Workflow, pos) -> Node:
    """LoadHyperLoRA on the released checkpoint and the antelopev2 folder, with the node's defaults."""
    return w.add("LoadHyperLoRA", pos, checkpoint=HYPER, face_analyzer=ANALYZER, provider="auto", dtype="auto",
                 keep_networks=False)


def identity_chain(w: Workflow, x: float, y: float, image: str = "face.jpg", *, title: str = "Photo of the person",
                   hyper: Node | None = None) -> tuple[Node, Node, Node]:
    """[LoadHyperLoRA] + LoadImage + HyperLoRAFromImage + PreviewImage of the face crops."""
    if hyper is None:
        hyper = hyper_lora_loader(w, (x, y))
        y += 210
    photo = w.add("LoadImage", (x, y), title=title, image=image, upload="image")
    ident = from_image(w, hyper, photo.out("IMAGE"), (x + 360, y), preview=(x, y + 390))
    return hyper, photo, ident


def from_image(w: Workflow, hyper: Node, image, pos, preview=None) -> Node:
    """HyperLoRAFromImage at ``pos`` with a PreviewImage of its face crops (below it unless ``preview``)."""
    ident = w.add("HyperLoRAFromImage", pos, remove_background=True, grayscale=False, face_index=-1,
                  on_failure="error", crop=True, crop_scale_LRTB="1,1,1,1", safe_crop=True)
    w.connect(hyper.out("hyper_lora"), ident, "hyper_lora")
    w.connect(image, ident, "image")
    crops = w.add("PreviewImage", preview or (pos[0], pos[1] + 230), title="Face crops (what HyperLoRA saw)",
                  size=(320, 300))
    w.connect(ident.out("face_crops"), crops, "images")
    return ident


def clip_skip(w: Workflow, ckpt: Node, pos) -> tuple[Node, int]:
    """CLIP Set Last Layer at -2 on the checkpoint's CLIP: the text encoder as HyperLoRA was trained with."""
    node = w.add("CLIPSetLastLayer", pos, title="CLIP Set Last Layer (HyperLoRA: -2)", stop_at_clip_layer=CLIP_SKIP)
    w.connect(ckpt.out("CLIP"), node, "clip")
    return node.out("CLIP")


def prompts(w: Workflow, ckpt: Node, x: float, y: float, positive: str = POSITIVE) -> tuple[Node, Node]:
    clip = clip_skip(w, ckpt, (x - 400, y + 560))
    pos = w.add("CLIPTextEncode", (x, y), title="Positive prompt (keep the trigger words)", text=positive)
    neg = w.add("CLIPTextEncode", (x, y + 260), title="Negative prompt", text=NEGATIVE)
    for node in (pos, neg):
        w.connect(clip, node, "clip")
    return pos, neg


def sample_and_save(w: Workflow, ckpt: Node, model, positive, negative, x: float, y: float, prefix: str,
                    width: int = 1024, height: int = 1024) -> Node:
    latent = w.add("EmptyLatentImage", (x, y + 350), width=width, height=height, batch_size=1)
    sampler = w.add("KSampler", (x, y), seed=42, control_after_generate="randomize", steps=25, cfg=5.0,
                    sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    w.connect(model, sampler, "model")
    w.connect(positive, sampler, "positive")
    w.connect(negative, sampler, "negative")
    w.connect(latent.out("LATENT"), sampler, "latent_image")
    decode = w.add("VAEDecode", (x + 360, y))
    w.connect(sampler.out("LATENT"), decode, "samples")
    w.connect(ckpt.out("VAE"), decode, "vae")
    save = w.add("SaveImage", (x + 360, y + 130), size=(480, 560), filename_prefix=prefix)
    w.connect(decode.out("IMAGE"), save, "images")
    return sampler


def sample_with_lora(w: Workflow, ckpt: Node, lora, pos: Node, neg: Node, prefix: str) -> Node:
    """The stock LoraModelLoader puts ``lora`` (which holds its own strength: 1.0) on the checkpoint's MODEL, then
    sample_and_save to the right of it."""
    loaded = w.add("LoraModelLoader", (1680, 0), strength_model=1.0)
    w.connect(ckpt.out("MODEL"), loaded, "model")
    w.connect(lora, loaded, "lora")
    return sample_and_save(w, ckpt, loaded.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), 2060, 0,
                           prefix)


def checkpoint(w: Workflow, pos) -> Node:
    return w.add("CheckpointLoaderSimple", pos, title="Load Checkpoint (SDXL)", ckpt_name=CHECKPOINT)


def applied(w: Workflow, ckpt: Node, hyper: Node, ident: Node, pos) -> Node:
    apply = w.add("ApplyHyperLoRA", pos, id_strength=REFINE.id_strength, base_strength=0.0)
    w.connect(ckpt.out("MODEL"), apply, "model")
    w.connect(hyper.out("hyper_lora"), apply, "hyper_lora")
    w.connect(ident.out("identity"), apply, "identity")
    return apply


# -- the workflows ------------------------------------------------------------------------------------------------
def portrait() -> Workflow:
    w = Workflow("HyperLoRA portrait from one photo", "Portrait from one photo",
                 "One face photo -> an identity LoRA -> SDXL portraits of that person")
    w.note(note_text("One photo of a face -> an identity LoRA -> SDXL portraits of that person.", SDXL), (0, -340))
    hyper, _, ident = identity_chain(w, 0, 0)
    ckpt = checkpoint(w, (360, 460))
    apply = applied(w, ckpt, hyper, ident, (760, 0))
    pos, neg = prompts(w, ckpt, 760, 200)
    sample_and_save(w, ckpt, apply.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), 1220, 0,
                    "hyperlora/portrait")
    return w


def several_photos() -> Workflow:
    w = Workflow("HyperLoRA with several photos of one person", "Several photos of one person",
                 "Photos of one person averaged into one steadier identity")
    w.note(note_text("Several photos of ONE person, averaged into one identity (steadier than a single photo). "
                     "Upscale Image makes them one size (centre crop) so they can be batched; keep the face "
                     "inside the centre square. Add photos with more Load Image + Upscale Image + Batch Images.",
                     SDXL), (0, -340))
    hyper = hyper_lora_loader(w, (0, 0))
    scaled = []
    for i in range(3):
        photo = w.add("LoadImage", (0, 210 + 400 * i), title=f"Photo {i + 1}", image=f"face_{i + 1}.jpg",
                      upload="image")
        scale = w.add("ImageScale", (360, 210 + 400 * i), upscale_method="lanczos", width=1024, height=1024,
                      crop="center")
        w.connect(photo.out("IMAGE"), scale, "image")
        scaled.append(scale.out("IMAGE"))
    batch = scaled[0]
    for i, other in enumerate(scaled[1:]):
        node = w.add("ImageBatch", (720, 400 + 200 * i))
        w.connect(batch, node, "image1")
        w.connect(other, node, "image2")
        batch = node.out("IMAGE")
    ident = from_image(w, hyper, batch, (1080, 0))
    ckpt = checkpoint(w, (1080, 560))
    apply = applied(w, ckpt, hyper, ident, (1460, 0))
    pos, neg = prompts(w, ckpt, 1460, 200)
    sample_and_save(w, ckpt, apply.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), 1920, 0,
                    "hyperlora/several_photos")
    return w


def controlnet() -> Workflow:
    w = Workflow("HyperLoRA identity with a ControlNet pose", "Identity + ControlNet pose",
                 "The face from one photo, the pose from a second image")
    w.note(note_text("The identity with a ControlNet: the pose (or edges, depth) comes from the second image.",
                     SDXL, "- an SDXL ControlNet (openpose, canny or depth): models/controlnet/, with a matching "
                     "pose / edge / depth image in the Pose image node"), (0, -380), size=(420, 340))
    hyper, _, ident = identity_chain(w, 0, 0)
    ckpt = checkpoint(w, (360, 460))
    apply = applied(w, ckpt, hyper, ident, (760, 0))
    pos, neg = prompts(w, ckpt, 760, 200)
    cn = w.add("ControlNetLoader", (760, 760), control_net_name="controlnet-openpose-sdxl-1.0.safetensors")
    pose = w.add("LoadImage", (760, 900), title="Pose image (openpose / edges / depth)", image="pose.png",
                 upload="image")
    control = w.add("ControlNetApplyAdvanced", (1220, 200), strength=0.7, start_percent=0.0, end_percent=0.8)
    w.connect(pos.out("CONDITIONING"), control, "positive")
    w.connect(neg.out("CONDITIONING"), control, "negative")
    w.connect(cn.out("CONTROL_NET"), control, "control_net")
    w.connect(pose.out("IMAGE"), control, "image")
    w.connect(ckpt.out("VAE"), control, "vae")
    sample_and_save(w, ckpt, apply.out("MODEL"), control.out("positive"), control.out("negative"), 1640, 0,
                    "hyperlora/controlnet")
    return w


def concept_slider() -> Workflow:
    w = Workflow("HyperLoRA concept slider between two photos", "Concept slider between two photos",
                 "Slide from one photo's identity to another's (neutral to smiling)")
    w.note(note_text("A slider between two photos (e.g. the same person neutral / smiling, young / old). "
                     "strength +1 moves toward the end photo, -1 toward the start; try -2..2. weight mode: the "
                     "exact LoRA difference; coefficient mode: moves the identity itself.", SDXL), (0, -340))
    hyper = hyper_lora_loader(w, (0, 0))
    start = w.add("LoadImage", (0, 210), title="Start photo", image="start.jpg", upload="image")
    end = w.add("LoadImage", (0, 600), title="End photo", image="end.jpg", upload="image")
    ckpt = checkpoint(w, (0, 990))
    slider = w.add("ConceptSlider", (400, 210), mode="weight", strength=1.0)
    w.connect(hyper.out("hyper_lora"), slider, "hyper_lora")
    w.connect(start.out("IMAGE"), slider, "start_image")
    w.connect(end.out("IMAGE"), slider, "end_image")
    w.connect(ckpt.out("MODEL"), slider, "model")
    pos, neg = prompts(w, ckpt, 760, 200)
    sample_and_save(w, ckpt, slider.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), 1220, 0,
                    "hyperlora/slider")
    return w


def two_people() -> Workflow:
    w = Workflow("HyperLoRA two people in one picture", "Two people, one identity per half",
                 "Two identities as hooks on the left and right halves of one picture")
    width, height = 1216, 832
    w.note(note_text("Two people in one picture: each identity becomes HOOKS (HyperLoRA Identity Hook) that act "
                     "only on its own prompt, and Cond Set Props limits each prompt to one half of the image "
                     "(SolidMask + MaskComposite build the left and right masks; change x / width to move the "
                     "split). The model itself is not patched.", SDXL,
                     "Both regional prompts need the trigger words."), (0, -360), size=(420, 320))
    hyper = hyper_lora_loader(w, (0, 0))
    ckpt = checkpoint(w, (0, 990))
    clip = clip_skip(w, ckpt, (0, 1150))
    canvas = w.add("SolidMask", (1120, 700), title="Empty canvas", value=0.0, width=width, height=height)
    half = w.add("SolidMask", (1120, 860), title="Half", value=1.0, width=width // 2, height=height)
    combined = None
    for i, (side, x0) in enumerate((("left", 0), ("right", width // 2))):
        photo = w.add("LoadImage", (0, 210 + 390 * i), title=f"Person on the {side}", image=f"person_{side}.jpg",
                      upload="image")
        ident = from_image(w, hyper, photo.out("IMAGE"), (360, 210 + 560 * i))
        hook = w.add("HyperLoRAHook", (720, 210 + 560 * i), title=f"Identity hook ({side})", strength=0.85,
                     start_percent=0.0, end_percent=1.0)
        w.connect(hyper.out("hyper_lora"), hook, "hyper_lora")
        w.connect(ident.out("identity"), hook, "identity")
        mask = w.add("MaskComposite", (1120, 1020 + 190 * i), title=f"{side.capitalize()} half", x=x0, y=0,
                     operation="add")
        w.connect(canvas.out("MASK"), mask, "destination")
        w.connect(half.out("MASK"), mask, "source")
        text = w.add("CLIPTextEncode", (1120, 0 + 380 * i), title=f"Prompt for the {side} person",
                     text=f"{TRIGGER}, a photo of a person on the {side}, half-body, in a park")
        w.connect(clip, text, "clip")
        props = w.add("ConditioningSetProperties", (1580, 100 + 300 * i), title=f"Cond Set Props ({side})",
                      strength=1.0, set_cond_area="default")
        w.connect(text.out("CONDITIONING"), props, "cond_NEW")
        w.connect(mask.out("MASK"), props, "mask")
        w.connect(hook.out("hooks"), props, "hooks")
        if combined is None:
            combined = props.out("CONDITIONING")
        else:
            node = w.add("ConditioningCombine", (1960, 260))
            w.connect(combined, node, "conditioning_1")
            w.connect(props.out("CONDITIONING"), node, "conditioning_2")
            combined = node.out("CONDITIONING")
    neg = w.add("CLIPTextEncode", (1580, 720), title="Negative prompt", text=NEGATIVE)
    w.connect(clip, neg, "clip")
    sample_and_save(w, ckpt, ckpt.out("MODEL"), combined, neg.out("CONDITIONING"), 2300, 0, "hyperlora/two_people",
                    width, height)
    return w


def save_lora() -> Workflow:
    w = Workflow("HyperLoRA save the LoRA for other tools", "Save the LoRA and the identity",
                 "The identity as a LoRA file (A1111, Forge, kohya) and an identity file")
    w.note(note_text("Save the identity as a normal LoRA file (models/loras/hyperlora/, kohya keys: ComfyUI's Load "
                     "LoRA, A1111/Forge and kohya load it; use it with the trigger words at weight 0.75-0.85) and "
                     "as a small identity file (models/hyper_lora/identities/, for Load HyperLoRA Identity). "
                     "No SDXL checkpoint is needed here."), (0, -340))
    hyper, _, ident = identity_chain(w, 0, 0)
    lora = w.add("SaveHyperLoRA", (760, 0), filename_prefix="hyperlora/my_identity")
    w.connect(hyper.out("hyper_lora"), lora, "hyper_lora")
    w.connect(ident.out("identity"), lora, "identity")
    saved = w.add("SaveHyperLoRAIdentity", (760, 160), filename_prefix="my_identity", storage="fp16")
    w.connect(ident.out("identity"), saved, "identity")
    return w


def refine_chain(w: Workflow, mode: str):
    """Photo -> identity -> HyperLoRA Refine in ``mode`` (with its loss preview); returns ckpt, pos, neg, refine."""
    hyper, photo, ident = identity_chain(w, 0, 0)
    ckpt = checkpoint(w, (360, 460))
    pos, neg = prompts(w, ckpt, 760, 300)
    refined = w.add("HyperLoRARefine", (1220, 0), mode=mode, steps=REFINE.steps, lr=REFINE.lr,
                    rank=REFINE.rank, seed=REFINE.seed, control_after_generate="fixed", batch_size=REFINE.batch,
                    resolution=REFINE.resolution, precision="auto", gradient_checkpointing=True,
                    id_strength=REFINE.id_strength, lidb_a=REFINE.lidb_a, lidb_b=REFINE.lidb_b)
    for source, name in ((ckpt.out("MODEL"), "model"), (ckpt.out("VAE"), "vae"), (pos.out("CONDITIONING"), "positive"),
                         (hyper.out("hyper_lora"), "hyper_lora"), (ident.out("identity"), "identity"),
                         (photo.out("IMAGE"), "image")):
        w.connect(source, refined, name)
    curve = w.add("PreviewImage", (1220, 420), title="Training loss", size=(420, 260))
    w.connect(refined.out("loss_curve"), curve, "images")
    return ckpt, pos, neg, refined


def refine() -> Workflow:
    w = Workflow("HyperLoRA refine the identity by fine-tuning", "Refine the identity (fast fine-tuning)",
                 "About 50 fine-tuning steps from the prediction, for a closer likeness")
    w.note(note_text("About 50 fine-tuning steps on the photo, starting from the HyperLoRA prediction "
                     "(HyperDreamBooth-style): a closer likeness than the zero-shot identity. The photo, flipped and "
                     "slightly cropped, is the training target; the positive prompt is the training prompt. It is "
                     "meant for a GPU: SDXL training on a CPU is very slow.", SDXL,
                     "The refined LoRA already contains id_strength: load it at 1.0. It is saved under "
                     "output/loras/hyperlora/ (Save LoRA Weights); move it to models/loras/ to use it with the "
                     "stock Load LoRA."), (0, -340))
    ckpt, pos, neg, refined = refine_chain(w, REFINE.mode)
    saved = w.add("SaveLoRANode", (1220, 740), prefix="loras/hyperlora/refined")
    w.connect(refined.out("lora"), saved, "lora")
    sample_with_lora(w, ckpt, refined.out("lora"), pos, neg, "hyperlora/refined")
    return w


def lidb() -> Workflow:
    w = Workflow("HyperLoRA LiDB personalisation", "A LiDB personalisation (~90-170 KB)",
                 "HyperDreamBooth's compact weights, trained on top of the prediction and saved to models/lidb")
    w.note(note_text("Fine-tuning in LiDB space (HyperDreamBooth's Lightweight DreamBooth): 150 numbers per layer "
                     "(a = 100, b = 50), trained on top of the HyperLoRA prediction. Save LiDB keeps them in "
                     "models/lidb/ (fp16 ~171 KB, int8 ~89 KB); Load LiDB gives them back as a LoRA. Without "
                     "hyper_lora and identity, HyperLoRA Refine trains a LiDB from zero. It is meant for a GPU.",
                     SDXL, "The refined LoRA contains the prediction at id_strength and the LiDB: load it at 1.0. "
                     "The saved LiDB holds only what was added to the prediction."), (0, -340))
    ckpt, pos, neg, refined = refine_chain(w, "lidb")
    saved = w.add("SaveLiDB", (1220, 740), filename_prefix="lidb/my_identity", storage="fp16")
    w.connect(refined.out("lidb"), saved, "lidb")
    sample_with_lora(w, ckpt, refined.out("lora"), pos, neg, "hyperlora/lidb")
    return w


def hyperdreambooth() -> Workflow:
    w = Workflow("HyperLoRA HyperDreamBooth identity from one photo", "A LiDB predicted from one photo (~120 KB)",
                 "Your own HyperDreamBooth network: photo -> LiDB -> LoRA at 1.0, saved to models/lidb")
    w.note("\n".join([
        "HyperDreamBooth: a hypernetwork predicts the person's LiDB (a + b numbers per layer) from one photo; its "
        "rank-1 LoRA is loaded at 1.0. No released HyperDreamBooth weights exist: train and export your own "
        "(README, HyperDreamBooth) into models/hyperdreambooth/my_hdb.safetensors.", "",
        "Models (download them, put them here, then press R to refresh the lists):",
        f"- {ANTELOPEV2.line()}", SDXL, "",
        f"The prompt should contain the words the network was trained with (here {TRIGGER}). Save LiDB keeps the "
        "prediction in models/lidb/; HyperLoRA Refine's lidb input can fine-tune it further."]), (0, -340))
    hdb = w.add("LoadHyperDreamBooth", (0, 0), hdb="my_hdb.safetensors")
    photo = w.add("LoadImage", (0, 120), title="Photo of the person", image="face.jpg", upload="image")
    predicted = w.add("HyperDreamBoothFromImage", (360, 0), face_analyzer=ANALYZER, provider="auto",
                      remove_background=True, face_index=-1, on_failure="error")
    w.connect(hdb.out("hdb"), predicted, "hdb")
    w.connect(photo.out("IMAGE"), predicted, "image")
    crops = w.add("PreviewImage", (360, 300), title="Face crop", size=(320, 300))
    w.connect(predicted.out("face_crops"), crops, "images")
    saved = w.add("SaveLiDB", (360, 640), filename_prefix="lidb/my_identity", storage="fp16")
    w.connect(predicted.out("lidb"), saved, "lidb")
    ckpt = checkpoint(w, (760, 300))
    pos, neg = prompts(w, ckpt, 1220, 0)
    sample_with_lora(w, ckpt, predicted.out("lora"), pos, neg, "hyperlora/hyperdreambooth")
    return w


WORKFLOWS = (portrait, several_photos, controlnet, concept_slider, two_people, save_lora, refine, lidb,
             hyperdreambooth)


# -- thumbnails ---------------------------------------------------------------------------------------------------
LINK_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
               "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784", "CONTROL_NET": "#00d78d",
               "HYPER_LORA": "#e57373", "HYPER_LORA_IDENTITY": "#4dd0e1", "HOOKS": "#aed581", "LIDB": "#f06292",
               "HYPER_DREAMBOOTH": "#ba68c8"}


def thumbnail(w: Workflow, path: Path, size=(512, 384)) -> None:
    """A drawn overview of the graph: nodes as boxes (ours in violet, notes in brown), links coloured by type."""
    from PIL import Image, ImageDraw, ImageFont

    boxes = {n.id: (n.pos[0], n.pos[1], *w._size(n)) for n in w.nodes}
    x0 = min(b[0] for b in boxes.values())
    y0 = min(b[1] for b in boxes.values())
    x1 = max(b[0] + b[2] for b in boxes.values())
    y1 = max(b[1] + b[3] for b in boxes.values())
    top, pad = 62, 10
    scale = min((size[0] - 2 * pad) / (x1 - x0), (size[1] - top - pad) / (y1 - y0))

    def at(x, y):
        return pad + (x - x0) * scale, top + (y - y0) * scale

    image = Image.new("RGB", size, "#202020")
    draw = ImageDraw.Draw(image)
    try:
        font, caption, small = ImageFont.load_default(18), ImageFont.load_default(13), ImageFont.load_default(9)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = caption = small = ImageFont.load_default()
    draw.text((pad, 8), f"HyperLoRA: {w.title}", fill="#f0f0f0", font=font)
    draw.text((pad, 34), w.description, fill="#c8c8c8", font=caption)
    for _, src, slot, dst, dslot, kind in w.links:
        sx, sy, sw, _ = boxes[src]
        dx, dy, _, _ = boxes[dst]
        draw.line([at(sx + sw, sy + 40 + 22 * slot), at(dx, dy + 40 + 22 * dslot)], fill=LINK_COLORS.get(kind,
                  "#999999"), width=2)
    for node in w.nodes:
        x, y, bw, bh = boxes[node.id]
        fill = "#653" if node.type == "Note" else "#4a3a6b" if node.type in OURS else "#353535"
        draw.rounded_rectangle([at(x, y), at(x + bw, y + bh)], radius=3, fill=fill, outline="#777777")
        label = node.title or node.spec.title
        draw.text(at(x + 8, y + 6), label[:int(bw * scale / 5)], fill="#eeeeee", font=small)
    image.save(path, "JPEG", quality=80, optimize=True)


def build(out: Path = OUT) -> list[Path]:
    """Write every workflow's UI json, thumbnail and API twin; returns the UI files."""
    (out / "api").mkdir(parents=True, exist_ok=True)
    written = []
    for make in WORKFLOWS:
        w = make()
        ui = out / f"{w.name}.json"
        ui.write_text(json.dumps(w.ui(), indent=2) + "\n")
        (out / "api" / f"{w.name}.json").write_text(json.dumps(w.api(), indent=2) + "\n")
        thumbnail(w, out / f"{w.name}.jpg")
        written.append(ui)
    return written


if __name__ == "__main__":
    build()
