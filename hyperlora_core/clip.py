"""CLIP vision tokens: preprocessing equal to transformers' CLIPImageProcessor and a ViT image-tower encoder.

The encoder loads the HF-format folder users already have (``config.json`` + ``model.safetensors`` of a
CLIPVisionModel, CLIPVisionModelWithProjection or full CLIPModel) by key conversion, or an open_clip
``.safetensors`` checkpoint (``visual.*`` keys). Only safetensors is read. It returns the penultimate hidden
states with the class token, i.e. transformers' ``hidden_states[-2]``.

The tower is open_clip_torch's ``VisionTransformer``; this module only reads the file, converts HF key names to
open_clip's, and checks every key and shape first. Inside ComfyUI the nodes use ComfyUI's own ``comfy.clip_vision``
instead (nodes/handle.py). tests/test_clip.py holds the tokens equal to transformers' CLIPVisionModel.

Letters: ``b`` images, ``n`` tokens (1 class token + grid²), ``d`` width (1024 for ViT-L/14).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .config import Shapes, check_keys
from .errors import (
    ClipConfigError,
    ClipInputError,
    ClipModelMissing,
    DependencyMissing,
    MissingKeyError,
    ShapeMismatchError,
)
from .safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

IMAGE_SIZE = 224  # CLIP ViT-L/14 input side
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
WHAT = "CLIP vision model"
# Heads of the released CLIP towers by width (B, L, H, bigG); otherwise open_clip's default 64-wide heads.
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HF_FILES = ("model.safetensors", "open_clip_model.safetensors")


# ---------------------------------------------------------------------------------------------- preprocessing
def _resize_and_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shortest side to ``size`` (PIL bicubic, long side truncated as HF does), then the centre ``size``²."""
    from PIL import Image

    h, w = rgb.shape[:2]
    long = int(size * max(h, w) / min(h, w))
    new_h, new_w = (long, size) if w <= h else (size, long)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2  # floor, as HF's center_crop
    return resized[top:top + size, left:left + size]


def _as_rgb8(crop: Any, index: int) -> np.ndarray:
    if hasattr(crop, "convert") and hasattr(crop, "size"):  # a PIL image
        crop = np.asarray(crop.convert("RGB"))
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        found = f"{type(crop).__name__} {getattr(crop, 'dtype', '')} {list(getattr(crop, 'shape', []))}"
        raise ClipInputError(
            f"CLIP preprocessing: crop {index} must be an HxWx3 uint8 RGB array, got {found}. "
            "Convert it first (hyperlora_core.images.to_rgb8)."
        )
    if min(crop.shape[:2]) < 1:
        raise ClipInputError(f"CLIP preprocessing: crop {index} is empty ({list(crop.shape)}).")
    return np.ascontiguousarray(crop)


def preprocess(crops: Sequence[np.ndarray], *, size: int = IMAGE_SIZE) -> torch.Tensor:
    """HxWx3 uint8 RGB crops (or PIL images) -> float32 pixels [b, 3, size, size], equal to CLIPImageProcessor.

    Same steps and the same arithmetic as transformers' PIL CLIPImageProcessor: shortest side to ``size`` with
    PIL bicubic, centre crop (floor on odd margins), ×1/255 in float64 then float32, OpenAI mean/std.
    """
    if len(crops) == 0:
        raise ClipInputError("CLIP preprocessing: no crops were given; at least one face crop is needed.")
    batch = []
    for index, crop in enumerate(crops):
        x = _resize_and_crop(_as_rgb8(crop, index), size)
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch.append((x - OPENAI_MEAN) / OPENAI_STD)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()  # b h w c -> b c h w


# ---------------------------------------------------------------------------------------------- interface
@runtime_checkable
class ClipEncoder(Protocol):
    """Anything that turns preprocessed pixels into penultimate CLIP tokens (ours, or ComfyUI's clip_vision)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float [b, 3, 224, 224] -> float32 tokens [b, n, d] (n = 257, d = 1024 for ViT-L/14)."""
        ...


def encode_crops(encoder: ClipEncoder, crops: Sequence[np.ndarray]) -> torch.Tensor:
    """Preprocess ``crops`` and encode them: [b, n, d]."""
    return encoder.encode(preprocess(crops))


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ClipVisionConfig:
    """A CLIP ViT image tower, as far as the penultimate tokens need it."""

    width: int  # token width d (1024 for ViT-L/14)
    layers: int  # transformer blocks in the file (24); the last one is not run
    heads: int  # attention heads (16)
    patch_size: int  # patch side in pixels (14)
    image_size: int  # input side in pixels (224)
    mlp_dim: int  # hidden width of each block's MLP (4096)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    quick_gelu: bool = True  # QuickGELU (OpenAI weights) rather than exact GELU

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "patch_size", "image_size", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClipVisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.layers < 2:
            raise ValueError(f"ClipVisionConfig.layers must be >= 2 for penultimate tokens, got {self.layers}")
        if self.width % self.heads:
            raise ValueError(f"ClipVisionConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ClipVisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def open_clip_shapes(self, layers: int | None = None) -> Shapes:
        """open_clip ``VisionTransformer`` keys (no ``visual.`` prefix) of the first ``layers`` blocks."""
        d, m = self.width, self.mlp_dim
        shapes: Shapes = {"class_embedding": (d,), "positional_embedding": (self.num_tokens, d),
                          "conv1.weight": (d, 3, self.patch_size, self.patch_size),
                          "ln_pre.weight": (d,), "ln_pre.bias": (d,)}
        for i in range(self.layers if layers is None else layers):
            p = f"transformer.resblocks.{i}."
            shapes.update({p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
                           p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
                           p + "mlp.c_fc.weight": (m, d), p + "mlp.c_fc.bias": (m,),
                           p + "mlp.c_proj.weight": (d, m), p + "mlp.c_proj.bias": (d,)})
            for norm in ("ln_1", "ln_2"):
                shapes.update({f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)})
        return shapes

    def hf_shapes(self) -> Shapes:
        """transformers ``CLIPVisionTransformer`` keys (no ``vision_model.`` prefix)."""
        d, m = self.width, self.mlp_dim
        shapes: Shapes = {"embeddings.class_embedding": (d,),
                          "embeddings.patch_embedding.weight": (d, 3, self.patch_size, self.patch_size),
                          "embeddings.position_embedding.weight": (self.num_tokens, d),
                          "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,)}
        for i in range(self.layers):
            p = f"encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes.update({f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)})
            shapes.update({p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,),
                           p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,)})
            for norm in ("layer_norm1", "layer_norm2"):
                shapes.update({f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)})
        return shapes


# ---------------------------------------------------------------------------------------------- file layouts
@dataclass(frozen=True)
class _Layout:
    """Where the image tower sits in a file."""

    kind: str  # "hf" or "open_clip"
    prefix: str  # key prefix of the tower: "vision_model.", "visual." or ""
    anchor: str  # the class-embedding key (relative), read for the width

    def tower_keys(self, keys: Sequence[str]) -> list[str]:
        """Keys of the image tower (relative), minus buffers that carry no weights."""
        p = self.prefix
        if p:
            rel = [k[len(p):] for k in keys if k.startswith(p)]
        elif self.kind == "hf":
            rel = [k for k in keys if k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))]
        else:
            rel = list(keys)
        return [k for k in rel if k not in ("embeddings.position_ids", "attn_mask")]


_LAYOUTS = (_Layout("hf", "vision_model.", "embeddings.class_embedding"),
            _Layout("hf", "", "embeddings.class_embedding"),
            _Layout("open_clip", "visual.", "class_embedding"),
            _Layout("open_clip", "", "class_embedding"))


def _detect_layout(sf: SafetensorsFile) -> _Layout:
    keys = set(sf.keys())
    for layout in _LAYOUTS:
        if layout.prefix + layout.anchor in keys:
            return layout
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise ClipConfigError(
        f"{WHAT}: '{sf.path}' holds no CLIP image tower (no 'vision_model.embeddings.class_embedding' or "
        f"'visual.class_embedding'; first keys: {sample}). Use the HF folder of openai/clip-vit-large-patch14 "
        "(config.json + model.safetensors) or an open_clip ViT-L-14 .safetensors checkpoint."
    )


def _resolve_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise ClipModelMissing(
            f"{WHAT}: '{path}' does not exist. Point it at the folder of openai/clip-vit-large-patch14 "
            "(config.json + model.safetensors) or at an open_clip ViT-L-14 .safetensors file."
        )
    for name in _HF_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir())
    candidates = [n for n in found if n.endswith(".safetensors")]
    if len(candidates) == 1:  # e.g. a ComfyUI-style single file with a custom name
        return path / candidates[0]
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" It has only pickle weights ({', '.join(pickles)}); for safety only .safetensors is loaded: download "
            "model.safetensors from the same repository.") if pickles else ""
    raise ClipModelMissing(
        f"{WHAT}: '{path}' has no model.safetensors (found: {', '.join(found) or 'nothing'}).{hint} Put "
        "config.json and model.safetensors of openai/clip-vit-large-patch14 there, or pass the .safetensors file."
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipConfigError(f"{WHAT}: '{path}' is not valid JSON ({exc}). Download it again.") from exc
    if not isinstance(data, dict):
        raise ClipConfigError(f"{WHAT}: '{path}' is not a JSON object. Download it again.")
    return data


def _hf_settings(file: Path) -> tuple[dict[str, Any], dict[str, int], Path] | None:
    """(heads/activation/eps, declared dims, path) from an HF config.json beside ``file``, or None without one."""
    cfg_path = file.parent / "config.json"
    cfg = _read_json(cfg_path)
    if cfg is None:
        return None
    vision = cfg if cfg.get("model_type") == "clip_vision_model" else cfg.get("vision_config") or cfg
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ClipConfigError(f"{WHAT}: '{cfg_path}': hidden_act {act!r} is not supported (quick_gelu or gelu); "
                              "this is not a CLIP vision tower.")
    # transformers leaves out fields equal to CLIPVisionConfig's defaults, so those are the fallbacks.
    settings = {"heads": vision.get("num_attention_heads", 12), "quick_gelu": act == "quick_gelu",
                "layer_norm_eps": vision.get("layer_norm_eps", 1e-5)}
    declared = {"width": vision.get("hidden_size", 768), "layers": vision.get("num_hidden_layers", 12),
                "mlp_dim": vision.get("intermediate_size", 3072), "patch_size": vision.get("patch_size", 32),
                "image_size": vision.get("image_size", 224)}
    return settings, declared, cfg_path


def _open_clip_settings(file: Path, width: int) -> tuple[dict[str, Any], dict[str, int], Path] | None:
    """Heads and activation from an ``open_clip_config.json`` (as on the HF hub) beside ``file``."""
    cfg_path = file.parent / "open_clip_config.json"
    cfg = _read_json(cfg_path)
    if cfg is None:
        return None
    model_cfg = cfg.get("model_cfg", cfg)
    head_width = model_cfg.get("vision_cfg", {}).get("head_width", 64)  # open_clip's default
    settings = {"heads": width // head_width if head_width else 0, "quick_gelu": bool(model_cfg.get("quick_gelu"))}
    return settings, {}, cfg_path


def _need(sf: SafetensorsFile, key: str, ndim: int) -> tuple[int, ...]:
    """Shape of a tensor the dimensions are read from; the key-by-key check follows later."""
    if key not in sf.tensors:
        raise MissingKeyError(f"{WHAT}: '{sf.path}' lacks tensor {key!r}; the file is incomplete or not a CLIP "
                              "ViT image tower. Download model.safetensors again.")
    shape = sf.shape(key)
    if len(shape) != ndim:
        raise ShapeMismatchError(f"{WHAT}: '{sf.path}': tensor {key!r} has shape {list(shape)}, expected {ndim} dims.")
    return shape


def infer_config(sf: SafetensorsFile, layout: _Layout) -> ClipVisionConfig:
    """Read the dimensions off the tensors, the rest (heads, activation) off the JSON config beside the file."""
    hf, p = layout.kind == "hf", layout.prefix
    (width,) = _need(sf, p + layout.anchor, 1)
    patch = _need(sf, p + ("embeddings.patch_embedding.weight" if hf else "conv1.weight"), 4)[-1]
    positions = _need(sf, p + ("embeddings.position_embedding.weight" if hf else "positional_embedding"), 2)[0]
    block = r"encoder\.layers\.(\d+)\." if hf else r"transformer\.resblocks\.(\d+)\."
    ids = {int(m.group(1)) for k in layout.tower_keys(sf.keys()) if (m := re.match(block, k))}
    layers = max(ids) + 1 if ids else 0
    mlp_key = p + ("encoder.layers.0.mlp.fc1.weight" if hf else "transformer.resblocks.0.mlp.c_fc.weight")
    mlp_dim = _need(sf, mlp_key, 2)[0]
    grid = round((positions - 1) ** 0.5)
    found = {"width": width, "layers": layers, "mlp_dim": mlp_dim, "patch_size": patch, "image_size": grid * patch}
    if grid * grid + 1 != positions:
        raise ShapeMismatchError(f"{WHAT}: '{sf.path}': {positions} position embeddings is not 1 + a square grid; "
                                 "this is not a CLIP ViT image tower.")
    read = _hf_settings(sf.path) if hf else _open_clip_settings(sf.path, width)
    if read is None:
        settings = {"heads": _KNOWN_HEADS.get(width, width // 64), "quick_gelu": True}
        log.warning("%s: no config JSON beside '%s'; assuming OpenAI CLIP settings: %d heads, QuickGELU.",
                    WHAT, sf.path, settings["heads"])
        read = settings, {}, None
    settings, declared, cfg_path = read
    for name, value in declared.items():
        if value != found[name]:
            raise ShapeMismatchError(
                f"{WHAT}: '{cfg_path}' declares {name}={value} but the tensors of '{sf.path}' give {found[name]}. "
                "config.json and model.safetensors come from different models; download both from one repository."
            )
    if settings["heads"] <= 0 or width % settings["heads"]:
        raise ClipConfigError(
            f"{WHAT}: cannot tell the attention heads of the {width}-wide tower in '{sf.path}' "
            f"(got {settings['heads']}). Put the model's config.json (HF) or open_clip_config.json beside it."
        )
    try:
        return ClipVisionConfig(**found, **settings)
    except ValueError as exc:
        raise ClipConfigError(f"{WHAT}: '{sf.path}': {exc}.") from exc


def _check(sf: SafetensorsFile, layout: _Layout, config: ClipVisionConfig) -> None:
    """Every tower key present with its shape, nothing unknown; the heads (post-LN, projection) are optional."""
    found = {k: sf.shape(layout.prefix + k) for k in layout.tower_keys(sf.keys())}
    expected = config.hf_shapes() if layout.kind == "hf" else config.open_clip_shapes()
    post = "post_layernorm" if layout.kind == "hf" else "ln_post"
    for key in (f"{post}.weight", f"{post}.bias"):
        if key in found:
            expected[key] = (config.width,)
    if layout.kind == "open_clip" and "proj" in found:
        expected["proj"] = (config.width, found["proj"][-1])
    check_keys(WHAT, sf.path, found, expected)


def inspect_clip(path: str | Path) -> tuple[ClipVisionConfig, SafetensorsFile, str, str]:
    """Headers only, nothing loaded: (config, file, layout kind, key prefix), or the precise error (for doctor)."""
    sf = SafetensorsFile(_resolve_file(Path(path)), WHAT)
    layout = _detect_layout(sf)
    config = infer_config(sf, layout)
    _check(sf, layout, config)
    return config, sf, layout.kind, layout.prefix


def _hf_to_open_clip(sf: SafetensorsFile, prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """HF names -> open_clip names for the embeddings and the first ``layers`` blocks; q/k/v are concatenated."""

    def get(key: str) -> torch.Tensor:
        return sf.tensor(prefix + key)

    out = {"class_embedding": get("embeddings.class_embedding"),
           "conv1.weight": get("embeddings.patch_embedding.weight"),
           "positional_embedding": get("embeddings.position_embedding.weight"),
           "ln_pre.weight": get("pre_layrnorm.weight"), "ln_pre.bias": get("pre_layrnorm.bias")}
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [get(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)  # nn.MultiheadAttention packs q, k, v
            for old, new in renames.items():
                out[f"{dst}{new}.{kind}"] = get(f"{src}{old}.{kind}")
    return out


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"{WHAT}: dtype {dtype!r} is not one of fp32, fp16, bf16.")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{WHAT}: dtype {dtype} is not one of float32, float16, bfloat16.")
    return dtype


def build_tower(config: ClipVisionConfig, layers: int) -> nn.Module:
    """open_clip's ``VisionTransformer`` with ``layers`` blocks, on the meta device, without its head.

    open_clip builds the image tower (the same class serves its ViT-L-14-quickgelu); only the dimensions come from
    the file. The final LayerNorm and projection are pruned: the penultimate tokens never pass through them.
    """
    from functools import partial

    try:
        from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
    except ImportError as exc:
        raise DependencyMissing(
            f"{WHAT}: the standalone CLIP encoder needs open_clip_torch ({exc}). Install it with "
            "'pip install open_clip_torch', or, in ComfyUI, connect Load CLIP Vision (no extra package needed)."
        ) from exc
    with torch.device("meta"):
        visual = VisionTransformer(
            image_size=config.image_size, patch_size=config.patch_size, width=config.width, layers=layers,
            heads=config.heads, mlp_ratio=config.mlp_dim / config.width,
            act_layer=QuickGELU if config.quick_gelu else nn.GELU,
            norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        )
    visual.prune_intermediate_layers(indices=[layers - 1], prune_norm=True, prune_head=True)
    return visual


class ClipVisionEncoder:
    """CLIP's ViT image tower (without its last block) that returns the penultimate tokens [b, n, d]."""

    def __init__(self, visual: nn.Module, config: ClipVisionConfig, *, source: str = "") -> None:
        self.visual = visual.eval().requires_grad_(False)
        self.config = config  # the full tower as stored; ``visual`` runs config.layers - 1 blocks
        self.source = source  # file the weights came from, for messages

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def width(self) -> int:
        return self.config.width

    @classmethod
    def from_folder(cls, path: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None) -> ClipVisionEncoder:
        """Load an HF-format folder/file or an open_clip ``.safetensors`` checkpoint, checked key by key.

        ``device`` None: CUDA when available, else CPU. ``dtype`` None: fp16 on CUDA, fp32 elsewhere; or one
        of fp32/fp16/bf16 (names or torch dtypes).
        """
        config, sf, kind, prefix = inspect_clip(path)
        run = config.layers - 1  # hidden_states[-2] is the output of the second-to-last block
        if kind == "hf":
            state = _hf_to_open_clip(sf, prefix, run)
        else:
            state = {k: sf.tensor(prefix + k) for k in config.open_clip_shapes(run)}
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(dtype, device)
        visual = build_tower(config, run)
        visual.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
        log.info("%s: loaded '%s' (%s layout, width %d, %d blocks, %d heads) on %s as %s.", WHAT, sf.path,
                 kind, config.width, config.layers, config.heads, device, dtype)
        return cls(visual, config, source=str(sf.path))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [b, 3, s, s] (from ``preprocess``) -> float32 penultimate tokens [b, n, d] on ``device``."""
        side = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, side, side):
            raise ClipInputError(
                f"{WHAT}: pixels must have shape [b, 3, {side}, {side}], got {list(pixels.shape)}. "
                "Pass the output of hyperlora_core.clip.preprocess."
            )
        x = pixels.to(device=self.device, dtype=self.dtype)
        last = len(self.visual.transformer.resblocks) - 1
        with torch.no_grad():  # not inference_mode: the tokens may feed a differentiable resampler
            out = self.visual.forward_intermediates(x, indices=[last], intermediates_only=True, output_fmt="NLC",
                                                    output_extra_tokens=True)
        tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        return tokens.float()
