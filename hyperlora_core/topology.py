"""The SDXL UNet's 140 attention modules, and the three ways checkpoints name them.

A HyperLoRA checkpoint lists its modules in ``hyper_lora_modules.json``. The names are not documented and
appear in three spellings; all of them resolve here to one :class:`AttnModule`, which knows its ComfyUI/SGM
name, its diffusers name and its widths. The json order is kept by the caller: it is the token order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

#: The four linears of an attention module, in token order, as (short name, diffusers/SGM suffix, kohya suffix).
LINEARS: tuple[tuple[str, str, str], ...] = (
    ("to_q", "to_q", "to_q"),
    ("to_k", "to_k", "to_k"),
    ("to_v", "to_v", "to_v"),
    ("to_out", "to_out.0", "to_out_0"),
)
TOKENS_PER_MODULE = 2 * len(LINEARS)  # a down and an up token per linear

# (diffusers prefix, SGM prefix, attention level 0 = 640-wide / 1 = 1280-wide, transformer blocks)
_SDXL_BLOCKS: tuple[tuple[str, str, int, int], ...] = (
    ("down_blocks.1.attentions.0", "input_blocks.4.1", 0, 2),
    ("down_blocks.1.attentions.1", "input_blocks.5.1", 0, 2),
    ("down_blocks.2.attentions.0", "input_blocks.7.1", 1, 10),
    ("down_blocks.2.attentions.1", "input_blocks.8.1", 1, 10),
    ("mid_block.attentions.0", "middle_block.1", 1, 10),
    ("up_blocks.0.attentions.0", "output_blocks.0.1", 1, 10),
    ("up_blocks.0.attentions.1", "output_blocks.1.1", 1, 10),
    ("up_blocks.0.attentions.2", "output_blocks.2.1", 1, 10),
    ("up_blocks.1.attentions.0", "output_blocks.3.1", 0, 2),
    ("up_blocks.1.attentions.1", "output_blocks.4.1", 0, 2),
    ("up_blocks.1.attentions.2", "output_blocks.5.1", 0, 2),
)

NAMINGS = ("kohya_diffusers", "kohya_sgm", "diffusers")


@dataclass(frozen=True)
class UNetSpec:
    """Widths of the UNet a HyperLoRA targets; every module's linear sizes follow from it."""

    name: str  # shown in messages, e.g. "SDXL"
    level_widths: tuple[int, int]  # hidden width of the two attention levels (SDXL: 640 and 1280)
    context_dim: int  # width of the text context read by attn2's to_k / to_v (SDXL: 2048)

    def __post_init__(self) -> None:
        if len(self.level_widths) != 2 or min(self.level_widths) <= 0 or self.context_dim <= 0:
            raise ValueError(f"UNetSpec {self.name!r}: widths must be two positive ints and context_dim positive")


SDXL = UNetSpec(name="SDXL", level_widths=(640, 1280), context_dim=2048)


@dataclass(frozen=True)
class AttnModule:
    """One attention module of the SDXL UNet."""

    sgm: str  # ComfyUI / SGM name without prefix, e.g. "input_blocks.4.1.transformer_blocks.0.attn1"
    diffusers: str  # diffusers name, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    level: int  # 0: the 640-wide level, 1: the 1280-wide level
    cross: bool  # True for attn2, whose to_k / to_v read the text context

    def hidden(self, spec: UNetSpec) -> int:
        return spec.level_widths[self.level]

    def linear_shape(self, linear: str, spec: UNetSpec) -> tuple[int, int]:
        """(in_features, out_features) of ``linear`` ("to_q", "to_k", "to_v" or "to_out") under ``spec``."""
        width = self.hidden(spec)
        reads_context = self.cross and linear in ("to_k", "to_v")
        return (spec.context_dim if reads_context else width, width)

    def name(self, naming: str) -> str:
        if naming == "kohya_diffusers":
            return "lora_unet_" + self.diffusers.replace(".", "_")
        if naming == "kohya_sgm":
            return "lora_unet_" + self.sgm.replace(".", "_")
        if naming == "diffusers":
            return self.diffusers + ".processor"
        raise ValueError(f"unknown module naming {naming!r}; use one of {', '.join(NAMINGS)}")


@lru_cache(maxsize=1)
def sdxl_modules() -> tuple[AttnModule, ...]:
    """All 140 modules in SGM order (down, mid, up); attn1 before attn2 in each transformer block."""
    modules = []
    for diff_prefix, sgm_prefix, level, depth in _SDXL_BLOCKS:
        for t in range(depth):
            for a in (1, 2):
                tail = f"transformer_blocks.{t}.attn{a}"
                modules.append(AttnModule(f"{sgm_prefix}.{tail}", f"{diff_prefix}.{tail}", level, a == 2))
    return tuple(modules)


def diffusers_order() -> tuple[AttnModule, ...]:
    """The same modules in diffusers' registration order: down, up, then mid."""
    rank = {"down": 0, "up": 1, "mid": 2}
    return tuple(sorted(sdxl_modules(), key=lambda m: rank[m.diffusers.split("_", 1)[0]]))


@lru_cache(maxsize=1)
def _lookup() -> dict[str, AttnModule]:
    table: dict[str, AttnModule] = {}
    for m in sdxl_modules():
        for naming in NAMINGS:
            table[m.name(naming)] = m
        table[m.diffusers] = m
        table[m.sgm] = m
        table["diffusion_model." + m.sgm] = m
        table["unet." + m.diffusers] = m
    return table


def resolve(name: str) -> AttnModule | None:
    """The SDXL module a json name refers to, in any supported naming; None if it names none."""
    return _lookup().get(name.strip())


def kohya_key(module: AttnModule, linear: str) -> str:
    """``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``: loads in ComfyUI, A1111/Forge and kohya."""
    suffix = dict((s, k) for s, _, k in LINEARS)[linear]
    return "lora_unet_" + module.sgm.replace(".", "_") + "_" + suffix


def comfy_key(module: AttnModule, linear: str) -> str:
    """``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q``: ComfyUI's LORA_MODEL keys."""
    suffix = dict((s, d) for s, d, _ in LINEARS)[linear]
    return "diffusion_model." + module.sgm + "." + suffix
