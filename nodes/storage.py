"""Saving LoRAs for other tools, and saving / loading identities."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..hyperlora_core import Identity, save_lora
from ..hyperlora_core.config import TRIGGER_WORDS
from ..hyperlora_core.lora_io import KeyFormat
from . import folders
from .apply import check_model, lora_dtype, make_lora
from .targets import file_keys
from .types import CATEGORY, HyperLoRAType, IdentityType

log = logging.getLogger(__name__)


def lora_file_naming(handle, model=None) -> KeyFormat:
    """The key naming of a saved LoRA: the convention ``model``'s family uses, read from its LoRA key map (after
    checking the model fits), else kohya's ``lora_unet_<path>``, which ComfyUI maps for every family."""
    if model is None:
        return "kohya"
    check_model(model, handle.core.targets)
    return file_keys(model, handle.core.targets)


class SaveHyperLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveHyperLoRA",
            display_name="Save HyperLoRA as LoRA",
            category=CATEGORY,
            description="Writes the identity as a normal LoRA file into models/loras, with kohya keys: ComfyUI's "
                        "Load LoRA, A1111/Forge and kohya's scripts load it. Connect the model to name the keys as "
                        "its family's LoRAs name them.",
            inputs=[
                HyperLoRAType.Input("hyper_lora", tooltip="The HyperLoRA that made the identity."),
                IdentityType.Input("identity", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="hyperlora/identity",
                                tooltip="File name (and sub-folder) under models/loras; a number is appended."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model the LoRA is for. Its LoRA key map names the file's keys "
                                       "in its family's convention, and a model of another family is refused. "
                                       "Without it: kohya keys (lora_unet_...), which ComfyUI loads for every "
                                       "family."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved file, as Load LoRA lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, hyper_lora, identity, filename_prefix, model=None) -> io.NodeOutput:
        target = folders.save_target("loras", filename_prefix)
        lora = make_lora(hyper_lora, identity, "id", key_format=lora_file_naming(hyper_lora, model))
        save_lora(lora, target, dtype=lora_dtype(hyper_lora),
                  metadata={"hyperlora_fingerprint": hyper_lora.core.fingerprint,
                            "hyperlora_trigger_words": TRIGGER_WORDS})
        log.info("saved HyperLoRA LoRA %s", target)
        return folders.saved_output("loras", target)


class SaveHyperLoRAIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveHyperLoRAIdentity",
            display_name="Save HyperLoRA Identity",
            category=CATEGORY,
            description="Saves an identity (a few hundred KB) into models/hyper_lora/identities.",
            inputs=[
                IdentityType.Input("identity", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="identity",
                                tooltip="File name under models/hyper_lora/identities; a number is appended."),
                io.Combo.Input("storage", options=["fp16", "int8"], default="fp16",
                               tooltip="fp16: ~282 KB, exact. int8: ~143 KB, error <= 2e-3 per coefficient."),
            ],
            outputs=[io.String.Output(display_name="identity_name", tooltip="The saved file's name.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, identity, filename_prefix, storage) -> io.NodeOutput:
        target = folders.save_target(folders.IDENTITIES, filename_prefix)
        identity.save(target, storage=storage)
        return folders.saved_output(folders.IDENTITIES, target)


class LoadHyperLoRAIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadHyperLoRAIdentity",
            display_name="Load HyperLoRA Identity",
            category=CATEGORY,
            description="Loads a saved identity. It only works with the checkpoint that made it.",
            inputs=[io.Combo.Input("identity", options=folders.identities(),
                                   tooltip="An identity file in models/hyper_lora/identities.")],
            outputs=[IdentityType.Output(display_name="identity", tooltip="The loaded identity.")],
        )

    @classmethod
    def validate_inputs(cls, identity) -> bool | str:
        return folders.check_identity(identity)

    @classmethod
    def execute(cls, identity) -> io.NodeOutput:
        return io.NodeOutput(Identity.load(folders.identity_path(identity)))
