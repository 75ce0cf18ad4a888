"""Model folders: registration with ComfyUI (honours extra_model_paths.yaml) and the dropdown listings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..hyperlora_core.errors import CheckpointFileMissing, FaceModelMissing, InputValueError
from ..hyperlora_core.sources import ANTELOPEV2, CHECKPOINT

log = logging.getLogger(__name__)

HYPER_LORA = "hyper_lora"
INSIGHTFACE = "insightface"
IDENTITIES = "hyper_lora_identities"
LIDB = "lidb"  # models/lidb: LiDB files (Save LiDB / Load LiDB)
HDB = "hyperdreambooth"  # models/hyperdreambooth: HyperDreamBooth networks (Load HyperDreamBooth)
MODULES_JSON = "hyper_lora_modules.json"
DETECTOR = "scrfd_10g_bnkps.onnx"
CLIP_NAMES = ("clip_vit_large_14", "clip_vit", "clip")
NOT_CHECKPOINTS = {"clip_vit", "clip_processor", "identities"}


def register() -> None:
    """Add our folders under ComfyUI's models dir, keeping any path extra_model_paths.yaml already gave."""
    base = Path(folder_paths.models_dir)
    for name, path in ((HYPER_LORA, base / "hyper_lora"), (INSIGHTFACE, base / "insightface"),
                       (IDENTITIES, base / "hyper_lora" / "identities"), (LIDB, base / "lidb"),
                       (HDB, base / "hyperdreambooth")):
        folder_paths.add_model_folder_path(name, str(path), is_default=False)
        folder_paths.folder_names_and_paths[name] = (folder_paths.folder_names_and_paths[name][0], {".safetensors"}
                                                     if name in (IDENTITIES, LIDB, HDB) else set())


def _roots(kind: str) -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(kind) if os.path.isdir(p)]


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder, or an accidental ``x/x/`` nesting of one (what load_hyperlora accepts by name)."""
    return (folder / MODULES_JSON).is_file() or (folder / folder.name / MODULES_JSON).is_file()


def checkpoints() -> list[str]:
    """Checkpoint folders (relative to a hyper_lora root), including the official nodes' hyper_lora/hyper_lora/.

    A folder that only holds checkpoints (``hyper_lora/`` itself) is not one: listing it would offer a choice that
    cannot load.
    """
    found = []
    for root in _roots(HYPER_LORA):
        for parent in (root, root / "hyper_lora"):
            if not parent.is_dir():
                continue
            for sub in sorted(parent.iterdir()):
                if sub.is_dir() and sub.name not in NOT_CHECKPOINTS and is_checkpoint(sub):
                    found.append(sub.relative_to(root).as_posix())
    return sorted(set(found))


def _find_dir(kind: str, name: str) -> Path | None:
    """``name`` (a dropdown value, relative) under the first root of ``kind`` that has it.

    Containment is judged on the name as listed, not on where a symlink leads: models folders shared through
    symlinks work, while an absolute name or one with ``..`` is refused.
    """
    parts = Path(name.replace("\\", "/")).parts  # "." (files right in the root) has none: the root itself
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\0" in name:
        return None
    for root in _roots(kind):
        path = root.joinpath(*parts)
        if path.is_dir():
            return path
    return None


def _first_folder(kind: str) -> str:
    """Where a download of ``kind`` goes: its first registered folder (it may not exist yet)."""
    return str(Path(folder_paths.get_folder_paths(kind)[0]))


def check_choice(input_name: str, value: str, listed: list[str], where: str, what: str) -> bool | str:
    """Queue-time check of a folder dropdown (ComfyUI 0.3.64 does not check V3 combo values): True, or a message
    naming the input, listing what is available (or saying there is none and where it goes) and what to do."""
    if value in listed:
        return True
    if listed:
        return (f"{input_name} '{value}' is not installed. Available: {', '.join(listed)}. Pick one in {where}'s "
                f"{input_name} list.")
    return f"{input_name} '{value}' is not installed, and there is none yet: {what} Then press R to refresh the lists."


def check_checkpoint(name: str) -> bool | str:
    return check_choice("checkpoint", name, checkpoints(), "the HyperLoRA node",
                        f"download a checkpoint folder ({CHECKPOINT.origin}: {MODULES_JSON} and three .safetensors "
                        f"files) into {_first_folder(HYPER_LORA)}/.")


def check_face_analyzer(name: str) -> bool | str:
    return check_choice("face_analyzer", name, face_analyzers(), "the HyperLoRA node",
                        f"download antelopev2 ({ANTELOPEV2.origin}) and unpack its .onnx files into "
                        f"{Path(_first_folder(INSIGHTFACE)) / 'models' / 'antelopev2'}/.")


def check_identity(name: str) -> bool | str:
    return check_choice("identity", name, identities(), "Load HyperLoRA Identity",
                        "save one with Save HyperLoRA Identity (it writes to models/hyper_lora/identities).")


def checkpoint_path(name: str) -> Path:
    path = _find_dir(HYPER_LORA, name)
    if path is None:
        raise CheckpointFileMissing(
            f"HyperLoRA checkpoint '{name}' is not in any hyper_lora folder "
            f"({', '.join(map(str, _roots(HYPER_LORA)))}). Put the released checkpoint folder there and refresh "
            "the page (press R).")
    return path


def face_analyzers() -> list[str]:
    """Folders holding the antelopev2 detector, at most three levels down; symlinked folders are followed."""
    found = []
    for root in _roots(INSIGHTFACE):
        for folder, subs, files in os.walk(root, followlinks=True):
            rel = Path(folder).relative_to(root)
            if len(rel.parts) >= 3:
                subs.clear()
            if DETECTOR in files:
                found.append(rel.as_posix())
    return sorted(set(found))


def face_analyzer_path(name: str) -> Path:
    path = _find_dir(INSIGHTFACE, name)
    if path is None:
        raise FaceModelMissing(
            f"face analyzer '{name}' is not in any insightface folder ({', '.join(map(str, _roots(INSIGHTFACE)))}). "
            "Put antelopev2 (scrfd_10g_bnkps.onnx, 2d106det.onnx, glintr100.onnx, genderage.onnx, 1k3d68.onnx) "
            "in models/insightface/models/antelopev2/.")
    return path


def clip_folder(checkpoint: Path) -> Path:
    """The CLIP ViT-L/14 used when no CLIP_VISION is connected."""
    candidates = [checkpoint / n for n in CLIP_NAMES]
    for root in _roots(HYPER_LORA):
        candidates += [root / "clip_vit" / "clip_vit_large_14"]
        if (root / "clip_vit").is_dir():
            candidates += sorted(p for p in (root / "clip_vit").iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "model.safetensors").is_file() or any(candidate.glob("*.safetensors")):
            return candidate
    raise CheckpointFileMissing(
        "no CLIP ViT-L/14 found: connect a CLIP_VISION (Load CLIP Vision with clip-vit-large-patch14), or put "
        "openai/clip-vit-large-patch14 (config.json + model.safetensors) in models/hyper_lora/clip_vit/"
        "clip_vit_large_14/.")


def identities() -> list[str]:
    return folder_paths.get_filename_list(IDENTITIES)


def lidbs() -> list[str]:
    return folder_paths.get_filename_list(LIDB)


def check_lidb(name: str) -> bool | str:
    return check_choice("lidb", name, lidbs(), "Load LiDB",
                        "save one with Save LiDB (HyperLoRA Refine in mode lidb makes one; it writes to models/lidb).")


def hdbs() -> list[str]:
    return folder_paths.get_filename_list(HDB)


def check_hdb(name: str) -> bool | str:
    return check_choice("hdb", name, hdbs(), "Load HyperDreamBooth",
                        "train and export one (python -m hyperlora_core.train run ... --export) into "
                        f"{_first_folder(HDB)}/; no released HyperDreamBooth weights exist.")


def hdb_path(name: str) -> Path:
    """The HyperDreamBooth file ``name``; refused when two hyperdreambooth folders hold different files of it."""
    return _unique_file(HDB, name, "HyperDreamBooth network", "models/hyperdreambooth", "two hyperdreambooth folders")


def identity_path(name: str) -> Path:
    """The identity file ``name``; refused when two identity folders hold different files of that name."""
    return _unique_file(IDENTITIES, name, "identity", "models/hyper_lora/identities", "two identity folders")


def lidb_path(name: str) -> Path:
    """The LiDB file ``name``; refused when two lidb folders hold different files of that name."""
    return _unique_file(LIDB, name, "LiDB", "models/lidb", "two lidb folders")


def _unique_file(kind: str, name: str, what: str, where: str, folders: str) -> Path:
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise CheckpointFileMissing(f"{what} '{name}' is not in {where}; save it there first.")
    path, name = Path(path), os.path.relpath(os.path.join("/", name), "/")  # as ComfyUI confines it
    for root in _roots(kind):
        other = root / name
        if other.is_file() and not other.samefile(path) and other.read_bytes() != path.read_bytes():
            raise InputValueError(
                f"{what} '{name}' names two different files: '{path}' and '{other}' ({folders}, "
                "see extra_model_paths.yaml). Which person was meant is unclear: rename or delete one of them and "
                "refresh the page (press R).")
    return path


def saved_name(kind: str, target: Path) -> str:
    """How a dropdown of ``kind`` lists a file that save_target made."""
    return target.relative_to(Path(folder_paths.get_folder_paths(kind)[0]).resolve()).as_posix()


def shown_path(target: Path) -> str:
    """A saved file as a user finds it: ``models/...`` when under ComfyUI's models folder, else the full path."""
    try:
        return "models/" + Path(target).resolve().relative_to(Path(folder_paths.models_dir).resolve()).as_posix()
    except ValueError:
        return str(target)


def saved_output(kind: str, target: Path) -> io.NodeOutput:
    """A save node's output: the file's name as the dropdown of ``kind`` lists it, shown under the node with the
    path where a user finds it."""
    name = saved_name(kind, target)
    return io.NodeOutput(name, ui={"text": [name], "saved_path": [shown_path(target)]})


def check_prefix(prefix: str, folder: str) -> list[str]:
    """The parts of a filename_prefix, refused (not silently rewritten) when it could lead outside ``folder``."""
    where = f"a relative name under {folder}, e.g. 'hyperlora/identity'"
    parts = prefix.replace("\\", "/").split("/")
    if "\0" in prefix:
        problem = "holds a NUL character"
    elif prefix.startswith(("/", "\\")):
        problem = "is an absolute path"
    elif ":" in prefix:
        problem = "names a drive or stream (':')"
    elif ".." in parts:
        problem = "climbs out of the folder with '..'"
    else:
        return [p for p in parts if p not in ("", ".")] or ["hyperlora"]
    raise InputValueError(f"filename_prefix {prefix!r} {problem}: files are only saved inside {folder}. Use {where}.")


def save_target(kind: str, prefix: str, ext: str = ".safetensors") -> Path:
    """A new numbered file under the first folder of ``kind``; a prefix that would leave it is refused."""
    root = Path(folder_paths.get_folder_paths(kind)[0]).resolve()
    parts = check_prefix(prefix, str(root))
    target_dir = root.joinpath(*parts[:-1]).resolve()
    if root != target_dir and root not in target_dir.parents:
        raise InputValueError(f"filename_prefix '{prefix}' leads outside {root} through a link; use a plain name")
    target_dir.mkdir(parents=True, exist_ok=True)
    stem, counter = parts[-1], 1
    while (target_dir / f"{stem}_{counter:05d}_{ext}").exists():
        counter += 1
    return target_dir / f"{stem}_{counter:05d}_{ext}"
