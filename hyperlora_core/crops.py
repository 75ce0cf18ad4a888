"""Face crops for the two encoders.

- ``clip_crop``: the square CLIP sees (DESIGN.md): around the 106-landmark box, centre moved up by 0.125*l,
  half-side l = 0.75*max(w, h) of that box. Cut at the image's own resolution (no resampling; CLIP preprocessing
  resizes it). Pixels outside the image are grey #7f7f7f. Optionally the background is replaced by the same grey
  through a blurred face-outline mask, and the crop turned grey (kept 3-channel).
- ``arcface_crop``: 112x112, aligned by a similarity transform from the detector's 5 keypoints onto the standard
  ArcFace template (the input glintr100 sees; shown as a preview).

cv2 (installed with insightface) is imported inside the functions.
"""

from __future__ import annotations

import math

import numpy as np

GREY = 127  # #7f7f7f
ARCFACE_SIZE = 112
# Standard ArcFace 5-point template for 112x112 (left eye, right eye, nose tip, left and right mouth corner)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
UP_SHIFT = 0.125  # centre moves up by this fraction of the half-side
HALF_SIDE = 0.75  # half-side as a fraction of the landmark box's longer side
FOREHEAD = 0.4  # the outline mask adds a forehead cap this fraction of the landmark box height
MASK_RES = 256  # the outline mask is drawn and blurred at this resolution, then scaled to the crop
MASK_BLUR = 0.03  # Gaussian sigma of the mask blur, as a fraction of the crop side
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's convert("L")


def clip_crop_box(landmark_106: np.ndarray) -> tuple[int, int, int]:
    """Integer crop square (x0, y0, side) in image pixels: x0 = round(cx - l), y0 = round(cy - l), side = round(2l)."""
    pts = _points(landmark_106, "landmark_106")
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    half = HALF_SIDE * float(max(x2 - x1, y2 - y1))
    if not half > 0:
        raise ValueError("landmark_106 collapses to a point: the face landmarks are unusable")
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0 - UP_SHIFT * half
    return math.floor(cx - half + 0.5), math.floor(cy - half + 0.5), max(1, math.floor(2 * half + 0.5))


def clip_crop(image_rgb8: np.ndarray, landmark_106: np.ndarray, *, remove_background: bool,
              grayscale: bool) -> np.ndarray:
    """Square uint8 RGB crop around the face for CLIP (see the module docstring)."""
    _check_image(image_rgb8)
    x0, y0, side = clip_crop_box(landmark_106)
    crop = _cut(image_rgb8, x0, y0, side)
    if remove_background:
        mask = outline_mask(np.asarray(landmark_106, np.float32) - np.array([x0, y0], np.float32), side)
        blended = crop.astype(np.float32) * mask[:, :, None] + GREY * (1.0 - mask[:, :, None])
        crop = np.rint(blended).astype(np.uint8)
    if grayscale:
        luma = np.rint(crop.astype(np.float32) @ _LUMA).clip(0, 255).astype(np.uint8)
        crop = np.repeat(luma[:, :, None], 3, axis=2)
    return crop


def outline_mask(points: np.ndarray, side: int) -> np.ndarray:
    """Float32 [side, side] in [0, 1]: 1 on the face (convex hull of the landmarks plus a forehead cap), 0 far away.

    ``points`` are the landmarks in crop pixels. Drawn at MASK_RES, blurred, then resized to the crop.
    """
    import cv2

    res = min(side, MASK_RES)
    scale = res / side
    pts = np.asarray(points, np.float64) * scale
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    t = np.linspace(0.0, np.pi, 16)
    cap = np.stack([(x1 + x2) / 2 + (x2 - x1) / 2 * np.cos(t), y1 - FOREHEAD * (y2 - y1) * np.sin(t)], 1)
    hull = cv2.convexHull(np.round(np.concatenate([pts, cap]) * 16).astype(np.int32))
    mask = np.zeros((res, res), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0, lineType=cv2.LINE_AA, shift=4)
    sigma = MASK_BLUR * res
    k = 2 * math.ceil(3 * sigma) + 1
    mask = cv2.GaussianBlur(mask, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)
    if res != side:
        mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)
    return np.clip(mask, 0.0, 1.0)


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


def _cut(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """image[y0:y0+side, x0:x0+side] with grey where the square leaves the image."""
    h, w = image.shape[:2]
    out = np.full((side, side, 3), GREY, np.uint8)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return out


def _points(points: np.ndarray, name: str, count: int | None = None) -> np.ndarray:
    pts = np.asarray(points, np.float64)
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
