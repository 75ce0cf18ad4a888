"""Memory for training on ComfyUI's diffusion models: gradient checkpointing and frozen weights kept by reference.

* Checkpointing works at the level ComfyUI's own trainer uses (``comfy_extras/nodes_train.py``): the highest
  descendants of ``diffusion_model`` that are not containers (ResBlocks, SpatialTransformers, Down/Upsample,
  the DiT blocks of other models). SDXL's ``TimestepEmbedSequential`` blocks are containers: ``UNetModel``
  iterates over their children and never calls the block's own ``forward``, so patching a block does nothing.
* Frozen weights. ComfyUI loads models inside ``torch.inference_mode()``, and inference tensors cannot be saved
  for backward. Instead of copying them (a second UNet per step), :func:`frozen_by_reference` swaps each
  inference parameter for a normal tensor that aliases the same memory, for the duration of the run only.
  Where the model computes in another dtype than its weights' (fp16 weights, bf16 compute), each layer casts its
  weight on every call, and autograd would keep every cast (a second UNet at the compute dtype):
  :func:`casts_by_reference` keeps a reference to the weight instead and casts it again in the backward pass.
* Host memory on the CPU. :func:`heap_returned` has glibc map tensors of 1 MiB or more on their own while training
  runs, so the per-layer weight casts and activations it frees go back to the system at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
TRAINING_MMAP_THRESHOLD = 1 << 20  # bytes: blocks at least this large are mapped on their own while training
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # bytes: where glibc's sliding threshold ends once tensors this big were freed


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


class _Cast(tuple):
    """A frozen layer's weight cast, saved as (layer, device, dtype)."""


def _outer_hooks() -> tuple[Callable, Callable] | None:
    """The saved-tensor hooks active when the run starts (a profiler's, a benchmark's), to be chained to."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _CastsByReference:
    """Saved-tensor hooks: a frozen layer's weight cast (ComfyUI's ops cast ``weight`` to the input's dtype and
    device on every call) is saved as (layer, device, dtype) and cast again when backward needs it. Only layers
    without weight functions (their cast is exactly ``weight.to(...)``), and only tensors that need no gradient,
    have the weight's shape and are not the weight itself. Every other tensor goes to the hooks that were active
    before (or is kept as it is)."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.current: torch.nn.Module | None = None
        self.outer = _outer_hooks()
        self.handles = []
        for m in root.modules():
            if hasattr(m, "comfy_cast_weights") and isinstance(getattr(m, "weight", None), torch.Tensor):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self.current = module

    def _leave(self, module, args, output) -> None:
        self.current = None

    def _is_cast(self, t: torch.Tensor) -> bool:
        """``t`` is a view (the cast itself, or e.g. its transpose that a matmul keeps) of a weight-sized buffer
        that is not the weight, needs no gradient, and is what a cast makes: another dtype or device than the
        weight's (without one, ``weight.to`` returns the weight itself) and the weight's sizes in some order. An
        activation that merely has as many elements (an early layer's input needs no gradient either) is not one."""
        m = self.current
        if m is None or t.requires_grad or getattr(m, "weight_function", None):
            return False
        w, storage = m.weight, t.untyped_storage()
        if (t.dtype == w.dtype and t.device == w.device) or sorted(t.shape) != sorted(w.shape):
            return False
        return (w.is_contiguous() and storage.nbytes() == w.numel() * t.element_size()
                and storage.data_ptr() != w.untyped_storage().data_ptr())

    def pack(self, t: torch.Tensor):
        if self._is_cast(t):
            return _Cast((self.current, t.device, t.dtype, t.size(), t.stride(), t.storage_offset()))
        return self.outer[0](t) if self.outer else t

    def unpack(self, packed):
        if isinstance(packed, _Cast):
            m, device, dtype, size, stride, offset = packed
            cast = m.weight.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
            return cast.as_strided(size, stride, offset)
        return self.outer[1](packed) if self.outer else packed


@contextlib.contextmanager
def casts_by_reference(diffusion_model: torch.nn.Module) -> Iterator[None]:
    """Within it, the frozen layers' weight casts are saved for backward by reference (see ``_CastsByReference``).
    Inside checkpointed units the recomputation keeps them, one unit at a time."""
    hooks = _CastsByReference(diffusion_model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            yield
    finally:
        for h in hooks.handles:
            h.remove()


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl)
        return None


@contextlib.contextmanager
def heap_returned(device: torch.device) -> Iterator[bool]:
    """While training on the CPU under glibc, blocks of 1 MiB or more are mapped on their own and given back to the
    system when freed; afterwards free heap pages are trimmed. Yields whether it applies (not on GPUs, whose
    activations are not in host memory, nor with other C libraries).

    glibc serves a block from its heap once a larger block has been freed: its mmap threshold slides up to 32 MiB.
    Training frees, every layer and every step, weight casts and activations of a few MiB to tens of MiB; the
    holes they leave in the heap stay resident until trimmed, and the heap's high-water mark, not the tensors alive,
    sets the process's RSS. Setting the threshold fixes it (glibc stops sliding it), so it is left at 32 MiB
    afterwards, the value the sliding one reaches in a process that handles tensors of that size.
    """
    libc = _libc() if device.type == "cpu" else None
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
