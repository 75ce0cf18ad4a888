"""LoadHyperLoRA: a checkpoint folder, a face analyzer and a CLIP encoder -> HYPER_LORA."""

from __future__ import annotations

from comfy_api.latest import io

from . import folders
from .handle import HyperLoRAHandle
from .types import CATEGORY, HyperLoRAType


class LoadHyperLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadHyperLoRA",
            display_name="HyperLoRA",  # the frontend's search puts an exact name first; any longer one loses to ids
            # such as HyperLoRAHook (13 characters), which it ranks by length
            category=CATEGORY,
            description="Start here: loads a HyperLoRA checkpoint folder (e.g. sdxl_hyper_id_lora_v1_fidelity) with "
                        "its face analyzer and CLIP encoder. Only file headers are read here; weights load on first "
                        "use.",
            inputs=[
                io.Combo.Input("checkpoint", options=folders.checkpoints(),
                               tooltip="Checkpoint folder in models/hyper_lora (hyper_lora_modules.json and the "
                                       "three .safetensors files, as released)."),
                io.Combo.Input("face_analyzer", options=folders.face_analyzers(),
                               tooltip="insightface antelopev2 folder in models/insightface (usually "
                                       "models/antelopev2)."),
                io.Combo.Input("provider", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="Where face analysis runs (onnxruntime). auto: CUDA when available."),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                               tooltip="Precision of the resampler and CLIP. auto: fp16 on a GPU, fp32 on the CPU."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP ViT-L/14 from Load CLIP Vision (clip-vit-large-patch14). "
                                            "Without it the CLIP folder beside the checkpoint or in "
                                            "models/hyper_lora/clip_vit is used."),
            ],
            outputs=[HyperLoRAType.Output(display_name="hyper_lora", tooltip="The loaded HyperLoRA.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint, face_analyzer) -> bool | str:
        """At queue time, with the other node errors: a checkpoint or analyzer that is not installed."""
        problems = [m for m in (folders.check_checkpoint(checkpoint), folders.check_face_analyzer(face_analyzer))
                    if m is not True]
        return " ".join(problems) or True

    @classmethod
    def execute(cls, checkpoint, face_analyzer, provider, dtype, clip_vision=None) -> io.NodeOutput:
        handle = HyperLoRAHandle(folders.checkpoint_path(checkpoint), folders.face_analyzer_path(face_analyzer),
                                 provider=provider, dtype=dtype, clip_vision=clip_vision)
        return io.NodeOutput(handle)
