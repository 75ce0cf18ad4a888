"""LoRA state dicts: key formats, building from mixed bases, saving.

A LoRA here is a plain ``dict[str, Tensor]`` with, per target linear ``P``:
``P.lora_down.weight`` [r, in], ``P.lora_up.weight`` [out, r] and ``P.alpha`` (scalar), so that the weight
delta is ``up @ down · alpha / r``. Key prefixes follow one of two formats:

* ``kohya``: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` (ComfyUI's LoraLoader maps it for
  every family; for SDXL A1111/Forge and kohya's scripts load it too);
* ``comfy``: ``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (ComfyUI's LORA_MODEL);
* a mapping {target key: prefix}: a family's own convention, as a host reads it from its key maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .safetensors_file import save_atomic
from .targets import TargetLayers, TargetLinear, kohya_prefix

KeyFormat = str | Mapping[str, str]  # "kohya", "comfy", or {target key: LoRA key prefix} (a family's own naming)
KEY_FORMATS: dict[str, Callable[[TargetLinear], str]] = {"kohya": kohya_prefix, "comfy": lambda lin: lin.key}
ALPHA_PER_RANK = 0.5  # the method's alpha = rank / 2, i.e. a LoRA scale of 0.5
ID_STRENGTH = 0.85  # the weight an identity's LoRA is applied at by default (the method recommends 0.75–0.85)


def key_function(key_format: KeyFormat) -> Callable[[TargetLinear], str]:
    """The LoRA key prefix of a target linear in ``key_format``; a mapping must name every target."""
    if isinstance(key_format, Mapping):
        def named(linear: TargetLinear) -> str:
            if linear.key not in key_format:
                raise ValueError(f"the LoRA key naming has no name for target {linear.key!r}")
            return key_format[linear.key]
        return named
    try:
        return KEY_FORMATS[key_format]
    except KeyError:
        raise ValueError(f"key_format must be one of {sorted(KEY_FORMATS)}, got {key_format!r}") from None


def build_lora(
    mixed: list[dict[str, torch.Tensor]],
    targets: TargetLayers,
    key_format: KeyFormat = "kohya",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Mixed basis matrices (per target linear {"down": [in, r], "up": [r, out]}) -> LoRA state dict."""
    key_of = key_function(key_format)
    lora: dict[str, torch.Tensor] = {}
    for linear, pair in zip(targets.linears, mixed, strict=True):  # token order
        _add_pair(lora, key_of(linear), pair, dtype)
    return lora


def lora_pair(down_mixed: torch.Tensor, up_mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixed bases in basis orientation (``[..., in, r]``, ``[..., r, out]``) -> the stored orientation
    (``down [..., r, in]``, ``up [..., out, r]``) and alpha = r / 2, so the delta is ``alpha / r · up @ down``.

    The one definition of a HyperLoRA layer's LoRA: inference (:func:`build_lora`) and training both call it.
    """
    rank = down_mixed.shape[-1]
    return down_mixed.transpose(-1, -2), up_mixed.transpose(-1, -2), rank * ALPHA_PER_RANK


def _add_pair(lora: dict[str, torch.Tensor], prefix: str, pair: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    down, up, alpha = lora_pair(pair["down"], pair["up"])
    lora[prefix + ".lora_down.weight"] = down.to(dtype).contiguous()
    lora[prefix + ".lora_up.weight"] = up.to(dtype).contiguous()
    lora[prefix + ".alpha"] = torch.tensor(alpha, dtype=dtype)


def lora_prefixes(lora: dict[str, torch.Tensor]) -> list[str]:
    """The target prefixes of a LoRA state dict, in insertion order."""
    suffix = ".lora_down.weight"
    return [key[: -len(suffix)] for key in lora if key.endswith(suffix)]


def lora_delta(lora: dict[str, torch.Tensor], prefix: str, strength: float = 1.0) -> torch.Tensor:
    """The weight delta ``strength · alpha / r · up @ down`` the LoRA adds at ``prefix`` (float32)."""
    down = lora[prefix + ".lora_down.weight"].float()
    up = lora[prefix + ".lora_up.weight"].float()
    alpha = float(lora[prefix + ".alpha"]) if prefix + ".alpha" in lora else down.shape[0]
    return strength * alpha / down.shape[0] * (up @ down)


def save_lora(lora: dict[str, torch.Tensor], path: str | Path, *, dtype: torch.dtype | None = torch.float16,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA as safetensors (fp16 by default, as LoRA files usually are), atomically; returns the path."""
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in lora.items()}
    return save_atomic(tensors, path, metadata={"ss_network_module": "networks.lora", **(metadata or {})})
