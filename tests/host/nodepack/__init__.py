"""A test-only ComfyUI node pack (V1 API): tiny models from ComfyUI's own classes and synthetic face photos.

The host tier links this folder into a throw-away ``custom_nodes/`` beside the real package; it is never shipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2])  # tests/, for face_doubles
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from . import tiny  # noqa: E402

SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "seed of the random weights / pixels"})


class HLTestTinySDXL:
    """SDXL (140 attention modules, SDXL names) at model_channels 32: attention widths 64/128, context 64."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED,
                             "model_channels": ("INT", {"default": 32, "min": 32, "max": 64, "step": 32,
                                                        "tooltip": "32 fits the tiny HyperLoRA; others differ"})}}

    def build(self, seed, model_channels):
        return (tiny.tiny_sdxl(seed, model_channels),)


class HLTestTinySD15:
    """SD1.5 (comfy.supported_models.SD15) at tiny widths, context 64: the wrong base model for an SDXL LoRA."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def build(self, seed):
        return (tiny.tiny_sd15(seed),)


class HLTestTinyCLIP:
    """SDXL's text encoders (clip_l + clip_g, real tokenizers) at width 32: context [1, 77, 64], pooled [1, 32]."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def build(self, seed):
        return (tiny.tiny_clip(seed),)


class HLTestTinyVAE:
    """A TAESD-shaped VAE with random weights, loaded by comfy.sd.VAE as the stock VAELoader would."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def build(self, seed):
        return (tiny.tiny_vae(seed),)


class HLTestFaceImage:
    """A 640x640 dark photo with a painted face the antelopev2 doubles detect (or none, with face=False)."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED, "face": ("BOOLEAN", {"default": True, "tooltip": "paint a face"})}}

    def build(self, seed, face):
        return (tiny.face_photo(seed, face),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (HLTestTinySDXL, HLTestTinySD15, HLTestTinyCLIP, HLTestTinyVAE,
                                                     HLTestFaceImage)}
