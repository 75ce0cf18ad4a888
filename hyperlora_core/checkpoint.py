"""Open a released HyperLoRA checkpoint folder: find its files, infer its dimensions, check every key.

Nothing heavy is read here. Opening parses four small headers and the module list, samples a few blocks
for the fingerprint, and leaves the 3 GB basis memory-mapped and untouched until the first mixing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from .config import IdProjectorConfig, ResamplerConfig, Shapes, check_keys
from .errors import CheckpointFileMissing, CheckpointFormatError, MissingKeyError, ModuleMismatchError
from .safetensors_file import SafetensorsFile
from .targets import (
    RELEASED_FAMILY,
    TOKENS_PER_LINEAR,
    BasisLayout,
    TargetLayers,
    basis_keys,
    basis_layout,
    is_extended,
    released_basis_layout,
    released_target_layers,
)
from .topology import SDXL, AttnModule, UNetSpec, resolve

log = logging.getLogger(__name__)

MODULES_JSON = "hyper_lora_modules.json"
FILES = {  # file name -> role, in the order they are described to users
    MODULES_JSON: "module list",
    "hyper_lora_modules.safetensors": "LoRA basis",
    "resampler.safetensors": "resampler",
    "id_projector.safetensors": "ID projector",
    "base_resampler.safetensors": "base resampler (optional)",
}
KINDS = ("id", "base")
DEFAULT_DIM_HEAD = 64  # the released resampler's head width  # the two LoRAs a checkpoint may predict


@dataclass(frozen=True)
class BasisConfig:
    """The LoRA bases in ``hyper_lora_modules.safetensors``."""

    k: int  # basis size K: coefficients per token
    id_rank: int  # rank of the ID-LoRA (8 in the release)
    base_rank: int | None  # rank of the Base-LoRA (id_rank // 2), None when the file has no base bases

    def rank(self, kind: str) -> int | None:
        return self.id_rank if kind == "id" else self.base_rank


class ModuleList(NamedTuple):
    """What ``hyper_lora_modules.json`` says, checked."""

    names: tuple[str, ...]  # module names as written in the json, json (= token) order
    layout: BasisLayout  # per target linear: (module index, basis name, in, out), token order
    targets: TargetLayers | None  # extended list: its description; released-style: None (built on first use)
    modules: tuple[AttnModule, ...]  # released-style list: the SDXL module each name refers to; extended: ()
    unet: UNetSpec | None  # released-style list: the UNet the modules were checked against; extended: None

    def described(self) -> TargetLayers:
        return self.targets if self.targets is not None else released_target_layers(self.modules, self.unet)


@dataclass
class Checkpoint:
    """A checked checkpoint folder. Tensors stay on disk until asked for."""

    folder: Path  # the folder holding hyper_lora_modules.json
    listed: ModuleList  # the module list
    basis: BasisConfig
    resampler: ResamplerConfig
    id_projector: IdProjectorConfig | None
    base_resampler: ResamplerConfig | None
    files: dict[str, SafetensorsFile]  # role -> file
    fingerprint: str  # content fingerprint: header bytes and sampled data of every file
    notes: list[str] = field(default_factory=list)  # non-fatal findings, shown by `inspect`

    @property
    def encoders(self) -> tuple[str, ...]:
        """Which face encoders the ID resampler reads: ("arcface", "clip"), ("arcface",) or ("clip",)."""
        if self.resampler.two_conditions:
            return ("arcface", "clip")
        return ("arcface",) if self.id_projector is not None else ("clip",)

    @property
    def has_base(self) -> bool:
        return self.base_resampler is not None

    @property
    def names(self) -> tuple[str, ...]:
        return self.listed.names

    @property
    def modules(self) -> tuple[AttnModule, ...]:
        return self.listed.modules

    @property
    def unet(self) -> UNetSpec | None:
        return self.listed.unet

    @property
    def targets(self) -> TargetLayers:
        """The linears the bases adapt, in token order, with their sizes and model family."""
        if self.listed.targets is None:  # a released-style list: described on first use, not at load
            self.listed = self.listed._replace(targets=self.listed.described())
        return self.listed.targets

    @property
    def family(self) -> str:
        """The model family the checkpoint was made for (SDXL for the released ones)."""
        return self.listed.targets.family if self.listed.targets is not None else RELEASED_FAMILY


def find_folder(path: Path) -> Path:
    """The folder holding the module list; accepts one level of accidental nesting (``x/x/``)."""
    if not path.exists():
        raise CheckpointFileMissing(
            f"HyperLoRA checkpoint folder '{path}' does not exist. It must contain "
            + ", ".join(FILES) + " (the last is optional)."
        )
    if (path / MODULES_JSON).is_file():
        return path
    nested = [p for p in path.iterdir() if p.is_dir() and (p / MODULES_JSON).is_file()] if path.is_dir() else []
    if len(nested) == 1:
        log.info("using nested checkpoint folder %s", nested[0])
        return nested[0]
    raise CheckpointFileMissing(
        f"HyperLoRA checkpoint: '{path / MODULES_JSON}' is missing. The folder must contain "
        + ", ".join(FILES) + " (the last is optional)."
    )


def read_module_list(folder: Path, unet: UNetSpec | None) -> ModuleList:
    """The checked module list.

    A released-style list (names with ``hidden_size`` / ``cross_attention_dim``): each name is resolved to an SDXL
    module and checked against ``unet``'s widths; ``unet`` None takes the widths from the list itself (the first
    module of each level, the first attn2's context) and checks that every module agrees. An extended list
    describes its linears itself (``unet`` does not apply; modules () and UNet None). Either way a host then checks
    the linears against its model's weights.
    """
    raw = _read_json(folder / MODULES_JSON)
    if is_extended(raw):
        targets = TargetLayers.from_json(raw, str(folder / MODULES_JSON))
        return ModuleList(tuple(m.name for m in targets.modules), basis_layout(targets), targets, (), None)
    names, modules, unet = _read_released(folder / MODULES_JSON, raw, unet)
    return ModuleList(names, released_basis_layout(modules, unet), None, modules, unet)


def _read_json(path: Path) -> dict:
    head = path.read_bytes()[:64]
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointFormatError(f"module list: '{path}' is a git-LFS pointer, not the file; download it again.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"module list: '{path}' is not valid JSON ({exc}); download it again.") from exc
    if not isinstance(raw, dict) or not raw:
        raise CheckpointFormatError(f"module list: '{path}' must be a non-empty JSON object of module entries.")
    return raw


def _read_released(path: Path, raw: dict, unet: UNetSpec | None,
                   ) -> tuple[tuple[str, ...], tuple[AttnModule, ...], UNetSpec]:
    if unet is None:
        unet = _listed_unet(path, raw)
    names, modules, seen = [], [], {}
    for name, info in raw.items():
        module = resolve(name)
        if module is None:
            raise ModuleMismatchError(
                f"module list: '{path}': module {name!r} is not an attention module of the {unet.name} UNet "
                "in any known naming (kohya-diffusers, kohya-SGM, diffusers processor). This checkpoint is "
                "not for SDXL."
            )
        if module in seen:
            raise ModuleMismatchError(f"module list: '{path}': {name!r} and {seen[module]!r} name the same module.")
        seen[module] = name
        _check_module_entry(path, name, info, module, unet)
        names.append(name)
        modules.append(module)
    return tuple(names), tuple(modules), unet


def _listed_unet(path: Path, raw: dict) -> UNetSpec:
    widths: dict[int, int] = {}
    context = None
    for name, info in raw.items():
        module = resolve(name)
        if module is None or not isinstance(info, dict):
            continue  # reported with its name by the checks that follow
        widths.setdefault(module.level, info.get("hidden_size"))
        if module.cross and context is None:
            context = info.get("cross_attention_dim")
    try:
        return UNetSpec(name=f"the UNet listed in {path.name}", level_widths=(widths.get(0) or widths.get(1),
                        widths.get(1) or widths.get(0)), context_dim=context or widths.get(1))
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"module list: '{path}' gives no usable hidden_size / cross_attention_dim "
                                    f"({exc}); download it again.") from exc


def _check_module_entry(path: Path, name: str, info: object, module: AttnModule, unet: UNetSpec) -> None:
    if not isinstance(info, dict) or "hidden_size" not in info:
        raise CheckpointFormatError(f"module list: '{path}': entry {name!r} lacks 'hidden_size'.")
    unknown = set(info) - {"hidden_size", "cross_attention_dim"}
    if unknown:
        raise CheckpointFormatError(f"module list: '{path}': entry {name!r} has unknown fields {sorted(unknown)}.")
    hidden, cross = info["hidden_size"], info.get("cross_attention_dim")
    want_cross = unet.context_dim if module.cross else None
    if hidden != module.hidden(unet) or (cross != want_cross and not (cross == hidden and not module.cross)):
        raise ModuleMismatchError(
            f"module {name!r}: the checkpoint says hidden_size={hidden}, cross_attention_dim={cross}, but in "
            f"{unet.name} this module has hidden_size={module.hidden(unet)}, cross_attention_dim={want_cross}. "
            f"This HyperLoRA was made for a different model than {unet.name}."
        )


def _basis_shapes(layout: BasisLayout, kind: str, k: int, rank: int) -> Shapes:
    """{basis key: shape}: [K, in, r] for a down basis, [K, r, out] for an up one (a fresh dict to update)."""
    return dict(_cached_basis_shapes(layout, kind, k, rank))


@lru_cache(maxsize=8)  # the released load path: the same layout at every load, ~0.25 ms to build
def _cached_basis_shapes(layout: BasisLayout, kind: str, k: int, rank: int) -> Shapes:
    shapes = [s for _, _, a, b in layout for s in ((k, a, rank), (k, rank, b))]
    return dict(zip(basis_keys(layout, kind), shapes, strict=True))


def read_basis_config(file: SafetensorsFile, layout: BasisLayout) -> BasisConfig:
    found = {key: info.shape for key, info in file.tensors.items()}
    id_keys = basis_keys(layout, "id")
    first = id_keys[0]
    if first not in found or len(found[first]) != 3:
        raise MissingKeyError(
            f"LoRA basis: '{file.path}' lacks {first!r} (a [K, in, rank] tensor); it is not a HyperLoRA basis file."
        )
    k, _, id_rank = found[first]
    expected = _basis_shapes(layout, "id", k, id_rank)
    base_rank = None
    if any(".base_" in key for key in found):
        base_keys = basis_keys(layout, "base")
        base_rank = found.get(base_keys[0], (0, 0, id_rank // 2))[2]
        expected.update(_basis_shapes(layout, "base", k, base_rank))
    try:
        check_keys("LoRA basis", file.path, found, expected)
    except CheckpointFormatError as exc:
        raise type(exc)(f"{exc} (module index i in '<i>.<linear>...' follows the order of {MODULES_JSON})") from exc
    return BasisConfig(k=k, id_rank=id_rank, base_rank=base_rank)


def open_checkpoint(path: str | Path, *, unet: UNetSpec | None = SDXL, dim_head: int | None = None) -> Checkpoint:
    """Find, parse and check a checkpoint folder without reading its tensors (``unet`` None: see read_module_list)."""
    folder = find_folder(Path(path).expanduser())
    listed = read_module_list(folder, unet)
    files = {
        "basis": SafetensorsFile(folder / "hyper_lora_modules.safetensors", "LoRA basis"),
        "resampler": SafetensorsFile(folder / "resampler.safetensors", "resampler"),
    }
    basis = read_basis_config(files["basis"], listed.layout)
    resampler = _resampler_config(files["resampler"], dim_head, listed, basis.k)
    id_projector = None
    if (folder / "id_projector.safetensors").exists() or resampler.two_conditions:
        files["id_projector"] = SafetensorsFile(folder / "id_projector.safetensors", "ID projector")
        id_projector = IdProjectorConfig.from_shapes(_shapes(files["id_projector"]), what="ID projector",
                                                     path=files["id_projector"].path)
        if id_projector.width != resampler.x_dim:
            raise CheckpointFormatError(
                f"ID projector: '{files['id_projector'].path}' makes {id_projector.width}-wide tokens but the "
                f"resampler's proj_in reads {resampler.x_dim}; the files come from different checkpoints."
            )
    notes: list[str] = []
    base_resampler = None
    if (folder / "base_resampler.safetensors").exists():
        files["base_resampler"] = SafetensorsFile(folder / "base_resampler.safetensors", "base resampler")
        if basis.base_rank is None:
            raise MissingKeyError(
                f"base resampler: '{files['base_resampler'].path}' is present but the LoRA basis has no "
                "'<i>.<linear>.base_down_basis' tensors; remove the base resampler or use the matching basis."
            )
        base_resampler = _resampler_config(files["base_resampler"], dim_head, listed, basis.k)
    elif basis.base_rank is not None:
        notes.append("the basis has base_* tensors but there is no base_resampler.safetensors: no Base-LoRA")
    hasher = hashlib.sha256((folder / MODULES_JSON).read_bytes())
    for role in sorted(files):
        files[role].update_fingerprint(hasher)
    return Checkpoint(folder=folder, listed=listed, basis=basis, resampler=resampler,
                      id_projector=id_projector, base_resampler=base_resampler, files=files,
                      fingerprint=hasher.hexdigest()[:32], notes=notes)


def _shapes(file: SafetensorsFile) -> Shapes:
    return {key: info.shape for key, info in file.tensors.items()}


def _resampler_config(file: SafetensorsFile, dim_head: int | None, listed: ModuleList, k: int) -> ResamplerConfig:
    """dim_head: as given; else as the file's metadata tells ("dim_head"); else the release's 64."""
    if dim_head is None:
        told = file.metadata.get("dim_head", str(DEFAULT_DIM_HEAD))
        if not told.isdigit() or int(told) <= 0:
            raise CheckpointFormatError(f"{file.what}: '{file.path}': metadata dim_head={told!r} is not a number")
        dim_head = int(told)
    config = ResamplerConfig.from_shapes(_shapes(file), what=file.what, path=file.path, dim_head=dim_head)
    tokens = TOKENS_PER_LINEAR * len(listed.layout)
    if config.num_queries != tokens:
        raise CheckpointFormatError(
            f"{file.what}: '{file.path}' has {config.num_queries} latent tokens but {MODULES_JSON} lists "
            f"{len(listed.names)} modules of {len(listed.layout)} linears, which need {tokens} (2 per linear); "
            "the files do not belong together."
        )
    if config.out_dim != k:
        raise CheckpointFormatError(
            f"{file.what}: '{file.path}' outputs {config.out_dim} coefficients per token but the basis has K={k}; "
            "the files do not belong together."
        )
    return config
