"""Tiny models of every family HyperLoRA is tested on, built from ComfyUI's own classes.

SD1.5, SDXL, Flux and Qwen-Image have their real topology (number of blocks and their kinds) at widths of 32-128,
so that a target-layer description read from the tiny model has the real model's number of linears; SD3 (MMDiT,
whose width is tied to its depth) has 2 joint blocks. ``expected_linears`` counts them from
the config alone (blocks x projections), independently of the scanning code.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tiny
from .base import CATEGORY, SEED, AlwaysRunsOutput, save_output

# Flux.1 (comfy.ldm.flux): 19 double-stream and 38 single-stream blocks, as in flux1-dev, at width 64
TINY_FLUX_REAL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
                  "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 19,
                  "depth_single_blocks": 38, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
                  "guidance_embed": True}
# Qwen-Image (comfy.ldm.qwen_image): its 60 dual-stream blocks, at 2 heads of 32 (width 64), context 64
TINY_QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2,
                   "num_layers": 60, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
                   "axes_dims_rope": (8, 12, 12)}
# SD3 (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT): width is 64 x depth there, so the real 24 blocks cannot be
# tiny; 2 joint blocks (the last context block pre-only, without output projection or MLP), context 64
TINY_SD3_2 = {"in_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_max_size": 16, "num_patches": 256,
              "adm_in_channels": 32, "pos_embed_scaling_factor": None, "out_channels": 16,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64,
                                                                                   "out_features": 128}}}


@dataclass(frozen=True)
class Family:
    """A tested model family: how to build it tiny, and its linears counted from the config."""

    name: str  # ComfyUI's model_config class name, which the description reports as the family
    build: object  # seed -> ModelPatcher
    attention: int  # attention projections: the default targets
    feed_forward: int  # feed-forward linears added by the opt-in
    context: int  # width of the text conditioning (c_crossattn) the model reads
    pooled: int | None  # width of its pooled / size conditioning (y), None if it reads none


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


def tiny_sd3(seed: int = 0):
    """A ModelPatcher around SD3 (comfy.supported_models.SD3): 2 joint blocks at width 128."""
    import comfy.supported_models
    import torch

    model = comfy.supported_models.SD3(dict(TINY_SD3_2)).get_model({})
    tiny.randomise(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # pos_embed is a buffer from torch.empty (a checkpoint fills it): may hold NaN
        pos = model.diffusion_model.pos_embed
        pos.copy_(torch.randn(pos.shape, generator=g) * 0.02)
    return tiny._patcher(model)


# Linears per family counted from a config alone (blocks x projections): (attention, feed-forward).
def unet_counts(config: dict) -> tuple[int, int]:
    """UNet transformer block: attn1 + attn2, each to_q/k/v/out.0; feed-forward ff.net.0.proj + ff.net.2."""
    blocks = _unet_blocks(config)
    return blocks * 2 * 4, blocks * 2


def flux_counts(config: dict) -> tuple[int, int]:
    """Double block: img_attn + txt_attn, each qkv + proj; single block: linear1 + linear2 (fused with the MLP);
    feed-forward: img_mlp + txt_mlp of the double blocks, 2 linears each."""
    return config["depth"] * 2 * 2 + config["depth_single_blocks"] * 2, config["depth"] * 2 * 2


def qwen_image_counts(config: dict) -> tuple[int, int]:
    """Block: to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out; feed-forward img_mlp + txt_mlp, 2 linears each."""
    layers = config.get("num_layers", 60)
    return layers * 8, layers * 2 * 2


def sd3_counts(config: dict) -> tuple[int, int]:
    """Joint block: context and x attention, each qkv + proj, but the last context block (pre-only) has no proj;
    feed-forward: mlp.fc1 + fc2 of every block but that pre-only one."""
    depth = config["depth"]
    return depth * 2 * 2 - 1, (depth * 2 - 1) * 2


COUNTS = {"SD15": unet_counts, "SDXL": unet_counts, "Flux": flux_counts, "QwenImage": qwen_image_counts,
          "SD3": sd3_counts}
# The released models' configs as ComfyUI's model detection gives them (for counts at real size, meta device)
REAL_CONFIGS = {
    "SD15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "SDXL": dict(tiny.TINY_SDXL_CONFIG, model_channels=320, context_dim=2048, adm_in_channels=2816,
                 num_head_channels=64),
    "Flux": dict(TINY_FLUX_REAL, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24,
                 axes_dim=[16, 56, 56]),
    "QwenImage": {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
    "SD3": {"in_channels": 16, "patch_size": 2, "depth": 24, "pos_embed_max_size": 192, "num_patches": 36864,
            "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "out_channels": 16,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 1536}}},
}


def real_size_on_meta(name: str):
    """ComfyUI's BaseModel of ``name`` at its released size, on the meta device (no memory, no weights)."""
    import comfy.supported_models
    import torch

    with torch.device("meta"):
        return getattr(comfy.supported_models, name)(dict(REAL_CONFIGS[name])).get_model({})


def _family(name: str, build, config: dict, context: int, pooled: int | None) -> Family:
    attention, feed_forward = COUNTS[name](config)
    return Family(name, build, attention=attention, feed_forward=feed_forward, context=context, pooled=pooled)


def _families() -> dict[str, Family]:
    sd15, sdxl = tiny.TINY_SD15_CONFIG, tiny.TINY_SDXL_CONFIG
    return {f.name: f for f in (
        _family("SD15", tiny.tiny_sd15, sd15, context=sd15["context_dim"], pooled=None),
        _family("SDXL", tiny.tiny_sdxl, sdxl, context=sdxl["context_dim"], pooled=sdxl["adm_in_channels"]),
        _family("Flux", tiny_flux_real, TINY_FLUX_REAL, context=TINY_FLUX_REAL["context_in_dim"],
                pooled=TINY_FLUX_REAL["vec_in_dim"]),
        _family("QwenImage", tiny_qwen_image, TINY_QWEN_IMAGE, context=TINY_QWEN_IMAGE["joint_attention_dim"],
                pooled=None),
        _family("SD3", tiny_sd3, TINY_SD3_2, context=TINY_SD3_2["context_embedder_config"]["params"]["in_features"],
                pooled=TINY_SD3_2["adm_in_channels"]),
    )}


FAMILIES = _families()


class HLTestTinyFamily:
    """A MODEL of one tested family (SD1.5, SDXL, Flux, Qwen-Image at real block counts; SD3 at 2 blocks)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES), {"tooltip": "ComfyUI's model_config class name"}),
                             "seed": SEED}}

    def build(self, family, seed):
        return (FAMILIES[family].build(seed),)


class HLTestDumpTargets(AlwaysRunsOutput):
    """Write the weights of the model's target linears (read by target_scan, as the HyperLoRA nodes read them) to
    output/<name>.safetensors, after ComfyUI's model management applied the MODEL's patches; metadata: how many
    patches the MODEL carries and the family."""

    FUNCTION = "dump"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the model to read"}),
                             "name": ("STRING", {"default": "targets", "tooltip": "file name under output/"}),
                             "feed_forward": ("BOOLEAN", {"default": False, "tooltip": "add the feed-forward"})}}

    def dump(self, model, name, feed_forward):
        import comfy.lora
        import comfy.model_management

        from hyperlora_core.target_scan import read_tree, scan_targets

        comfy.model_management.load_models_gpu([model], force_full_load=True)
        base = model.model
        targets = scan_targets(read_tree(base, comfy.lora.model_lora_keys_unet(base, {})), feed_forward=feed_forward)
        sd = base.state_dict()
        weights = {lin.key: sd[lin.key + ".weight"].detach().float().cpu().clone() for lin in targets.linears}
        return save_output(name, weights, {"patches": str(len(model.patches)), "family": targets.family})


NODE_CLASS_MAPPINGS = {"HLTestTinyFamily": HLTestTinyFamily, "HLTestDumpTargets": HLTestDumpTargets}
