"""Building blocks of fast refinement (HyperDreamBooth-style), pure torch; the training loop lives with the host.

Two trainable parametrisations of an identity's LoRA, both giving per-layer weight deltas with autograd:

* :class:`CoefficientLoRA` trains the coefficient tokens themselves and mixes the (frozen) bases on every
  call; tokens are re-normalised per token after each optimiser step, so the result stays in the method's
  space and is still a small identity.
* :class:`ResidualLoRA` keeps the predicted LoRA frozen and trains a zero-initialised residual of rank r on
  the same linears; :func:`concat_by_rank` then folds both into one LoRA file.

Letters: ``k`` basis size, ``a``/``b`` the two sides of a basis matrix, ``r`` rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .arithmetic import combine_by_rank
from .identity import Identity
from .model import HyperLoRA
from .resampler import normalize_tokens
from .topology import LINEARS


def concat_by_rank(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA whose delta is exactly ΔW_a + ΔW_b (the rank-relaxed result: prediction plus residual)."""
    return combine_by_rank([(a, 1.0), (b, 1.0)])


class ResidualLoRA(nn.Module):
    """Zero-initialised rank-r LoRAs on given linears: up = 0, down ~ N(0, 1/in); delta = up @ down."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int = 4, *, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        g = torch.Generator().manual_seed(seed)
        self.prefixes = list(shapes)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for p in self.prefixes:
            out_f, in_f = shapes[p]
            self.down.append(nn.Parameter(torch.randn(rank, in_f, generator=g) * in_f ** -0.5))
            self.up.append(nn.Parameter(torch.zeros(out_f, rank)))

    def delta(self, index: int) -> torch.Tensor:
        return self.up[index] @ self.down[index]

    def state_dict_lora(self) -> dict[str, torch.Tensor]:
        """As a LoRA state dict with alpha = rank (scale 1)."""
        out = {}
        for i, p in enumerate(self.prefixes):
            out[p + ".lora_down.weight"] = self.down[i].detach().clone()
            out[p + ".lora_up.weight"] = self.up[i].detach().clone()
            out[p + ".alpha"] = torch.tensor(float(self.down[i].shape[0]))
        return out


class CoefficientLoRA(nn.Module):
    """Trainable coefficient tokens over frozen bases; ``delta(i)`` is differentiable in the tokens."""

    def __init__(self, hyperlora: HyperLoRA, identity: Identity, prefixes: Sequence[str],
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        identity.check_compatible(hyperlora.fingerprint, hyperlora.module_names)
        self.identity = identity
        self.tokens = nn.Parameter(identity.tokens.detach().float().clone().to(device))
        self.prefixes = list(prefixes)  # one per (module, linear), json order then q, k, v, out
        basis = hyperlora.checkpoint.files["basis"]
        self.scale = 1.0 / 2.0  # alpha / rank of the method
        downs, ups = [], []
        for i in range(len(hyperlora.module_names)):
            for linear, _, _ in LINEARS:
                downs.append(basis.tensor(f"{i}.{linear}.id_down_basis").to(device, torch.float32))
                ups.append(basis.tensor(f"{i}.{linear}.id_up_basis").to(device, torch.float32))
        if len(downs) != len(self.prefixes):
            raise ValueError(f"{len(self.prefixes)} prefixes for {len(downs)} target linears")
        self._downs, self._ups = downs, ups  # frozen, not parameters

    def delta(self, index: int) -> torch.Tensor:
        """scale · up @ down of linear ``index`` ([out, in]), from the current tokens."""
        module, j = divmod(index, len(LINEARS))
        a = self.tokens[8 * module + 2 * j]
        b = self.tokens[8 * module + 2 * j + 1]
        down = torch.einsum("k,kir->ir", a, self._downs[index])  # [in, r]
        up = torch.einsum("k,kro->ro", b, self._ups[index])  # [r, out]
        return self.scale * (up.t() @ down.t())

    @torch.no_grad()
    def renormalize(self) -> None:
        """Back onto the unit sphere per token, as the resampler's output is."""
        self.tokens.copy_(normalize_tokens(self.tokens))

    def to_identity(self) -> Identity:
        refined = self.identity.with_tokens(self.tokens.detach().cpu().clone(), self.identity.base_tokens)
        refined.meta["refined"] = "coefficients"
        return refined
