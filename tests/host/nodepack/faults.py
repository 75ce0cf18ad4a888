"""Test-only nodes that make bad inputs for the host tier: broken images, foreign models, a CLIP Vision of the
wrong size, a user's Cancel at a chosen moment, and a busy queue.

Every model is built from ComfyUI's own classes at tiny widths, with seeded random weights where they are read.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from . import tiny
from .base import CATEGORY, AlwaysRunsOutput, SeededBuilder

IMAGE_KINDS = ("empty_batch", "one_pixel", "huge", "nan", "inf")
HUGE_SIDE = 20000
# Flux (comfy.ldm.flux) at width 64: one double and one single block, rope axes summing to the head width
TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
             "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
             "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
             "guidance_embed": False}
# SD3 (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT) at depth 1 (width 64 per depth), context 64
TINY_SD3 = {"in_channels": 16, "patch_size": 2, "depth": 1, "pos_embed_max_size": 16, "num_patches": 256,
            "adm_in_channels": 32, "pos_embed_scaling_factor": None, "out_channels": 16,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64,
                                                                                 "out_features": 64}}}
VIT_WIDTHS = {"ViT-H/14": (1280, 16), "ViT-bigG/14": (1664, 16), "ViT-L/14": (1024, 16)}  # width, heads


def bad_image(kind: str):
    """An IMAGE [b, h, w, 3] that is no usable photo; 'huge' is a zero-stride view (no 4.8 GB behind it)."""
    import torch

    if kind == "empty_batch":
        return torch.zeros(0, 64, 64, 3)
    if kind == "one_pixel":
        return torch.full((1, 1, 1, 3), 0.5)
    if kind == "huge":
        return torch.full((1, 1, 1, 3), 0.5).expand(1, HUGE_SIDE, HUGE_SIDE, 3)
    image = tiny.face_photo(0, True, side=320)
    image[0, 100:110, 100:110, :] = float("nan") if kind == "nan" else float("inf")
    return image


def tiny_flux(seed: int = 0):
    import comfy.supported_models

    model = comfy.supported_models.Flux(dict(TINY_FLUX)).get_model({})
    tiny.randomise(model, seed)
    return tiny._patcher(model)


def tiny_sd3(seed: int = 0):
    import comfy.supported_models

    model = comfy.supported_models.SD3(dict(TINY_SD3)).get_model({})
    tiny.randomise(model, seed)
    return tiny._patcher(model)


def clip_vision(kind: str):
    """comfy.clip_vision.ClipVisionModel with ``kind``'s width and patch at one layer (weights never read)."""
    import comfy.clip_vision

    width, heads = VIT_WIDTHS[kind]
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": width,
              "image_size": 224, "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
              "num_attention_heads": heads, "num_channels": 3, "num_hidden_layers": 1, "patch_size": 14,
              "projection_dim": 32}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))
        return comfy.clip_vision.ClipVisionModel(str(path))


def cancel_when(target: str, after: int = 1) -> None:
    """Press Cancel once node ``target`` of the running prompt reports progress ``after``: the flag is set exactly
    as POST /interrupt sets it, from inside that node's own progress update, so the moment is never a race."""
    import comfy.model_management as mm
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    original = comfy.utils.PROGRESS_BAR_HOOK
    armed_in = get_executing_context().prompt_id

    def hook(value, total, preview, prompt_id=None, node_id=None):
        context = get_executing_context()
        if context is None or context.prompt_id != armed_in:  # never fired: disarm for later prompts
            comfy.utils.set_progress_bar_global_hook(original)
        elif context.node_id == target and value >= after:
            comfy.utils.set_progress_bar_global_hook(original)
            mm.interrupt_current_processing(True)
        return original(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    comfy.utils.set_progress_bar_global_hook(hook)


class HLTestBadImage:
    """An IMAGE that is no usable photo: an empty batch, 1x1, 20000x20000, or with NaN / inf pixels."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(IMAGE_KINDS), {"tooltip": "which bad image"})}}

    def build(self, kind):
        return (bad_image(kind),)


class HLTestTinyFlux(SeededBuilder):
    """Flux (comfy.supported_models.Flux) at width 64: not an SDXL UNet at all."""

    RETURN_TYPES = ("MODEL",)
    make = staticmethod(tiny_flux)


class HLTestTinySD3(SeededBuilder):
    """SD3 (comfy.supported_models.SD3, MMDiT) at depth 1."""

    RETURN_TYPES = ("MODEL",)
    make = staticmethod(tiny_sd3)


class HLTestClipVision:
    """A CLIP_VISION of a given architecture's width (ViT-H, ViT-bigG, ViT-L), one layer."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(VIT_WIDTHS), {"tooltip": "architecture whose width to copy"})}}

    def build(self, kind):
        return (clip_vision(kind),)


class HLTestCancelAt:
    """Pass a MODEL and an IMAGE through, and press Cancel when ``node`` reports progress ``after``."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IMAGE")
    FUNCTION = "arm"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"node": ("STRING", {"default": "", "tooltip": "node id to cancel"}),
                             "after": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "progress value"})},
                "optional": {"model": ("MODEL", {"tooltip": "passed through"}),
                             "image": ("IMAGE", {"tooltip": "passed through"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def arm(self, node, after, model=None, image=None):
        cancel_when(node, after)
        return (model, image)


class HLTestSleep(AlwaysRunsOutput):
    """Keep the queue busy for ``seconds`` (an output node that always runs)."""

    FUNCTION = "sleep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 60.0, "tooltip": "seconds"})}}

    def sleep(self, seconds):
        time.sleep(seconds)
        return {}


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    HLTestBadImage, HLTestTinyFlux, HLTestTinySD3, HLTestClipVision, HLTestCancelAt, HLTestSleep)}
