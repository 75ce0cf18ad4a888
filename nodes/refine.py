"""HyperLoRARefine: a few dozen HyperDreamBooth-style fine-tuning steps seeded by the HyperLoRA prediction."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from ..hyperlora_core.refine import MODE_LR, MODES, RefineConfig
from .training import PRECISIONS, refine
from .types import CATEGORY, HyperLoRAType, IdentityType, LidbType

log = logging.getLogger(__name__)
DEFAULTS = RefineConfig()  # one home for every default: the core's config


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss per step as an IMAGE [1, H, W, 3]: each step grey, a running mean black, first and last in text."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        pad = 16

        def xy(i: int, v: float) -> tuple[float, float]:
            return (pad + (width - 2 * pad) * i / max(1, len(losses) - 1),
                    height - pad - (height - 2 * pad) * (v - lo) / span)

        smooth, acc = [], losses[0]
        for v in losses:
            acc = 0.8 * acc + 0.2 * v
            smooth.append(acc)
        if len(losses) > 1:
            draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 170, 170), width=1)
            draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(0, 0, 0), width=2)
        draw.text((pad, 2), f"loss {losses[0]:.4g} -> {losses[-1]:.4g} ({len(losses)} steps)", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)


class HyperLoRARefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperLoRARefine",
            display_name="HyperLoRA Refine",
            category=CATEGORY,
            description="A few dozen fine-tuning steps on the reference photos, starting from the HyperLoRA "
                        "prediction and/or a LiDB (HyperDreamBooth-style); mode lidb can also start from zero. The "
                        "incoming MODEL is never changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to fine-tune against, of the HyperLoRA's family (it is "
                                                "not changed)."),
                io.Vae.Input("vae", tooltip="The model's VAE: it encodes the reference photos into latents."),
                io.Conditioning.Input("positive", tooltip="The training prompt (CLIP Text Encode); it should contain "
                                                          "the trigger words 'fcsks fxhks fhyks'."),
                HyperLoRAType.Input("hyper_lora", optional=True,
                                    tooltip="The HyperLoRA that made the identity (needed with identity)."),
                IdentityType.Input("identity", optional=True,
                                   tooltip="The predicted identity to start from. Leave it and lidb unconnected "
                                           "to train a LiDB from zero (mode lidb)."),
                io.Image.Input("image", tooltip="Reference photos of the person (a batch). They are resized to "
                                                "'resolution' and, for augmentation, flipped and slightly cropped."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULTS.mode,
                               tooltip="rank_relaxed: keep the start and train a rank-r residual LoRA (the "
                                       "result is one LoRA). coefficients: train the identity's own coefficients "
                                       "(the result is still a small identity file). lidb: train a LiDB, a+b "
                                       "numbers per layer (~120 KB), from zero or on top of the prediction."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=5000,
                             tooltip="Optimiser steps; about 50 is enough."),
                io.Float.Input("lr", default=DEFAULTS.lr, min=0.0, max=1.0, step=1e-5, round=False,
                               tooltip="AdamW learning rate; 0 uses the mode's own: "
                                       + ", ".join(f"{m} {v:g}" for m, v in MODE_LR.items()) + "."),
                io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=128,
                             tooltip="Rank of the residual LoRA (rank_relaxed only)."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=True,
                             tooltip="Seed of the noise, timesteps, augmentation and the residual's start; the "
                                     "same seed gives the same result."),
                io.Int.Input("batch_size", default=DEFAULTS.batch, min=1, max=16,
                             tooltip="Noised latents per step; their timesteps are spread over the schedule."),
                io.Int.Input("resolution", default=DEFAULTS.resolution, min=256, max=2048, step=64,
                             tooltip="The references are resized to about resolution × resolution pixels, aspect "
                                     "kept (SDXL was trained at 1024)."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="auto: bf16 on GPUs that support it, otherwise the model's own dtype "
                                       "(fp16 with dynamic loss scaling). fp32 is slowest and most exact."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Keep only each ResBlock's and transformer's inputs and recompute the "
                                         "rest in the backward pass: much less memory, about a third slower."),
                io.Float.Input("id_strength", default=DEFAULTS.id_strength, min=-2.0, max=2.0, step=0.01,
                               tooltip="The weight you will apply the identity at: the prediction is trained in "
                                       "at it, and the output LoRA already contains it (load it at 1.0)."),
                LidbType.Input("lidb", optional=True,
                               tooltip="A LiDB (Load LiDB) to start from: mode lidb trains it further, "
                                       "rank_relaxed trains a residual on top of it (and of the prediction, if "
                                       "identity is connected too)."),
                io.Int.Input("lidb_a", default=DEFAULTS.lidb_a, min=1, max=1024, optional=True,
                             tooltip="Mode lidb: the down side's trainable size a (the paper's 100). It must not "
                                     "exceed any adapted layer's input width."),
                io.Int.Input("lidb_b", default=DEFAULTS.lidb_b, min=1, max=1024, optional=True,
                             tooltip="Mode lidb: the up side's trainable size b (the paper's 50). It must not "
                                     "exceed any adapted layer's output width."),
            ],
            outputs=[
                IdentityType.Output(display_name="identity", tooltip="The refined identity (coefficients mode; "
                                                                     "apply it at id_strength); in rank_relaxed "
                                                                     "mode the input identity."),
                io.LoraModel.Output(display_name="lora", tooltip="The refined LoRA (ComfyUI keys), id_strength "
                                                                 "included: load it at 1.0 (Load LoRA Model), "
                                                                 "or Save LoRA Weights."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step."),
                LidbType.Output(display_name="lidb", tooltip="The trained LiDB (mode lidb; Save LiDB writes it), "
                                                             "without the prediction it was trained on top of. "
                                                             "Empty in the other modes."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, hyper_lora=None, identity=None, image=None, mode=DEFAULTS.mode,
                steps=DEFAULTS.steps, lr=DEFAULTS.lr, rank=DEFAULTS.rank, seed=DEFAULTS.seed,
                batch_size=DEFAULTS.batch, resolution=DEFAULTS.resolution, precision="auto",
                gradient_checkpointing=True, id_strength=DEFAULTS.id_strength, lidb=None, lidb_a=DEFAULTS.lidb_a,
                lidb_b=DEFAULTS.lidb_b) -> io.NodeOutput:
        config = RefineConfig(mode=mode, steps=steps, lr=lr, rank=rank, seed=seed, batch=batch_size,
                              resolution=resolution, id_strength=id_strength, lidb_a=lidb_a, lidb_b=lidb_b)
        result, losses = refine(model, vae, positive, hyper_lora, identity, image, config, precision=precision,
                                checkpointing=gradient_checkpointing, start=lidb)
        log.info("HyperLoRA refine (%s): loss %.4g -> %.4g over %d steps", mode, losses[0], losses[-1], len(losses))
        return io.NodeOutput(result.identity or identity, result.lora, loss_curve_image(losses), result.lidb)
