"""Thin ComfyUI V3 adapters over ``hyperlora_core``, one module per concern."""

from __future__ import annotations

import importlib.util
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger(__name__)

OPTIONAL = {"insightface": "pip install insightface onnxruntime   (or everything: pip install -r "
                           "custom_nodes/ComfyUI-HyperLoRA/requirements.txt)",
            "onnxruntime": "pip install onnxruntime   (the runtime insightface depends on)"}


def report_missing() -> list[str]:
    """One clear log line per missing package; the nodes still load and name it when used."""
    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    for name in missing:
        log.warning("HyperLoRA: %s is not installed; face analysis needs it. Install it: %s", name, OPTIONAL[name])
    return missing


class HyperLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .apply import ApplyHyperLoRA, HyperLoRAToLoRA
        from .hook import HyperLoRAHook
        from .hyperdreambooth import HyperDreamBoothFromImage, LoadHyperDreamBooth
        from .identity import HyperLoRAFromImage
        from .lidb import LoadLiDB, SaveLiDB
        from .loader import LoadHyperLoRA
        from .refine import HyperLoRARefine
        from .slider import ConceptSlider
        from .storage import LoadHyperLoRAIdentity, SaveHyperLoRA, SaveHyperLoRAIdentity
        from .trigger_check import register

        report_missing()
        register()
        return [LoadHyperLoRA, HyperLoRAFromImage, ApplyHyperLoRA, ConceptSlider, HyperLoRAToLoRA, SaveHyperLoRA,
                SaveHyperLoRAIdentity, LoadHyperLoRAIdentity, HyperLoRAHook, HyperLoRARefine, SaveLiDB, LoadLiDB,
                LoadHyperDreamBooth, HyperDreamBoothFromImage]
