"""Face crops for the encoders, exactly as the released checkpoints were trained on (DESIGN.md §1, Preprocessing).

All cuts are PIL ``crop`` calls on float boxes (PIL rounds each edge; pixels outside the image are black, 0), so
a crop may be one pixel wider than tall. With the 106 landmarks' bounding box (w, h) and centre:

- ``clip_square``: centre moved up by 0.125·l, half-side l = 0.75·max(w, h).
- ``clip_crop``: that square, cut from the background-removed canvas (``background.py``) or from the photo itself;
  optionally PIL ``convert('L')`` (kept 3-channel, as CLIPImageProcessor converts it back to RGB).
- ``arcface_box``: the square of half-side 2·l about the same centre, cut from the *original* photo; the face
  detector runs again on it (``face.py``).
- ``base_crop``: the Base-LoRA's input: the face blurred into the photo, then (``crop``) the box
  (cx − l·a, cy − l·c, cx + l·b, cy + l·d) with (a, b, c, d) = ``crop_scale_lrtb``, clamped to the photo
  (``safe_crop``).
- ``arcface_crop``: 112×112, aligned by a similarity transform from 5 detector keypoints onto the standard ArcFace
  template (what glintr100 sees).

Images are HxWx3 uint8 RGB arrays; PIL and cv2 are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARCFACE_SIZE = 112
# Standard ArcFace 5-point template for 112x112 (left eye, right eye, nose tip, left and right mouth corner)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
UP_SHIFT = 0.125  # the CLIP crop's centre moves up by this fraction of its half-side
HALF_SIDE = 0.75  # the CLIP crop's half-side, as a fraction of the 106-point box's longer side
ARCFACE_SCALE = 2.0  # the re-detection square's half-side, in CLIP half-sides
LANDMARKS = 106


@dataclass(frozen=True)
class BaseCrop:
    """Which part of the face-blurred photo the Base-LoRA's CLIP sees (the authors' BaseCond options)."""

    crop: bool = True  # cut the box below; False: the whole (blurred) photo
    crop_scale_lrtb: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # left, right, top, bottom, in l
    safe_crop: bool = True  # clamp the box to the photo (no black margins)

    def __post_init__(self) -> None:
        scales = tuple(float(v) for v in self.crop_scale_lrtb)
        if len(scales) != 4 or not all(np.isfinite(scales)):
            raise ValueError(f"crop_scale_LRTB must be four numbers (left, right, top, bottom), got "
                             f"{self.crop_scale_lrtb!r}")
        if scales[0] + scales[1] <= 0 or scales[2] + scales[3] <= 0:
            raise ValueError(f"crop_scale_LRTB {scales} gives an empty box: left + right and top + bottom must be "
                             "above 0 (1,1,1,1 is the authors' default)")
        object.__setattr__(self, "crop_scale_lrtb", scales)

    @classmethod
    def parse(cls, crop: bool, crop_scale_lrtb: str, safe_crop: bool) -> BaseCrop:
        """From the node's text input, e.g. "1,1,1,1" or "1, 1, 0.8, 1.2"."""
        parts = [p for p in str(crop_scale_lrtb).replace(" ", "").split(",") if p]
        try:
            scales = tuple(float(p) for p in parts)
        except ValueError:
            scales = ()
        if len(scales) != 4:
            raise ValueError(f"crop_scale_LRTB must be four comma-separated numbers (left, right, top, bottom), "
                             f"e.g. 1,1,1,1; got {crop_scale_lrtb!r}")
        return cls(crop=bool(crop), crop_scale_lrtb=scales, safe_crop=bool(safe_crop))


def clip_square(landmark_106: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, l): the CLIP crop's centre and half-side in image pixels (see the module docstring).

    Computed in the landmarks' own float type (insightface gives float32), as the authors do, so that PIL rounds
    the same box edges.
    """
    pts = _points(landmark_106, "landmark_106", LANDMARKS)
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    half = max(x2 - x1, y2 - y1) * HALF_SIDE
    if not half > 0:
        raise ValueError("landmark_106 collapses to a point: the face landmarks are unusable")
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5 - half * UP_SHIFT, half


def clip_crop(image_rgb8: np.ndarray, landmark_106: np.ndarray, *, remove_background: bool,
              grayscale: bool) -> np.ndarray:
    """The crop CLIP sees, uint8 RGB (see the module docstring)."""
    from PIL import Image

    from .background import remove_background as grey_out

    _check_image(image_rgb8)
    cx, cy, half = clip_square(landmark_106)
    photo = Image.fromarray(image_rgb8)
    source = grey_out(photo, landmark_106) if remove_background else photo
    face = source.crop((cx - half, cy - half, cx + half, cy + half))
    if grayscale:
        face = face.convert("L")
    return np.asarray(face.convert("RGB"))


def arcface_box(landmark_106: np.ndarray) -> tuple[float, float, float, float]:
    """The square the ArcFace face is detected again in: half-side 2·l about the CLIP crop's centre."""
    cx, cy, half = clip_square(landmark_106)
    half *= ARCFACE_SCALE
    return cx - half, cy - half, cx + half, cy + half


def arcface_region(image_rgb8: np.ndarray, landmark_106: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The original photo cut to ``arcface_box`` (PIL crop, black outside) and the cut's top-left pixel."""
    from PIL import Image

    _check_image(image_rgb8)
    box = arcface_box(landmark_106)
    cut = Image.fromarray(image_rgb8).crop(box)
    return np.asarray(cut), (int(round(box[0])), int(round(box[1])))  # PIL's own rounding of the box


def base_crop(image_rgb8: np.ndarray, landmark_106: np.ndarray, options: BaseCrop = BaseCrop()) -> np.ndarray:
    """The Base-LoRA's CLIP input, uint8 RGB: the face blurred into the photo, then cut (see the docstring)."""
    from PIL import Image

    from .background import blur_face

    _check_image(image_rgb8)
    blurred = blur_face(Image.fromarray(image_rgb8), landmark_106)
    if options.crop:
        cx, cy, half = clip_square(landmark_106)
        a, b, c, d = options.crop_scale_lrtb
        x1, y1, x2, y2 = cx - half * a, cy - half * c, cx + half * b, cy + half * d
        if options.safe_crop:
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(blurred.width, x2), min(blurred.height, y2)
        if round(x2) <= round(x1) or round(y2) <= round(y1):
            raise ValueError(f"the Base crop box ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}) holds no pixel of the "
                             f"{blurred.width}x{blurred.height} photo; use crop_scale_LRTB 1,1,1,1 or turn crop off")
        blurred = blurred.crop((x1, y1, x2, y2))
    return np.asarray(blurred.convert("RGB"))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` points onto ``dst``: 2x3.

    Umeyama's closed form; reflections are excluded.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d_c.T @ s_c / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ d @ vt
    var_s = (s_c ** 2).sum() / len(src)
    if var_s == 0:
        raise ValueError("the keypoints coincide: no alignment is possible")
    scale = float(np.trace(np.diag(sv) @ d) / var_s)
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]]).astype(np.float32)


def arcface_crop(image_rgb8: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """112x112x3 uint8 face aligned from the 5 detector keypoints onto the ArcFace template (black outside)."""
    import cv2

    _check_image(image_rgb8)
    matrix = similarity_transform(_points(kps, "kps", 5), ARCFACE_TEMPLATE)
    return cv2.warpAffine(image_rgb8, matrix, (ARCFACE_SIZE, ARCFACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _points(points: np.ndarray, name: str, count: int | None = None) -> np.ndarray:
    """The points as given (dtype kept: the authors' arithmetic runs in the landmarks' own float32)."""
    pts = np.asarray(points)
    if not np.issubdtype(pts.dtype, np.floating):
        pts = pts.astype(np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or (count is not None and pts.shape[0] != count) or len(pts) < 2:
        want = f"[{count}, 2]" if count else "[n, 2]"
        raise ValueError(f"{name} must have shape {want}, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return pts


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an HxWx3 uint8 RGB image (use images.to_rgb8), got {got}")
