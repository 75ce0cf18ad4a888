"""Export a trained hypernetwork in the released folder format, and read such a folder back into one.

The folder holds exactly the released files (``hyper_lora_modules.json``, ``hyper_lora_modules.safetensors``,
``resampler.safetensors``, ``id_projector.safetensors`` and, with a Base-LoRA, ``base_resampler.safetensors``),
fp16 by default, so ``load_hyperlora``, our nodes and the official loader read it unchanged. The training config
and step go beside the folder (``<folder>.train.json``), not inside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import DEFAULT_DIM_HEAD, MODULES_JSON
from ..targets import TargetLayers, released_json
from .hypernet import BasisStack, HyperNetwork

NAMING = "kohya_diffusers"  # the module naming of a released-style json


def _basis_tensors(stack: BasisStack) -> dict[str, torch.Tensor]:
    return {s.key: stack.tensor(s) for s in stack.slots}


def module_json(targets: TargetLayers) -> dict[str, object]:
    """The module list of an export: released-style where the targets are SDXL's attention modules (the official
    loader and older versions read it), else the extended form that describes every linear and the family."""
    released = released_json(targets, NAMING)
    return released if released is not None else targets.to_json()


def export_checkpoint(net: HyperNetwork, folder: str | Path, *, dtype: torch.dtype = torch.float16,
                      training: dict | None = None) -> Path:
    """Write ``net`` as a released-format checkpoint folder; ``training`` (config, step) goes beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODULES_JSON).write_text(json.dumps(module_json(net.targets), indent=2))

    def save(tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None) -> None:
        out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
        save_file(out, str(folder / name), metadata=metadata)

    told = {"dim_head": str(net.config.dim_head)} if net.config.dim_head != DEFAULT_DIM_HEAD else None
    basis = _basis_tensors(net.id_bases)
    if net.base_bases is not None:
        basis.update(_basis_tensors(net.base_bases))
    save(basis, "hyper_lora_modules.safetensors")
    save(net.resampler.state_dict(), "resampler.safetensors", told)
    save(net.id_projector.state_dict(), "id_projector.safetensors")
    if net.base_resampler is not None:
        save(net.base_resampler.state_dict(), "base_resampler.safetensors", told)
    if training is not None:
        folder.with_name(folder.name + ".train.json").write_text(json.dumps(training, indent=1))
    return folder


def import_checkpoint(net: HyperNetwork, folder: str | Path) -> HyperNetwork:
    """Load a released-format folder (e.g. an export, to continue training from it) into ``net``, strictly."""
    folder = Path(folder)
    net.resampler.load_state_dict(_read(folder / "resampler.safetensors"), strict=True)
    net.id_projector.load_state_dict(_read(folder / "id_projector.safetensors"), strict=True)
    if net.base_resampler is not None:
        net.base_resampler.load_state_dict(_read(folder / "base_resampler.safetensors"), strict=True)
    basis = _read(folder / "hyper_lora_modules.safetensors")
    with torch.no_grad():
        for stack in (net.id_bases, net.base_bases):
            if stack is None:
                continue
            for key, slot in zip(_basis_tensors(stack), stack.slots, strict=True):
                if key not in basis:
                    raise KeyError(f"'{folder / 'hyper_lora_modules.safetensors'}' lacks {key!r}")
                stack.groups[slot.group][slot.row].copy_(basis[key])
    return net


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' is missing")
    return {k: v.float() for k, v in load_file(str(path)).items()}
