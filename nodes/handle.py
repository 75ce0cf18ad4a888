"""The HYPER_LORA value: a checked checkpoint, its face analyzer and CLIP encoder, under ComfyUI's model management.

Nothing heavy happens when the loader runs: it reads the checkpoint's headers. The rest follows the photos:

- When face analysis starts, the CLIP tower's, the networks' and the basis' pages are read ahead in the
  background, in the order they will be needed.
- CLIP and the networks (resampler, ID projector) are built on first use, each in a ModelPatcher: loaded to the
  compute device for a prediction and offloadable whenever sampling needs the memory.
- Once the identity is predicted they go back through model management's offload path. On a CPU-only machine
  offloading moves nothing, so they are freed there (about 1.5 GB in fp32) unless ``keep_networks``; the next
  photos build them again.
- The 3 GB basis is never copied: it stays memory-mapped and is mixed on the CPU, so it takes no VRAM at all.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..hyperlora_core import load_hyperlora
from ..hyperlora_core.errors import ClipConfigError
from ..hyperlora_core.model import HyperLoRA
from ..hyperlora_core.pipeline import IdentityPipeline
from ..hyperlora_core.readahead import ReadAhead, Span

log = logging.getLogger(__name__)


VIT_NAMES = {768: "ViT-B", 1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}  # by hidden width


def _patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def offload(patcher: comfy.model_patcher.ModelPatcher | None) -> None:
    """Take ``patcher`` out of ComfyUI's loaded models, back on its offload device (what free_memory does)."""
    for i, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
            return


def return_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc's malloc_trim). CLIP's weights are 8 MB tensors, which glibc
    serves from its heap once a larger block has been freed; freed there, they stay in RSS until trimmed."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class ComfyClipVision:
    """hyperlora_core's ClipEncoder on ComfyUI's own CLIP_VISION model (same HF weights, same tokens).

    Connected from Load CLIP Vision, the model belongs to that node: it is offloaded after use, never freed here.
    """

    def __init__(self, clip_vision, width: int | None = None) -> None:
        if clip_vision is not None and width is not None:  # the tokens' width the checkpoint reads
            check_clip_vision(clip_vision, width)
        self.clip_vision = clip_vision  # comfy.clip_vision.ClipVisionModel

    @property
    def loaded(self) -> bool:
        return self.clip_vision is not None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        cv = self.clip_vision
        mm.load_model_gpu(cv.patcher)
        with torch.no_grad():  # with autograd on, each call kept ~1.8 GB (fp32 casts of the fp16 weights) alive
            out = cv.model(pixel_values=pixels.to(cv.load_device).float(), intermediate_output=-2)
        return out[1].float().to(mm.intermediate_device())

    def spans(self) -> list[Span]:
        return []

    def release(self, free: bool) -> None:
        offload(self.clip_vision.patcher)


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
    """The CLIP folder beside the checkpoint, loaded on first use by ComfyUI's own ``comfy.clip_vision`` (as Load
    CLIP Vision would), so ComfyUI offloads and counts it; any ViT width or depth the folder's tensors give (tiny
    test towers too), where ``comfy.clip_vision.load`` only recognises the released sizes by key names."""

    def __init__(self, folder: Path, width: int | None = None) -> None:
        from ..hyperlora_core.clip import inspect_clip

        super().__init__(None)
        self.folder, self.width = folder, width
        self.loads = 0  # how many times the tower was loaded from the file
        config, sf, _, prefix = inspect_clip(folder)  # headers only: a missing or broken file is named at once
        if width is not None and config.width != width:
            kind = VIT_NAMES.get(config.width, f"a {config.width}-wide model")
            raise ClipConfigError(
                f"CLIP folder '{folder}' holds {kind} (width {config.width}); HyperLoRA reads CLIP ViT-L/14 tokens "
                f"(width {width}). Put openai/clip-vit-large-patch14 there, or connect it through Load CLIP Vision.")
        self._spans = sf.spans(k for k in sf.keys() if k.startswith(prefix))

    def spans(self) -> list[Span]:
        """Where the image tower lies in its file, for the read-ahead; nothing once loaded."""
        return [] if self.loaded else self._spans

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.clip_vision is None:
            model = load_clip_folder(self.folder)
            if self.width is not None:
                check_clip_vision(model, self.width)
            self.clip_vision = model
            self.loads += 1
        return super().encode(pixels)

    def release(self, free: bool) -> None:
        if self.clip_vision is not None:
            offload(self.clip_vision.patcher)
        if free:
            self.clip_vision = None


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
    """What flows along a HYPER_LORA wire. Building it reads headers only."""

    def __init__(self, checkpoint: Path, face_folder: Path, *, provider: str, dtype: str, clip_vision=None,
                 keep_networks: bool = False) -> None:
        self.dtype = _dtype(dtype)
        self.core: HyperLoRA = load_hyperlora(checkpoint, device="cpu", dtype=self.dtype, unet=None)
        self.face_folder, self.provider = face_folder, provider
        self.keep_networks = keep_networks  # CPU-only: keep CLIP and the networks in memory between photo sets
        self._patcher: comfy.model_patcher.ModelPatcher | None = None
        self.clip: ComfyClipVision | ManagedClip | None = None
        if "clip" in self.core.encoders or self.core.has_base:  # the base resampler reads CLIP tokens too
            if clip_vision is not None:
                self.clip = ComfyClipVision(clip_vision, self.core.clip_width)
            else:
                from .folders import clip_folder

                self.clip = ManagedClip(clip_folder(Path(checkpoint)), self.core.clip_width)
        self._pipeline: IdentityPipeline | None = None
        self.readahead: ReadAhead | None = None  # the last read-ahead started

    @property
    def patcher(self) -> comfy.model_patcher.ModelPatcher:
        """The networks in a ModelPatcher, built (from the memory-mapped files) on first use."""
        if self._patcher is None:
            self._patcher = _patcher(self.core.networks())
        return self._patcher

    @property
    def pipeline(self) -> IdentityPipeline:
        """Built on first use: the face analyzer starts onnxruntime sessions, which takes a moment."""
        if self._pipeline is None:
            from ..hyperlora_core.face import FaceAnalyzer

            faces = FaceAnalyzer(self.face_folder, providers=self.provider)
            log.info("HyperLoRA face analysis runs on %s", faces.provider)
            self._pipeline = IdentityPipeline(self.core, faces, self.clip, on_start=self.prefetch,
                                              after_predict=self.release)
        return self._pipeline

    def prefetch(self) -> None:
        """Read ahead, in the background, what the photos will need: CLIP, the networks, then the basis."""
        first = self.clip.spans() if self.clip is not None else []
        self.readahead = self.core.prefetch(networks=not self.core.built, first=first)

    def load_networks(self) -> None:
        mm.load_models_gpu([self.patcher])

    def release(self) -> None:
        """After an identity is predicted: CLIP and the networks go back through model management's offload
        path; on a CPU-only machine, where that moves nothing, they are freed unless ``keep_networks``."""
        cpu_only = mm.get_torch_device().type == "cpu"
        if cpu_only and self.keep_networks:
            return  # kept loaded, and listed by model management as before (POST /free can still unload them)
        free = cpu_only
        offload(self._patcher)
        if self.clip is not None:
            self.clip.release(free)
        if free:
            self._patcher = None
            self.core.release_networks()
            return_freed_memory()
            log.info("HyperLoRA: identity ready; CLIP and the networks freed (the next photos load them again)")

    def loaded(self) -> dict[str, object]:
        """What is in memory now and how often each part was built: for tests, benches and logs."""
        builds = Counter(self.core.builds)
        if isinstance(self.clip, ManagedClip):
            builds["clip"] = self.clip.loads
        return {"networks": list(self.core.built), "clip": isinstance(self.clip, ManagedClip) and self.clip.loaded,
                "face_analyzer": self._pipeline is not None, "builds": dict(+builds)}

    def __repr__(self) -> str:
        return repr(self.core)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        device = mm.get_torch_device()
        return torch.float16 if device.type != "cpu" and mm.should_use_fp16(device) else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
