"""The linears a personalisation targets, as data: the seam between model families and what trains on them.

A :class:`TargetLayers` lists the weight-bearing linears of a diffusion model that a HyperLoRA (or a LiDB file)
adapts, grouped into modules, in token order. Each linear is named by its ComfyUI weight key without the
``.weight`` suffix (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q``), which is both the key
ComfyUI's ``LORA_MODEL`` patches use and the name ``comfy.lora`` maps other conventions to.

Token order: linear ``l`` (counted over all modules, in order) owns tokens ``2l`` (its down matrix) and ``2l + 1``
(its up matrix). Its bases are ``<i>.<name>.<kind>_<down|up>_basis`` in ``hyper_lora_modules.safetensors``, ``i``
the module's index and ``name`` the linear's short name (:func:`basis_names`: ``to_q``, ``to_out``, ``qkv``...).

The released SDXL checkpoints describe their modules by name only; :func:`released_target_layers` expands such a
list. Other families carry the description itself in ``hyper_lora_modules.json`` (:meth:`TargetLayers.to_json`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import CheckpointFormatError, ModuleMismatchError
from .topology import LINEARS, SDXL, AttnModule, UNetSpec, resolve, sdxl_modules

#: Each target linear owns two tokens of the weight sequence: its down token, then its up token.
TOKENS_PER_LINEAR = 2
SIDES = ("down", "up")
MODEL_PREFIX = "diffusion_model."  # ComfyUI's prefix of a diffusion model's weight keys
METADATA = "__metadata__"  # the one non-module entry of an extended module list: {"family": ...}
RELEASED_FAMILY = "SDXL"  # what a released-style module list (names and widths only) describes
_RELEASED_NAMES = {suffix: short for short, suffix, _ in LINEARS}  # "to_out.0" -> "to_out": the released basis keys
_LINEAR_FIELDS = ("key", "in_features", "out_features")


@dataclass(frozen=True)
class TargetLinear:
    """One adapted linear: its ComfyUI key (no ``.weight``) and its sizes."""

    key: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if not self.key or self.key.endswith(".weight"):
            raise ValueError(f"target linear key {self.key!r}: give the module's key without '.weight'")
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"target linear {self.key!r}: sizes must be positive, got "
                             f"{self.in_features} -> {self.out_features}")

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The [out, in] shape of the model's weight."""
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class TargetModule:
    """A group of linears that share one place in the checkpoint's module list (e.g. an attention module)."""

    name: str
    linears: tuple[TargetLinear, ...]


@dataclass(frozen=True)
class TargetLayers:
    """Every target of one model family, in token order."""

    family: str
    modules: tuple[TargetModule, ...]

    @property
    def linears(self) -> tuple[TargetLinear, ...]:
        return tuple(lin for module in self.modules for lin in module.linears)

    @property
    def token_count(self) -> int:
        return TOKENS_PER_LINEAR * sum(len(module.linears) for module in self.modules)

    def to_json(self) -> dict[str, object]:
        """The extended ``hyper_lora_modules.json``: the family, then each module's linears with their sizes."""
        out: dict[str, object] = {METADATA: {"family": self.family}}
        for module in self.modules:
            out[module.name] = {"linears": [{f: getattr(lin, f) for f in _LINEAR_FIELDS} for lin in module.linears]}
        return out

    @classmethod
    def from_json(cls, raw: dict, where: str) -> TargetLayers:
        """Read :meth:`to_json`'s form; every problem names ``where`` (the file) and the entry."""
        meta = raw.get(METADATA)
        if not isinstance(meta, dict) or not isinstance(meta.get("family"), str) or set(meta) != {"family"}:
            raise CheckpointFormatError(f"module list: '{where}': {METADATA!r} must be {{\"family\": \"<name>\"}}, "
                                        f"got {meta!r}")
        modules = tuple(_module_from_json(name, info, where) for name, info in raw.items() if name != METADATA)
        if not modules:
            raise CheckpointFormatError(f"module list: '{where}' lists no modules")
        layers = cls(meta["family"], modules)
        _check_unique(layers, where)
        return layers


def is_extended(raw: dict) -> bool:
    """Whether a parsed module list is the extended form (it describes its linears) rather than the released one."""
    return METADATA in raw or any(isinstance(v, dict) and "linears" in v for v in raw.values())


def _module_from_json(name: str, info: object, where: str) -> TargetModule:
    if not isinstance(info, dict) or set(info) != {"linears"} or not isinstance(info["linears"], list) \
            or not info["linears"]:
        raise CheckpointFormatError(f"module list: '{where}': entry {name!r} must be {{\"linears\": [...]}} with "
                                    f"at least one linear; got {info!r:.200}")
    linears = []
    for n, entry in enumerate(info["linears"]):
        if not isinstance(entry, dict) or set(entry) != set(_LINEAR_FIELDS) or not isinstance(entry["key"], str) \
                or not all(type(entry[f]) is int for f in _LINEAR_FIELDS[1:]):
            raise CheckpointFormatError(f"module list: '{where}': linear {n} of {name!r} must have exactly "
                                        f"{', '.join(_LINEAR_FIELDS)} (a string and two integers); got {entry!r:.200}")
        try:
            linears.append(TargetLinear(entry["key"], entry["in_features"], entry["out_features"]))
        except ValueError as exc:
            raise CheckpointFormatError(f"module list: '{where}': module {name!r}: {exc}") from exc
    return TargetModule(name, tuple(linears))


def _check_unique(layers: TargetLayers, where: str) -> None:
    seen: set[str] = set()
    for lin in layers.linears:
        if lin.key in seen:
            raise CheckpointFormatError(f"module list: '{where}': linear {lin.key!r} is listed twice")
        seen.add(lin.key)


def basis_names(module: TargetModule) -> tuple[str, ...]:
    """Each linear's part of its basis keys: its key relative to the module (``to_q``, ``qkv``, ``ff_net_0_proj``),
    the released ``to_out`` for ``to_out.0``; the linears' indices where a key does not sit under the module's name
    or two names would be the same."""
    prefix = MODEL_PREFIX + module.name + "."
    names = []
    for j, lin in enumerate(module.linears):
        rel = lin.key[len(prefix):] if lin.key.startswith(prefix) else ""
        names.append(_RELEASED_NAMES.get(rel, rel.replace(".", "_")) if rel else str(j))
    if len(set(names)) != len(names):
        names = [str(j) for j in range(len(module.linears))]
    return tuple(names)


BasisLayout = tuple[tuple[int, str, int, int], ...]  # per target linear, token order: (module index, name, in, out)


def basis_layout(layers: TargetLayers) -> BasisLayout:
    """What the basis file holds for ``layers``: per linear its module's index, its basis name, its sizes."""
    return tuple((i, name, lin.in_features, lin.out_features) for i, module in enumerate(layers.modules)
                 for name, lin in zip(basis_names(module), module.linears, strict=True))


def released_basis_layout(modules: Sequence[AttnModule], spec: UNetSpec) -> BasisLayout:
    """``basis_layout(released_target_layers(modules, spec))`` without building the description: the released
    checkpoints' load path, where 560 linear objects would cost more than the whole check (tested equal)."""
    return tuple((i, short, *module.linear_shape(short, spec)) for i, module in enumerate(modules)
                 for short, _, _ in LINEARS)


@lru_cache(maxsize=8)  # a layout of plain tuples hashes in ~10 us; the keys take ~0.2 ms to format at every load
def basis_keys(layout: BasisLayout, kind: str) -> tuple[str, ...]:
    """The key of every basis tensor of ``kind`` ("id" or "base"), in token order: position ``t`` holds the basis
    that token ``t`` mixes, i.e. side ``t % 2`` (0 down, 1 up) of linear ``t // 2``."""
    return tuple(f"{i}.{name}.{kind}_{side}_basis" for i, name, _, _ in layout for side in SIDES)


def token_index(linear: int, side: int) -> int:
    """The coefficient token that mixes side ``side`` (0 down, 1 up) of target linear ``linear``."""
    return TOKENS_PER_LINEAR * linear + side


def kohya_prefix(linear: TargetLinear) -> str:
    """``lora_unet_<key without diffusion_model., dots as underscores>``: the key ComfyUI maps for every family
    (for SDXL also what A1111/Forge and kohya's scripts write)."""
    key = linear.key[len(MODEL_PREFIX):] if linear.key.startswith(MODEL_PREFIX) else linear.key
    return "lora_unet_" + key.replace(".", "_")


def _released_module(module: AttnModule, spec: UNetSpec) -> TargetModule:
    prefix = MODEL_PREFIX + module.sgm + "."  # = topology.comfy_key, without its per-call table
    return TargetModule(module.sgm, tuple(TargetLinear(prefix + suffix, *module.linear_shape(short, spec))
                                          for short, suffix, _ in LINEARS))


def released_target_layers(modules: Sequence[AttnModule], spec: UNetSpec) -> TargetLayers:
    """The description a released-style module list means: each SDXL attention module's four linears (q, k, v,
    out) at the widths of ``spec``, in the list's order."""
    return TargetLayers(RELEASED_FAMILY, tuple(_released_module(m, spec) for m in modules))


def sdxl_target_layers(spec: UNetSpec = SDXL) -> TargetLayers:
    """The 140 attention modules (560 linears) of an SDXL-topology UNet of the widths in ``spec``."""
    return released_target_layers(sdxl_modules(), spec)


def released_json(layers: TargetLayers, naming: str = "kohya_diffusers") -> dict[str, object] | None:
    """``layers`` as a released-style module list (names, hidden_size, cross_attention_dim) that the official
    loader reads, or None when they are not SDXL attention modules with SDXL's four linears each."""
    if layers.family != RELEASED_FAMILY:
        return None
    table: dict[str, object] = {}
    for module in layers.modules:
        attn = resolve(module.name)
        if attn is None or len(module.linears) != len(LINEARS):
            return None
        hidden, context = module.linears[0].in_features, module.linears[1].in_features
        spec = UNetSpec(layers.family, (hidden, hidden), context)
        if _released_module(attn, spec) != module:
            return None
        table[attn.name(naming)] = {"hidden_size": hidden, "cross_attention_dim": context if attn.cross else None}
    return table


def check_fits(targets: TargetLayers, weights: Mapping[str, Sequence[int]], model_family: str, *,
               what: str = "HyperLoRA", error: type[Exception] = ModuleMismatchError) -> None:
    """Refuse a model whose weights (``{ComfyUI key: shape}``, e.g. from its state dict) lack a target linear or
    have it at other sizes; the message names both families and the first target, in token order, that does not
    fit. ``what`` is the thing made for ``targets`` (a HyperLoRA, a LiDB), ``error`` the class raised."""
    missing, other = [], []
    for lin in targets.linears:
        found = weights.get(lin.key + ".weight")
        if found is None:
            missing.append(lin)
        elif tuple(found) != lin.weight_shape:
            other.append((lin, tuple(found)))
    if not missing and not other:
        return
    order = {lin.key: i for i, lin in enumerate(targets.linears)}
    first = min([*missing, *(lin for lin, _ in other)], key=lambda lin: order[lin.key])
    shape = dict((lin.key, found) for lin, found in other).get(first.key)
    where = (f"{first.key} does not exist in the MODEL" if shape is None else
             f"{first.key} is {list(shape)} in the MODEL, {list(first.weight_shape)} in the {what}")
    parts = [f"{len(missing)} of its {len(targets.linears)} layers do not exist in the MODEL"] if missing else []
    parts += [f"{len(other)} have other sizes"] if other else []
    if model_family != targets.family:
        advice = f"Use a model of the {targets.family} family, or a {what} made for {model_family}."
    else:
        advice = (f"The MODEL is a {model_family} of other widths than this {what} was made for: use a standard "
                  f"{targets.family} model, or a {what} trained on this one.")
    raise error(f"This {what} was made for {targets.family} and the MODEL is {model_family}: they do not fit. "
                f"First layer that does not fit: {where}; {' and '.join(parts)}. {advice}")
