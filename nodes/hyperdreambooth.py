"""Load HyperDreamBooth and HyperDreamBooth Identity from Image: one face photo -> a LiDB and its LoRA.

The network is small (the heads and a ViT encoder); Load HyperDreamBooth checks the file's headers and reads it on
the CPU with a progress bar. For a prediction it goes to the compute device in a ModelPatcher (ComfyUI counts and
offloads it like any model) and back through model management's offload path afterwards. The face crop is the
core's own (``crops.clip_crop``, as HyperLoRA Face makes it), and a photo without a usable face is refused with the
same error HyperLoRA Face gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
from comfy_api.latest import io

from ..hyperlora_core.hdb.checkpoint import load_hdb, predict_lidb
from ..hyperlora_core.hdb.network import HyperDreamBooth
from ..hyperlora_core.pipeline import ON_FAILURE, usable_faces
from . import folders
from .handle import offload
from .identity import previews
from .lidb import lidb_lora
from .types import CATEGORY, HdbType, LidbType

log = logging.getLogger(__name__)
_ANALYZERS: dict[tuple[str, str], object] = {}  # (antelopev2 folder, provider) -> FaceAnalyzer, built once


@dataclass
class HdbHandle:
    """What flows along an HDB wire: the network (on the CPU), its LiDB aux seed and its ModelPatcher."""

    net: HyperDreamBooth
    seed: int
    path: Path
    patcher: comfy.model_patcher.ModelPatcher

    def __repr__(self) -> str:
        return f"HyperDreamBooth({self.path.name}, {len(self.net.targets.linears)} linears, seed {self.seed})"


def analyzer_for(name: str, provider: str):
    """The FaceAnalyzer of an antelopev2 folder, built on first use (onnxruntime sessions take a moment)."""
    from ..hyperlora_core.face import FaceAnalyzer

    folder = folders.face_analyzer_path(name)
    key = (str(folder), provider)
    if key not in _ANALYZERS:
        _ANALYZERS[key] = FaceAnalyzer(folder, providers=provider)
    return _ANALYZERS[key]


def face_crops(faces, image, *, remove_background: bool, face_index: int | None, on_failure: str, bar) -> list:
    """The CLIP crops of the usable photos of an IMAGE batch, found and refused as HyperLoRA Face does it."""
    from ..hyperlora_core.crops import clip_crop

    found = usable_faces(image, lambda rgb, i: faces.analyze(rgb, index=i, face_index=face_index, embed=False),
                         on_failure, progress=lambda done, total: bar.update_absolute(done))
    for line in found.reports:  # one line per photo: what was found
        log.info("HyperDreamBooth Identity: %s", line)
    return [clip_crop(rgb, result.face.landmark_106, remove_background=remove_background, grayscale=False)
            for _, rgb, result in found.faces]


class LoadHyperDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadHyperDreamBooth",
            display_name="Load HyperDreamBooth",
            category=CATEGORY,
            description="Loads a HyperDreamBooth hypernetwork (python -m hyperlora_core.train export writes one) "
                        "from models/hyperdreambooth. Its headers are checked first; no released weights exist, so "
                        "train your own (README, HyperDreamBooth).",
            inputs=[io.Combo.Input("hdb", options=folders.hdbs(),
                                   tooltip="A HyperDreamBooth .safetensors file in models/hyperdreambooth.")],
            outputs=[HdbType.Output(display_name="hdb", tooltip="The hypernetwork, for HyperDreamBooth Identity "
                                                                "from Image.")],
        )

    @classmethod
    def validate_inputs(cls, hdb) -> bool | str:
        return folders.check_hdb(hdb)

    @classmethod
    def execute(cls, hdb) -> io.NodeOutput:
        path = folders.hdb_path(hdb)
        bar = comfy.utils.ProgressBar(2)
        bar.update_absolute(1)
        net, seed = load_hdb(path, device="cpu")  # every key and shape is checked before any weight is read
        bar.update_absolute(2)
        patcher = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        return io.NodeOutput(HdbHandle(net, seed, path, patcher))


class HyperDreamBoothFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperDreamBoothFromImage",
            display_name="HyperDreamBooth Identity from Image",
            category=CATEGORY,
            description="Predicts a person's LiDB (HyperDreamBooth's ~120 KB personalisation) from face photos: "
                        "finds the face in each photo, crops it as HyperLoRA Face does, and averages the "
                        "predictions. Save it with Save LiDB, apply its LoRA at 1.0, or refine it with HyperLoRA "
                        "Refine.",
            inputs=[
                HdbType.Input("hdb", tooltip="From Load HyperDreamBooth."),
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person (averaged)."),
                io.Combo.Input("face_analyzer", options=folders.face_analyzers(),
                               tooltip="insightface antelopev2 folder in models/insightface (usually "
                                       "models/antelopev2), as in the HyperLoRA node."),
                io.Combo.Input("provider", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="Where face analysis runs (onnxruntime). auto: CUDA when available."),
                io.Boolean.Input("remove_background", default=True,
                                 tooltip="Grey out everything but the face below the eyebrows, as HyperLoRA Face "
                                         "does (the crop the training data used)."),
                io.Int.Input("face_index", default=-1, min=-1, max=64,
                             tooltip="Several faces in a photo: -1 takes the largest; 0, 1, ... the k-th counted "
                                     "from the left."),
                io.Combo.Input("on_failure", options=list(ON_FAILURE), default="error",
                               tooltip="A photo without a usable face: stop with an error naming it, or leave it "
                                       "out (the others are used)."),
            ],
            outputs=[
                LidbType.Output(display_name="lidb", tooltip="The predicted LiDB: for Save LiDB, or HyperLoRA "
                                                             "Refine's lidb input."),
                io.LoraModel.Output(display_name="lora", tooltip="Its rank-1 LoRA (ComfyUI keys): load it at 1.0 "
                                                                 "with Load LoRA Model."),
                io.Image.Output(display_name="face_crops", tooltip="The crops the network saw, one per used photo."),
            ],
        )

    @classmethod
    def validate_inputs(cls, face_analyzer) -> bool | str:
        return folders.check_face_analyzer(face_analyzer)

    @classmethod
    def execute(cls, hdb, image, face_analyzer, provider, remove_background, face_index,
                on_failure) -> io.NodeOutput:
        from ..hyperlora_core.clip import preprocess

        bar = comfy.utils.ProgressBar(len(image) + 1)
        faces = analyzer_for(face_analyzer, provider)
        crops = face_crops(faces, image, remove_background=remove_background,
                           face_index=None if face_index < 0 else face_index, on_failure=on_failure, bar=bar)
        mm.load_models_gpu([hdb.patcher])
        try:
            lidb = predict_lidb(hdb.net, preprocess(crops, size=hdb.net.image_size), seed=hdb.seed)
        finally:
            offload(hdb.patcher)
        bar.update_absolute(len(image) + 1)
        return io.NodeOutput(lidb, lidb_lora(lidb), previews(crops))
