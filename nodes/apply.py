"""ApplyHyperLoRA and HyperLoRAToLoRA: an identity becomes a LoRA on ComfyUI's own LoRA path."""

from __future__ import annotations

import logging
import math

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch
from comfy_api.latest import io

from ..hyperlora_core.config import TRIGGER_WORDS
from ..hyperlora_core.errors import InputValueError
from ..hyperlora_core.lora_io import ID_STRENGTH, KeyFormat
from ..hyperlora_core.targets import TargetLayers, check_fits
from .types import CATEGORY, HyperLoRAType, IdentityType

log = logging.getLogger(__name__)


def lora_dtype(handle) -> torch.dtype:
    """The basis file's dtype: saving and applying in it is lossless for the mixed weights."""
    file = handle.core.checkpoint.files["basis"]
    tags = file.dtypes()
    return file.torch_dtype(next(iter(tags))) if len(tags) == 1 else torch.float32


def check_strength(name: str, value: float) -> float:
    """Refuse a strength that is not a finite number (the API lets NaN through: it fails no min/max check)."""
    if not math.isfinite(value):
        raise InputValueError(f"{name} is {value}; it must be a finite number (0.75-0.85 is usual for an identity). "
                              "Set the widget to a number.")
    return value


def mixing_progress(done: int, total: int) -> None:
    """Basis mixing reports to the node's progress bar, which also stops it when the user cancels the run."""
    mm.throw_exception_if_processing_interrupted()
    comfy.utils.ProgressBar(total).update_absolute(done, total)


def make_lora(handle, identity, kind: str = "id", key_format: KeyFormat = "comfy", release: bool = False,
              ) -> dict[str, torch.Tensor]:
    return handle.core.identity_to_lora(identity, kind=kind, key_format=key_format, dtype=lora_dtype(handle),
                                        progress=mixing_progress, release=release)


def model_family(model) -> str:
    """The family of a MODEL as ComfyUI detected it: its model_config's class name (SDXL, SD15, Flux, ...)."""
    return type(model.model.model_config).__name__


def check_model(model, targets: TargetLayers, **made_for) -> None:
    """Refuse, before any mixing or sampling, a MODEL that lacks a layer the HyperLoRA (or, with ``what`` and
    ``error`` as check_fits takes them, a LiDB) targets or has it at other sizes (a checkpoint of another family):
    the message names both families and the first layer that does not fit."""
    shapes = {key: tuple(w.shape) for key, w in model.model_state_dict().items()}
    check_fits(targets, shapes, model_family(model), **made_for)


def apply_identity(model, handle, identity, id_strength: float, base_strength: float = 0.0):
    """A patched clone of ``model``; the incoming MODEL is never changed."""
    check_strength("id_strength", id_strength)
    check_strength("base_strength", base_strength)
    check_model(model, handle.core.targets)
    lora = make_lora(handle, identity, "id")
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, id_strength, 0.0)
    if base_strength != 0.0:
        if handle.core.has_base and identity.base_tokens is not None:
            patched, _ = comfy.sd.load_lora_for_models(patched, None, make_lora(handle, identity, "base"),
                                                       base_strength, 0.0)
        elif not handle.core.has_base:
            log.warning("base_strength %.2f ignored: this checkpoint has no Base-LoRA (no base_resampler.safetensors; "
                        "the released checkpoints have none). Set base_strength to 0.", base_strength)
        else:
            log.warning("base_strength %.2f ignored: this identity has no Base tokens (it was saved or made without "
                        "Base conditions). Make it again with HyperLoRA Face.", base_strength)
    return patched


class ApplyHyperLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyHyperLoRA",
            display_name="Apply HyperLoRA",
            category=CATEGORY,
            description="Applies an identity to a MODEL as a LoRA (on a copy): an SDXL model for the released "
                        "HyperLoRAs, else the family the HyperLoRA was trained for. The prompt must contain the "
                        f"trigger words '{TRIGGER_WORDS}' (output below).",
            inputs=[
                io.Model.Input("model", tooltip="A model of the family the HyperLoRA was made for (SDXL for the "
                                                "released ones); another family is refused before sampling."),
                HyperLoRAType.Input("hyper_lora", tooltip="The HyperLoRA that made the identity."),
                IdentityType.Input("identity", tooltip="From HyperLoRA Face (photos) or Load HyperLoRA Identity."),
                io.Float.Input("id_strength", default=ID_STRENGTH, min=-2.0, max=2.0, step=0.01,
                               tooltip="LoRA weight of the identity; 0.75-0.85 is recommended."),
                io.Float.Input("base_strength", default=0.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="Weight of the Base-LoRA, for checkpoints that have one (the released "
                                       "ones do not: leave at 0)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the identity."),
                     io.String.Output(display_name="trigger_words",
                                      tooltip="Put these words in the prompt, or the identity has no effect.")],
        )

    @classmethod
    def execute(cls, model, hyper_lora, identity, id_strength, base_strength) -> io.NodeOutput:
        return io.NodeOutput(apply_identity(model, hyper_lora, identity, id_strength, base_strength), TRIGGER_WORDS)


class HyperLoRAToLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperLoRAToLoRA",
            display_name="HyperLoRA Identity to LoRA",
            category=CATEGORY,
            description="Turns an identity into a LORA_MODEL for the core Load LoRA Model and Save LoRA Weights "
                        "nodes.",
            inputs=[
                HyperLoRAType.Input("hyper_lora", tooltip="The HyperLoRA that made the identity."),
                IdentityType.Input("identity", tooltip="The identity to convert."),
                io.Combo.Input("kind", options=["id", "base"], default="id",
                               tooltip="id: the identity LoRA. base: the Base-LoRA (checkpoints that have one)."),
            ],
            outputs=[io.LoraModel.Output(display_name="lora", tooltip="The LoRA (ComfyUI keys, alpha = rank/2).")],
        )

    @classmethod
    def execute(cls, hyper_lora, identity, kind) -> io.NodeOutput:
        return io.NodeOutput(make_lora(hyper_lora, identity, kind))
