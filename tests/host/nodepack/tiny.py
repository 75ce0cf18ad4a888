"""Tiny models built from ComfyUI's own classes, for the host tier (shared by the test node pack and conftest).

Every builder imports ComfyUI lazily, so this module imports without it. Weights are seeded random: the models
have real topologies and names (SDXL: 140 attention modules named as in SDXL) at widths of 16-128.
"""

from __future__ import annotations

# SDXL's real block structure at tiny widths (HOST.md): 140 attention modules named exactly as in SDXL.
TINY_SDXL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 32 + 1536, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SD1.5's block structure (one transformer per attention level, conv proj_in) at the same tiny widths.
TINY_SD15_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 64,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
HOST_UNET_WIDTHS = dict(level_widths=(64, 128), context_dim=64)  # the tiny SDXL's attention widths, for UNetSpec
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
# clip_l (32) + clip_g (32) = the UNet's context_dim 64; clip_g's pooled output (32) feeds adm_in_channels 32+1536
TINY_CLIP_OPTIONS = {"clip_l_model_config": dict(TINY_CLIP),
                     "clip_g_model_config": dict(TINY_CLIP, projection_dim=32)}


def host_unet():
    """The UNetSpec of the tiny SDXL (HyperLoRA checkpoints for it are written with this)."""
    from hyperlora_core import UNetSpec

    return UNetSpec(name="tiny SDXL (ComfyUI)", **HOST_UNET_WIDTHS)


def hyperlora_and_identity(folder, images: int = 1, seed: int = 0):
    """A random HyperLoRA checkpoint for the tiny SDXL written to ``folder``, loaded, and an identity predicted
    from ``images`` random conditions: (HyperLoRA, Identity)."""
    import torch

    from hyperlora_core import load_hyperlora
    from hyperlora_core.synthetic import write_checkpoint

    unet = host_unet()
    hl = load_hyperlora(write_checkpoint(folder, unet=unet, base=False), unet=unet)
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(images, 257, 1024, generator=g)
    arc = torch.nn.functional.normalize(torch.randn(images, 512, generator=g), dim=-1)
    return hl, hl.predict_identity(clip_tokens=clip, id_embeds=arc)


def randomise(module, seed: int, scale: float | None = None) -> None:
    """Seeded random weights (ComfyUI's layers come out of torch.empty).

    scale None: matrices N(0, 1/fan_in), norm weights 1, biases 0, so that every layer (attention included)
    moves the output; a float: every parameter N(0, scale²).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in module.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            if scale is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if id(p) in norms else 0.0)


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)


def tiny_sdxl(seed: int = 0, model_channels: int = 32, dtype=None):
    """A ModelPatcher around SDXL (comfy.supported_models.SDXL) at ``model_channels`` (32: 23.6 M params);
    ``dtype`` (e.g. torch.float16) sets the UNet's weight dtype as ComfyUI's loader does."""
    import comfy.supported_models

    config = dict(TINY_SDXL_CONFIG, model_channels=model_channels)
    supported = comfy.supported_models.SDXL(config)
    supported.unet_config["num_head_channels"] = 16  # BASE forces 64, which a 32-wide level cannot split
    if dtype is not None:
        supported.set_inference_dtype(dtype, None)
    model = supported.get_model({})
    randomise(model, seed)
    return _patcher(model)


def tiny_sd15(seed: int = 0):
    """A ModelPatcher around SD1.5 (comfy.supported_models.SD15) at tiny widths: attention at 32/64/128."""
    import comfy.supported_models

    model = comfy.supported_models.SD15(dict(TINY_SD15_CONFIG)).get_model({})
    randomise(model, seed)
    return _patcher(model)



def tiny_controlnet(seed: int = 0):
    """comfy.controlnet.ControlNet around comfy.cldm.cldm.ControlNet with the tiny SDXL's config (12 M params),
    as ControlNetLoader builds it from an ldm-format SDXL ControlNet file; small random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    import comfy.supported_models
    import torch

    supported = comfy.supported_models.SDXL(dict(TINY_SDXL_CONFIG))
    supported.unet_config["num_head_channels"] = 16
    config = {k: v for k, v in supported.unet_config.items() if k != "out_channels"}
    model = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="cpu",
                                       operations=comfy.ops.disable_weight_init, **config)
    randomise(model, seed, scale=0.02)
    return comfy.controlnet.ControlNet(model, load_device=comfy.model_management.get_torch_device())

def tiny_clip(seed: int = 0, options: dict | None = None):
    """comfy.sd.CLIP around SDXL's two text encoders (sdxl_clip.SDXLClipModel) at width 32, real tokenizers;
    ``options``: its model_options (default TINY_CLIP_OPTIONS)."""
    import comfy.sd
    import comfy.sdxl_clip
    import torch

    class Target:
        params: dict = {}
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options=dict(options or TINY_CLIP_OPTIONS, dtype=torch.float32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embedding" in name else p.shape[-1] ** -0.5))
    return clip


def tiny_vae(seed: int = 0, scale: float = 0.01):
    """comfy.sd.VAE detecting a TAESD-shaped state dict (seeded He-initialised weights); ``scale`` shrinks the
    latents first so that the decoder's input clamp does not saturate on a random UNet's output."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in comfy.taesd.taesd.TAESD().state_dict().items():  # its layers come out of torch.empty
        fan_in = p[0].numel() if p.ndim > 1 else 1
        sd[name] = torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5 if p.ndim > 1 else torch.zeros(p.shape)
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(0.0)
    sd["taesd_decoder.19.weight"] /= 600.0  # the ReLU blocks grow the signal ~100x: keep pixels mid-grey, unclipped
    sd["taesd_decoder.19.bias"].fill_(0.5)
    return comfy.sd.VAE(sd=sd)


def face_photo(seed: int = 0, face: bool = True, side: int = 640):
    """An IMAGE [1, side, side, 3]: dark noise with, if ``face``, a painted face the detector double finds."""
    import numpy as np
    import torch

    from face_doubles import centred_box, paint_face  # tests/ is put on sys.path by the pack's __init__

    image = np.random.default_rng(seed).integers(10, 40, size=(side, side, 3), dtype=np.uint8)
    if face:
        paint_face(image, centred_box(side / 2, side / 2 - 10, side / 4), seed=seed)
    return torch.from_numpy(image).float().div(255.0)[None]


WATCHED_KEY = "output_blocks.2.1.transformer_blocks.7.attn2.to_k.weight"  # a cross-attention key of level 1
_TARGETS = ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
            "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight")


def is_lora_target(key: str) -> bool:
    """True for the 4 x 140 attention linears of SDXL (diffusion_model keys without the prefix)."""
    return ".transformer_blocks." in key and key.endswith(_TARGETS)
