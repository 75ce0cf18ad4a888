"""The trainable hypernetwork: the core's resampler and ID projector plus the LoRA bases as parameters.

One sample's face conditions -> unit-norm coefficient tokens (``normalize_tokens`` of the resampler's
per-image output: a training sample is one reference image) -> per-linear LoRA factors, mixed with the core's
:func:`~hyperlora_core.basis.mix_bases` and oriented by :func:`~hyperlora_core.lora_io.lora_pair`, the very
functions inference uses. Bases of equal shape are stacked into one parameter ``[j, k, a, b]`` so a step mixes
each shape group with one einsum (and FSDP shards them along j).

Parameter groups (what a stage trains): ``base`` (base resampler + base bases), ``id_x`` (ID projector and the
resampler's x path: proj_in, attn2, norm_attn2_*), ``id_clip`` (the CLIP branch: proj_in_2, attn3, norm_attn3_*),
``id_shared`` (latents, attn1, feed-forward, their norms, proj_out) and ``id_bases``.

Letters: ``b`` samples, ``q`` tokens, ``j`` stacked basis members, ``k`` basis size, ``a``/``c`` matrix sides,
``r`` rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..basis import mix_bases
from ..config import IdProjectorConfig, ResamplerConfig
from ..lora_io import lora_pair
from ..resampler import IdProjector, Resampler, normalize_tokens
from ..targets import TargetLayers, basis_keys, basis_layout, token_index
from .config import ModelConfig
from .denoiser import Factors

X_PATH = ("proj_in", "attn2", "norm_attn2_l", "norm_attn2_x")
CLIP_PATH = ("proj_in_2", "attn3", "norm_attn3_l", "norm_attn3_y")


@dataclass(frozen=True)
class Slot:
    """Where one basis tensor lives in its stacked group."""

    linear: int  # index of the target linear (token order)
    side: int  # 0 down, 1 up
    key: str  # its key in hyper_lora_modules.safetensors
    group: str  # name of the stacked parameter
    row: int  # index along its first axis


class BasisStack(nn.Module):
    """All bases of one kind, stacked by shape: ``groups[name]`` is ``[j, k, a, c]``."""

    def __init__(self, targets: TargetLayers, kind: str, k: int, rank: int, *, up_std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.slots: list[Slot] = []
        shapes: dict[str, tuple[int, int, int]] = {}
        rows: dict[str, int] = {}
        linears = targets.linears
        for token, key in enumerate(basis_keys(basis_layout(targets), kind)):
            i, side = divmod(token, 2)
            a, c = (linears[i].in_features, rank) if side == 0 else (rank, linears[i].out_features)
            name = f"{'down' if side == 0 else 'up'}_{a}x{c}"
            shapes[name] = (k, a, c)
            self.slots.append(Slot(i, side, key, name, rows.get(name, 0)))
            rows[name] = rows.get(name, 0) + 1
        self.groups = nn.ParameterDict()
        for name, (kk, a, c) in shapes.items():
            std = a ** -0.5 if name.startswith("down") else up_std
            self.groups[name] = nn.Parameter(torch.randn(rows[name], kk, a, c, generator=generator) * std)
        for name in self.groups:  # token of every row, in row order
            index = [token_index(s.linear, s.side) for s in self.slots if s.group == name]
            self.register_buffer(f"tokens_{name}", torch.tensor(index), persistent=False)
        _, _, alpha = lora_pair(torch.zeros(1, rank), torch.zeros(rank, 1))
        self.up_scale = alpha / rank  # the LoRA scale alpha / r, carried by the up matrices

    def forward(self, tokens: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """tokens [b, q, k] -> {(linear, side): mixed [b, a, c]} through the core's mix_bases, the up matrices
        scaled by alpha / r. Per group: one gather, one einsum, and (mixing being linear) the scale on the group's
        coefficients rather than on each matrix; one unbind, whose backward stacks the rows' gradients once where
        a select per row would write a zero tensor of the whole group for every row (j² work)."""
        rows = {}
        for name, group in self.groups.items():
            coefs = tokens[:, getattr(self, f"tokens_{name}")]
            rows[name] = mix_bases(coefs * self.up_scale if name.startswith("up") else coefs, group).unbind(1)
        return {(s.linear, s.side): rows[s.group][s.row] for s in self.slots}

    def tensor(self, slot: Slot) -> torch.Tensor:
        return self.groups[slot.group][slot.row]


class HyperNetwork(nn.Module):
    """Resampler(s), ID projector and bases for the target linears ``targets`` of a base model."""

    def __init__(self, config: ModelConfig, targets: TargetLayers) -> None:
        super().__init__()
        self.config, self.targets = config, targets
        g = torch.Generator().manual_seed(config.init_seed)
        common = dict(dim=config.dim, depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                      num_queries=targets.token_count, out_dim=config.k,
                      ff_inner=config.ff_mult * config.dim)
        self.resampler_config = ResamplerConfig(x_dim=config.dim, y_dim=config.clip_dim, **common)
        self.projector_config = IdProjectorConfig(embed_dim=config.embed_dim, num_tokens=config.id_tokens,
                                                  width=config.dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.resampler = Resampler(self.resampler_config)
            self.id_projector = IdProjector(self.projector_config)
            self.base_resampler = Resampler(ResamplerConfig(x_dim=config.clip_dim, y_dim=None, **common)) \
                if config.base else None
            for resampler in filter(None, (self.resampler, self.base_resampler)):
                nn.init.normal_(resampler.latents, std=config.dim ** -0.5)
            for layer in self.resampler.layers:  # the x path joins in stage 3 as a no-op, then learns
                nn.init.zeros_(layer.attn2.to_out[0].weight)
        self.id_bases = BasisStack(targets, "id", config.k, config.id_rank, up_std=config.up_basis_std, generator=g)
        self.base_bases = BasisStack(targets, "base", config.k, config.base_rank, up_std=config.up_basis_std,
                                     generator=g) if config.base else None

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameter groups a stage chooses from (see the module docstring)."""
        out: dict[str, list[nn.Parameter]] = {"base": [], "id_x": list(self.id_projector.parameters()), "id_clip": [],
                                              "id_shared": [], "id_bases": list(self.id_bases.parameters())}
        if self.base_resampler is not None:
            out["base"] = list(self.base_resampler.parameters()) + list(self.base_bases.parameters())
        for name, p in self.resampler.named_parameters():
            parts = name.split(".")
            part = parts[2] if parts[0] == "layers" else parts[0]
            out["id_x" if part in X_PATH else "id_clip" if part in CLIP_PATH else "id_shared"].append(p)
        return out

    def id_tokens(self, clip: torch.Tensor | None, arcface: torch.Tensor | None) -> torch.Tensor:
        """Per-sample ID tokens [b, q, k]: x = ID projector(ArcFace) unless None (bypassed), y = CLIP tokens."""
        x = self.id_projector(arcface) if arcface is not None else None
        return normalize_tokens(self.resampler.per_image(x, clip).float())

    def base_tokens(self, base_clip: torch.Tensor) -> torch.Tensor:
        return normalize_tokens(self.base_resampler.per_image(base_clip).float())

    def factors(self, tokens: torch.Tensor, kind: str) -> Factors:
        """Tokens [b, q, k] -> LoRA factors of every target linear, the delta being ``up @ down``."""
        stack = self.id_bases if kind == "id" else self.base_bases
        mixed = stack(tokens)  # a module call: under run --shard each stack is an FSDP unit, gathered for it
        out: Factors = {}
        for i, linear in enumerate(self.targets.linears):
            down, up, _ = lora_pair(mixed[(i, 0)], mixed[(i, 1)])  # up already carries alpha / r
            out[linear.key] = (down, up)
        return out

    def forward(self, clip: torch.Tensor | None, arcface: torch.Tensor | None, base_clip: torch.Tensor | None,
                ) -> dict[str, Factors]:
        """Conditions of b samples -> {"id": factors, "base": factors}; a kind is absent when its input is None."""
        out: dict[str, Factors] = {}
        if clip is not None or arcface is not None:
            out["id"] = self.factors(self.id_tokens(clip, arcface), "id")
        if base_clip is not None and self.base_resampler is not None:
            out["base"] = self.factors(self.base_tokens(base_clip), "base")
        return out
