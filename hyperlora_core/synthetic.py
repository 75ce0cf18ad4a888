"""Random checkpoints in the released file format, for tests, benchmarks and host smoke runs.

The writer follows the released layout exactly (file names, keys, shapes, json) at any width: the real
SDXL topology of 140 modules at tiny widths for tests, or full size for benchmarks. Every tensor is drawn
from a seed derived from what it *is* (a module's canonical name, a parameter name), not from where it is
written, so two checkpoints that list the modules in different json orders describe the same network.
Files are streamed tensor by tensor: writing a 3 GB basis never holds more than one tensor in memory.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .config import IdProjectorConfig, ResamplerConfig
from .safetensors_file import DTYPES
from .targets import SIDES, TOKENS_PER_LINEAR, TargetLayers, basis_names, released_target_layers
from .topology import NAMINGS, AttnModule, UNetSpec, diffusers_order, sdxl_modules

TINY_UNET = UNetSpec(name="tiny SDXL", level_widths=(16, 32), context_dim=24)
_TAGS = {v[0]: k for k, v in DTYPES.items()}

Entry = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]  # key, shape, producer


def write_safetensors(path: Path, entries: Iterable[Entry], dtype: torch.dtype,
                      metadata: dict[str, str] | None = None) -> Path:
    """Stream tensors into a safetensors file: header first, then each tensor as it is produced."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, item = 0, torch.empty((), dtype=dtype).element_size()
    for key, shape, _ in entries:
        n = item
        for s in shape:
            n *= s
        header[key] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape, make in entries:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"producer of {key} gave {list(t.shape)}, expected {list(shape)}")
            fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return path


def _gen(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tag.encode()))


def _normal(seed: int, tag: str, shape: Sequence[int], scale: float, shift: float = 0.0) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(tuple(shape), generator=_gen(seed, tag)) * scale + shift


def _resampler_entries(config: ResamplerConfig, targets: TargetLayers, seed: int, tag: str) -> list[Entry]:
    entries: list[Entry] = []
    for key, shape in config.expected_shapes().items():
        if key == "latents":
            def latents(shape=shape) -> torch.Tensor:
                rows = [torch.randn(TOKENS_PER_LINEAR * len(m.linears), config.dim,
                                    generator=_gen(seed, f"{tag}.latents.{m.name}")) for m in targets.modules]
                return torch.cat(rows).reshape(shape)
            entries.append((key, shape, latents))
        elif key.endswith(".weight") and len(shape) == 1:  # LayerNorm gain
            entries.append((key, shape, _normal(seed, f"{tag}.{key}", shape, 0.1, 1.0)))
        else:
            fan_in = shape[-1] if len(shape) == 2 else 1
            entries.append((key, shape, _normal(seed, f"{tag}.{key}", shape, fan_in ** -0.5)))
    return entries


def write_checkpoint(
    folder: str | Path,
    *,
    naming: str = "kohya_diffusers",
    order: str = "sgm",
    unet: UNetSpec = TINY_UNET,
    k: int = 16,
    rank: int = 4,
    base: bool = False,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    dim_head: int = 16,
    num_id_tokens: int = 4,
    id_width: int = 24,
    id_embed_dim: int = 512,
    clip_dim: int = 1024,
    encoders: tuple[str, ...] = ("arcface", "clip"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    modules: Sequence[AttnModule] | None = None,
    targets: TargetLayers | None = None,
) -> Path:
    """Write a complete random checkpoint folder; returns its path.

    naming: one of kohya_diffusers, kohya_sgm, diffusers. order: "sgm", "diffusers" or "reversed" (json order).
    encoders: ("arcface", "clip") as released, or ("arcface",) / ("clip",) for one-condition resamplers.
    targets: any family's target linears, written as the extended module list (naming, order, unet and modules
    then do not apply); None writes the released SDXL-style list of ``modules`` at the widths of ``unet``.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if targets is None:
        if modules is None:
            modules = {"sgm": sdxl_modules(), "diffusers": diffusers_order(),
                       "reversed": tuple(reversed(sdxl_modules()))}[order]
        table = {m.name(naming): {"hidden_size": m.hidden(unet),
                                  "cross_attention_dim": unet.context_dim if m.cross else None} for m in modules}
        targets = released_target_layers(modules, unet)
    else:
        table = targets.to_json()
    (folder / "hyper_lora_modules.json").write_text(json.dumps(table, indent=2))
    write_safetensors(folder / "hyper_lora_modules.safetensors", _basis_entries(targets, k, rank, base, seed), dtype)

    two = "arcface" in encoders and "clip" in encoders
    x_dim = id_width if "arcface" in encoders else clip_dim
    common = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, num_queries=targets.token_count,
                  out_dim=k, ff_inner=4 * dim)
    resampler = ResamplerConfig(x_dim=x_dim, y_dim=clip_dim if two else None, **common)
    told = {"dim_head": str(dim_head)} if dim_head != 64 else None  # the release says nothing: 64
    write_safetensors(folder / "resampler.safetensors", _resampler_entries(resampler, targets, seed, "id"), dtype,
                      told)
    if "arcface" in encoders:
        proj = IdProjectorConfig(embed_dim=id_embed_dim, num_tokens=num_id_tokens, width=id_width)
        entries = [(key, shape, _normal(seed, f"proj.{key}", shape, 0.1 if len(shape) == 1 else shape[-1] ** -0.5,
                                        1.0 if key == "2.weight" else 0.0))
                   for key, shape in proj.expected_shapes().items()]
        write_safetensors(folder / "id_projector.safetensors", entries, dtype)
    if base:
        base_cfg = ResamplerConfig(x_dim=clip_dim, y_dim=None, **common)
        write_safetensors(folder / "base_resampler.safetensors",
                          _resampler_entries(base_cfg, targets, seed, "base"), dtype, told)
    return folder


def _basis_entries(targets: TargetLayers, k: int, rank: int, base: bool, seed: int) -> list[Entry]:
    """Every basis tensor, seeded by the module's name and the linear's (not by position in the file)."""
    entries: list[Entry] = []
    kinds = [("id", rank)] + ([("base", rank // 2)] if base else [])
    for i, module in enumerate(targets.modules):
        for name, lin in zip(basis_names(module), module.linears, strict=True):
            for kind, r in kinds:
                for side, shape in zip(SIDES, ((k, lin.in_features, r), (k, r, lin.out_features)), strict=True):
                    tag = f"basis.{module.name}.{name}.{kind}.{side}"
                    entries.append((f"{i}.{name}.{kind}_{side}_basis", shape, _normal(seed, tag, shape, 0.1)))
    return entries
