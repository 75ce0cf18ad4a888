"""Photos -> face conditions -> identity -> LoRA: the whole zero-shot path in one object.

Face analysis is cached by image content, so re-running a graph with only the seed changed, or adding one
photo to a set, analyses only what is new. Each image gets a result and a reason; a failure names the image
index and what to do, or (``on_failure="skip"``) is listed in the output and left out of the average.

One face analysis per photo feeds everything the checkpoint reads: the CLIP crop and the ArcFace embedding of the
ID conditions and, for checkpoints with a base resampler, the face-blurred Base conditions (``crops.base_crop``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .crops import BaseCrop
from .errors import ConditionError
from .identity import Identity
from .model import HyperLoRA

log = logging.getLogger(__name__)

ON_FAILURE = ("error", "skip")
# error mode, several photos: how to go on with the others (the node's widget words; the CLI's --skip-failed)
SKIP_HINT = " To use the other photos without it, set on_failure: skip (--skip-failed on the command line)."
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CropOptions:
    """How a detected face becomes the encoders' input."""

    remove_background: bool = True  # replace everything outside the face outline by grey #7f7f7f
    grayscale: bool = False  # feed CLIP a grey crop (kept 3-channel)
    face_index: int | None = None  # None: the largest face; k: the k-th face from the left
    base: BaseCrop = BaseCrop()  # the Base conditions' crop (checkpoints with a base resampler)

    def __post_init__(self) -> None:
        if self.face_index is not None and self.face_index < 0:
            raise ValueError(f"face_index must be >= 0 (0 is the leftmost face) or None for the largest; "
                             f"got {self.face_index}")


@dataclass
class Conditions:
    """What the encoders made of a batch of reference photos."""

    clip_tokens: torch.Tensor | None  # [b, 257, 1024] penultimate CLIP tokens of the used images
    id_embeds: torch.Tensor | None  # [b, 512] normed ArcFace embeddings of the used images
    used: list[int]  # indices of the images that contributed
    skipped: dict[int, str] = field(default_factory=dict)  # image index -> reason it was left out
    previews: list[np.ndarray] = field(default_factory=list)  # CLIP crops of the used images, uint8 RGB
    reports: list[str] = field(default_factory=list)  # one line per input image
    base_clip_tokens: torch.Tensor | None = None  # [b, 257, 1024] CLIP tokens of the face-blurred images
    base_previews: list[np.ndarray] = field(default_factory=list)  # the Base conditions' crops, uint8 RGB


class IdentityPipeline:
    """Glue between the face analyzer, the CLIP encoder and a loaded HyperLoRA."""

    def __init__(self, hyperlora: HyperLoRA, faces: object, clip: object | None = None, *, cache_size: int = 64,
                 on_start: Callable[[], None] | None = None, after_predict: Callable[[], None] | None = None,
                 ) -> None:
        if ("clip" in hyperlora.encoders or hyperlora.has_base) and clip is None:
            raise ValueError("this checkpoint reads CLIP tokens: give the pipeline a CLIP ViT-L/14 encoder")
        self.hyperlora = hyperlora
        self.faces = faces  # hyperlora_core.face.FaceAnalyzer (or anything with its analyze())
        self.clip = clip  # hyperlora_core.clip.ClipEncoder
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_size = cache_size
        self.analysed = 0  # face analyses actually run (not served from the cache)
        self.on_start = on_start  # called as face analysis starts (a host reads ahead what will be needed)
        self.after_predict = after_predict  # called when prediction is over, failed or not (a host releases)

    def analyze(self, image: np.ndarray, index: int, options: CropOptions):
        """Face analysis of one RGB uint8 image, cached by content and selection."""
        embed = "arcface" in self.hyperlora.encoders
        key = (_digest(image), options.face_index, embed)
        if key in self._cache:
            self._cache.move_to_end(key)
            return _reindexed(self._cache[key], index)
        result = self.faces.analyze(image, index=index, face_index=options.face_index, embed=embed)
        self.analysed += 1
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def conditions(self, images: Sequence[object], options: CropOptions = CropOptions(), on_failure: str = "error",
                   progress: Progress | None = None) -> Conditions:
        from .crops import base_crop, clip_crop

        found = usable_faces(images, lambda image, i: self.analyze(image, i, options), on_failure, progress)
        crops, bases, embeds = [], [], []
        for _, image, result in found.faces:
            landmarks = result.face.landmark_106
            crops.append(clip_crop(image, landmarks, remove_background=options.remove_background,
                                   grayscale=options.grayscale))
            if self.hyperlora.has_base:
                bases.append(base_crop(image, landmarks, options.base))
            if result.face.embedding is not None:
                embeds.append(torch.from_numpy(np.asarray(result.face.embedding, dtype=np.float32)))
        clip_tokens = self._encode_clip(crops) if "clip" in self.hyperlora.encoders else None
        id_embeds = torch.stack(embeds) if "arcface" in self.hyperlora.encoders else None
        base_tokens = self._encode_clip(bases) if bases else None
        return Conditions(clip_tokens=clip_tokens, id_embeds=id_embeds, used=[i for i, _, _ in found.faces],
                          skipped=found.skipped, previews=crops, reports=found.reports, base_clip_tokens=base_tokens,
                          base_previews=bases)

    def _encode_clip(self, crops: list[np.ndarray]) -> torch.Tensor:
        from .clip import preprocess

        return self.clip.encode(preprocess(crops)).float()

    def identity(self, images: Sequence[object], options: CropOptions = CropOptions(), on_failure: str = "error",
                 progress: Progress | None = None, before_predict: Callable[[], None] | None = None,
                 ) -> tuple[Identity, Conditions]:
        """The averaged identity of the person in ``images``, and the conditions it came from.

        before_predict: called between encoding and prediction (a host loads the networks to its device there).
        """
        if self.on_start is not None:
            self.on_start()
        try:
            conditions = self.conditions(images, options, on_failure, progress)
            if before_predict is not None:
                before_predict()
            identity = self.hyperlora.predict_identity(clip_tokens=conditions.clip_tokens,
                                                       id_embeds=conditions.id_embeds,
                                                       base_clip_tokens=conditions.base_clip_tokens)
        finally:
            if self.after_predict is not None:
                self.after_predict()
        identity.meta.update({"images_used": ",".join(map(str, conditions.used)),
                              "images_skipped": ",".join(map(str, conditions.skipped))})
        return identity, conditions


@dataclass
class UsableFaces:
    """The photos of a batch in which face analysis found a usable face, and what became of the others."""

    faces: list[tuple[int, np.ndarray, object]]  # (image index, RGB uint8 image, its FaceResult) per usable photo
    skipped: dict[int, str]  # image index -> reason it was left out (on_failure "skip")
    reports: list[str]  # one line per analysed image: what was found


def usable_faces(images: Sequence[object], analyze: Callable[[np.ndarray, int], object], on_failure: str = "error",
                 progress: Progress | None = None) -> UsableFaces:
    """Analyse each photo (``analyze(rgb_uint8, index)`` returns a FaceResult) and keep those with a usable face.

    on_failure "error": the first photo without one raises its own error, naming the image; "skip": it is left out,
    and only a batch with none left is refused. An empty batch is refused. Every consumer of face photos (HyperLoRA
    Face, HyperDreamBooth) goes through here, so they accept and refuse the same photos with the same words.
    """
    from .images import to_rgb8

    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if len(images) == 0:
        raise ConditionError("no reference image given (the image batch is empty): connect at least one photo "
                             "of the person to the image input")
    found = UsableFaces(faces=[], skipped={}, reports=[])
    for i, raw in enumerate(images):
        image = to_rgb8(raw, index=i)
        result = analyze(image, i)
        found.reports.append(f"photo {i + 1}: {result.summary()}")
        if not result.ok:
            if on_failure == "error":
                result.raise_for_failure(SKIP_HINT if len(images) > 1 else "")
            found.skipped[i] = result.reason
            continue
        found.faces.append((i, image, result))
        if progress is not None:
            progress(i + 1, len(images))
    if not found.faces:
        raise ConditionError(f"no usable face in any of the {len(images)} photo(s), so on_failure: skip left "
                             "none to use (" + "; ".join(f"photo {i + 1}: {r}" for i, r in found.skipped.items())
                             + "). Give at least one photo where one face is clearly visible.")
    return found


def _digest(image: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def _reindexed(result, index: int):
    """A cached result reported under the index the image has in this batch."""
    from dataclasses import replace

    return result if result.index == index else replace(result, index=index)
