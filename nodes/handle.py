"""The HYPER_LORA value: a checked checkpoint, its face analyzer and CLIP encoder, under ComfyUI's model management.

The resampler and ID projector (~150 MB) live in a ModelPatcher: loaded to the compute device for a
prediction and offloadable whenever sampling needs the memory. The 3 GB basis is never copied: it stays
memory-mapped and is mixed on the CPU (a fraction of a second), so it takes no VRAM at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..hyperlora_core import load_hyperlora
from ..hyperlora_core.model import HyperLoRA
from ..hyperlora_core.pipeline import IdentityPipeline

log = logging.getLogger(__name__)
TRIGGER_WORDS = "fcsks fxhks fhyks"


class ComfyClipVision:
    """hyperlora_core's ClipEncoder on ComfyUI's own CLIP_VISION model (same HF weights, same tokens)."""

    def __init__(self, clip_vision) -> None:
        self.clip_vision = clip_vision

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        cv = self.clip_vision
        mm.load_model_gpu(cv.patcher)
        out = cv.model(pixel_values=pixels.to(cv.load_device).float(), intermediate_output=-2)
        return out[1].float().to(mm.intermediate_device())


class ManagedClip:
    """The standalone CLIP encoder wrapped in a ModelPatcher, so ComfyUI can offload it too."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        from ..hyperlora_core.clip import ClipVisionEncoder

        self.encoder = ClipVisionEncoder.from_folder(folder, device=mm.unet_offload_device(), dtype=dtype)
        self.patcher = comfy.model_patcher.ModelPatcher(self.encoder.visual, load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mm.load_model_gpu(self.patcher)
        return self.encoder.encode(pixels.to(self.patcher.load_device)).to(mm.intermediate_device())


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
                self.clip = ComfyClipVision(clip_vision)
            else:
                from .folders import clip_folder

                self.clip = ManagedClip(clip_folder(Path(checkpoint)), self.dtype)
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
