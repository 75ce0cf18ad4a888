"""Face analysis on an insightface antelopev2 folder: detection, 106 landmarks and the ArcFace embedding.

Only three of the folder's five models run: the SCRFD detector, the 106-point landmark model and glintr100.
It follows the authors' pipeline (DESIGN.md §1) and only adds where that pipeline finds no face or several:

1. Detection at ``det_size`` (640), then 512, 384, 256: the first size that finds any face wins, as in the
   authors' nodes. Only when all of them find nothing does the analyzer retry with the image shrunk into a black
   border (a face that fills the frame is too large for the detector's anchors). Each size is passed to the
   detector per call, because insightface 2.1 ignores ``det_model.input_size``.
2. Which face: the authors take the detector's first (highest score); we take the largest, or the
   ``face_index``-th from the left. On a one-face photo that is the same face.
3. Its 106 landmarks, from the original image.
4. The ArcFace embedding, as the authors make it: the original photo cut to the square of half-side 2·l about the
   CLIP crop's centre (``crops.arcface_region``), the detector run again on that cut at ``det_size``, and the
   first face it returns embedded. When that second detection finds several faces we embed the one that
   overlaps the chosen face most (the first one wins ties). When it finds none (where the official nodes skip
   the photo), the same retries as in step 1 run on the cut, and the photo's report line says which one found
   the face; when none does, the photo has no usable face and its line says why.

insightface and onnxruntime are imported when an analyzer is built, never at package import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FaceModelError, FaceNotFoundError
from .face_models import (  # noqa: F401 - re-exported: the folder helpers used to live here
    ANTELOPE_FILES,
    NEEDED,
    PROVIDER_CHOICES,
    _check_files,
    _load_face_analysis,
    resolve_antelopev2,
    resolve_providers,
)

log = logging.getLogger(__name__)

PAD_FRACTION = 0.25  # retry: the image is shrunk to the middle half of the detector input, black around it
MIN_DET_SIZE = 256


@dataclass(frozen=True)
class Face:
    """One detected face, in original image pixels."""

    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2 (the first detection)
    kps: np.ndarray  # float32 [5, 2]: eyes, nose tip, mouth corners (x, y) (the first detection)
    landmark_106: np.ndarray  # float32 [106, 2]: insightface 2d106det points (x, y)
    embedding: np.ndarray | None  # float32 [512]: normed glintr100 embedding of the re-detected face; None: not asked
    det_score: float  # detector confidence in [0, 1]
    arcface_kps: np.ndarray | None = None  # float32 [5, 2]: keypoints of the re-detected face, image pixels

    def __post_init__(self) -> None:
        for name, shape in (("bbox", (4,)), ("kps", (5, 2)), ("landmark_106", (106, 2)), ("arcface_kps", (5, 2))):
            if getattr(self, name) is None and name == "arcface_kps":
                continue
            value = np.asarray(getattr(self, name), dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"Face.{name} must have shape {shape}, got {value.shape}")
            object.__setattr__(self, name, value)
        if self.embedding is not None:
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
    first: bool = True  # the chosen face is the detector's first (the one the authors' pipeline uses)
    arcface_faces: int = 0  # faces the ArcFace re-detection found in the 2·l square (0: not run or none)
    arcface_attempt: tuple[int, bool] | None = None  # (det_size, padded) of the re-detection pass that found it

    def __post_init__(self) -> None:
        if (self.face is None) == (self.reason == "ok"):
            raise ValueError("FaceResult: reason must be 'ok' exactly when a face is present")

    @property
    def ok(self) -> bool:
        return self.face is not None

    @property
    def det_size_asked(self) -> int | None:
        """The analyzer's own detector size (the first pass)."""
        return self.attempts[0][0] if self.attempts else None

    def summary(self) -> str:
        """One line for the photo's report: the reason, or what was found and where we left the authors' path."""
        if not self.ok:
            return self.reason
        notes = [f"{self.n_faces} face(s) at detector size {self.det_size}{' (padded retry)' if self.padded else ''}"]
        if not self.first:
            notes.append("not the detector's first face, which the official nodes would use")
        if self.arcface_attempt is not None and self.arcface_attempt != (self.det_size_asked, False):
            size, padded = self.arcface_attempt
            notes.append(f"the ArcFace face was found only when the detector ran again at {size}"
                         f"{' padded' if padded else ''} (the official nodes find none and skip this photo)")
        if self.arcface_faces > 1:
            notes.append(f"{self.arcface_faces} faces in the ArcFace square: the one overlapping this face is used")
        return "ok: " + "; ".join(notes)

    def raise_for_failure(self, hint: str = "") -> None:
        """Raise FaceNotFoundError naming the photo as a user counts it (from 1) when no face was chosen;
        ``hint`` (the caller's advice for its own mode) is appended."""
        if self.face is None:
            raise FaceNotFoundError(f"photo {self.index + 1}: {self.reason}{hint}")


def retry_sizes(det_size: int) -> tuple[int, ...]:
    """Smaller detector sizes tried (unpadded) after det_size, as the authors do: det_size - 128 k, down to 256."""
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

    def analyze(self, image_rgb8: np.ndarray, *, index: int = 0, face_index: int | None = None,
                embed: bool = True) -> FaceResult:
        """Find the faces of one HxWx3 uint8 RGB image and describe the chosen one.

        ``face_index`` None picks the largest face; k picks the k-th face counted from the left (0 = leftmost).
        ``embed`` False skips the ArcFace step (checkpoints that read CLIP only).
        """
        if image_rgb8.dtype != np.uint8 or image_rgb8.ndim != 3 or image_rgb8.shape[2] != 3:
            raise ValueError(f"photo {index + 1}: analyze() needs HxWx3 uint8 RGB (use images.to_rgb8), "
                             f"got {image_rgb8.dtype} {image_rgb8.shape}")
        if face_index is not None and face_index < 0:
            raise ValueError(f"face_index must be >= 0 (0 is the leftmost face) or None, got {face_index}")
        import cv2

        bgr = cv2.cvtColor(image_rgb8, cv2.COLOR_RGB2BGR)  # insightface's detector and landmark model read BGR
        boxes, kpss, attempts = self._detect(bgr)
        size, padded = attempts[-1]
        found = {"n_faces": len(boxes), "det_size": size, "padded": padded, "attempts": attempts}
        if len(boxes) == 0:
            return FaceResult(index=index, face=None, n_faces=0, reason=self._no_face_reason(bgr, attempts),
                              attempts=attempts)
        chosen = _choose(boxes, face_index)
        if chosen is None:
            reason = (f"face_index {face_index} asked for, but only {len(boxes)} face(s) were found (0 is the "
                      f"leftmost, {len(boxes) - 1} the rightmost); lower face_index, or set it to -1 for the "
                      "largest face")
            return FaceResult(index=index, face=None, reason=reason, **found)
        box, kps = boxes[chosen], kpss[chosen]
        from insightface.app.common import Face as InsightFace

        ins = InsightFace(bbox=box[:4].astype(np.float32), kps=kps.astype(np.float32), det_score=float(box[4]))
        landmarks = np.asarray(self._landmark.get(bgr, ins), dtype=np.float32)
        face = Face(bbox=box[:4], kps=kps, landmark_106=landmarks, embedding=None, det_score=float(box[4]))
        found["first"] = chosen == 0
        if not embed:
            return FaceResult(index=index, face=face, reason="ok", **found)
        embedded = self._embed_again(image_rgb8, face)
        if embedded is None:
            return FaceResult(index=index, face=None, reason=self._no_arcface_reason(image_rgb8, face), **found)
        (embedding, arcface_kps), found["arcface_faces"], found["arcface_attempt"] = embedded
        face = Face(bbox=face.bbox, kps=face.kps, landmark_106=landmarks, embedding=embedding,
                    det_score=face.det_score, arcface_kps=arcface_kps)
        return FaceResult(index=index, face=face, reason="ok", **found)

    def _plan(self) -> list[tuple[int, bool]]:
        """(size, padded) of each detection pass, in order: the authors' sizes, then the padded retry."""
        return [(self.det_size, False)] + [(s, False) for s in self.sizes] + [(self.det_size, True)]

    def _detect(self, bgr: np.ndarray):
        """Detection passes until one finds a face: (boxes [n,5], kps [n,5,2], attempts).

        The authors' sizes first (det_size, then smaller), the padded retry only after all of them found nothing.
        """
        attempts = []
        for size, padded in self._plan():
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

    def _embed_again(self, rgb: np.ndarray, face: Face):
        """((embedding, keypoints in image pixels), faces found, (size, padded)) from the re-detection in the 2·l
        square, or None when no pass finds a face there.

        The recognition input is ``crops.arcface_crop`` of the cut (the same similarity alignment and warp as
        insightface's norm_crop, without its deprecated scikit-image call), fed through the model's ``get_feat``.
        """
        from .crops import arcface_crop, arcface_region

        region, (ox, oy) = arcface_region(rgb, face.landmark_106)
        boxes, kpss, attempts = self._detect(np.ascontiguousarray(region[:, :, ::-1]))
        if len(boxes) == 0:
            return None
        pick = _overlapping(boxes, face.bbox - np.array([ox, oy, ox, oy], np.float32))
        aligned_bgr = np.ascontiguousarray(arcface_crop(region, kpss[pick])[:, :, ::-1])
        embedding = np.asarray(self._recognition.get_feat(aligned_bgr), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm == 0.0:
            raise FaceModelError(f"the recognition model '{self.folder / NEEDED['recognition']}' returned an empty "
                                 "embedding; download glintr100.onnx again")
        return (embedding / norm, kpss[pick] + np.array([ox, oy], np.float32)), len(boxes), attempts[-1]

    def _no_arcface_reason(self, rgb: np.ndarray, face: Face) -> str:
        from .crops import arcface_box

        x1, y1, x2, y2 = arcface_box(face.landmark_106)
        h, w = rgb.shape[:2]
        tried = ", ".join(f"{s}{' padded' if p else ''}" for s, p in self._plan())
        return (f"a face was found in this {w}x{h} photo, but the ArcFace step found none when it ran the detector "
                f"again on the square ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f}) around it, as the official pipeline "
                f"does (sizes tried: {tried}), so there is no identity embedding. Use a photo where the face is "
                "larger, sharper and frontal.")

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


def _overlapping(boxes: np.ndarray, target: np.ndarray) -> int:
    """Row of the box that overlaps ``target`` (x1, y1, x2, y2) most; the first (the detector's best) wins ties."""
    if len(boxes) == 1:
        return 0
    x1 = np.maximum(boxes[:, 0], target[0])
    y1 = np.maximum(boxes[:, 1], target[1])
    x2 = np.minimum(boxes[:, 2], target[2])
    y2 = np.minimum(boxes[:, 3], target[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = areas + (target[2] - target[0]) * (target[3] - target[1]) - inter
    return int(np.argmax(inter / np.maximum(union, 1e-6)))
