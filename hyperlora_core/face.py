"""Face analysis on an insightface antelopev2 folder: detection, 106 landmarks and the ArcFace embedding.

Only three of the folder's five models run: the SCRFD detector, the 106-point landmark model and glintr100.
Per image, the detector runs once at ``det_size``; only when it finds nothing does the analyzer retry, first with
the image shrunk into a black border (a face that fills the frame is too large for the detector's anchors), then
at smaller detection sizes. Each size is passed to the detector per call, because insightface 2.1 ignores
``det_model.input_size``. Landmarks and the embedding are computed for the chosen face only, on the original image.

insightface and onnxruntime are imported when an analyzer is built, never at package import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FaceModelError, FaceModelMissing, FaceNotFoundError

log = logging.getLogger(__name__)

ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx", "genderage.onnx", "1k3d68.onnx")
NEEDED = {"detection": "scrfd_10g_bnkps.onnx", "landmark_2d_106": "2d106det.onnx", "recognition": "glintr100.onnx"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
PAD_FRACTION = 0.25  # retry: the image is shrunk to the middle half of the detector input, black around it
MIN_DET_SIZE = 256
_MIN_ONNX_BYTES = 1024


@dataclass(frozen=True)
class Face:
    """One detected face, in original image pixels."""

    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2
    kps: np.ndarray  # float32 [5, 2]: eyes, nose tip, mouth corners (x, y)
    landmark_106: np.ndarray  # float32 [106, 2]: insightface 2d106det points (x, y)
    embedding: np.ndarray  # float32 [512]: glintr100 ArcFace embedding, L2-normalised
    det_score: float  # detector confidence in [0, 1]

    def __post_init__(self) -> None:
        for name, shape in (("bbox", (4,)), ("kps", (5, 2)), ("landmark_106", (106, 2))):
            value = np.asarray(getattr(self, name), dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"Face.{name} must have shape {shape}, got {value.shape}")
            object.__setattr__(self, name, value)
        emb = np.asarray(self.embedding, dtype=np.float32)
        if emb.ndim != 1 or not np.isfinite(emb).all():
            raise ValueError(f"Face.embedding must be a finite 1-D vector, got shape {emb.shape}")
        object.__setattr__(self, "embedding", emb)

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0.0) * max(self.bbox[3] - self.bbox[1], 0.0))


@dataclass(frozen=True)
class FaceResult:
    """What face analysis made of one image: the chosen face, or why there is none."""

    index: int  # the image's index in its batch
    face: Face | None  # the chosen face (largest, or the face_index-th from the left); None on failure
    n_faces: int  # faces the successful detection pass found (0 when none was found)
    reason: str  # "ok", or a user-facing explanation of the failure and what to do
    det_size: int | None = None  # detector input size of the pass that found the faces
    padded: bool = False  # True when the faces were found only after shrinking the image into a border
    attempts: tuple[tuple[int, bool], ...] = field(default=())  # (det_size, padded) of every detection pass run

    def __post_init__(self) -> None:
        if (self.face is None) == (self.reason == "ok"):
            raise ValueError("FaceResult: reason must be 'ok' exactly when a face is present")

    @property
    def ok(self) -> bool:
        return self.face is not None

    def raise_for_failure(self, hint: str = "") -> None:
        """Raise FaceNotFoundError naming the photo as a user counts it (from 1) when no face was chosen;
        ``hint`` (the caller's advice for its own mode) is appended."""
        if self.face is None:
            raise FaceNotFoundError(f"photo {self.index + 1}: {self.reason}{hint}")


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


def retry_sizes(det_size: int) -> tuple[int, ...]:
    """Smaller detector sizes tried (unpadded) after the padded retry: det_size - 128 k, down to 256."""
    return tuple(range(det_size - 128, MIN_DET_SIZE - 1, -128))


class FaceAnalyzer:
    """insightface ``FaceAnalysis`` on an antelopev2 folder, used for one face per image.

    ``.provider`` is the onnxruntime provider the detector session actually runs on.
    """

    def __init__(self, root: str | Path, *, providers: str | Sequence[str] = "auto", det_size: int = 640,
                 det_thresh: float = 0.5) -> None:
        if det_size < MIN_DET_SIZE or det_size % 32:
            raise ValueError(f"det_size must be a multiple of 32 and at least {MIN_DET_SIZE}, got {det_size}")
        if not 0.0 < det_thresh < 1.0:
            raise ValueError(f"det_thresh must be between 0 and 1, got {det_thresh}")
        self.folder = resolve_antelopev2(root)
        _check_files(self.folder)
        self.det_size = det_size
        self.det_thresh = det_thresh
        self.sizes = retry_sizes(det_size)
        self._app = _load_face_analysis(self.folder, resolve_providers(providers))
        self._app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=(det_size, det_size))
        self._detector = self._app.det_model
        self._landmark = self._app.models["landmark_2d_106"]
        self._recognition = self._app.models["recognition"]
        self.provider = str(self._detector.session.get_providers()[0])
        log.info("face analysis: %s on %s", self.folder, self.provider)

    def analyze(self, image_rgb8: np.ndarray, *, index: int = 0, face_index: int | None = None) -> FaceResult:
        """Find the faces of one HxWx3 uint8 RGB image and describe the chosen one.

        ``face_index`` None picks the largest face; k picks the k-th face counted from the left (0 = leftmost).
        """
        if image_rgb8.dtype != np.uint8 or image_rgb8.ndim != 3 or image_rgb8.shape[2] != 3:
            raise ValueError(f"image {index}: analyze() needs HxWx3 uint8 RGB (use images.to_rgb8), "
                             f"got {image_rgb8.dtype} {image_rgb8.shape}")
        if face_index is not None and face_index < 0:
            raise ValueError(f"face_index must be >= 0 (0 is the leftmost face) or None, got {face_index}")
        import cv2

        bgr = cv2.cvtColor(image_rgb8, cv2.COLOR_RGB2BGR)  # insightface's detector and landmark model read BGR
        boxes, kpss, attempts = self._detect(bgr)
        size, padded = attempts[-1]
        if len(boxes) == 0:
            return FaceResult(index=index, face=None, n_faces=0, reason=self._no_face_reason(bgr, attempts),
                              attempts=attempts)
        chosen = _choose(boxes, face_index)
        if chosen is None:
            reason = (f"face_index {face_index} asked for, but only {len(boxes)} face(s) were found (0 is the "
                      f"leftmost, {len(boxes) - 1} the rightmost); lower face_index, or leave it empty for the "
                      "largest face")
            return FaceResult(index=index, face=None, n_faces=len(boxes), reason=reason, det_size=size,
                              padded=padded, attempts=attempts)
        face = self._describe(image_rgb8, bgr, boxes[chosen], kpss[chosen])
        return FaceResult(index=index, face=face, n_faces=len(boxes), reason="ok", det_size=size, padded=padded,
                          attempts=attempts)

    def _detect(self, bgr: np.ndarray):
        """Detection passes until one finds a face: (boxes [n,5], kps [n,5,2], attempts)."""
        plan = [(self.det_size, False), (self.det_size, True)] + [(s, False) for s in self.sizes]
        attempts = []
        for size, padded in plan:
            attempts.append((size, padded))
            if padded:
                boxes, kpss = self._detect_padded(bgr, size)
            else:
                boxes, kpss = self._detector.detect(bgr, input_size=(size, size), max_num=0)
            if kpss is None:
                raise FaceModelError(f"the detector in '{self.folder}' gives no keypoints; alignment needs "
                                     "antelopev2's scrfd_10g_bnkps.onnx (the 'kps' variant)")
            if len(boxes):
                if len(attempts) > 1:
                    log.info("face found only on retry %s", attempts[-1])
                return boxes, kpss, tuple(attempts)
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), tuple(attempts)

    def _detect_padded(self, bgr: np.ndarray, size: int):
        """Shrink the image into the middle of a black size x size canvas, detect, map back to image pixels."""
        import cv2

        h, w = bgr.shape[:2]
        inner = size * (1.0 - 2.0 * PAD_FRACTION)
        scale = inner / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = np.zeros((size, size, 3), np.uint8)
        x0, y0 = (size - nw) // 2, (size - nh) // 2
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas[y0:y0 + nh, x0:x0 + nw] = cv2.resize(bgr, (nw, nh), interpolation=interp)
        boxes, kpss = self._detector.detect(canvas, input_size=(size, size), max_num=0)
        if kpss is None:
            return boxes, None
        sx, sy = nw / w, nh / h
        boxes = boxes.copy()
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - x0) / sx
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - y0) / sy
        kpss = (kpss - np.array([x0, y0], np.float32)) / np.array([sx, sy], np.float32)
        return boxes, kpss

    def _describe(self, rgb: np.ndarray, bgr: np.ndarray, box: np.ndarray, kps: np.ndarray) -> Face:
        """106 landmarks and the normalised ArcFace embedding of one detected face.

        The recognition input is ``crops.arcface_crop`` (the same similarity alignment and warp as insightface's
        norm_crop, without its deprecated scikit-image call), fed through the model's own ``get_feat``.
        """
        from insightface.app.common import Face as InsightFace

        from .crops import arcface_crop

        ins = InsightFace(bbox=box[:4].astype(np.float32), kps=kps.astype(np.float32), det_score=float(box[4]))
        landmarks = self._landmark.get(bgr, ins)
        aligned_bgr = np.ascontiguousarray(arcface_crop(rgb, kps)[:, :, ::-1])
        embedding = np.asarray(self._recognition.get_feat(aligned_bgr), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm == 0.0:
            raise FaceModelError(f"the recognition model '{self.folder / NEEDED['recognition']}' returned an empty "
                                 "embedding; download glintr100.onnx again")
        return Face(bbox=box[:4], kps=kps, landmark_106=landmarks, embedding=embedding / norm,
                    det_score=float(box[4]))

    def _no_face_reason(self, bgr: np.ndarray, attempts) -> str:
        tried = ", ".join(f"{s}{' padded' if p else ''}" for s, p in attempts)
        h, w = bgr.shape[:2]
        hint = "the photo is very dark; " if float(bgr.mean()) < 20.0 else ""
        return (f"no face found in this {w}x{h} photo ({hint}detector sizes tried: {tried}). Use a photo where the "
                "face is clearly visible, frontal and lit.")


def _choose(boxes: np.ndarray, face_index: int | None) -> int | None:
    """Row of the largest box, or of the face_index-th box from the left (None when there are fewer)."""
    if face_index is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return int(np.argmax(areas))
    order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2.0, kind="stable")
    return int(order[face_index]) if face_index < len(order) else None


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
