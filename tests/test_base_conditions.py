"""Base conditions end to end: photos -> face-blurred crops -> CLIP -> base resampler -> Base-LoRA, against float64.

The reference chain shares no code with the package: the crops come from tests/test_preprocessing.py's PIL +
insightface reference, the CLIP tokens from transformers' CLIPVisionModel in float64, the base resampler and the
basis mixing from tests/test_reference.py's float64 implementation of DESIGN.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("insightface")
transformers = pytest.importorskip("transformers")

from test_preprocessing import Reference, astronaut, tight_head_shot  # noqa: E402
from test_reference import assert_lora_equal, max_diff, reference_base_tokens, reference_lora  # noqa: E402

from hyperlora_core import load_hyperlora  # noqa: E402
from hyperlora_core.clip import ClipVisionEncoder  # noqa: E402
from hyperlora_core.face import FaceAnalyzer  # noqa: E402
from hyperlora_core.pipeline import CropOptions, IdentityPipeline  # noqa: E402
from hyperlora_core.synthetic import TINY_UNET  # noqa: E402

from face_doubles import write_antelopev2  # noqa: E402
from helpers import TINY_CLIP_WIDTH  # noqa: E402

PHOTOS = (astronaut, tight_head_shot)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_factory, tiny_clip_folder):
    antelope = write_antelopev2(tmp_path_factory.mktemp("insightface") / "antelopev2")
    ckpt = tiny_factory(clip_dim=TINY_CLIP_WIDTH, base=True)
    hl = load_hyperlora(ckpt, unet=TINY_UNET)
    clip = ClipVisionEncoder.from_folder(tiny_clip_folder, device="cpu", dtype="fp32")
    return ckpt, hl, clip, FaceAnalyzer(antelope, providers="cpu"), Reference(antelope)


def reference_base_clip(reference: Reference, clip_folder, photos, **crop) -> torch.Tensor:
    model = transformers.CLIPVisionModel.from_pretrained(str(clip_folder)).double().eval()
    tokens = []
    for photo in photos:
        image = Image.fromarray(photo)
        _, pixels = reference.base_conditions(image, reference.faces(image)[0], **crop)
        with torch.no_grad():
            tokens.append(model(pixel_values=pixels.double(), output_hidden_states=True).hidden_states[-2])
    return torch.cat(tokens)


@pytest.mark.parametrize("crop", [{}, {"lrtb": (1.5, 1.5, 1.0, 2.5), "safe_crop": False}, {"crop": False}])
def test_base_lora_from_photos_equals_the_float64_reference(parts, tiny_clip_folder, crop):
    from hyperlora_core.crops import BaseCrop

    ckpt, hl, clip, faces, reference = parts
    pipeline = IdentityPipeline(hl, faces, clip)
    photos = [make() for make in PHOTOS]
    options = CropOptions(base=BaseCrop(crop=crop.get("crop", True), crop_scale_lrtb=crop.get("lrtb", (1, 1, 1, 1)),
                                        safe_crop=crop.get("safe_crop", True)))
    identity, cond = pipeline.identity(photos, options)
    assert pipeline.analysed == len(photos)  # one face analysis per photo feeds the ID and the Base conditions
    assert identity.base_tokens is not None and cond.base_clip_tokens.shape[0] == len(photos)
    base_clip = reference_base_clip(reference, tiny_clip_folder, photos, **crop)
    assert max_diff(base_clip, cond.base_clip_tokens) <= 1e-5
    tokens = reference_base_tokens(ckpt, base_clip)
    assert max_diff(tokens, identity.base_tokens) <= 1e-5
    assert_lora_equal(reference_lora(ckpt, tokens, "base", "kohya"),
                      hl.identity_to_lora(identity, kind="base", key_format="kohya"))


def test_base_tokens_follow_the_base_crop(parts):
    """The Base-LoRA really reads the Base crop: another crop_scale_LRTB gives other base tokens, same ID tokens."""
    from hyperlora_core.crops import BaseCrop

    _, hl, clip, faces, _ = parts
    pipeline = IdentityPipeline(hl, faces, clip)
    photo = [astronaut()]
    a, _ = pipeline.identity(photo)
    b, _ = pipeline.identity(photo, CropOptions(base=BaseCrop(crop_scale_lrtb=(2.0, 2.0, 2.0, 2.0))))
    assert torch.equal(a.tokens, b.tokens)
    assert float((a.base_tokens - b.base_tokens).abs().max()) > 1e-3


def test_checkpoint_without_base_makes_no_base_tokens(parts, tiny_factory):
    _, _, clip, faces, _ = parts
    hl = load_hyperlora(tiny_factory(clip_dim=TINY_CLIP_WIDTH), unet=TINY_UNET)
    identity, cond = IdentityPipeline(hl, faces, clip).identity([astronaut()])
    assert identity.base_tokens is None and cond.base_clip_tokens is None and cond.base_previews == []
    assert np.asarray(cond.previews[0]).dtype == np.uint8
