"""LiDB (Lightweight DreamBooth, HyperDreamBooth's compact weights): a rank-1 LoRA whose two factors are each
projected through a frozen random orthonormal matrix. Pure torch.

Per target linear ``ℓ`` (``i`` inputs, ``o`` outputs)::

    down_ℓ = A_train_ℓ · A_aux_ℓ     [1, i]   A_train [1, a] trains; A_aux [a, i] frozen, A_aux·A_auxᵀ = I_a
    up_ℓ   = B_aux_ℓ · B_train_ℓ     [o, 1]   B_train [b, 1] trains; B_aux [o, b] frozen, B_auxᵀ·B_aux = I_b
    ΔW_ℓ   = up_ℓ · down_ℓ           [o, i]   saved as a LoRA with alpha = rank = 1 (scale 1)

Only the ``a + b`` numbers per linear are stored (:class:`LiDB`); the aux matrices are regenerated from the seed
(:mod:`hyperlora_core.lidb_aux`: on a few threads, and kept in a bounded in-process cache for the next LiDB of the
same layout).

**Aux matrices, recipe v1** (:func:`~hyperlora_core.lidb_aux.aux_pair`). For linear key ``K``, seed ``s`` and side
``X`` ("A" or "B"):

1. the byte stream SHAKE-256(``"hyperlora.lidb.aux.v1" NUL s NUL K NUL X``) (UTF-8, ``s`` in decimal), read as
   little-endian uint32 words ``w``; uniforms ``u = (w + 0.5) / 2³²`` in float64;
2. consecutive pairs ``(u1, u2)`` give two normals by Box–Muller: ``√(-2 ln u1)·cos(2π u2)``, then ``…·sin(…)``;
3. side A fills ``M [i, a]`` row by row, side B fills ``N [o, b]``; each is orthonormalised by the reduced QR
   decomposition in float64 with the signs fixed so that ``diag(R) > 0`` (which makes Q unique: it equals
   Gram–Schmidt on the columns); ``A_aux = Q_Mᵀ``, ``B_aux = Q_N``, rounded to float32.

The stream depends only on the seed and the linear's own key, so a linear's matrices do not depend on the other
linears or their order. SHAKE-256 is fixed by FIPS 202; the float64 arithmetic agrees between machines and torch
versions to rounding (~1e-15), far below float32's resolution, though an element near zero can round to another
float32: with torch 2.14 (MKL) on 1 and on 2 threads, 3 of SDXL's first 80 linears differed in one element of their
A_aux each, by at most 4e-9.

**File** (:meth:`LiDB.save`): safetensors with ``a_train [n, a]`` and ``b_train [n, b]`` (fp16 or fp32; ``int8``
storage writes ``<name>.int8`` and a per-row fp16 ``<name>.scale``), and metadata: ``format``, ``version``,
``seed``, ``a``, ``b``, ``storage``, ``targets`` (the :class:`TargetLayers` as JSON, zlib, base64) and ``meta``.

Letters: ``n`` target linears, ``a``/``b`` the aux sizes, ``i``/``o`` a linear's in/out features.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import LidbFormatError, LidbMismatchError
from .identity import dequantize_int8, quantize_int8
from .lidb_aux import AUX_CACHE, aux_pair, check_sizes, iter_aux  # noqa: F401 (aux_pair: its home was here)
from .safetensors_file import read_header, save_atomic
from .targets import TargetLayers, TargetLinear, TargetModule

LIDB_A = 100  # the paper's size of the down side's trainable vector (A_train is 1 × a)
LIDB_B = 50  # the paper's size of the up side's trainable vector (B_train is b × 1)
LIDB_SEED = 0  # the aux matrices' default seed
FORMAT = "hyperlora.lidb"
FORMAT_VERSION = "1"
STORAGE = ("fp16", "fp32", "int8")
MAX_TARGETS_BYTES = 16 << 20  # the target description, decompressed: SDXL's 560 linears take ~45 KB
KEY_FORMATS = ("comfy", "kohya")
_NAMES = ("a_train", "b_train")


def lora_key(key: str, key_format: str) -> str:
    """A target's LoRA prefix: its ComfyUI key, or the kohya form (``lora_unet_`` + the UNet path with ``_``)."""
    if key_format == "comfy":
        return key
    if key_format == "kohya":
        return "lora_unet_" + key.removeprefix("diffusion_model.").replace(".", "_")
    raise ValueError(f"key_format must be one of {KEY_FORMATS}, got {key_format!r}")


def lidb_factors(a_train: torch.Tensor, b_train: torch.Tensor, a_aux: torch.Tensor, b_aux: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [o, 1], down [1, i]) of one linear from a_train [a] and b_train [b]; differentiable in both."""
    down = a_train.reshape(1, -1) @ a_aux
    up = b_aux @ b_train.reshape(-1, 1)
    return up, down


class LidbAux:
    """The frozen aux matrices of every target linear, for one (targets, seed, a, b)."""

    def __init__(self, targets: TargetLayers, *, seed: int = LIDB_SEED, a: int = LIDB_A, b: int = LIDB_B,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """``progress(done, total)`` after each linear (SDXL's 560 take seconds: ~430 MB of float32), or once when
        the process's cache (:data:`~hyperlora_core.lidb_aux.AUX_CACHE`) already holds this layout."""
        self.targets, self.seed, self.a, self.b = targets, int(seed), int(a), int(b)
        for linear in targets.linears:  # every size first: fail before the slow part
            check_sizes(linear, self.a, self.b)
        # [a, i] and [o, b] per linear; this object's own lists of the cached tensors, which are never modified
        self.down_aux, self.up_aux = AUX_CACHE.matrices(targets, self.seed, self.a, self.b, progress)

    def matches(self, weights: LiDB) -> bool:
        return (weights.targets, weights.seed, weights.a, weights.b) == (self.targets, self.seed, self.a, self.b)

    def factors(self, index: int, a_train: torch.Tensor, b_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [o, 1], down [1, i]) of linear ``index``, in the trainable vectors' device and dtype."""
        a_aux = self.down_aux[index].to(a_train.device, a_train.dtype)
        b_aux = self.up_aux[index].to(b_train.device, b_train.dtype)
        return lidb_factors(a_train, b_train, a_aux, b_aux)

    def lora(self, a_train: torch.Tensor, b_train: torch.Tensor, key_format: str = "comfy",
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The rank-1 LoRA (alpha 1) of a_train [n, a] and b_train [n, b], in ``key_format`` keys."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for index, linear in enumerate(self.targets.linears):
                up, down = self.factors(index, a_train[index].float(), b_train[index].float())
                _put(out, lora_key(linear.key, key_format), up, down, dtype)
        return out


def _put(lora: dict[str, torch.Tensor], prefix: str, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> None:
    lora[prefix + ".lora_down.weight"] = down.to(dtype).contiguous()
    lora[prefix + ".lora_up.weight"] = up.to(dtype).contiguous()
    lora[prefix + ".alpha"] = torch.tensor(1.0, dtype=dtype)


@dataclass
class LiDB:
    """The trained numbers of a LiDB personalisation, with what it takes to rebuild its LoRA."""

    targets: TargetLayers  # the linears, in order (row ``j`` of both tensors belongs to ``targets.linears[j]``)
    a_train: torch.Tensor  # [n, a] float32
    b_train: torch.Tensor  # [n, b] float32
    seed: int = LIDB_SEED  # the aux matrices' seed
    meta: dict[str, str] = field(default_factory=dict)  # free-form notes (what it was trained on top of, ...)

    def __post_init__(self) -> None:
        n = len(self.targets.linears)
        if self.a_train.ndim != 2 or self.b_train.ndim != 2 or self.a_train.shape[0] != n \
                or self.b_train.shape[0] != n:
            raise LidbMismatchError(f"LiDB weights must be a_train [{n}, a] and b_train [{n}, b] for {n} target "
                                    f"linears; got {list(self.a_train.shape)} and {list(self.b_train.shape)}")
        for linear in self.targets.linears:
            check_sizes(linear, self.a, self.b)

    @property
    def a(self) -> int:
        return int(self.a_train.shape[1])

    @property
    def b(self) -> int:
        return int(self.b_train.shape[1])

    def aux(self, progress: Callable[[int, int], None] | None = None) -> LidbAux:
        return LidbAux(self.targets, seed=self.seed, a=self.a, b=self.b, progress=progress)

    def lora(self, aux: LidbAux | None = None, key_format: str = "comfy", dtype: torch.dtype = torch.float32,
             progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA these numbers make (alpha 1). ``aux`` reuses matrices already generated for this layout;
        without it they come from the process's cache, made now if absent (``progress(done, total)`` after each
        linear), or, for a layout larger than the cache, each linear's are generated, used and dropped in turn."""
        if aux is None and AUX_CACHE.fits(self.targets, self.a, self.b):
            aux = self.aux(progress)
        if aux is not None:
            if not aux.matches(self):
                raise LidbMismatchError("the aux matrices given were made for another seed, a, b or target layout")
            return aux.lora(self.a_train, self.b_train, key_format, dtype)
        out: dict[str, torch.Tensor] = {}
        linears = self.targets.linears
        with torch.no_grad(), closing(iter_aux(linears, self.seed, self.a, self.b)) as pairs:
            for index, (linear, (a_aux, b_aux)) in enumerate(zip(linears, pairs, strict=True)):
                up, down = lidb_factors(self.a_train[index].float(), self.b_train[index].float(), a_aux, b_aux)
                _put(out, lora_key(linear.key, key_format), up, down, dtype)
                if progress is not None:
                    progress(index + 1, len(linears))
        return out

    def save(self, path: str | Path, storage: str = "fp16") -> Path:
        """Write the file (see the module docstring), atomically; returns the path."""
        if storage not in STORAGE:
            raise ValueError(f"LiDB storage must be one of {STORAGE}, got {storage!r}")
        tensors: dict[str, torch.Tensor] = {}
        for name, value in zip(_NAMES, (self.a_train, self.b_train), strict=True):
            if storage == "int8":
                tensors[name + ".int8"], tensors[name + ".scale"] = quantize_int8(value.detach().float())
            else:
                tensors[name] = value.detach().to(torch.float16 if storage == "fp16" else torch.float32).contiguous()
        described = base64.b64encode(zlib.compress(json.dumps(targets_to_dict(self.targets)).encode(), 9)).decode()
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "seed": str(self.seed), "a": str(self.a),
                    "b": str(self.b), "storage": storage, "targets": described, "meta": json.dumps(self.meta)}
        return save_atomic(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, *, targets: TargetLayers | None = None, a: int | None = None,
             b: int | None = None) -> LiDB:
        """Read and check a LiDB file; ``targets``, ``a`` and ``b``, when given, must be what it holds."""
        path = Path(path)
        _, infos, metadata, _ = read_header(path, "LiDB")  # missing, truncated, not safetensors
        if metadata.get("format") != FORMAT:
            raise LidbFormatError(f"LiDB: '{path}' is not a LiDB file (it may be a LoRA or an identity; load that "
                                  "with its own loader).")
        if metadata.get("version") != FORMAT_VERSION:
            raise LidbFormatError(f"LiDB: '{path}' has format version {metadata.get('version')!r}; this version "
                                  f"reads {FORMAT_VERSION!r}. Update the extension.")
        try:
            seed, size_a, size_b = int(metadata["seed"]), int(metadata["a"]), int(metadata["b"])
            stored = targets_from_dict(decode_targets(metadata["targets"]))
            meta = json.loads(metadata.get("meta", "{}"))
            if not isinstance(meta, dict):
                raise ValueError("notes that are not a JSON object")
        except LidbFormatError as exc:
            raise LidbFormatError(f"LiDB: '{path}': {exc}; it is damaged. Save it again.") from exc
        except (KeyError, ValueError, TypeError, zlib.error) as exc:
            raise LidbFormatError(f"LiDB: '{path}' has damaged metadata ({exc!r}); save it again.") from exc
        expect_keys(path, infos, metadata.get("storage"), len(stored.linears), size_a, size_b)
        tensors = read_tensors(path)
        weights = cls(stored, dequantized(tensors, "a_train"), dequantized(tensors, "b_train"), seed=seed, meta=meta)
        if not (torch.isfinite(weights.a_train).all() and torch.isfinite(weights.b_train).all()):
            raise LidbFormatError(f"LiDB: '{path}' holds NaN or infinite numbers; train and save it again.")
        check_expected(path, weights, targets, a, b)
        return weights


def expect_keys(path: Path, infos: dict, storage: str | None, n: int, a: int, b: int) -> None:
    """Every tensor the storage implies, of the shape the metadata implies, and nothing else."""
    if storage not in STORAGE:
        raise LidbFormatError(f"LiDB: '{path}' has storage {storage!r}, not one of {STORAGE}; save it again.")
    want: dict[str, tuple[int, ...]] = {}
    for name, size in zip(_NAMES, (a, b), strict=True):
        if storage == "int8":
            want[name + ".int8"], want[name + ".scale"] = (n, size), (n, 1)
        else:
            want[name] = (n, size)
    for key, shape in want.items():
        if key not in infos:
            raise LidbFormatError(f"LiDB: '{path}' lacks tensor '{key}' (storage {storage}); save it again.")
        if tuple(infos[key].shape) != shape:
            raise LidbFormatError(
                f"LiDB: '{path}': tensor '{key}' has shape {list(infos[key].shape)}, but its metadata (a={a}, b={b}, "
                f"{n} target linears) implies {list(shape)}. The file is damaged; save it again.")
    extra = sorted(set(infos) - set(want))
    if extra:
        raise LidbFormatError(f"LiDB: '{path}' holds tensors a LiDB file does not have: {', '.join(extra)}.")


def check_expected(path: Path, weights: LiDB, targets: TargetLayers | None, a: int | None, b: int | None) -> None:
    """Refuse a file made for other linears, or of other sizes, than the caller's."""
    for name, want, got in (("a", a, weights.a), ("b", b, weights.b)):
        if want is not None and want != got:
            raise LidbMismatchError(f"LiDB: '{path}' has {name}={got}, but {want} is expected here. Use a LiDB "
                                    f"trained with {name}={want}, or set {name} to {got}.")
    if targets is None or targets == weights.targets:
        return
    mine, theirs = weights.targets.linears, targets.linears
    for j, (have, need) in enumerate(zip(mine, theirs, strict=False)):
        if have != need:
            raise LidbMismatchError(
                f"LiDB: '{path}' was made for another model ({weights.targets.family}): its linear {j} is "
                f"'{have.key}' {have.in_features}->{have.out_features}, the model's is '{need.key}' "
                f"{need.in_features}->{need.out_features}. Use a LiDB trained for this model.")
    raise LidbMismatchError(
        f"LiDB: '{path}' describes {len(mine)} target linears ({weights.targets.family}), the model has "
        f"{len(theirs)} ({targets.family}). Use a LiDB trained for this model.")


def targets_to_dict(targets: TargetLayers) -> dict:
    return {"family": targets.family,
            "modules": [{"name": m.name, "linears": [[lin.key, lin.in_features, lin.out_features]
                                                     for lin in m.linears]} for m in targets.modules]}


def targets_from_dict(data: dict) -> TargetLayers:
    """The inverse of :func:`targets_to_dict`; a malformed description raises ValueError/KeyError/TypeError."""
    modules = tuple(TargetModule(str(m["name"]), tuple(TargetLinear(str(k), int(i), int(o))
                                                       for k, i, o in m["linears"])) for m in data["modules"])
    return TargetLayers(str(data["family"]), modules)


def targets_from_shapes(family: str, shapes: Mapping[str, tuple[int, int]]) -> TargetLayers:
    """Target layers from ``{key: (out_features, in_features)}`` (weight shapes) in the mapping's order, grouped into
    modules by the key's parent (``….attn1.to_q`` and ``….attn1.to_out.0`` both belong to ``….attn1``)."""
    groups: dict[str, list[TargetLinear]] = {}
    for key, (out_f, in_f) in shapes.items():
        parts = key.split(".")
        parent = ".".join(parts[:-2] if parts[-1].isdigit() else parts[:-1])
        groups.setdefault(parent, []).append(TargetLinear(key, int(in_f), int(out_f)))
    return TargetLayers(family, tuple(TargetModule(name, tuple(lins)) for name, lins in groups.items()))


def decode_targets(text: str) -> dict:
    """The description stored in ``metadata['targets']``, inflated at most to MAX_TARGETS_BYTES."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(base64.b64decode(text, validate=True), MAX_TARGETS_BYTES + 1)
    if len(out) > MAX_TARGETS_BYTES or inflater.unconsumed_tail:
        raise LidbFormatError(f"its target description inflates past {MAX_TARGETS_BYTES >> 20} MiB")
    return json.loads(out)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors (checked against its header already)."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise LidbFormatError(f"LiDB: '{path}' is damaged ({exc}); save it again.") from exc


def dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name + ".int8" in tensors:
        return dequantize_int8(tensors[name + ".int8"], tensors[name + ".scale"])
    return tensors[name].float()


class LidbLoRA(nn.Module):
    """Trainable LiDB vectors over frozen aux matrices: ``factors(j)`` is differentiable in a_train and b_train.

    From zero: b_train = 0 (so ΔW starts at 0) and a_train ~ N(0, 1/a) seeded by ``init_seed`` (so ``down`` has
    about unit norm and b_train gets a gradient); or from ``start``, a LiDB of the same layout.
    """

    def __init__(self, aux: LidbAux, *, init_seed: int = 0, start: LiDB | None = None) -> None:
        super().__init__()
        self.aux = aux
        n = len(aux.targets.linears)
        if start is not None:
            if not aux.matches(start):
                raise LidbMismatchError(
                    f"the starting LiDB (seed {start.seed}, a={start.a}, b={start.b}, {len(start.targets.linears)} "
                    f"linears) differs from the trained layout (seed {aux.seed}, a={aux.a}, b={aux.b}, {n} linears)")
            a0, b0 = start.a_train.float().clone(), start.b_train.float().clone()
        else:
            g = torch.Generator().manual_seed(init_seed)
            a0, b0 = torch.randn(n, aux.a, generator=g) * aux.a ** -0.5, torch.zeros(n, aux.b)
        self.a_train = nn.Parameter(a0)
        self.b_train = nn.Parameter(b0)
        self._down_aux, self._up_aux = list(aux.down_aux), list(aux.up_aux)  # frozen, not parameters

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [o, 1], down [1, i]) float32 of linear ``index``."""
        return lidb_factors(self.a_train[index], self.b_train[index], self._down_aux[index], self._up_aux[index])

    def place(self, device: torch.device | str) -> None:
        """Move the trainable vectors and this module's own references to the aux matrices (``aux`` is untouched)."""
        self._down_aux = [t.to(device) for t in self._down_aux]
        self._up_aux = [t.to(device) for t in self._up_aux]
        self.to(device)

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._down_aux, *self._up_aux, self.a_train,
                                                           self.b_train])

    def to_lidb(self, meta: dict[str, str] | None = None) -> LiDB:
        return LiDB(self.aux.targets, self.a_train.detach().cpu().clone(), self.b_train.detach().cpu().clone(),
                    seed=self.aux.seed, meta=dict(meta or {}))
