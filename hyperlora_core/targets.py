"""The linears a personalisation targets, as data: the seam between model families and what trains on them.

A :class:`TargetLayers` lists the weight-bearing linears of a diffusion model that a HyperLoRA (or a LiDB file)
adapts, grouped into modules, in token order. Each linear is named by its ComfyUI weight key without the
``.weight`` suffix (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q``), which is both the key
ComfyUI's ``LORA_MODEL`` patches use and the name ``comfy.lora`` maps other conventions to.

The released SDXL checkpoints describe their modules by name only; :func:`sdxl_target_layers` expands that
description. Other families are read from the model itself (see the any-base-model work).
"""

from __future__ import annotations

from dataclasses import dataclass

from .topology import LINEARS, SDXL, UNetSpec, comfy_key, sdxl_modules

#: Each target linear owns two tokens of the weight sequence: its down token, then its up token.
TOKENS_PER_LINEAR = 2


@dataclass(frozen=True)
class TargetLinear:
    """One adapted linear: its ComfyUI key (no ``.weight``) and its sizes."""

    key: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if not self.key or self.key.endswith(".weight"):
            raise ValueError(f"target linear key {self.key!r}: give the module's key without '.weight'")
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"target linear {self.key!r}: sizes must be positive, got "
                             f"{self.in_features} -> {self.out_features}")


@dataclass(frozen=True)
class TargetModule:
    """A group of linears that share one place in the checkpoint's module list (e.g. an attention module)."""

    name: str
    linears: tuple[TargetLinear, ...]


@dataclass(frozen=True)
class TargetLayers:
    """Every target of one model family, in token order."""

    family: str
    modules: tuple[TargetModule, ...]

    @property
    def linears(self) -> tuple[TargetLinear, ...]:
        return tuple(lin for module in self.modules for lin in module.linears)

    @property
    def token_count(self) -> int:
        return TOKENS_PER_LINEAR * len(self.linears)


def sdxl_target_layers(spec: UNetSpec = SDXL) -> TargetLayers:
    """The 140 attention modules (560 linears) of an SDXL-topology UNet of the widths in ``spec``."""
    modules = []
    for module in sdxl_modules():
        linears = []
        for short, _, _ in LINEARS:
            fan_in, fan_out = module.linear_shape(short, spec)
            linears.append(TargetLinear(comfy_key(module, short), fan_in, fan_out))
        modules.append(TargetModule(module.sgm, tuple(linears)))
    return TargetLayers(spec.name, tuple(modules))
