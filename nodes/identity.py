"""HyperLoRAFromImage: reference photos of one person -> an identity, with face-crop previews."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy.utils import ProgressBar
from comfy_api.latest import io

from ..hyperlora_core.crops import BaseCrop
from ..hyperlora_core.pipeline import CropOptions
from .types import CATEGORY, HyperLoRAType, IdentityType

log = logging.getLogger(__name__)
PREVIEW = 224


def previews(crops: list[np.ndarray]) -> torch.Tensor:
    """Square uint8 crops -> an IMAGE batch [b, 224, 224, 3] in [0, 1]."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(c).resize((PREVIEW, PREVIEW), Image.Resampling.BICUBIC)) for c in crops]
    return torch.from_numpy(np.stack(out)).float() / 255.0


class HyperLoRAFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperLoRAFromImage",
            display_name="HyperLoRA Face",  # search "face" and "hyperlora": near the top
            category=CATEGORY,
            description="Identity from face photos: finds the face in each photo and predicts one identity from all "
                        "of them (averaged).",
            inputs=[
                HyperLoRAType.Input("hyper_lora", tooltip="From the HyperLoRA node (the loader)."),
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person (averaged)."),
                io.Boolean.Input("remove_background", default=True,
                                 tooltip="Grey out everything but the face below the eyebrows before CLIP sees it, "
                                         "as the released checkpoints were trained (recommended)."),
                io.Boolean.Input("grayscale", default=False, tooltip="Give CLIP a grey face crop."),
                io.Int.Input("face_index", default=-1, min=-1, max=64,
                             tooltip="Several faces in a photo: -1 takes the largest; 0, 1, ... the k-th counted "
                                     "from the left. The official nodes take the detector's first (most confident) "
                                     "face; use face_index to pick another. One face: all agree."),
                io.Combo.Input("on_failure", options=["error", "skip"], default="error",
                               tooltip="A photo without a usable face: stop with an error naming it, or leave it "
                                       "out (the others are used)."),
                io.Boolean.Input("crop", default=True,
                                 tooltip="Base-LoRA only (checkpoints with base_resampler.safetensors): cut the "
                                         "face-blurred photo around the face (crop_scale_LRTB); off: the whole "
                                         "photo."),
                io.String.Input("crop_scale_LRTB", default="1,1,1,1",
                                tooltip="Base-LoRA only: the cut's left, right, top and bottom extent, in half-sides "
                                        "of the face square (the official nodes' default 1,1,1,1)."),
                io.Boolean.Input("safe_crop", default=True,
                                 tooltip="Base-LoRA only: keep the cut inside the photo (no black margins)."),
            ],
            outputs=[IdentityType.Output(display_name="identity", tooltip="The person's identity."),
                     io.Image.Output(display_name="face_crops", tooltip="What CLIP saw, one crop per used photo.")],
        )

    @classmethod
    def execute(cls, hyper_lora, image, remove_background, grayscale, face_index, on_failure, crop=True,
                crop_scale_LRTB="1,1,1,1", safe_crop=True) -> io.NodeOutput:  # noqa: N803 - the authors' input name
        images = [img.cpu().numpy() for img in image]  # IMAGE: [b, h, w, c] float in [0, 1]
        bar = ProgressBar(len(images) + 1)
        options = CropOptions(remove_background=remove_background, grayscale=grayscale,
                              face_index=None if face_index < 0 else face_index,
                              base=BaseCrop.parse(crop, crop_scale_LRTB, safe_crop))
        identity, conditions = hyper_lora.pipeline.identity(
            images, options, on_failure, progress=lambda done, total: bar.update_absolute(done),
            before_predict=hyper_lora.load_networks)
        bar.update_absolute(len(images) + 1)
        for line in conditions.reports:  # one line per photo: what was found, and where we left the official path
            log.info("HyperLoRA Face: %s", line)
        return io.NodeOutput(identity, previews(conditions.previews))
