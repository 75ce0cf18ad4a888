"""Arithmetic on identities and LoRAs: sliders, interpolation, averages.

* Weight space: ``lora_difference`` gives the exact LoRA of ``s · (ΔW(a) − ΔW(b))`` by concatenating ranks
  (``down = [d_a; d_b]``, ``up = [s·u_a, −s·u_b]``), so applying it equals applying ``a`` at +s and ``b`` at −s.
* Coefficient space: identities are points on a product of unit spheres (one per token); interpolation and
  averaging work on the tokens and re-normalise each token, then the bases rebuild a rank-r LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import IdentityMismatchError
from .identity import Identity
from .lora_io import lora_prefixes
from .resampler import normalize_tokens


def combine_by_rank(terms: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The LoRA whose delta is exactly Σ w·ΔW over (lora, w) terms: ranks concatenated, w·alpha/r folded into up."""
    prefixes = lora_prefixes(terms[0][0])
    if any(set(lora_prefixes(lora)) != set(prefixes) for lora, _ in terms[1:]):
        raise ValueError("the LoRAs target different layers; make them with the same checkpoint and key format")
    out: dict[str, torch.Tensor] = {}
    for p in prefixes:
        downs, ups = [], []
        for lora, weight in terms:
            down = lora[p + ".lora_down.weight"].float()
            rank = down.shape[0]
            alpha = float(lora[p + ".alpha"]) if p + ".alpha" in lora else float(rank)
            downs.append(down)
            ups.append(lora[p + ".lora_up.weight"].float() * (weight * alpha / rank))
        down = torch.cat(downs, dim=0)
        out[p + ".lora_down.weight"] = down
        out[p + ".lora_up.weight"] = torch.cat(ups, dim=1)
        out[p + ".alpha"] = torch.tensor(float(down.shape[0]))  # scale 1: the factors are folded into up
    return out


def lora_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], strength: float = 1.0,
                    ) -> dict[str, torch.Tensor]:
    """The rank-(r_a + r_b) LoRA whose delta is exactly ``strength · (ΔW_a − ΔW_b)``."""
    return combine_by_rank([(a, strength), (b, -strength)])


def _check_same_source(identities: Sequence[Identity]) -> None:
    first = identities[0]
    for other in identities[1:]:
        if other.fingerprint != first.fingerprint or other.module_names != first.module_names:
            raise IdentityMismatchError(
                "these identities were made by different checkpoints and cannot be mixed; predict them with one"
            )


def _combine(identities: Sequence[Identity], weights: Sequence[float]) -> Identity:
    _check_same_source(identities)
    tokens = normalize_tokens(sum(w * i.tokens.float() for w, i in zip(weights, identities, strict=True)))
    base = None
    if all(i.base_tokens is not None for i in identities):
        base = normalize_tokens(sum(w * i.base_tokens.float() for w, i in zip(weights, identities, strict=True)))
    return identities[0].with_tokens(tokens, base)


def interpolate(a: Identity, b: Identity, t: float) -> Identity:
    """``(1 − t)·a + t·b`` per token, re-normalised; t outside [0, 1] extrapolates (a slider in coefficients)."""
    return _combine([a, b], [1.0 - t, t])


def average(identities: Sequence[Identity], weights: Sequence[float] | None = None) -> Identity:
    """A weighted mean of identities (weights default to equal), re-normalised per token."""
    if not identities:
        raise ValueError("average() needs at least one identity")
    weights = [1.0] * len(identities) if weights is None else list(weights)
    if len(weights) != len(identities) or sum(weights) == 0:
        raise ValueError("average() needs one weight per identity, not all zero")
    total = sum(weights)
    return _combine(identities, [w / total for w in weights])
