"""Backpropagation through ComfyUI blocks that update their residual streams in place.

ComfyUI's stream blocks (``DoubleStreamBlock`` / ``SingleStreamBlock`` of Flux, Chroma and HunyuanVideo) add to
their streams in place (``txt += ...``, ``x += ...``) after one of their LayerNorms has read the stream; the
LayerNorm keeps that tensor for its backward, so autograd refuses the backward ("modified by an inplace
operation"). While gradients are recorded, each of those LayerNorms reads a copy of its input instead: the in-place
update then changes only the stream, and the values and gradients are those of the out-of-place computation.
Without gradients nothing is copied. Other blocks (UNets, MMDiT, Qwen-Image) update out of place and are left as
they are, so their training costs nothing more; a block that updated in place elsewhere would fail loudly with
autograd's own error, never silently.
"""

from __future__ import annotations

import torch

STREAM_BLOCK_SUFFIX = "StreamBlock"  # class-name suffix of the blocks that update their streams in place


def _copy_input(module: torch.nn.Module, args: tuple):
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (args[0].clone(), *args[1:])


def guard_inplace_streams(diffusion_model: torch.nn.Module) -> int:
    """Make the LayerNorms of ``diffusion_model``'s stream blocks read a copy of their input while gradients are
    recorded; returns how many were guarded."""
    count = 0
    for block in diffusion_model.modules():
        if not type(block).__name__.endswith(STREAM_BLOCK_SUFFIX):
            continue
        for module in block.children():
            if isinstance(module, torch.nn.LayerNorm):
                module.register_forward_pre_hook(_copy_input)
                count += 1
    return count
