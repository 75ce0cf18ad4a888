"""Where users get the model files the nodes need, by name: one home for the doctor's fixes, the nodes' messages
and the example workflows' Notes. README.md and web/docs/LoadHyperLoRA.md say the same (tests/test_user_docs.py).

Sizes of the HyperLoRA files are those of the release (DESIGN.md); the others are as published, rounded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One download: what it is, where it comes from, and its files with their sizes."""

    what: str  # what the user is fetching
    origin: str  # the official source, by name
    files: tuple[tuple[str, str], ...]  # (file name, size) as published
    folder: str  # where it goes, relative to ComfyUI's folder

    def line(self) -> str:
        files = ", ".join(f"{name} ({size})" for name, size in self.files)
        return f"{self.what}: {self.origin}; files {files}; put them in {self.folder}"


CHECKPOINT = Source(
    "HyperLoRA checkpoint",
    "Hugging Face model bytedance-research/HyperLoRA, folder sdxl_hyper_id_lora_v1_fidelity (or _edit)",
    (("hyper_lora_modules.json", "a few KB"), ("hyper_lora_modules.safetensors", "2.97 GB"),
     ("resampler.safetensors", "150 MB"), ("id_projector.safetensors", "16.8 MB")),
    "models/hyper_lora/sdxl_hyper_id_lora_v1_fidelity/",
)
ANTELOPEV2 = Source(
    "Face analyzer antelopev2",
    "antelopev2.zip of the InsightFace Model Zoo (GitHub deepinsight/insightface, release model-zoo)",
    (("scrfd_10g_bnkps.onnx", "17 MB"), ("2d106det.onnx", "5 MB"), ("glintr100.onnx", "261 MB"),
     ("genderage.onnx", "1.3 MB, not used"), ("1k3d68.onnx", "144 MB, not used")),
    "models/insightface/models/antelopev2/",
)
CLIP_VIT_L14 = Source(
    "CLIP ViT-L/14",
    "Hugging Face model openai/clip-vit-large-patch14",
    (("config.json", "4.5 KB"), ("model.safetensors", "1.71 GB")),
    "models/hyper_lora/clip_vit/clip_vit_large_14/ (or use Load CLIP Vision with it)",
)
SOURCES = (CHECKPOINT, ANTELOPEV2, CLIP_VIT_L14)
