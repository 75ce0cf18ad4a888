"""Tiny models of every family HyperLoRA is tested on, built from ComfyUI's own classes at real block counts.

Each family's real topology (number of blocks and their kinds) at widths of 32-128, so that a target-layer
description read from the tiny model has the real model's number of linears. ``expected_linears`` counts them from
the config alone (blocks x projections), independently of the scanning code.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tiny

# Flux.1 (comfy.ldm.flux): 19 double-stream and 38 single-stream blocks, as in flux1-dev, at width 64
TINY_FLUX_REAL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
                  "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 19,
                  "depth_single_blocks": 38, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
                  "guidance_embed": True}
# Qwen-Image (comfy.ldm.qwen_image): its 60 dual-stream blocks, at 2 heads of 32 (width 64), context 64
TINY_QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2,
                   "num_layers": 60, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
                   "axes_dims_rope": (8, 12, 12)}


@dataclass(frozen=True)
class Family:
    """A tested model family: how to build it tiny, and its linears counted from the config."""

    name: str  # ComfyUI's model_config class name, which the description reports as the family
    build: object  # seed -> ModelPatcher
    attention: int  # attention projections: the default targets
    feed_forward: int  # feed-forward linears added by the opt-in


def _unet_blocks(config: dict) -> int:
    """Transformer blocks of an SGM UNet config: input + middle + output depths."""
    return sum(config["transformer_depth"]) + config["transformer_depth_middle"] + sum(
        config["transformer_depth_output"])


def tiny_flux_real(seed: int = 0):
    """A ModelPatcher around Flux (comfy.supported_models.Flux) with Flux.1's 19 + 38 blocks at width 64."""
    import comfy.supported_models

    model = comfy.supported_models.Flux(dict(TINY_FLUX_REAL)).get_model({})
    tiny.randomise(model, seed)
    return tiny._patcher(model)


def tiny_qwen_image(seed: int = 0):
    """A ModelPatcher around Qwen-Image (comfy.supported_models.QwenImage): 60 blocks at width 64."""
    import comfy.supported_models

    model = comfy.supported_models.QwenImage(dict(TINY_QWEN_IMAGE)).get_model({})
    tiny.randomise(model, seed)
    return tiny._patcher(model)


def _families() -> dict[str, Family]:
    sd15, sdxl = _unet_blocks(tiny.TINY_SD15_CONFIG), _unet_blocks(tiny.TINY_SDXL_CONFIG)
    flux_double, flux_single = TINY_FLUX_REAL["depth"], TINY_FLUX_REAL["depth_single_blocks"]
    qwen = TINY_QWEN_IMAGE["num_layers"]
    return {f.name: f for f in (
        # UNet block: attn1 + attn2, each to_q/k/v/out.0; feed-forward ff.net.0.proj + ff.net.2
        Family("SD15", tiny.tiny_sd15, attention=sd15 * 2 * 4, feed_forward=sd15 * 2),
        Family("SDXL", tiny.tiny_sdxl, attention=sdxl * 2 * 4, feed_forward=sdxl * 2),
        # double block: img_attn + txt_attn, each qkv + proj; single block: linear1 + linear2 (fused);
        # feed-forward: img_mlp + txt_mlp, 2 linears each
        Family("Flux", tiny_flux_real, attention=flux_double * 2 * 2 + flux_single * 2,
               feed_forward=flux_double * 2 * 2),
        # block: to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out; feed-forward img_mlp + txt_mlp, 2 linears each
        Family("QwenImage", tiny_qwen_image, attention=qwen * 8, feed_forward=qwen * 2 * 2),
    )}


FAMILIES = _families()


class HLTestTinyFamily:
    """A MODEL of one tested family (SD1.5, SDXL, Flux, Qwen-Image) at its real block count, tiny widths."""

    CATEGORY = "hyperlora_test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES), {"tooltip": "ComfyUI's model_config class name"}),
                             "seed": tiny_seed()}}

    def build(self, family, seed):
        return (FAMILIES[family].build(seed),)


def tiny_seed():
    return ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "seed of the random weights"})


NODE_CLASS_MAPPINGS = {"HLTestTinyFamily": HLTestTinyFamily}
