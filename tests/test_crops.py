"""Face crops: CLIP square geometry (DESIGN.md), background removal, grayscale, ArcFace alignment.

tests/test_preprocessing.py checks the whole default path pixel for pixel against an independent reference; these
are the geometric properties, each on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from hyperlora_core.background import OUTLINE  # noqa: E402
from hyperlora_core.crops import (  # noqa: E402
    ARCFACE_TEMPLATE,
    arcface_box,
    arcface_crop,
    arcface_region,
    clip_crop,
    similarity_transform,
)

GREY = 127  # #7f7f7f

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
    """PIL crop of the DESIGN.md square: each edge rounded, the photo's pixels inside, black (0) outside."""
    image = coordinate_image(400, 600)
    pts = face_points(*GEOMETRY_CASES[case])
    crop = clip_crop(image, pts, remove_background=False, grayscale=False)
    left, top, side = expected_square(pts)
    x0, y0 = round(left), round(top)
    assert crop.shape == (round(top + side) - y0, round(left + side) - x0, 3) and crop.dtype == np.uint8
    rows, cols = np.mgrid[:crop.shape[0], :crop.shape[1]]
    inside = (x0 + cols >= 0) & (x0 + cols < 600) & (y0 + rows >= 0) & (y0 + rows < 400)
    xs, ys = decode(crop)
    assert np.array_equal(xs[inside], (x0 + cols)[inside]) and np.array_equal(ys[inside], (y0 + rows)[inside])
    assert np.all(crop[~inside] == 0)
    assert inside.all() == (case in ("inside", "wide_box", "fractional"))


def insightface_order(cx: float, cy: float, r: float, seed: int = 0) -> np.ndarray:
    """106 points in insightface's roles: the 33 jaw points (OUTLINE's first 33, in its order) on the lower half
    of a circle of radius r, the 10 eyebrow points on a line at cy - 0.3 r, the rest inside the face."""
    pts = np.random.default_rng(seed).uniform([cx - 0.5 * r, cy - 0.2 * r], [cx + 0.5 * r, cy + 0.6 * r], (106, 2))
    t = np.linspace(np.pi, 0.0, 33)  # from one temple, round the chin, to the other
    pts[list(OUTLINE[:33])] = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    pts[list(OUTLINE[33:])] = np.stack([np.linspace(cx + 0.9 * r, cx - 0.9 * r, 10), np.full(10, cy - 0.3 * r)], 1)
    return pts.astype(np.float32)


def test_background_removal_greys_all_but_the_face_below_the_brows():
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    pts = insightface_order(320, 240, 100)
    plain = clip_crop(image, pts, remove_background=False, grayscale=False)
    masked = clip_crop(image, pts, remove_background=True, grayscale=False)
    left, top, _ = expected_square(pts)
    x0, y0 = round(left), round(top)

    def at(x, y, half=4):
        return (slice(y - y0 - half, y - y0 + half), slice(x - x0 - half, x - x0 + half))

    np.testing.assert_array_equal(masked[at(320, 280)], plain[at(320, 280)])  # the middle of the face
    assert np.all(masked[at(320, 140)] == GREY)  # the forehead, above the brows: outside the polygon
    for corner in (masked[:6, :6], masked[:6, -6:], masked[-6:, :6], masked[-6:, -6:]):
        assert np.all(corner == GREY)
    assert (masked != plain).any(axis=2).mean() > 0.4  # a real share of the square was replaced


def test_background_edge_is_soft():
    """The mask is blurred: along a row through the cheek the pixels go from photo to grey over several steps."""
    image = np.full((480, 640, 3), 255, np.uint8)
    pts = insightface_order(320, 240, 100)
    masked = clip_crop(image, pts, remove_background=True, grayscale=False)[..., 0].astype(int)
    row = masked[masked.shape[0] // 2 + 20]
    between = ((row > GREY + 5) & (row < 250)).sum()
    assert between >= 6, row


def test_grayscale_is_pil_luma_kept_three_channel():
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    pts = face_points(100, 100, 200, 210)
    colour = clip_crop(image, pts, remove_background=False, grayscale=False)
    grey = clip_crop(image, pts, remove_background=False, grayscale=True)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(colour).convert("L")))


def test_arcface_region_is_the_doubled_square_of_the_original():
    image = coordinate_image(400, 600)
    pts = face_points(250, 150, 330, 250)
    left, top, side = expected_square(pts)
    cx, cy, half = left + side / 2, top + side / 2, side / 2
    box = arcface_box(pts)
    np.testing.assert_allclose(box, (cx - 2 * half, cy - 2 * half, cx + 2 * half, cy + 2 * half), rtol=1e-6)
    region, (ox, oy) = arcface_region(image, pts)
    assert (ox, oy) == (round(box[0]), round(box[1]))
    xs, ys = decode(region)
    inside = region[..., 2] > 0
    rows, cols = np.mgrid[:region.shape[0], :region.shape[1]]
    assert np.array_equal(xs[inside], (ox + cols)[inside]) and np.array_equal(ys[inside], (oy + rows)[inside])


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
    x0, y0 = round(left), round(top)
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
    (np.zeros((10, 10, 3), np.uint8), face_points(1, 1, 5, 5)[:68], "shape"),
    (np.zeros((10, 10, 3), np.uint8), np.full((106, 3), 3.0, np.float32), "shape"),
    (np.zeros((10, 10, 3), np.uint8), np.full((106, 2), np.nan, np.float32), "NaN"),
])
def test_clip_crop_rejects_bad_input(image, pts, match):
    with pytest.raises(ValueError, match=match):
        clip_crop(image, pts, remove_background=False, grayscale=False)
