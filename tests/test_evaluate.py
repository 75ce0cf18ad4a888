"""Face similarity (the ID metric of validation and ``python -m hyperlora_core eval``) on the face doubles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hyperlora_core.cli import main
from hyperlora_core.errors import FaceNotFoundError
from hyperlora_core.evaluate import face_similarity
from hyperlora_core.face import FaceAnalyzer

import face_fixtures
from face_doubles import centred_box, paint_face

antelope = face_fixtures.antelope  # the shared fixture


def _face(seed, cx=320, side=150):
    img = np.zeros((640, 640, 3), np.uint8)
    return paint_face(img, centred_box(cx, 320, side), seed=seed)


def test_scores_are_mean_cosines_to_the_references(antelope):
    """Each score is the mean cosine of the image's face embedding to the references' (computed here from the
    analyzer's own embeddings); the reference itself scores 1; an image without a face scores 0 and is listed."""
    analyzer = FaceAnalyzer(antelope, providers="cpu")
    refs = [_face(1), _face(1, cx=300)]
    images = [_face(1), _face(2), _face(3, side=140), np.zeros((640, 640, 3), np.uint8)]
    result = face_similarity(analyzer, images, refs)
    emb = [analyzer.analyze(im).face.embedding for im in refs + images[:3]]
    emb = [e / np.linalg.norm(e) for e in emb]
    expected = [float(np.mean([e @ emb[0], e @ emb[1]])) for e in emb[2:]]
    assert result.scores[:3] == pytest.approx(expected, abs=1e-6)
    assert result.scores[0] == pytest.approx((1 + float(emb[0] @ emb[1])) / 2, abs=1e-6)
    assert result.scores[1] < result.scores[0] - 1e-3
    assert result.missing == (3,) and result.scores[3] == 0.0
    assert result.mean == pytest.approx(np.mean(result.scores))
    with pytest.raises(FaceNotFoundError, match=r"reference image\(s\) \[0\]"):
        face_similarity(analyzer, refs, [np.zeros((640, 640, 3), np.uint8)])


def test_eval_command(antelope, tmp_path, capsys):
    paths = {}
    for name, seed in (("ref", 1), ("same", 1), ("other", 2)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(_face(seed)).save(paths[name])
    code = main(["eval", "--images", str(paths["same"]), str(paths["other"]), "--references", str(paths["ref"]),
                 "--insightface", str(antelope), "--provider", "cpu", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scores"][str(paths["same"])] == pytest.approx(1.0, abs=1e-5)
    assert out["scores"][str(paths["other"])] < 0.999
    assert out["no_face"] == []
