"""The papers' identity metric: ArcFace cosine between faces in generated images and the reference photos.

Each generated image's face (the largest) is embedded with the same antelopev2 analysis the nodes use; its
score is the mean cosine to the reference faces' embeddings. An image without a face scores 0 and is counted,
so a model that stops drawing faces cannot score well by omission.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import FaceNotFoundError


@dataclass(frozen=True)
class Similarity:
    """Face similarity of generated images to references."""

    scores: tuple[float, ...]  # per generated image: mean ArcFace cosine to the references (0 without a face)
    missing: tuple[int, ...]  # indices of generated images where no face was found

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0


def _embeddings(analyzer, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    out = []
    for i, image in enumerate(images):
        result = analyzer.analyze(image, index=i)
        out.append(None if result.face is None else result.face.embedding / np.linalg.norm(result.face.embedding))
    return out


def face_similarity(analyzer, images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> Similarity:
    """``analyzer``: a FaceAnalyzer (or anything with its ``analyze``); images and references: HxWx3 uint8 RGB."""
    refs = _embeddings(analyzer, references)
    missing_refs = [i for i, e in enumerate(refs) if e is None]
    if missing_refs:
        raise FaceNotFoundError(f"reference image(s) {missing_refs}: no face found; use photos with a visible face")
    ref = np.stack(refs)  # [r, 512]
    scores, missing = [], []
    for i, emb in enumerate(_embeddings(analyzer, images)):
        if emb is None:
            missing.append(i)
            scores.append(0.0)
        else:
            scores.append(float((ref @ emb).mean()))
    return Similarity(tuple(scores), tuple(missing))
