"""The two trainable parametrisations of fast refinement (HyperDreamBooth-style), pure torch.

Both are strategies with one interface (:class:`Parametrisation`): per-linear float32 LoRA factors with autograd
(``factors(i)``, and ``delta(i) = up @ down``), the trainable ``parameters()``, ``place(device)``,
``after_step()`` after each optimiser step and ``result()``. Both are trained at the strength the identity will be
applied at, folded into ``up``; the result is saved as exactly those factors (alpha = rank), so loading it at
1.0 gives the very weights training saw.

* :class:`CoefficientLoRA` (mode ``coefficients``) trains the coefficient tokens themselves and mixes the
  frozen bases on every call; tokens are re-normalised per token after each optimiser step, so the result
  stays in the method's space and is still a small identity.
* :class:`RankRelaxed` (mode ``rank_relaxed``) keeps the predicted LoRA frozen and trains a zero-initialised
  :class:`ResidualLoRA` of rank r on the same linears; :func:`concat_by_rank` folds both into one LoRA.
* :class:`LidbOnBase` (mode ``lidb``) trains LiDB vectors (``a + b`` numbers per linear, see :mod:`.lidb`), from
  zero or on top of a frozen base LoRA (the prediction); the result is both, concatenated by rank, and the LiDB.

Letters: ``k`` basis size, ``a``/``b`` the two sides of a basis matrix, ``r`` rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .arithmetic import combine_by_rank
from .errors import LidbMismatchError
from .identity import Identity
from .lidb import LiDB, LidbAux, LidbLoRA
from .lora_io import ALPHA_PER_RANK, lora_prefixes
from .model import HyperLoRA
from .pages import release_pages
from .resampler import normalize_tokens
from .safetensors_file import SafetensorsFile
from .targets import basis_keys, basis_layout, token_index


@dataclass
class RefineResult:
    """What a refinement gives back."""

    lora: dict[str, torch.Tensor]  # the refined LoRA, in the prediction's key format
    identity: Identity | None  # the refined identity (coefficients), None where the result is a LoRA only
    lidb: LiDB | None = None  # the trained LiDB vectors (mode lidb), without the frozen base


class Parametrisation(Protocol):
    """A trainable form of an identity's LoRA on the linears ``prefixes`` (token order)."""

    prefixes: list[str]

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # (up [out, r], down [r, in]), float32

    def device_bytes(self) -> int: ...  # bytes that ``place`` puts on the compute device

    def place(self, device: torch.device | str) -> None: ...  # move the frozen and trainable tensors there

    def after_step(self) -> None: ...  # after each optimiser step

    def result(self) -> RefineResult: ...


class _Factored:
    """Shared by both parametrisations: the delta and the saved LoRA come from the same float32 factors."""

    prefixes: list[str]

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta(self, index: int) -> torch.Tensor:
        """[out, in] float32 weight delta of linear ``index``: ``up @ down``, the product ComfyUI's LoRA patch
        takes of the saved factors (alpha = rank), so the saved result reproduces it bit for bit."""
        up, down = self.factors(index)
        return up @ down

    def lora(self) -> dict[str, torch.Tensor]:
        """The current factors as a LoRA (alpha = rank, scale 1): applied at 1.0 it adds exactly ``delta``."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, p in enumerate(self.prefixes):
                up, down = self.factors(i)
                out[p + ".lora_down.weight"] = down.detach().cpu().clone()
                out[p + ".lora_up.weight"] = up.detach().cpu().clone()
                out[p + ".alpha"] = torch.tensor(float(down.shape[0]))
        return out


class _BasisMix(torch.autograd.Function):
    """``Σ_k c_k · basis[k]`` for a [k, a, b] basis in any dtype, in float32. The basis is saved for backward by
    reference; its float32 widening lives only inside forward and backward, never between them. Where the basis
    is a view of ``mapping`` (the file, memory-mapped), its pages leave the process's memory after each use."""

    @staticmethod
    def forward(ctx, coefs: torch.Tensor, basis: torch.Tensor, mapping: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.mapping = mapping
        out = (coefs @ basis.reshape(basis.shape[0], -1).float()).reshape(basis.shape[1:])
        if mapping is not None:
            release_pages(basis, mapping)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (basis,) = ctx.saved_tensors
        flat = basis.reshape(basis.shape[0], -1).float()
        out = flat @ grad.reshape(-1).float()
        if ctx.mapping is not None:
            release_pages(basis, ctx.mapping)
        return out, None, None


def mapped_tensors(file: SafetensorsFile, keys: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the mapping, file-backed views of ``keys``) through one private mapping of ``file``: pages are read when
    used and never copied into the process's own memory (a misaligned tensor is read normally)."""
    raw = torch.from_file(str(file.path), shared=False, size=file.size, dtype=torch.uint8)
    out = []
    for key in keys:
        info = file.tensors[key]
        dtype = file.torch_dtype(info.dtype)
        start = file.data_start + info.start
        item = torch.empty((), dtype=dtype).element_size()
        if start % item:
            out.append(file.tensor(key))
            continue
        out.append(raw[start:file.data_start + info.end].view(dtype).view(info.shape))
    return raw, out


def mix_basis(coefs: torch.Tensor, basis: torch.Tensor, mapping: torch.Tensor | None = None) -> torch.Tensor:
    """[k] coefficients × [k, a, b] basis -> [a, b] float32, differentiable in the coefficients. ``mapping``: the
    memory-mapped file ``basis`` may be a view of, whose pages are then given back after each use."""
    return _BasisMix.apply(coefs.float(), basis, mapping)


def concat_by_rank(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA whose delta is exactly ΔW_a + ΔW_b (the rank-relaxed result: prediction plus residual)."""
    return concat_by_rank_at(a, 1.0, b)


def concat_by_rank_at(a: dict[str, torch.Tensor], strength: float, b: dict[str, torch.Tensor],
                      ) -> dict[str, torch.Tensor]:
    """The LoRA whose delta is exactly strength·ΔW_a + ΔW_b, to be loaded at 1.0."""
    return combine_by_rank([(a, strength), (b, 1.0)])


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


class RankRelaxed(_Factored, nn.Module):
    """The frozen prediction, at the strength it will be applied at, plus a trainable zero-initialised residual
    of rank ``rank`` on each of its linears; the result is both, concatenated by rank."""

    def __init__(self, predicted: dict[str, torch.Tensor], rank: int = 4, *, seed: int = 0,
                 strength: float = 1.0) -> None:
        super().__init__()
        self.predicted, self.strength = predicted, strength
        self.prefixes = lora_prefixes(predicted)
        folded = combine_by_rank([(predicted, strength)])  # strength·alpha/r folded into up, float32
        ups, downs, shapes = [], [], {}
        for p in self.prefixes:
            down = folded[p + ".lora_down.weight"].detach().clone()  # never an inference tensor
            up = folded[p + ".lora_up.weight"].detach().clone()
            ups.append(up)
            downs.append(down)
            shapes[p] = (up.shape[0], down.shape[1])
        self._ups, self._downs = ups, downs  # frozen, not parameters
        self.residual = ResidualLoRA(shapes, rank, seed=seed)

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        up = torch.cat([self._ups[index], self.residual.up[index]], dim=1)
        down = torch.cat([self._downs[index], self.residual.down[index]], dim=0)
        return up, down

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._ups, *self._downs, *self.residual.parameters()])

    def place(self, device: torch.device | str) -> None:
        self._ups = [t.to(device) for t in self._ups]
        self._downs = [t.to(device) for t in self._downs]
        self.residual.to(device)

    def after_step(self) -> None:
        pass

    def result(self) -> RefineResult:
        return RefineResult(concat_by_rank_at(self.predicted, self.strength, self.residual.state_dict_lora()), None)


class CoefficientLoRA(_Factored, nn.Module):
    """Trainable coefficient tokens over frozen bases; ``factors(i)`` are differentiable in the tokens.

    The bases stay in the checkpoint's dtype (about 2.8 GiB at released size in fp16) where they were read
    until :meth:`place` moves them; each linear's basis is widened to float32 only while it is being mixed.
    ``strength`` is the weight the identity is applied at (folded into ``up``).
    """

    def __init__(self, hyperlora: HyperLoRA, identity: Identity, prefixes: Sequence[str], *,
                 strength: float = 1.0) -> None:
        super().__init__()
        identity.check_compatible(hyperlora.fingerprint, hyperlora.module_names)
        self.hyperlora, self.identity = hyperlora, identity
        self.tokens = nn.Parameter(identity.tokens.detach().float().clone())
        self.prefixes = list(prefixes)  # one per target linear, in token order
        self.scale = strength * ALPHA_PER_RANK  # strength · alpha / rank of the method
        keys = basis_keys(basis_layout(hyperlora.targets), "id")  # per linear: down, then up
        self._mapping, mapped = mapped_tensors(hyperlora.checkpoint.files["basis"], keys)
        downs, ups = mapped[0::2], mapped[1::2]
        if len(downs) != len(self.prefixes):
            raise ValueError(f"{len(self.prefixes)} prefixes for {len(downs)} target linears")
        self._downs, self._ups = downs, ups  # frozen, not parameters

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale · (Σ b·up_basis)ᵀ [out, r], (Σ a·down_basis)ᵀ [r, in]) of linear ``index``."""
        a = self.tokens[token_index(index, 0)]
        b = self.tokens[token_index(index, 1)]
        down = mix_basis(a, self._downs[index], self._mapping).t().contiguous()  # [r, in]
        up = (self.scale * mix_basis(b, self._ups[index], self._mapping)).t().contiguous()  # [out, r]
        return up, down

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._downs, *self._ups, self.tokens])

    def place(self, device: torch.device | str) -> None:
        self._downs = [t.to(device) for t in self._downs]
        self._ups = [t.to(device) for t in self._ups]
        if torch.device(device).type != "cpu":
            self._mapping = None  # the bases were copied: the file's mapping goes with the last view of it
        self.to(device)

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
        """The refined identity, and its LoRA at the training strength exactly as training computed it."""
        return RefineResult(self.lora(), self.to_identity())


class LidbOnBase(_Factored, nn.Module):
    """Trainable LiDB vectors on every linear of ``aux.targets``, alone or on top of a frozen ``base`` LoRA on the
    same linears whose scale is already folded in (alpha = rank, e.g. :func:`combine_by_rank`'s output)."""

    def __init__(self, aux: LidbAux, base: dict[str, torch.Tensor] | None = None, *, seed: int = 0,
                 start: LiDB | None = None, meta: dict[str, str] | None = None) -> None:
        super().__init__()
        self.trainable = LidbLoRA(aux, init_seed=seed, start=start)
        self.prefixes = [linear.key for linear in aux.targets.linears]
        self.base, self.meta = base, dict(meta or {})
        self._ups: list[torch.Tensor] = []
        self._downs: list[torch.Tensor] = []
        if base is not None:
            if set(lora_prefixes(base)) != set(self.prefixes):
                raise LidbMismatchError("the LiDB and the LoRA it is trained on top of adapt different layers; "
                                        "use a LiDB made for this HyperLoRA's model")
            self._ups = [base[p + ".lora_up.weight"].detach().float().clone() for p in self.prefixes]
            self._downs = [base[p + ".lora_down.weight"].detach().float().clone() for p in self.prefixes]

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.trainable.factors(index)
        if not self._ups:
            return up, down
        return torch.cat([self._ups[index], up], dim=1), torch.cat([self._downs[index], down], dim=0)

    def device_bytes(self) -> int:
        return self.trainable.device_bytes() + sum(t.numel() * t.element_size() for t in [*self._ups, *self._downs])

    def place(self, device: torch.device | str) -> None:
        self._ups = [t.to(device) for t in self._ups]
        self._downs = [t.to(device) for t in self._downs]
        self.trainable.place(device)

    def after_step(self) -> None:
        pass

    def result(self) -> RefineResult:
        """The LoRA training saw (the frozen base, if any, and the LiDB's factors concatenated by rank; alpha = rank),
        and the LiDB alone."""
        return RefineResult(self.lora(), None, self.trainable.to_lidb(self.meta))
