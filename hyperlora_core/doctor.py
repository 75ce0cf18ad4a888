"""The doctor: every file and package the nodes need, checked. From ComfyUI's folder:
``python custom_nodes/ComfyUI-HyperLoRA/doctor.py`` (or ``python -m hyperlora_core doctor --models <models dir>``
from this package's folder).

Each check reports ok / warn / problem, what it found, and the exact fix. It answers the commonest user
reports: files in the wrong folder, a nested antelopev2 folder, git-LFS pointers instead of weights, truncated
downloads, and onnxruntime packages fighting over one folder.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import MODULES_JSON, open_checkpoint, read_basis_config, read_module_list
from .config import IdProjectorConfig, ResamplerConfig
from .errors import HyperLoRAError
from .safetensors_file import SafetensorsFile
from .sources import ANTELOPEV2, CHECKPOINT, CLIP_VIT_L14
from .topology import SDXL, UNetSpec

COMMAND = "python custom_nodes/ComfyUI-HyperLoRA/doctor.py"  # how users run it, from ComfyUI's folder
ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx", "genderage.onnx", "1k3d68.onnx")
UNUSED_ANTELOPE = ("genderage.onnx", "1k3d68.onnx")  # in the download, never loaded by the nodes: a note at most
CLIP_WIDTH = 1024  # ViT-L/14 token width, what the released resampler reads
# leaves exactly one runtime, the one insightface depends on (README: "Face analysis on the GPU" for the other way)
ONNXRUNTIME_FIX = "pip uninstall -y onnxruntime-gpu onnxruntime && pip install onnxruntime"
MIN_ONNX_BYTES = 1024  # smaller than this is an empty file, an error page or a pointer
STATUSES = ("ok", "note", "warn", "problem")


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str  # what was checked
    status: str  # "ok", "note" (nothing to do), "warn" (works, worth fixing) or "problem" (does not work)
    detail: str  # what was found
    fix: str = ""  # the exact fix, empty when nothing is to be done

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def checkpoint_folders(models: Path) -> list[Path]:
    """Checkpoint folders under hyper_lora/ (and the official nodes' hyper_lora/hyper_lora/)."""
    found = []
    for parent in (models / "hyper_lora", models / "hyper_lora" / "hyper_lora"):
        if parent.is_dir():
            found += sorted(p for p in parent.iterdir() if p.is_dir() and p.name not in ("hyper_lora", "clip_vit",
                                                                                         "clip_processor"))
    return found


def check_checkpoints(models: Path, unet: UNetSpec = SDXL) -> list[Check]:
    folders = [f for f in checkpoint_folders(models) if any(f.rglob(MODULES_JSON)) or any(f.glob("*.safetensors"))]
    if not folders:
        return [Check("HyperLoRA checkpoint", "problem", f"no checkpoint folder in {models / 'hyper_lora'}",
                      f"download the released folder ({CHECKPOINT.origin}: {MODULES_JSON} and the three "
                      f".safetensors files) into {models / 'hyper_lora'}/")]
    checks = []
    for folder in folders:
        name = f"checkpoint {folder.name}"
        try:
            ckpt = open_checkpoint(folder, unet=unet)
        except HyperLoRAError as exc:  # say what is wrong with each file, not only the first one met
            problems = [c for c in check_checkpoint_files(folder, unet) if c.status == "problem"]
            checks += problems or [Check(name, "problem", str(exc), _fix_for(exc))]
            continue
        detail = (f"{ckpt.family}, {len(ckpt.targets.modules)} modules, K={ckpt.basis.k}, rank {ckpt.basis.id_rank}, "
                  f"encoders {'+'.join(ckpt.encoders)}")
        if ckpt.folder != folder:
            checks.append(Check(name, "warn", f"nested folder {ckpt.folder.relative_to(models)} (it works)",
                                f"move the files of {ckpt.folder} up into {folder}"))
        else:
            checks.append(Check(name, "ok", detail))
    return checks


def check_checkpoint_files(folder: Path, unet: UNetSpec = SDXL) -> list[Check]:
    """One line per file of a checkpoint folder, each file checked on its own (a bad one does not hide the next)."""
    from .checkpoint import find_folder

    try:
        folder = find_folder(folder)
    except HyperLoRAError:
        pass  # the module list's own line says it is missing
    name = f"checkpoint {folder.name}"
    checks, found = [], {}

    def attempt(file: str, read) -> None:
        try:
            found[file] = read(folder / file)
            checks.append(Check(f"{name}/{file}", "ok", "readable"))
        except (HyperLoRAError, OSError) as exc:
            checks.append(Check(f"{name}/{file}", "problem", str(exc), _fix_for(exc)))

    attempt(MODULES_JSON, lambda path: read_module_list(path.parent, unet))
    modules = found.get(MODULES_JSON)
    attempt("hyper_lora_modules.safetensors", lambda path: _basis(path, modules))
    for file, what in (("resampler.safetensors", "resampler"), ("base_resampler.safetensors", "base resampler")):
        if file == "resampler.safetensors" or (folder / file).exists():
            attempt(file, lambda path, what=what: _resampler(path, what))
    resampler = found.get("resampler.safetensors")
    projector = folder / "id_projector.safetensors"
    if projector.exists():
        attempt(projector.name, lambda path: IdProjectorConfig.from_shapes(
            _shapes(SafetensorsFile(path, "ID projector")), what="ID projector", path=path))
    elif resampler is None or resampler.two_conditions:
        checks.append(Check(f"{name}/{projector.name}", "problem", "missing (the released checkpoints have it)",
                            f"download {projector.name} of the same release into {folder}/"))
    return checks


def _basis(path: Path, modules) -> object:
    file = SafetensorsFile(path, "LoRA basis")
    return read_basis_config(file, modules.layout) if modules is not None else file


def _resampler(path: Path, what: str) -> ResamplerConfig:
    file = SafetensorsFile(path, what)
    told = file.metadata.get("dim_head", "64")
    dim_head = int(told) if told.isdigit() else 64
    return ResamplerConfig.from_shapes(_shapes(file), what=what, path=path, dim_head=dim_head)


def _shapes(file: SafetensorsFile) -> dict:
    return {key: info.shape for key, info in file.tensors.items()}


def _fix_for(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Fetch the real file", "Download", "download", "Put the file", "use the released", "re-download"):
        at = text.find(marker)
        if at >= 0:
            return text[at:]
    return "re-download the whole checkpoint folder"


def check_clip(models: Path, width: int = CLIP_WIDTH) -> list[Check]:
    candidates = []
    for parent in (models / "hyper_lora" / "clip_vit", models / "clip_vision"):
        if parent.is_dir():
            candidates += sorted(p for p in parent.iterdir() if p.is_dir() or p.suffix == ".safetensors")
    if not candidates:
        return [Check("CLIP ViT-L/14", "problem", "no CLIP vision model found",
                      f"download {CLIP_VIT_L14.origin} (config.json + model.safetensors) into "
                      f"{models / 'hyper_lora' / 'clip_vit' / 'clip_vit_large_14'}/, or its .safetensors into "
                      f"{models / 'clip_vision'}/")]
    return [_check_clip_candidate(path, width) for path in candidates]


def _check_clip_candidate(path: Path, width: int) -> Check:
    from .clip import inspect_clip

    name = f"CLIP {path.name}"
    try:
        config, file, kind, _ = inspect_clip(path)
    except HyperLoRAError as exc:
        return Check(name, "problem", str(exc), _fix_for(exc))
    detail = (f"{file.path.name}: {file.size / 2**20:.0f} MiB, {kind} layout, width {config.width}, "
              f"{config.layers} blocks, {config.num_tokens} tokens")
    if config.width != width:
        return Check(name, "problem", detail + f"; HyperLoRA reads {width}-wide CLIP tokens",
                     "use openai/clip-vit-large-patch14 (ViT-L/14)")
    return Check(name, "ok", detail)


def check_insightface(models: Path) -> list[Check]:
    base = models / "insightface" / "models" / "antelopev2"
    folder, checks = base, []
    if (base / "antelopev2").is_dir() and not (base / ANTELOPE_FILES[0]).exists():
        folder = base / "antelopev2"
        checks.append(Check("antelopev2 folder", "warn", f"nested folder {folder.relative_to(models)} (it works)",
                            f"move the .onnx files up into {base}/ and remove the inner folder"))
    if not folder.is_dir():
        return [Check("antelopev2", "problem", f"{base} does not exist",
                      f"download antelopev2 ({ANTELOPEV2.origin}: {', '.join(ANTELOPE_FILES)}) and put the "
                      f"files in {base}/")]
    for name in ANTELOPE_FILES:
        checks.append(_check_onnx(folder / name))
    return checks


def _check_onnx(path: Path) -> Check:
    check = _check_onnx_file(path)
    if path.name in UNUSED_ANTELOPE and check.status == "problem":
        return Check(check.name, "note", f"{check.detail}; the nodes never use it (insightface's "
                     f"{'gender/age' if path.name.startswith('genderage') else '3D landmark'} model)")
    return check


def _check_onnx_file(path: Path) -> Check:
    name = f"antelopev2/{path.name}"
    if not path.is_file():
        return Check(name, "problem", "missing", f"put {path.name} from antelopev2 into {path.parent}/")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        return Check(name, "problem", "a git-LFS pointer, not the model", f"download the real {path.name} again")
    if path.stat().st_size < MIN_ONNX_BYTES:
        return Check(name, "problem", f"only {path.stat().st_size} bytes: truncated or empty",
                     f"download {path.name} again")
    return Check(name, "ok", f"{path.stat().st_size / 2**20:.1f} MiB")


def check_packages(version: Callable[[str], str] = metadata.version,
                   providers: Callable[[], list[str]] | None = None) -> list[Check]:
    try:
        checks = [Check("package insightface", "ok", version("insightface"))]
    except metadata.PackageNotFoundError:
        checks = [Check("package insightface", "problem", "not installed (needed for face analysis)",
                        "pip install insightface")]
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if not installed:
        checks.append(Check("onnxruntime", "problem", "not installed",
                            "pip install onnxruntime"))
    elif len(installed) == 2:
        checks.append(Check("onnxruntime", "warn", f"both installed ({', '.join(installed)}); they share one folder "
                            "and the last one installed wins",
                            ONNXRUNTIME_FIX))
    else:
        checks.append(Check("onnxruntime", "ok", installed[0]))
    listed = providers() if providers is not None else _providers()
    if listed is not None:
        checks.append(Check("onnxruntime providers", "ok" if listed else "problem", ", ".join(listed) or "none",
                            "" if listed else "reinstall onnxruntime"))
    return checks


def _providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def run_doctor(models: Path, packages: bool = True, unet: UNetSpec = SDXL, clip_width: int = CLIP_WIDTH,
               ) -> list[Check]:
    models = Path(models).expanduser()
    if not models.is_dir():
        return [Check("models folder", "problem", f"{models} does not exist",
                      "pass ComfyUI's models folder, e.g. --models ComfyUI/models")]
    checks = check_checkpoints(models, unet) + check_clip(models, clip_width) + check_insightface(models)
    return checks + (check_packages() if packages else [])


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  status   detail / fix", "-" * (width + 40)]
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {c.status:<7}  {c.detail}")
        if c.fix:
            lines.append(f"{''.ljust(width)}  {'':<7}  fix: {c.fix}")
    problems = sum(c.status == "problem" for c in checks)
    lines.append(f"{problems} problem(s), {sum(c.status == 'warn' for c in checks)} warning(s), "
                 f"{sum(c.status == 'note' for c in checks)} note(s)")
    return "\n".join(lines)
