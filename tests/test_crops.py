"""Face crops: CLIP square geometry (DESIGN.md), background removal, grayscale, ArcFace alignment."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from hyperlora_core.crops import (  # noqa: E402
    ARCFACE_TEMPLATE,
    GREY,
    arcface_crop,
    clip_crop,
    similarity_transform,
)

from face_doubles import ASTRONAUT_KPS, astronaut_landmarks  # noqa: E402


def coordinate_image(h: int, w: int) -> np.ndarray:
    """Each pixel spells its own position: R = x % 256, G = y % 256, B = 16 * (x // 256) + y // 256 + 1."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x % 256, y % 256, 16 * (x // 256) + y // 256 + 1], -1).astype(np.uint8)


def decode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = pixels.astype(np.int64)
    return p[..., 0] + 256 * ((p[..., 2] - 1) // 16), p[..., 1] + 256 * ((p[..., 2] - 1) % 16)


def face_points(x1: float, y1: float, x2: float, y2: float, seed: int = 0) -> np.ndarray:
    """106 points spanning exactly the box (x1, y1)-(x2, y2)."""
    pts = np.random.default_rng(seed).uniform([x1, y1], [x2, y2], size=(106, 2))
    pts[0], pts[1] = (x1, y1), (x2, y2)
    return pts.astype(np.float32)


def expected_square(pts: np.ndarray) -> tuple[float, float, float]:
    """DESIGN.md, computed independently: centre of the landmark box moved up by 0.125*l, l = 0.75*max(w, h)."""
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    half = 0.75 * max(x2 - x1, y2 - y1)
    return (x1 + x2) / 2 - half, (y1 + y2) / 2 - 0.125 * half - half, 2 * half


GEOMETRY_CASES = {
    "inside": (200, 150, 300, 280),
    "wide_box": (120, 200, 330, 260),
    "tall_box": (250, 60, 290, 300),
    "over_top_left": (5, 10, 95, 100),
    "over_bottom_right": (520, 330, 600, 395),
    "fractional": (101.3, 77.8, 180.6, 166.1),
}


@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
def test_clip_crop_geometry(case):
    image = coordinate_image(400, 600)
    pts = face_points(*GEOMETRY_CASES[case])
    crop = clip_crop(image, pts, remove_background=False, grayscale=False)
    left, top, side = expected_square(pts)
    assert crop.ndim == 3 and crop.shape[0] == crop.shape[1] and crop.shape[2] == 3 and crop.dtype == np.uint8
    assert abs(crop.shape[0] - side) <= 0.5 + 1e-4
    rows, cols = np.mgrid[:crop.shape[0], :crop.shape[1]]
    inside = (left + cols >= -0.5) & (left + cols < 599.5) & (top + rows >= -0.5) & (top + rows < 399.5)
    xs, ys = decode(crop)
    # every pixel of the square that lies in the image is the image's pixel at (left + col, top + row), +- rounding
    assert np.all(np.abs(xs[inside] - (left + cols[inside])) <= 0.5 + 1e-4)
    assert np.all(np.abs(ys[inside] - (top + rows[inside])) <= 0.5 + 1e-4)
    strict_out = (left + cols < -1) | (left + cols > 600) | (top + rows < -1) | (top + rows > 400)
    assert np.all(crop[strict_out] == GREY)


def test_background_removal_greys_the_surroundings_and_keeps_the_face():
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    pts = face_points(260, 180, 380, 330, seed=1)
    plain = clip_crop(image, pts, remove_background=False, grayscale=False)
    masked = clip_crop(image, pts, remove_background=True, grayscale=False)
    side = plain.shape[0]
    c = side // 2
    # the middle of the landmark box (below the crop centre, which sits 0.125*l higher) is untouched
    x0, y0, _ = expected_square(pts)
    fx, fy = int(round(320 - x0)), int(round(255 - y0))
    np.testing.assert_array_equal(masked[fy - 5:fy + 5, fx - 5:fx + 5], plain[fy - 5:fy + 5, fx - 5:fx + 5])
    for corner in (masked[:6, :6], masked[:6, -6:], masked[-6:, :6], masked[-6:, -6:]):
        assert np.all(corner == GREY)
    assert np.all(masked[c, :3] == GREY) and np.all(masked[c, -3:] == GREY)  # left and right of the cheeks
    assert (masked != plain).any(axis=2).mean() > 0.2  # a real share of the square was replaced


def test_grayscale_has_equal_channels_and_is_the_luma():
    image = np.random.default_rng(2).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    pts = face_points(100, 100, 200, 210)
    colour = clip_crop(image, pts, remove_background=False, grayscale=False).astype(np.float64)
    grey = clip_crop(image, pts, remove_background=False, grayscale=True)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    luma = colour @ [0.299, 0.587, 0.114]
    assert np.abs(grey[..., 0] - luma).max() <= 0.5 + 1e-3
    both = clip_crop(image, pts, remove_background=True, grayscale=True)
    assert both[0, 0, 0] == both[0, 0, 2] == GREY


def _similar(points: np.ndarray, angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (points @ rot.T) * scale + np.asarray(shift)


@pytest.mark.parametrize(("angle", "scale", "shift"), [(0, 1, (0, 0)), (17, 2.3, (140, 60)), (-35, 0.7, (20, 90))])
def test_arcface_alignment_maps_keypoints_onto_the_template(angle, scale, shift):
    kps = _similar(ARCFACE_TEMPLATE.astype(np.float64), angle, scale, shift)
    m = similarity_transform(kps, ARCFACE_TEMPLATE)
    mapped = kps @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE, atol=1e-3)
    # the pixels follow: a bright dot painted at each keypoint lands on the template point in the crop
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in kps:
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = arcface_crop(image, kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_TEMPLATE:
        assert crop[int(round(y)), int(round(x))].max() > 100


def test_arcface_alignment_equals_insightface_norm_crop():
    face_align = pytest.importorskip("insightface.utils.face_align")
    kps = _similar(ARCFACE_TEMPLATE.astype(np.float64), 12, 1.8, (70, 40)) + np.random.default_rng(3).normal(
        0, 1.5, (5, 2))
    kps = kps.astype(np.float32)
    np.testing.assert_allclose(similarity_transform(kps, ARCFACE_TEMPLATE), face_align.estimate_norm(kps),
                               atol=1e-4)
    image = np.random.default_rng(4).integers(0, 256, size=(320, 320, 3), dtype=np.uint8)
    diff = np.abs(arcface_crop(image, kps).astype(int) - face_align.norm_crop(image, kps).astype(int))
    assert diff.max() <= 1


def test_real_photo_astronaut():
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()
    pts = astronaut_landmarks()
    crop = clip_crop(photo, pts, remove_background=False, grayscale=False)
    left, top, side = expected_square(pts)
    assert crop.shape == (132, 132, 3)
    x0, y0 = int(np.floor(left + 0.5)), int(np.floor(top + 0.5))
    np.testing.assert_array_equal(crop, photo[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]])
    # the eyes sit in the upper half of the square and the mouth in the lower half
    assert (ASTRONAUT_KPS[:2, 1] - y0 < side / 2).all() and (ASTRONAUT_KPS[3:, 1] - y0 > side / 2).all()
    # skin at the nose: red dominates blue
    nose = crop[int(124 - y0) - 3:int(124 - y0) + 3, int(218 - x0) - 3:int(218 - x0) + 3].reshape(-1, 3).mean(0)
    assert nose[0] > nose[2] + 30
    masked = clip_crop(photo, pts, remove_background=True, grayscale=True)
    assert np.all(masked[:4, :4] == GREY) and np.all(masked[..., 0] == masked[..., 2])
    aligned = arcface_crop(photo, ASTRONAUT_KPS)
    assert aligned.shape == (112, 112, 3) and aligned[40:100, 30:80].mean() > 100  # face, not border


@pytest.mark.parametrize(("image", "pts", "match"), [
    (np.zeros((10, 10), np.uint8), face_points(1, 1, 5, 5), "HxWx3 uint8"),
    (np.zeros((10, 10, 3), np.float32), face_points(1, 1, 5, 5), "HxWx3 uint8"),
    (np.zeros((10, 10, 3), np.uint8), np.full((106, 2), 3.0, np.float32), "collapses"),
    (np.zeros((10, 10, 3), np.uint8), np.full((106, 3), 3.0, np.float32), "shape"),
    (np.zeros((10, 10, 3), np.uint8), np.full((106, 2), np.nan, np.float32), "NaN"),
])
def test_clip_crop_rejects_bad_input(image, pts, match):
    with pytest.raises(ValueError, match=match):
        clip_crop(image, pts, remove_background=False, grayscale=False)
