"""Memory for training on ComfyUI's diffusion models: gradient checkpointing and frozen weights kept by reference.

* Checkpointing works at the level ComfyUI's own trainer uses (``comfy_extras/nodes_train.py``): the highest
  descendants of ``diffusion_model`` that are not containers (ResBlocks, SpatialTransformers, Down/Upsample,
  the DiT blocks of other models). SDXL's ``TimestepEmbedSequential`` blocks are containers: ``UNetModel``
  iterates over their children and never calls the block's own ``forward``, so patching a block does nothing.
* Frozen weights. ComfyUI loads models inside ``torch.inference_mode()``, and inference tensors cannot be saved
  for backward. Instead of copying them (a second UNet per step), :func:`frozen_by_reference` swaps each
  inference parameter for a normal tensor that aliases the same memory, for the duration of the run only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The highest descendants of ``root`` that are not containers: the units one forward call runs as a whole."""
    found: list[torch.nn.Module] = []
    for child in root.children():
        if isinstance(child, CONTAINERS):
            found.extend(checkpoint_units(child))
        else:
            found.append(child)
    return found


def _fresh(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _checkpointed(forward: Callable) -> Callable:
    """``forward`` under non-reentrant checkpointing. Its tensor arguments are cloned inside the recomputed region:
    some units add to their inputs in place (Flux's blocks do ``x += ...``), which would otherwise change the
    inputs kept for the recomputation and silently give wrong gradients. The clones are not kept."""
    def fresh(*args, **kwargs):
        return forward(*map(_fresh, args), **{k: _fresh(v) for k, v in kwargs.items()})

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(fresh, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Recompute each unit's activations in the backward pass instead of keeping them; yields how many units are
    checkpointed. The units' own ``forward`` is restored afterwards, also on error or interruption."""
    units = checkpoint_units(diffusion_model) if enabled else []
    try:
        for unit in units:
            unit.forward = _checkpointed(unit.forward)
        yield len(units)
    finally:
        for unit in units:
            unit.__dict__.pop("forward", None)


def _alias(t: torch.Tensor, parameter: bool) -> torch.Tensor:
    """A normal (not inference) tensor over the same memory as ``t``: no copy."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                    t.shape, t.stride())
        return torch.nn.Parameter(alias, requires_grad=False) if parameter else alias


@contextlib.contextmanager
def frozen_by_reference(module: torch.nn.Module) -> Iterator[int]:
    """Inference-mode parameters and buffers of ``module`` swapped for aliases of their memory, so that autograd
    can save them for backward by reference; the originals are put back afterwards. Yields how many were swapped.
    Nothing may write to these weights meanwhile (autograd would not notice)."""
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    try:
        for m in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(m, kind).items()):
                    if t is None or not t.is_inference():
                        continue
                    swapped.append((m, kind, name, t))
                    getattr(m, kind)[name] = _alias(t, kind == "_parameters")
        yield len(swapped)
    finally:
        for m, kind, name, t in reversed(swapped):
            getattr(m, kind)[name] = t
