"""Face analysis on antelopev2 doubles written in insightface's real ONNX formats (tests/face_doubles.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("insightface")
onnxruntime = pytest.importorskip("onnxruntime")

from hyperlora_core.errors import FaceModelError, FaceModelMissing, FaceNotFoundError  # noqa: E402
from hyperlora_core.face import FaceAnalyzer, FaceResult, resolve_providers  # noqa: E402
from hyperlora_core.images import to_rgb8  # noqa: E402

import face_fixtures  # noqa: E402
from face_doubles import (  # noqa: E402
    ANTELOPE_FILES,
    centred_box,
    landmark_template,
    paint_face,
    write_antelopev2,
    write_landmark,
)

antelope, analyzer = face_fixtures.antelope, face_fixtures.analyzer  # the shared fixtures


@pytest.fixture()
def detector_inputs(monkeypatch):
    """(width, height) of every input the detector's onnxruntime sessions really ran on, in order."""
    seen: list[tuple[int, int]] = []
    run = onnxruntime.InferenceSession.run

    def recording_run(self, output_names, input_feed, *args, **kwargs):
        if "input.1" in input_feed:  # the SCRFD double's input name
            seen.append(tuple(input_feed["input.1"].shape[:1:-1]))
        return run(self, output_names, input_feed, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", recording_run)
    return seen


@pytest.fixture()
def downloads(monkeypatch):
    """Every download insightface attempts (each refused as offline); tests assert it stays empty."""
    import sys

    import insightface.utils.storage  # noqa: F401 - loads insightface.utils.download too

    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise ConnectionError(f"offline test: refused to download {url}")

    for module in ("insightface.utils.storage", "insightface.utils.download"):
        monkeypatch.setattr(sys.modules[module], "download_file", refuse)
    yield attempts
    assert attempts == [], f"insightface tried to download {attempts}"


def three_faces() -> np.ndarray:
    """640x640 black with faces of 80, 160 and 40 px centred at x = 96, 320, 560 (left to right)."""
    img = np.zeros((640, 640, 3), np.uint8)
    paint_face(img, centred_box(96, 320, 80), seed=1)
    paint_face(img, centred_box(320, 320, 160), seed=2)
    paint_face(img, centred_box(560, 320, 40), seed=3)
    return img


def centre_x(result: FaceResult) -> float:
    return float(result.face.bbox[0] + result.face.bbox[2]) / 2


def test_one_detection_pass_in_the_normal_case(analyzer, detector_inputs):
    result = analyzer.analyze(three_faces(), index=2, embed=False)
    assert result.ok and result.reason == "ok" and result.index == 2 and result.face.embedding is None
    assert result.attempts == ((640, False),) and result.det_size == 640 and not result.padded
    assert detector_inputs == [(640, 640)]


def test_arcface_runs_the_detector_again_on_the_doubled_square(analyzer, detector_inputs):
    """The authors' second detection: on the 2·l square of the original photo, not on the whole image."""
    from hyperlora_core.crops import arcface_box

    result = analyzer.analyze(three_faces())
    assert result.ok and result.face.embedding.shape == (512,)
    x1, y1, x2, y2 = arcface_box(result.face.landmark_106)
    assert len(detector_inputs) > 1 and detector_inputs[0] == (640, 640)
    # the second pass saw the square (its side sets the scale), and its face is the chosen one, in image pixels
    assert x2 - x1 < 640 * 0.7 and result.arcface_faces == 1
    assert np.abs(result.face.arcface_kps.mean(0) - result.face.kps.mean(0)).max() < 16
    # the doubles miss the face at 640 and 512 in that square: the retry found it, and the line says so
    assert result.arcface_attempt == (384, False)
    assert "found only when the detector ran again at 384" in result.summary()


def test_arcface_step_that_finds_nothing_fails_the_photo(analyzer, monkeypatch):
    """A face the first detection found but no pass finds again in its square: no embedding, a clear reason."""
    calls = []
    detect = analyzer._detector.detect

    def second_pass_blind(img, *args, **kwargs):
        calls.append(img.shape)
        return detect(img, *args, **kwargs) if len(calls) == 1 else (np.zeros((0, 5)), np.zeros((0, 5, 2)))

    monkeypatch.setattr(analyzer._detector, "detect", second_pass_blind)
    result = analyzer.analyze(three_faces(), index=4)
    assert not result.ok and result.n_faces == 3
    assert "the ArcFace step found none" in result.reason and "sizes tried: 640, 512" in result.reason
    assert "on_failure" not in result.reason  # advice for the mode that is set comes from the pipeline (issue 16)
    with pytest.raises(FaceNotFoundError, match="photo 5: a face was found"):
        result.raise_for_failure()


def test_smaller_sizes_really_run(analyzer, detector_inputs):
    """A face too big for 640 and for the padded retry, but right for 384: the sizes must truly change."""
    img = np.zeros((1000, 1000, 3), np.uint8)
    paint_face(img, centred_box(500, 500, 420))
    result = analyzer.analyze(img, embed=False)
    assert result.ok, result.reason
    assert result.attempts == ((640, False), (512, False), (384, False))  # the authors' order, no padding yet
    assert detector_inputs == [(640, 640), (512, 512), (384, 384)]
    assert result.det_size == 384 and not result.padded
    np.testing.assert_allclose(result.face.bbox, centred_box(500, 500, 160 / 0.384), atol=32 / 0.384)


def test_padding_finds_a_face_that_fills_the_frame(antelope, detector_inputs):
    """The padded retry comes last; with no smaller sizes left to try, it finds a face too big for 640."""
    analyzer = FaceAnalyzer(antelope, providers="cpu")
    analyzer.sizes = ()  # the doubles find this face at 384 otherwise
    img = paint_face(np.zeros((600, 600, 3), np.uint8), (0, 0, 600, 600))
    result = analyzer.analyze(img, embed=False)
    assert result.ok, result.reason
    assert result.padded and result.attempts == ((640, False), (640, True))
    assert detector_inputs == [(640, 640), (640, 640)]
    np.testing.assert_allclose(result.face.bbox, [0, 0, 600, 600], atol=600 / 320 * 8)  # one grid step
    assert np.all((result.face.kps > 0) & (result.face.kps < 600))  # keypoints mapped back into the image


@pytest.mark.parametrize(("face_index", "x"), [(None, 320), (0, 96), (1, 320), (2, 560)])
def test_largest_face_by_default_and_face_index_left_to_right(analyzer, face_index, x):
    result = analyzer.analyze(three_faces(), face_index=face_index)
    assert result.n_faces == 3
    assert centre_x(result) == pytest.approx(x, abs=4)


def test_face_index_beyond_the_faces_found(analyzer):
    result = analyzer.analyze(three_faces(), index=1, face_index=3)
    assert not result.ok and result.n_faces == 3 and "only 3 face(s)" in result.reason
    with pytest.raises(FaceNotFoundError, match="photo 2: face_index 3"):
        result.raise_for_failure()


def test_dark_image_gives_the_no_face_error_with_its_index(analyzer, detector_inputs):
    dark = np.full((300, 400, 3), 6, np.uint8)
    result = analyzer.analyze(dark, index=5)
    assert not result.ok and result.n_faces == 0 and result.face is None
    assert "dark" in result.reason
    assert len(detector_inputs) == len(result.attempts) == 5  # 640, 512, 384, 256, then 640 padded
    assert result.attempts[-1] == (640, True)
    with pytest.raises(FaceNotFoundError, match=r"^photo 6: no face found"):
        result.raise_for_failure()


def _grey(img):
    return img[:, :, 0].copy()


def _rgba(img):
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:40, :40, 3] = 0  # a transparent corner, far from the face
    return rgba


def _sixteen_bit(img):
    return img.astype(np.uint16) * 257


def _torch_float(img):
    import torch

    return torch.from_numpy(img.astype(np.float32) / 255.0)


FORMATS = {"grey": _grey, "grey_hw1": lambda i: _grey(i)[:, :, None], "rgba": _rgba, "16-bit": _sixteen_bit,
           "torch_float": _torch_float, "float64": lambda i: i / 255.0}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_image_formats(analyzer, kind):
    img = np.zeros((640, 640, 3), np.uint8)
    paint_face(img, centred_box(320, 320, 160), seed=4)
    rgb = to_rgb8(FORMATS[kind](img), index=0)
    assert rgb.shape == (640, 640, 3) and rgb.dtype == np.uint8
    result = analyzer.analyze(rgb)
    assert result.ok, result.reason
    np.testing.assert_allclose(result.face.bbox, centred_box(320, 320, 160), atol=8)


def test_6000x4000_photo(analyzer, detector_inputs):
    img = np.zeros((4000, 6000, 3), np.uint8)
    paint_face(img, centred_box(3000, 2100, 1500))
    result = analyzer.analyze(img)
    assert result.ok, result.reason
    assert result.attempts == ((640, False),) and detector_inputs[0] == (640, 640)
    np.testing.assert_allclose(result.face.bbox, centred_box(3000, 2100, 1500), atol=32 / 0.1065)
    assert result.face.landmark_106.shape == (106, 2) and result.face.embedding.shape == (512,)


def test_landmarks_are_the_models_output_mapped_from_the_original_image(analyzer):
    """insightface maps the 192-crop output u to centre + u * 0.75 * max(w, h) of the chosen box."""
    face = analyzer.analyze(three_faces()).face
    x1, y1, x2, y2 = face.bbox
    expected = np.array([(x1 + x2) / 2, (y1 + y2) / 2]) + landmark_template() * 0.75 * max(x2 - x1, y2 - y1)
    np.testing.assert_allclose(face.landmark_106, expected, atol=0.05)


def test_embedding_is_normalised_deterministic_and_depends_on_the_face(analyzer):
    img = three_faces()
    a = analyzer.analyze(img).face.embedding
    b = analyzer.analyze(img.copy()).face.embedding
    other = img.copy()
    paint_face(other, centred_box(320, 320, 160), seed=99)
    c = analyzer.analyze(other).face.embedding
    assert a.dtype == np.float32 and a.shape == (512,)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(a, b)
    assert float(a @ c) < 0.999  # float noise alone would give exactly 1


def test_rejects_non_rgb8(analyzer):
    with pytest.raises(ValueError, match="photo 4: analyze\\(\\) needs HxWx3 uint8"):
        analyzer.analyze(np.zeros((64, 64), np.uint8), index=3)


# --- the folder ---------------------------------------------------------------------------------------------


def test_insightface_alone_would_download_a_missing_model(tmp_path, downloads):
    """The trap the analyzer avoids (and proof that the ``downloads`` guard sees attempts)."""
    from insightface.app import FaceAnalysis

    with pytest.raises(ConnectionError):
        FaceAnalysis(name="antelopev2", root=str(tmp_path), providers=["CPUExecutionProvider"])
    assert downloads and downloads[0].endswith("antelopev2.zip")
    downloads.clear()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_folder_lists_the_five_files_without_download(tmp_path, downloads, case):
    folder = tmp_path / "antelopev2"
    if case == "empty":
        folder.mkdir()
    with pytest.raises(FaceModelMissing) as info:
        FaceAnalyzer(folder, providers="cpu")
    message = str(info.value)
    assert all(name in message for name in ANTELOPE_FILES)
    assert str(folder) in message and "Nothing is downloaded" in message


def test_folder_without_detector_explains_the_assertion(tmp_path, downloads):
    folder = write_antelopev2(tmp_path / "antelopev2", skip=("scrfd_10g_bnkps.onnx",))
    with pytest.raises(FaceModelMissing, match="lacks scrfd_10g_bnkps.onnx.*AssertionError"):
        FaceAnalyzer(folder, providers="cpu")


def test_detector_file_that_is_not_a_detector(tmp_path, downloads):
    """insightface itself stops with a bare AssertionError here; the analyzer says what it means."""
    from insightface.app import FaceAnalysis

    folder = write_antelopev2(tmp_path / "antelopev2")
    write_landmark(folder / "scrfd_10g_bnkps.onnx")
    with pytest.raises(AssertionError):
        FaceAnalysis(name=str(folder), root=str(tmp_path), allowed_modules=["detection"],
                     providers=["CPUExecutionProvider"])
    with pytest.raises(FaceModelError, match="no face detector.*AssertionError"):
        FaceAnalyzer(folder, providers="cpu")


def test_lfs_pointer_is_named(tmp_path):
    folder = write_antelopev2(tmp_path / "antelopev2")
    (folder / "glintr100.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(FaceModelError, match="glintr100.onnx' is a git-LFS pointer"):
        FaceAnalyzer(folder, providers="cpu")


@pytest.mark.parametrize("layout", ["antelopev2/antelopev2", "antelopev2", "models/antelopev2"])
def test_nested_and_parent_folders_are_accepted(tmp_path, downloads, layout):
    inner = write_antelopev2(tmp_path / layout)
    given = tmp_path / layout.split("/")[0] if layout != "models/antelopev2" else tmp_path
    analyzer = FaceAnalyzer(given, providers="cpu")
    assert analyzer.folder == inner
    assert analyzer.analyze(three_faces()).ok


def test_doubles_route_like_the_real_antelopev2(antelope):
    """With every module allowed, insightface recognises all five doubles by their signatures."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(antelope), root=str(antelope.parent), providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "landmark_2d_106", "landmark_3d_68", "recognition", "genderage"}


def test_a_file_in_the_folder_is_accepted_as_root(antelope):
    assert FaceAnalyzer(antelope / "glintr100.onnx", providers="cpu").folder == antelope


def test_provider_actually_used_is_reported(analyzer):
    assert analyzer.provider == "CPUExecutionProvider"
    assert analyzer.provider == analyzer._detector.session.get_providers()[0]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is available")
def test_cuda_without_cuda_falls_back_to_cpu_and_says_so(antelope, caplog):
    with caplog.at_level(logging.WARNING, logger="hyperlora_core.face"):
        analyzer = FaceAnalyzer(antelope, providers="cuda")
    assert analyzer.provider == "CPUExecutionProvider"
    assert "CUDA was asked for" in caplog.text
    assert resolve_providers("auto") == ["CPUExecutionProvider"]


@pytest.mark.parametrize(("kwargs", "match"), [({"providers": "tpu"}, "providers must be one of"),
                                               ({"det_size": 600}, "multiple of 32"),
                                               ({"det_thresh": 1.5}, "det_thresh")])
def test_bad_arguments(antelope, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceAnalyzer(antelope, **kwargs)


def test_face_result_invariants():
    with pytest.raises(ValueError, match="reason must be 'ok'"):
        FaceResult(index=0, face=None, n_faces=0, reason="ok")


# --- images --------------------------------------------------------------------------------------------------


def test_to_rgb8_conversions():
    from PIL import Image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_rgb8(grey), np.repeat(grey[:, :, None], 3, 2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 255, 128
    out = to_rgb8(rgba)
    assert out[0, 0].tolist() == [127] * 3 and out[0, 1].tolist() == [255] * 3  # transparent -> #7f7f7f
    assert out[1, 0].tolist() == [191] * 3  # half alpha: halfway between white and grey
    sixteen = np.array([[0, 257, 32896, 65535]], np.uint16)
    assert to_rgb8(sixteen)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert to_rgb8(np.array([[0.0, 0.5, 1.0, 1.2]]))[0, :, 0].tolist() == [0, 128, 255, 255]  # HDR clipped
    palette = Image.fromarray(np.zeros((5, 6, 3), np.uint8) + 51).convert("P")  # web-safe grey
    assert to_rgb8(palette).shape == (5, 6, 3) and to_rgb8(palette)[0, 0].tolist() == [51] * 3
    batch_of_one = np.zeros((1, 4, 5, 3), np.float32)
    assert to_rgb8(batch_of_one).shape == (4, 5, 3)


@pytest.mark.parametrize(("image", "match"), [
    (np.zeros((4, 4, 3), np.float32) + 255.0, "photo 8: float values .* must be in \\[0, 1\\]"),
    (np.full((4, 4), np.nan, np.float32), "photo 8: contains NaN"),
    (np.zeros((3, 32, 32), np.uint8), "photo 8: shape .*channels first"),
    (np.zeros((0, 4, 3), np.uint8), "photo 8: the image is empty"),
    (np.array([[70000]], np.int32), "photo 8: integer values"),
    ("photo.png", "photo 8: expected an image"),
])
def test_to_rgb8_errors_name_the_image(image, match):
    from hyperlora_core.errors import ImageFormatError

    with pytest.raises(ImageFormatError, match=match):
        to_rgb8(image, index=7)


def test_load_image_16bit_grey_exif_and_errors(tmp_path):
    from PIL import Image

    from hyperlora_core.errors import ImageFileMissing, ImageFormatError
    from hyperlora_core.images import load_image

    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    sixteen.save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png")[0, :, 1].tolist() == [0, 128, 255]
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:5] = 255  # bright top rows
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(tall).save(tmp_path / "rotated.png", exif=exif)
    shown = load_image(tmp_path / "rotated.png")
    assert shown.shape == (20, 40, 3) and shown[:, -5:].min() == 255  # the bright rows are now on the right
    Image.fromarray(np.zeros((3, 3, 4), np.uint8)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png")[0, 0].tolist() == [127] * 3
    with pytest.raises(ImageFileMissing, match="photo 3: .*nope.png' does not exist"):
        load_image(tmp_path / "nope.png", index=2)
    (tmp_path / "bad.png").write_text("<html>not an image</html>")
    with pytest.raises(ImageFormatError, match="could not be read"):
        load_image(tmp_path / "bad.png")


def test_embedding_equals_insightface_own_recognition_path(analyzer):
    """Our alignment + get_feat gives what insightface's ArcFaceONNX.get gives on the same face."""
    from insightface.app.common import Face as InsightFace

    from hyperlora_core.crops import arcface_region

    img = three_faces()
    face = analyzer.analyze(img).face
    region, offset = arcface_region(img, face.landmark_106)
    ins = InsightFace(bbox=face.bbox, kps=face.arcface_kps - np.array(offset, np.float32), det_score=face.det_score)
    reference = analyzer._recognition.get(np.ascontiguousarray(region[:, :, ::-1]), ins)
    reference = reference / np.linalg.norm(reference)
    assert float(face.embedding @ reference) > 0.9999
