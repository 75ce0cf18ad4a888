"""The default path against an independent reference of DESIGN.md §1 "Preprocessing" (the authors' IDCond step).

The reference below is written from DESIGN.md's text with PIL, insightface's own ``FaceAnalysis.get`` and
transformers' ``CLIPImageProcessor``; it imports nothing from hyperlora_core. The face models are the real-format
ONNX doubles of tests/face_doubles.py: they fire where a test paints a bright patch, so each photo below has its
patch sized for the doubles' windows (both detections must see it).

Checked per case: the uint8 CLIP crop is equal pixel for pixel, the CLIP pixel tensor is within 1e-6, and the
ArcFace embedding has cosine >= 0.9999. ``test_negative_controls`` puts three old behaviours back (the hull mask,
grey out-of-frame pixels, the first-detection embedding) and shows that the same checks then fail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

pytest.importorskip("insightface")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from hyperlora_core import crops  # noqa: E402
from hyperlora_core.clip import preprocess  # noqa: E402
from hyperlora_core.face import FaceAnalyzer  # noqa: E402

import face_fixtures  # noqa: E402
from face_doubles import centred_box, paint_face  # noqa: E402

antelope, analyzer = face_fixtures.antelope, face_fixtures.analyzer  # the shared fixtures

log = logging.getLogger(__name__)

# -- the reference: DESIGN.md §1, written out with PIL + insightface ----------------------------------------------
JAW_AND_BROWS = [1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20, 19, 18, 32, 31, 30,
                 29, 28, 27, 26, 25, 17, 101, 105, 104, 103, 102, 50, 51, 49, 48, 43]
FIRST_SIZES = (640, 512, 384, 256)


class Reference:
    """The authors' IDCond / BaseCond steps as DESIGN.md describes them."""

    def __init__(self, folder) -> None:
        from insightface.app import FaceAnalysis

        self.app = FaceAnalysis(name=str(folder), root=str(folder.parent), providers=["CPUExecutionProvider"],
                                allowed_modules=["detection", "landmark_2d_106", "recognition"])
        self.app.prepare(ctx_id=0, det_size=(640, 640))
        self.processor = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()

    def get(self, photo: Image.Image, size: int) -> list:
        """FaceAnalysis.get at one detector size (insightface 2.1 reads input_sizes, 0.7 input_size)."""
        self.app.det_model.input_size = (size, size)
        self.app.det_model.input_sizes = [(size, size)]
        return self.app.get(np.ascontiguousarray(np.asarray(photo.convert("RGB"))[:, :, ::-1]))

    def faces(self, photo: Image.Image) -> list:
        for size in FIRST_SIZES:  # the first size that finds any face
            found = self.get(photo, size)
            if found:
                return found
        return []

    @staticmethod
    def square(lmk: np.ndarray) -> tuple:
        x_lo, y_lo = lmk.min(axis=0)
        x_hi, y_hi = lmk.max(axis=0)
        half = 0.75 * max(x_hi - x_lo, y_hi - y_lo)
        return (x_lo + x_hi) / 2, (y_lo + y_hi) / 2 - 0.125 * half, half

    @staticmethod
    def masked_cut(photo: Image.Image, lmk: np.ndarray, mask_scale: float):
        pts = lmk[JAW_AND_BROWS]
        mean = pts.mean(axis=0)
        mask = Image.new("L", photo.size, 0)
        ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in (pts - mean) * mask_scale + mean], fill=255)
        size = 0.8 * max(pts[:, 0].max() - pts[:, 0].min(), pts[:, 1].max() - pts[:, 1].min())
        box = (mean[0] - size, mean[1] - size, mean[0] + size, mean[1] + size)
        image_cut, mask_cut = photo.crop(box), mask.crop(box)
        soft = mask_cut.resize((512, 512)).filter(ImageFilter.GaussianBlur(radius=15)).resize(image_cut.size)
        return image_cut, soft, (int(mean[0] - size), int(mean[1] - size))

    def id_conditions(self, photo: Image.Image, face, *, remove_background=True, grayscale=False):
        """(uint8 crop, CLIP pixels [1, 3, 224, 224], normed ArcFace embedding or None)."""
        lmk = face.landmark_2d_106
        source = photo
        if remove_background:
            cut, soft, at = self.masked_cut(photo, lmk, 1.0)
            source = Image.new("RGB", photo.size, (0x7F, 0x7F, 0x7F))
            source.paste(cut, at, soft)
        cx, cy, half = self.square(lmk)
        crop = source.crop((cx - half, cy - half, cx + half, cy + half))
        if grayscale:
            crop = crop.convert("L")
        pixels = self.processor(images=crop, return_tensors="pt")["pixel_values"]
        around = photo.crop((cx - 2 * half, cy - 2 * half, cx + 2 * half, cy + 2 * half))
        again = self.get(around, 640)
        embedding = again[0].normed_embedding if again else None
        return np.asarray(crop.convert("RGB")), pixels, embedding

    def base_conditions(self, photo: Image.Image, face, *, crop=True, lrtb=(1.0, 1.0, 1.0, 1.0), safe_crop=True):
        lmk = face.landmark_2d_106
        cut, soft, at = self.masked_cut(photo, lmk, 1.4)
        blurred = cut.resize((512, 512)).filter(ImageFilter.GaussianBlur(radius=45)).resize(cut.size)
        out = photo.copy()
        out.paste(blurred, at, soft)
        if crop:
            cx, cy, half = self.square(lmk)
            a, b, c, d = lrtb
            x1, y1, x2, y2 = cx - half * a, cy - half * c, cx + half * b, cy + half * d
            if safe_crop:
                x1, y1, x2, y2 = max(0, x1), max(0, y1), min(out.width, x2), min(out.height, y2)
            out = out.crop((x1, y1, x2, y2))
        return np.asarray(out.convert("RGB")), self.processor(images=out, return_tensors="pt")["pixel_values"]


# -- the photos ------------------------------------------------------------------------------------------------
def astronaut() -> np.ndarray:
    """skimage's astronaut with her face brightened and its surround darkened, so that the detector double sees a
    face there (the pixels keep the photo's own texture)."""
    photo = skimage_data.astronaut()
    x1, y1, x2, y2 = (int(v) for v in centred_box(218, 118, 152))
    around = (slice(max(y1 - 76, 0), y2 + 76), slice(x1 - 76, x2 + 76))
    out = photo.copy()
    out[around] = photo[around] // 20
    out[y1:y2, x1:x2] = 215 + photo[y1:y2, x1:x2].astype(np.uint16) * 40 // 255
    return out


def dark(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 40, (h, w, 3), dtype=np.uint8)


def tight_head_shot() -> np.ndarray:
    """The face fills half of a 400² frame, near its left edge: the CLIP crop leaves the frame."""
    return paint_face(dark(400, 400, 0), centred_box(112, 122, 224), seed=3)


def small_face() -> np.ndarray:
    """A 180 px face in a 2000x1500 photo (found at detector size 512, the authors' second size)."""
    return paint_face(dark(1500, 2000, 1), centred_box(1400, 500, 180), seed=4)


def two_faces() -> np.ndarray:
    """A large face on the left (the detector's first) and a smaller, dimmer one on the right."""
    image = paint_face(dark(600, 900, 2), centred_box(200, 300, 260), seed=1)
    return paint_face(image, centred_box(720, 300, 132), seed=2, low=240)


@dataclass(frozen=True)
class Case:
    photo: object  # () -> HxWx3 uint8
    face_index: int | None = None  # ours; the reference picks the same face (see pick)
    remove_background: bool = True
    grayscale: bool = False
    grey_photo: bool = False  # hand the photo over as one grey channel

    def pick(self, faces: list):
        if self.face_index is None:  # ours takes the largest; the photos make it the detector's first
            return faces[0]
        return sorted(faces, key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)[self.face_index]


CASES = {
    "astronaut": Case(astronaut),
    "astronaut_keep_background": Case(astronaut, remove_background=False),
    "tight_head_shot": Case(tight_head_shot),
    "small_face_large_photo": Case(small_face),
    "two_faces_largest": Case(two_faces),
    "two_faces_right": Case(two_faces, face_index=1),
    "grayscale": Case(astronaut, grayscale=True),
    "grey_photo": Case(tight_head_shot, grayscale=True, grey_photo=True),
}


@pytest.fixture(scope="module")
def reference(antelope):
    return Reference(antelope)


def photo_of(case: Case) -> np.ndarray:
    image = case.photo()
    if case.grey_photo:
        image = np.repeat(np.asarray(Image.fromarray(image).convert("L"))[:, :, None], 3, axis=2)
    return image


def check(case: Case, analyzer, reference) -> dict:
    """Ours against the reference on one case; returns the figures."""
    image = photo_of(case)
    result = analyzer.analyze(image, face_index=case.face_index)
    assert result.ok, result.reason
    ref_crop, ref_pixels, ref_embedding = reference.id_conditions(
        Image.fromarray(image), case.pick(reference.faces(Image.fromarray(image))),
        remove_background=case.remove_background, grayscale=case.grayscale)
    ours = crops.clip_crop(image, result.face.landmark_106, remove_background=case.remove_background,
                           grayscale=case.grayscale)
    assert ours.shape == ref_crop.shape, (ours.shape, ref_crop.shape)
    differing = int((ours != ref_crop).any(axis=2).sum())
    assert differing == 0, f"{differing} of {ours.shape[0] * ours.shape[1]} crop pixels differ"
    pixel_diff = float((preprocess([ours]) - ref_pixels).abs().max())
    assert pixel_diff <= 1e-6, pixel_diff
    assert ref_embedding is not None, "the reference's ArcFace re-detection found no face: the case is broken"
    cosine = float(np.dot(result.face.embedding, ref_embedding))
    assert cosine >= 0.9999, cosine
    return {"crop": ours.shape, "pixel_diff": pixel_diff, "cosine": cosine}


@pytest.mark.parametrize("name", list(CASES))
def test_default_path_equals_the_reference(name, analyzer, reference):
    figures = check(CASES[name], analyzer, reference)
    log.info(f"{name}: crop {figures['crop']}, max pixel diff {figures['pixel_diff']:.2g}, "
          f"ArcFace cosine {figures['cosine']:.6f}")


def test_the_cases_exercise_what_they_claim(analyzer):
    """Out-of-frame pixels, the second detector size, two faces: each case really has its difficulty."""
    tight = tight_head_shot()
    face = analyzer.analyze(tight).face
    cx, cy, half = crops.clip_square(face.landmark_106)
    assert cx - half < 0 or cy - half < 0 or cx + half > 400 or cy + half > 400
    assert (crops.clip_crop(tight, face.landmark_106, remove_background=False, grayscale=False) == 0).all(2).any()
    assert analyzer.analyze(small_face()).det_size == 512
    both = analyzer.analyze(two_faces())
    assert both.n_faces == 2 and both.first
    right = analyzer.analyze(two_faces(), face_index=1)
    assert not right.first and "not the detector's first" in right.summary()


# -- the old behaviours must fail the same checks -----------------------------------------------------------------
def _hull_mask_crop(image, landmark_106, *, remove_background, grayscale):
    """Today's crop geometry with the previous mask: the convex hull of all 106 points plus a forehead cap,
    drawn and OpenCV-blurred at <= 256 px, grey blended in at the crop's size."""
    import cv2

    crop = KEEP["clip_crop"](image, landmark_106, remove_background=False, grayscale=False)
    cx, cy, half = (float(v) for v in crops.clip_square(landmark_106))
    side = max(crop.shape[:2])
    res = min(side, 256)
    pts = (np.asarray(landmark_106, np.float64) - [round(cx - half), round(cy - half)]) * res / side
    (lx, ly), (hx, hy) = pts.min(0), pts.max(0)
    t = np.linspace(0.0, np.pi, 16)
    cap = np.stack([(lx + hx) / 2 + (hx - lx) / 2 * np.cos(t), ly - 0.4 * (hy - ly) * np.sin(t)], 1)
    hull = cv2.convexHull(np.round(np.concatenate([pts, cap]) * 16).astype(np.int32))
    mask = np.zeros((res, res), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0, lineType=cv2.LINE_AA, shift=4)
    mask = cv2.resize(cv2.GaussianBlur(mask, (0, 0), 0.03 * res), (side, side))[:crop.shape[0], :crop.shape[1], None]
    out = np.rint(crop * mask + 127 * (1 - mask)).astype(np.uint8) if remove_background else crop
    if grayscale:
        out = np.repeat(np.asarray(Image.fromarray(out).convert("L"))[:, :, None], 3, 2)
    return out


def _grey_outside(image, landmark_106, **kw):
    """Today's crop, but with the pixels outside the photo grey (#7f7f7f) instead of black."""
    out = KEEP["clip_crop"](image, landmark_106, **kw).copy()
    cx, cy, half = crops.clip_square(landmark_106)
    x0, y0 = round(cx - half), round(cy - half)
    rows, cols = np.mgrid[:out.shape[0], :out.shape[1]]
    outside = (cols + x0 < 0) | (rows + y0 < 0) | (cols + x0 >= image.shape[1]) | (rows + y0 >= image.shape[0])
    out[outside] = 127
    return out


def _first_detection_embedding(self, rgb, face):
    """The previous ArcFace input: aligned from the first full-image detection's keypoints."""
    aligned = np.ascontiguousarray(crops.arcface_crop(rgb, face.kps)[:, :, ::-1])
    emb = np.asarray(self._recognition.get_feat(aligned), np.float32).reshape(-1)
    return (emb / np.linalg.norm(emb), face.kps), 1, (self.det_size, False)


KEEP = {"clip_crop": crops.clip_crop}
BROKEN = {  # name -> (what is put back, the case it must fail on)
    "old_hull_mask": (("crops", "clip_crop", _hull_mask_crop), "astronaut"),
    "grey_out_of_frame": (("crops", "clip_crop", _grey_outside), "tight_head_shot"),
    "first_detection_arcface": (("FaceAnalyzer", "_embed_again", _first_detection_embedding),
                                "small_face_large_photo"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_negative_controls(name, analyzer, reference, monkeypatch):
    (owner, attr, replacement), case = BROKEN[name]
    monkeypatch.setattr(crops if owner == "crops" else FaceAnalyzer, attr, replacement)
    with pytest.raises(AssertionError) as failed:
        check(CASES[case], analyzer, reference)
    log.info(f"{name} on {case}: caught ({str(failed.value).splitlines()[0]})")


# -- Base conditions ----------------------------------------------------------------------------------------------
BASE_CASES = {
    "default": {},
    "no_crop": {"crop": False},
    "wide_unsafe": {"lrtb": (1.5, 1.5, 1.0, 2.5), "safe_crop": False},
    "wide_safe": {"lrtb": (1.5, 1.5, 1.0, 2.5)},
}


@pytest.mark.parametrize("photo", ["astronaut", "tight_head_shot"])
@pytest.mark.parametrize("name", list(BASE_CASES))
def test_base_conditions_equal_the_reference(photo, name, analyzer, reference):
    image = photo_of(CASES[photo])
    kw = BASE_CASES[name]
    face = analyzer.analyze(image, embed=False).face
    options = crops.BaseCrop(crop=kw.get("crop", True), crop_scale_lrtb=kw.get("lrtb", (1, 1, 1, 1)),
                             safe_crop=kw.get("safe_crop", True))
    ours = crops.base_crop(image, face.landmark_106, options)
    ref_image, ref_pixels = reference.base_conditions(Image.fromarray(image),
                                                      reference.faces(Image.fromarray(image))[0], **kw)
    assert ours.shape == ref_image.shape and np.array_equal(ours, ref_image)
    assert float((preprocess([ours]) - ref_pixels).abs().max()) <= 1e-6
    # and the face really is blurred into the photo: a good share of the face box changed, the far corner did not
    x1, y1, x2, y2 = face.bbox.astype(int).clip(0)
    full = crops.base_crop(image, face.landmark_106, crops.BaseCrop(crop=False))
    assert (full != image).any(axis=2)[y1:y2, x1:x2].mean() > 0.2
    assert np.array_equal(full[-3:, -3:], image[-3:, -3:])


@pytest.mark.parametrize(("text", "match"), [("1,1,1", "four comma-separated"), ("a,b,c,d", "four comma"),
                                             ("0,0,1,1", "empty box"), ("1,1,nan,1", "four numbers")])
def test_crop_scale_text_is_checked(text, match):
    with pytest.raises(ValueError, match=match):
        crops.BaseCrop.parse(True, text, True)


def test_crop_scale_text_parses():
    assert crops.BaseCrop.parse(True, " 1, 1.5,0.8 ,2 ", False) == crops.BaseCrop(True, (1.0, 1.5, 0.8, 2.0), False)

