"""The two trainable parametrisations of fast refinement (HyperDreamBooth-style), pure torch.

Both are strategies with one interface (:class:`Parametrisation`): per-linear weight deltas with autograd
(``delta(i)``), the trainable ``parameters()``, ``after_step()`` after each optimiser step and ``result()``.

* :class:`CoefficientLoRA` (mode ``coefficients``) trains the coefficient tokens themselves and mixes the
  frozen bases on every call; tokens are re-normalised per token after each optimiser step, so the result
  stays in the method's space and is still a small identity.
* :class:`RankRelaxed` (mode ``rank_relaxed``) keeps the predicted LoRA frozen and trains a zero-initialised
  :class:`ResidualLoRA` of rank r on the same linears; :func:`concat_by_rank` folds both into one LoRA.

Letters: ``k`` basis size, ``a``/``b`` the two sides of a basis matrix, ``r`` rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .arithmetic import combine_by_rank
from .basis import mix_bases, token_index
from .identity import Identity
from .lora_io import ALPHA_PER_RANK, lora_prefixes
from .model import HyperLoRA
from .resampler import normalize_tokens
from .topology import LINEARS


@dataclass
class RefineResult:
    """What a refinement gives back."""

    lora: dict[str, torch.Tensor]  # the refined LoRA, in the prediction's key format
    identity: Identity | None  # the refined identity (coefficients), None where the result is a LoRA only


class Parametrisation(Protocol):
    """A trainable form of an identity's LoRA on the linears ``prefixes`` (json order, then q, k, v, out)."""

    prefixes: list[str]

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def delta(self, index: int) -> torch.Tensor: ...  # [out, in] weight delta of linear ``index``, differentiable

    def after_step(self) -> None: ...  # after each optimiser step

    def result(self) -> RefineResult: ...


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


class RankRelaxed(nn.Module):
    """The frozen prediction plus a trainable zero-initialised residual of rank ``rank`` on each of its linears."""

    def __init__(self, predicted: dict[str, torch.Tensor], rank: int = 4, *, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.predicted = predicted
        self.prefixes = lora_prefixes(predicted)
        folded = combine_by_rank([(predicted, 1.0)])  # alpha/r folded into up: delta = up @ down
        ups, downs, shapes = [], [], {}
        for p in self.prefixes:
            down = folded[p + ".lora_down.weight"].detach().clone()  # never an inference tensor
            up = folded[p + ".lora_up.weight"].detach().clone()
            ups.append(up.to(device))
            downs.append(down.to(device))
            shapes[p] = (up.shape[0], down.shape[1])
        self._ups, self._downs = ups, downs  # frozen, not parameters
        self.residual = ResidualLoRA(shapes, rank, seed=seed).to(device)

    def delta(self, index: int) -> torch.Tensor:
        """ΔW_pred + ΔW_residual as one product of the rank-concatenated factors."""
        up = torch.cat([self._ups[index], self.residual.up[index]], dim=1)
        down = torch.cat([self._downs[index], self.residual.down[index]], dim=0)
        return up @ down

    def after_step(self) -> None:
        pass

    def result(self) -> RefineResult:
        return RefineResult(concat_by_rank(self.predicted, self.residual.state_dict_lora()), None)


class CoefficientLoRA(nn.Module):
    """Trainable coefficient tokens over frozen bases; ``delta(i)`` is differentiable in the tokens.

    The bases stay in the checkpoint's dtype on ``device`` (about 2.8 GiB at released size in fp16) and are
    widened to float32 one linear at a time.
    """

    def __init__(self, hyperlora: HyperLoRA, identity: Identity, prefixes: Sequence[str],
                 device: torch.device | str = "cpu", *, key_format: str = "comfy",
                 lora_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        identity.check_compatible(hyperlora.fingerprint, hyperlora.module_names)
        self.hyperlora, self.identity = hyperlora, identity
        self.key_format, self.lora_dtype = key_format, lora_dtype
        self.tokens = nn.Parameter(identity.tokens.detach().float().clone().to(device))
        self.prefixes = list(prefixes)  # one per (module, linear), json order then q, k, v, out
        basis = hyperlora.checkpoint.files["basis"]
        self.scale = ALPHA_PER_RANK  # alpha / rank of the method
        downs, ups = [], []
        for i in range(len(hyperlora.module_names)):
            for linear, _, _ in LINEARS:
                downs.append(basis.tensor(f"{i}.{linear}.id_down_basis").to(device))
                ups.append(basis.tensor(f"{i}.{linear}.id_up_basis").to(device))
        if len(downs) != len(self.prefixes):
            raise ValueError(f"{len(self.prefixes)} prefixes for {len(downs)} target linears")
        self._downs, self._ups = downs, ups  # frozen, not parameters

    def delta(self, index: int) -> torch.Tensor:
        """scale · up @ down of linear ``index`` ([out, in]), from the current tokens."""
        module, j = divmod(index, len(LINEARS))
        a = self.tokens[token_index(module, j, 0)]
        b = self.tokens[token_index(module, j, 1)]
        down = mix_bases(a[None], self._downs[index][None])[0]  # [in, r], the core's one mixing
        up = mix_bases(b[None], self._ups[index][None])[0]  # [r, out]
        return self.scale * (up.t() @ down.t())

    @torch.no_grad()
    def renormalize(self) -> None:
        """Back onto the unit sphere per token, as the resampler's output is."""
        self.tokens.copy_(normalize_tokens(self.tokens))

    def after_step(self) -> None:
        self.renormalize()

    def to_identity(self) -> Identity:
        refined = self.identity.with_tokens(self.tokens.detach().cpu().clone(), self.identity.base_tokens)
        refined.meta["refined"] = "coefficients"
        return refined

    def result(self) -> RefineResult:
        refined = self.to_identity()
        lora = self.hyperlora.identity_to_lora(refined, key_format=self.key_format,
                                              dtype=self.lora_dtype or torch.float32)
        return RefineResult(lora, refined)
