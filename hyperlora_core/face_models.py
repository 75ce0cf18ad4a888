"""The insightface antelopev2 folder: finding it, checking its files, choosing onnxruntime providers, loading it.

insightface and onnxruntime are imported inside the functions, never at package import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .errors import FaceModelError, FaceModelMissing

log = logging.getLogger(__name__)

ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx", "genderage.onnx", "1k3d68.onnx")
NEEDED = {"detection": "scrfd_10g_bnkps.onnx", "landmark_2d_106": "2d106det.onnx", "recognition": "glintr100.onnx"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
_MIN_ONNX_BYTES = 1024


def resolve_antelopev2(root: str | Path) -> Path:
    """The folder holding the antelopev2 .onnx files: ``root`` itself (or the folder of a file given as root),
    ``root/antelopev2`` (also nested twice, as unzipping into a same-named folder leaves it), or
    ``root/models/antelopev2``.

    Raises FaceModelMissing listing the five files and where they go when the needed ones are absent.
    """
    root = Path(root).expanduser()
    if root.suffix == ".onnx" and root.is_file():  # pointed at one of the files: use its folder
        root = root.parent
    candidates = [root]
    for sub in ("antelopev2", "antelopev2/antelopev2", "models/antelopev2", "models/antelopev2/antelopev2"):
        candidates.append(root / sub)
    for folder in candidates:
        if all((folder / name).is_file() for name in NEEDED.values()):
            if folder != root:
                log.info("antelopev2 models found in %s", folder)
            return folder
    near = next((f for f in candidates if f.is_dir() and any(f.glob("*.onnx"))), None)
    raise FaceModelMissing(_missing_message(root, near))


def _missing_message(root: Path, near: Path | None) -> str:
    listing = ", ".join(ANTELOPE_FILES)
    if near is None:
        where = f"'{root}' does not exist" if not root.exists() else f"'{root}' holds no antelopev2 .onnx files"
        return (f"insightface antelopev2 models not found: {where}. Download antelopev2 ({listing}) and put the "
                f"five files directly in '{root}' (in ComfyUI: models/insightface/models/antelopev2/). "
                "Nothing is downloaded automatically.")
    missing = [n for n in ANTELOPE_FILES if not (near / n).is_file()]
    extra = ""
    if NEEDED["detection"] in missing:
        extra = (" Without the detector, insightface itself would only stop with a bare AssertionError "
                 "(assert 'detection' in self.models).")
    return (f"antelopev2 folder '{near}' lacks {', '.join(missing)}.{extra} The folder must hold all five files: "
            f"{listing}. Download the missing ones into '{near}'. Nothing is downloaded automatically.")


def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """onnxruntime provider list for "auto" (CUDA when onnxruntime offers it, else CPU), "cpu" or "cuda"."""
    import onnxruntime

    if not isinstance(providers, str):
        return list(providers)
    choice = providers.lower()
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"providers must be one of {PROVIDER_CHOICES} (or a list of onnxruntime providers), "
                         f"got {providers!r}")
    available = onnxruntime.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if choice == "cuda" and not has_cuda:
        log.warning("face analysis: CUDA was asked for but this onnxruntime (%s) offers only %s; running on the CPU. "
                    "Install onnxruntime-gpu for CUDA.", onnxruntime.__version__, ", ".join(available))
    if choice in ("auto", "cuda") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _check_files(folder: Path) -> None:
    for name in NEEDED.values():
        path = folder / name
        with open(path, "rb") as fh:
            head = fh.read(64)
        size = path.stat().st_size
        if head.startswith(b"version https://git-lfs"):
            raise FaceModelError(f"'{path}' is a git-LFS pointer ({size} bytes of text), not the model: "
                                 f"download the real {name} and replace it")
        if size < _MIN_ONNX_BYTES:
            raise FaceModelError(f"'{path}' is only {size} bytes: an interrupted download. Download {name} again")


def _load_face_analysis(folder: Path, providers: list[str]):
    """insightface FaceAnalysis on exactly this folder, with its failure modes explained."""
    from insightface.app import FaceAnalysis

    # An absolute folder as the model name works in 0.7.3 (os.path.join drops the root) and 2.1 (direct folder).
    try:
        app = FaceAnalysis(name=str(folder.resolve()), root=str(folder.parent),
                           allowed_modules=list(NEEDED), providers=providers)
    except AssertionError as exc:
        raise FaceModelError(
            f"insightface found no face detector in '{folder}' (its bare AssertionError). "
            f"'{NEEDED['detection']}' is there but is not a detection model: it may be a different model saved "
            "under that name, or damaged. Download antelopev2's scrfd_10g_bnkps.onnx again.") from exc
    except OSError as exc:  # includes requests' ConnectionError: a download attempt
        raise FaceModelMissing(
            f"insightface could not use '{folder}' and tried to fetch models instead ({exc}). Put the five "
            f"antelopev2 files ({', '.join(ANTELOPE_FILES)}) in that folder; nothing is downloaded.") from exc
    except _onnxruntime_errors() as exc:  # InvalidProtobuf, Fail, ...: a damaged file
        raise FaceModelError(f"onnxruntime could not load a model in '{folder}': {exc}. One of the .onnx "
                             "files is damaged or incomplete; download antelopev2 again.") from exc
    for task, name in NEEDED.items():
        if task not in app.models:
            raise FaceModelError(f"'{folder / name}' was not recognised as the {task} model by insightface; it is "
                                 f"probably a different model saved under that name. Download {name} again.")
    return app


def _onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "RuntimeException", "NotImplemented")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
