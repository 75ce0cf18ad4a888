"""HyperLoRAHook: an identity as HOOKS, for one region's conditioning and a range of steps."""

from __future__ import annotations

import comfy.hooks
from comfy_api.latest import io

from ..hyperlora_core.errors import InputValueError
from ..hyperlora_core.lora_io import ID_STRENGTH
from .apply import check_strength, make_lora
from .types import CATEGORY, HyperLoRAType, IdentityType


def identity_hooks(handle, identity, strength: float, start_percent: float, end_percent: float):
    """A weight hook carrying the in-memory LoRA, active from start to end percent of the sampling."""
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise InputValueError(f"start_percent ({start_percent}) must be below end_percent ({end_percent}), both "
                              "within 0..1: the hook is active from start to end of the sampling. Lower "
                              "start_percent or raise end_percent.")
    check_strength("strength", strength)
    hooks = comfy.hooks.create_hook_lora(make_lora(handle, identity), strength_model=strength, strength_clip=0.0)
    keyframes = comfy.hooks.HookKeyframeGroup()
    if start_percent > 0.0:
        keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.0))
    keyframes.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=start_percent))
    if end_percent < 1.0:
        keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=end_percent))
    hooks.set_keyframes_on_hooks(hook_kf=keyframes)
    return hooks


class HyperLoRAHook(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperLoRAHook",
            display_name="HyperLoRA Identity Hook",
            category=CATEGORY,
            description="Turns an identity into HOOKS. Attach them to one conditioning (Cond Set Props / Conditioning "
                        "Set Properties, with a mask for a region) to put this person only there: two hooks on two "
                        "regions give two people in one image.",
            inputs=[
                HyperLoRAType.Input("hyper_lora", tooltip="The HyperLoRA that made the identity."),
                IdentityType.Input("identity", tooltip="The identity."),
                io.Float.Input("strength", default=ID_STRENGTH, min=-2.0, max=2.0, step=0.01,
                               tooltip="LoRA weight of the identity while the hook is active."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the identity starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the identity stops."),
            ],
            outputs=[io.Hooks.Output(display_name="hooks", tooltip="For Conditioning Set Properties.")],
        )

    @classmethod
    def execute(cls, hyper_lora, identity, strength, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(identity_hooks(hyper_lora, identity, strength, start_percent, end_percent))
