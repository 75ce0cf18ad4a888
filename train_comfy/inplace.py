"""Backpropagation through ComfyUI models that update their residual stream in place.

ComfyUI's Flux blocks (and others written for inference) add to their residual stream in place
(``txt += ...``, ``x += ...``) after a LayerNorm has read it; the LayerNorm keeps that tensor for its backward, so
autograd refuses the backward ("modified by an inplace operation"). While gradients are recorded, each LayerNorm
here reads a copy of its input instead: the in-place update then changes only the stream, and the values (and
gradients) are those of the unmodified forward. Without gradients nothing is copied.
"""

from __future__ import annotations

import torch


def _copy_input(module: torch.nn.Module, args: tuple):
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (args[0].clone(), *args[1:])


def guard_inplace_streams(diffusion_model: torch.nn.Module) -> int:
    """Make every LayerNorm of ``diffusion_model`` read a copy of its input while gradients are recorded; returns
    how many were guarded."""
    count = 0
    for module in diffusion_model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(_copy_input)
            count += 1
    return count
