"""An identity: the coefficient tokens one face yields, with what it takes to use them safely.

At the released size the ID tokens are 1,120 × 128 = 143,360 numbers. Saved as fp16 they take ~282 KiB; the
int8 option stores each token with one fp16 scale (symmetric, round to nearest) in ~143 KiB. Since every
token has unit norm, the int8 error per number is at most scale / 2 = max|t| / 254.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import IdentityFormatError, IdentityMismatchError
from .safetensors_file import read_header, save_atomic

FORMAT = "hyperlora.identity"
FORMAT_VERSION = "1"
STORAGE = ("fp16", "fp32", "int8")
MAX_NAMES_BYTES = 4 << 20  # module-name list, decompressed: the released 140 names take ~12 KB


@dataclass
class Identity:
    """Coefficient tokens in json (= token) order, tied to the checkpoint that made them."""

    tokens: torch.Tensor  # [2 per target linear (8 per released module), K] float32, each token unit-norm
    module_names: tuple[str, ...]  # the checkpoint's json names, in order
    fingerprint: str  # content fingerprint of the checkpoint that made the tokens
    base_tokens: torch.Tensor | None = None  # like tokens, for the Base-LoRA, when the checkpoint has one
    meta: dict[str, str] = field(default_factory=dict)  # free-form notes (source images, refinement, ...)

    def __post_init__(self) -> None:
        rows = self.tokens.shape[0] if self.tokens.ndim == 2 else 0
        if rows % 2 or rows < 2 * len(self.module_names):  # 2 per linear, at least one linear per module
            raise IdentityFormatError(
                f"identity tokens must be [2 per target linear of {len(self.module_names)} modules, K]; got "
                f"{list(self.tokens.shape)}"
            )
        if self.base_tokens is not None and self.base_tokens.shape[0] != self.tokens.shape[0]:
            raise IdentityFormatError(f"base tokens {list(self.base_tokens.shape)} do not match the ID tokens")

    @property
    def k(self) -> int:
        return self.tokens.shape[1]

    def with_tokens(self, tokens: torch.Tensor, base_tokens: torch.Tensor | None = None) -> Identity:
        return replace(self, tokens=tokens, base_tokens=base_tokens, meta=dict(self.meta))

    def check_compatible(self, fingerprint: str, module_names: tuple[str, ...], what: str = "identity") -> None:
        """Refuse to pair tokens with a checkpoint that did not make them: the coefficients would be noise."""
        if tuple(module_names) != tuple(self.module_names):
            raise IdentityMismatchError(
                f"{what} lists {len(self.module_names)} modules that differ from the checkpoint's "
                f"{len(module_names)}; it was made by another checkpoint. Predict it again from the photos."
            )
        if fingerprint != self.fingerprint:
            raise IdentityMismatchError(
                f"{what} was made by checkpoint {self.fingerprint[:12]}, not by the loaded one "
                f"({fingerprint[:12]}). Coefficients only mean something with the bases they were predicted "
                "for; load that checkpoint, or predict the identity again from the photos."
            )

    def save(self, path: str | Path, storage: str = "fp16") -> Path:
        """Write a safetensors file; ``storage`` is "fp16" (exact to fp16), "fp32" or "int8" (smallest)."""
        if storage not in STORAGE:
            raise ValueError(f"identity storage must be one of {STORAGE}, got {storage!r}")
        tensors: dict[str, torch.Tensor] = {}
        for name, tokens in (("tokens", self.tokens), ("base_tokens", self.base_tokens)):
            if tokens is None:
                continue
            if storage == "int8":
                q, scale = quantize_int8(tokens)
                tensors[name + ".int8"], tensors[name + ".scale"] = q, scale
            else:
                tensors[name] = tokens.to(torch.float16 if storage == "fp16" else torch.float32).contiguous()
        names = base64.b64encode(zlib.compress(json.dumps(list(self.module_names)).encode(), 9)).decode()
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "storage": storage, "fingerprint": self.fingerprint,
                    "module_names": names, "meta": json.dumps(self.meta)}
        return save_atomic(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        path = Path(path)
        _, infos, metadata, _ = read_header(path, "identity")
        if metadata.get("format") != FORMAT:
            raise IdentityFormatError(
                f"identity: '{path}' is not a HyperLoRA identity file (it may be a LoRA; load that with a LoRA "
                "loader instead)."
            )
        if metadata.get("version") != FORMAT_VERSION:
            raise IdentityFormatError(f"identity: '{path}' has format version {metadata.get('version')!r}; "
                                      f"this version reads {FORMAT_VERSION!r}. Update the extension.")
        try:
            tensors = load_file(str(path))
            names = tuple(json.loads(_inflate(base64.b64decode(metadata["module_names"]), path)))
            meta = json.loads(metadata.get("meta", "{}"))
            fingerprint = metadata["fingerprint"]
            if not all(isinstance(n, str) for n in names) or not isinstance(meta, dict):
                raise ValueError("module names or notes of the wrong type")
        except IdentityFormatError:
            raise
        except (SafetensorError, KeyError, ValueError, zlib.error) as exc:
            raise IdentityFormatError(f"identity: '{path}' is damaged ({exc}); save it again.") from exc

        def read(name: str) -> torch.Tensor | None:
            if name + ".int8" in tensors:
                return dequantize_int8(tensors[name + ".int8"], tensors[name + ".scale"])
            return tensors[name].float() if name in tensors else None

        try:
            tokens, base_tokens = read("tokens"), read("base_tokens")
        except KeyError as exc:
            raise IdentityFormatError(f"identity: '{path}' lacks {exc} beside its int8 tokens; save it again.") from exc
        if tokens is None:
            raise IdentityFormatError(f"identity: '{path}' holds no tokens ({sorted(infos)}); save it again.")
        return cls(tokens=tokens, module_names=names, fingerprint=fingerprint, base_tokens=base_tokens, meta=meta)


def _inflate(data: bytes, path: Path) -> bytes:
    """zlib-decompress the module-name list, refusing to grow past MAX_NAMES_BYTES (a decompression bomb)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_NAMES_BYTES + 1)
    if len(out) > MAX_NAMES_BYTES or inflater.unconsumed_tail:
        raise IdentityFormatError(
            f"identity: '{path}' declares a module-name list that inflates past {MAX_NAMES_BYTES >> 20} MiB (a real "
            "one takes a few KB); it is damaged or not made by this extension. Delete it and save the identity "
            "again.")
    return out


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: q = round(t / s), s = max|t| / 127 (stored as fp16)."""
    scale = (tokens.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    q = torch.round(tokens / safe).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()
