"""The HYPER_LORA value: a checked checkpoint, its face analyzer and CLIP encoder, under ComfyUI's model management.

The resampler and ID projector (~150 MB) live in a ModelPatcher: loaded to the compute device for a
prediction and offloadable whenever sampling needs the memory. The 3 GB basis is never copied: it stays
memory-mapped and is mixed on the CPU (a fraction of a second), so it takes no VRAM at all.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..hyperlora_core import load_hyperlora
from ..hyperlora_core.errors import ClipConfigError
from ..hyperlora_core.model import HyperLoRA
from ..hyperlora_core.pipeline import IdentityPipeline

log = logging.getLogger(__name__)
TRIGGER_WORDS = "fcsks fxhks fhyks"


VIT_NAMES = {768: "ViT-B", 1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}  # by hidden width


class ComfyClipVision:
    """hyperlora_core's ClipEncoder on ComfyUI's own CLIP_VISION model (same HF weights, same tokens)."""

    def __init__(self, clip_vision, width: int | None = None) -> None:
        if width is not None:  # the tokens' width the checkpoint reads
            check_clip_vision(clip_vision, width)
        self.clip_vision = clip_vision

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        cv = self.clip_vision
        mm.load_model_gpu(cv.patcher)
        out = cv.model(pixel_values=pixels.to(cv.load_device).float(), intermediate_output=-2)
        return out[1].float().to(mm.intermediate_device())


def check_clip_vision(clip_vision, width: int) -> None:
    """Refuse, before any photo is analysed, a CLIP_VISION that is not a ViT-L/14 at 224 px (257 tokens of
    ``width``): ViT-H and ViT-bigG from IPAdapter setups are the usual mix-ups."""
    embeddings = getattr(getattr(clip_vision.model, "vision_model", None), "embeddings", None)
    patch = getattr(embeddings, "patch_embedding", None)
    found_width = getattr(patch, "out_channels", None)
    found_patch = (tuple(getattr(patch, "kernel_size", ())) or (None,))[0]
    found_size = getattr(clip_vision, "image_size", None)
    if (found_width, found_patch, found_size) == (width, 14, 224) and embeddings.class_embedding is not None:
        return
    kind = VIT_NAMES.get(found_width, f"a {found_width}-wide model") if found_width else "not a CLIP ViT"
    raise ClipConfigError(
        f"clip_vision: the connected CLIP Vision is {kind} (width {found_width}, patch {found_patch}, "
        f"{found_size} px); HyperLoRA reads CLIP ViT-L/14 tokens at 224 px (width {width}). Load "
        "clip-vit-large-patch14 in Load CLIP Vision, or disconnect clip_vision to use the CLIP folder in "
        "models/hyper_lora/clip_vit.")


class ManagedClip(ComfyClipVision):
    """The CLIP folder beside the checkpoint, loaded by ComfyUI's own ``comfy.clip_vision`` (as Load CLIP Vision
    would), so ComfyUI offloads and counts it; any ViT width or depth the folder's tensors give (tiny test towers
    too), where ``comfy.clip_vision.load`` only recognises the released sizes by key names."""

    def __init__(self, folder: Path, width: int | None = None) -> None:
        super().__init__(load_clip_folder(folder), width)


def load_clip_folder(folder: Path):
    """A ``comfy.clip_vision.ClipVisionModel`` from an HF folder/file or an open_clip ``.safetensors``.

    Every key and shape is checked by the core first (``inspect_clip``: the same clear errors as the CLI); only the
    image tower's tensors are read, so a full CLIPModel file does not load its text tower.
    """
    import comfy.clip_vision
    import comfy.utils

    from ..hyperlora_core.clip import inspect_clip

    config, sf, kind, prefix = inspect_clip(folder)
    settings = {"model_type": "clip_vision_model", "num_channels": 3, "hidden_size": config.width,
                "image_size": config.image_size, "intermediate_size": config.mlp_dim,
                "num_attention_heads": config.heads, "num_hidden_layers": config.layers,
                "patch_size": config.patch_size, "projection_dim": config.width,
                "hidden_act": "quick_gelu" if config.quick_gelu else "gelu"}
    with tempfile.TemporaryDirectory() as tmp:  # ClipVisionModel reads its settings from a JSON file
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(settings), encoding="utf-8")
        model = comfy.clip_vision.ClipVisionModel(str(path))
    state = {k: sf.tensor(k) for k in sf.keys() if k.startswith(prefix)}
    if kind == "open_clip":
        state = comfy.clip_vision.convert_to_transformers(state, prefix)
    else:
        state = {"vision_model." + k[len(prefix):]: v for k, v in state.items()}
    missing, _ = model.load_sd(state)
    missing = [k for k in missing if not k.startswith(("visual_projection", "vision_model.post_layernorm"))]
    if missing:  # inspect_clip checked every key, so this is a naming change in ComfyUI itself
        raise RuntimeError(f"CLIP vision model: ComfyUI did not take {len(missing)} tensors of '{sf.path}' "
                           f"(first: {missing[0]}); load it with Load CLIP Vision and connect it instead.")
    log.info("HyperLoRA: CLIP vision '%s' loaded by comfy.clip_vision (width %d, %d blocks).", sf.path,
             config.width, config.layers)
    return model


class HyperLoRAHandle:
    """What flows along a HYPER_LORA wire."""

    def __init__(self, checkpoint: Path, face_folder: Path, *, provider: str, dtype: str, clip_vision=None) -> None:
        self.dtype = _dtype(dtype)
        self.core: HyperLoRA = load_hyperlora(checkpoint, device="cpu", dtype=self.dtype, unet=None)
        self.face_folder, self.provider = face_folder, provider
        self.patcher = comfy.model_patcher.ModelPatcher(self.core.networks(), load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())
        self.clip = None
        if "clip" in self.core.encoders or self.core.has_base:  # the base resampler reads CLIP tokens too
            if clip_vision is not None:
                self.clip = ComfyClipVision(clip_vision, self.core.clip_width)
            else:
                from .folders import clip_folder

                self.clip = ManagedClip(clip_folder(Path(checkpoint)), self.core.clip_width)
        self._pipeline: IdentityPipeline | None = None

    @property
    def pipeline(self) -> IdentityPipeline:
        """Built on first use: the face analyzer starts onnxruntime sessions, which takes a moment."""
        if self._pipeline is None:
            from ..hyperlora_core.face import FaceAnalyzer

            faces = FaceAnalyzer(self.face_folder, providers=self.provider)
            log.info("HyperLoRA face analysis runs on %s", faces.provider)
            self._pipeline = IdentityPipeline(self.core, faces, self.clip)
        return self._pipeline

    def load_networks(self) -> None:
        mm.load_models_gpu([self.patcher])

    def __repr__(self) -> str:
        return repr(self.core)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        device = mm.get_torch_device()
        return torch.float16 if device.type != "cpu" and mm.should_use_fp16(device) else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
