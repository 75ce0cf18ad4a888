"""ConceptSlider: the difference between two identities, as an exact LoRA or in coefficient space."""

from __future__ import annotations

import comfy.sd
from comfy_api.latest import io

from ..hyperlora_core import interpolate, lora_difference
from ..hyperlora_core.errors import InputValueError
from ..hyperlora_core.lora_io import ID_STRENGTH
from .apply import check_model, check_strength, make_lora
from .types import CATEGORY, HyperLoRAType, IdentityType

COEFFICIENT_WEIGHT = ID_STRENGTH  # an identity LoRA from coefficient space is applied at the recommended weight


def _identity(handle, image, identity, which: str):
    if identity is not None:
        return identity
    if image is None:
        raise InputValueError(f"ConceptSlider needs the {which} end: connect {which}_image or {which}_identity")
    found, _ = handle.pipeline.identity([img.cpu().numpy() for img in image],
                                        before_predict=handle.load_networks)
    return found


def slider_lora(handle, start, end, mode: str, strength: float):
    """weight: exact strength·(ΔW(end) − ΔW(start)). coefficient: the LoRA of the identity moved past end."""
    check_strength("strength", strength)
    if mode == "weight":
        return lora_difference(make_lora(handle, end), make_lora(handle, start), strength)
    moved = interpolate(start, end, 0.5 + 0.5 * strength)  # strength 1: end; -1: start; 0: the midpoint
    return make_lora(handle, moved)


class ConceptSlider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptSlider",
            display_name="HyperLoRA Concept Slider",
            category=CATEGORY,
            description="A slider from a start to an end example (two photos or two identities): positive strength "
                        "moves toward the end, negative toward the start.",
            inputs=[
                HyperLoRAType.Input("hyper_lora", tooltip="From the HyperLoRA node (the loader)."),
                io.Combo.Input("mode", options=["weight", "coefficient"], default="weight",
                               tooltip="weight: the exact LoRA difference, LoRA(end) at +s and LoRA(start) at -s. "
                                       "coefficient: moves the identity itself between start and end (s=1: end, "
                                       "s=-1: start, beyond: extrapolates)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="How far to slide; negative goes toward the start."),
                io.Image.Input("start_image", optional=True, tooltip="Photo(s) of the start of the slider."),
                io.Image.Input("end_image", optional=True, tooltip="Photo(s) of the end of the slider."),
                IdentityType.Input("start_identity", optional=True, tooltip="Instead of start_image."),
                IdentityType.Input("end_identity", optional=True, tooltip="Instead of end_image."),
                io.Model.Input("model", optional=True,
                               tooltip="A model to apply the slider to (of the family the HyperLoRA was made for)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the slider (if one was given)."),
                     io.LoraModel.Output(display_name="lora", tooltip="The slider as a LoRA.")],
        )

    @classmethod
    def execute(cls, hyper_lora, mode, strength, start_image=None, end_image=None, start_identity=None,
                end_identity=None, model=None) -> io.NodeOutput:
        start = _identity(hyper_lora, start_image, start_identity, "start")
        end = _identity(hyper_lora, end_image, end_identity, "end")
        if model is not None:
            check_model(model, hyper_lora.core.targets)
        lora = slider_lora(hyper_lora, start, end, mode, strength)
        if model is not None:
            strength_model = 1.0 if mode == "weight" else COEFFICIENT_WEIGHT  # weight mode folds s into the LoRA
            model, _ = comfy.sd.load_lora_for_models(model, None, lora, strength_model, 0.0)
        return io.NodeOutput(model, lora)
