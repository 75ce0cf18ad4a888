"""Photos -> conditions -> identity -> LoRA with the real insightface/onnxruntime/open_clip code paths on doubles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyperlora_core import ConditionError, Identity, load_hyperlora
from hyperlora_core.cli import main
from hyperlora_core.clip import ClipVisionEncoder, preprocess
from hyperlora_core.crops import clip_crop
from hyperlora_core.errors import FaceNotFoundError
from hyperlora_core.face import FaceAnalyzer
from hyperlora_core.pipeline import CropOptions, IdentityPipeline
from hyperlora_core.synthetic import TINY_UNET

import face_fixtures
from face_doubles import astronaut_landmarks, centred_box, paint_face
from helpers import TINY_CLIP_WIDTH

pytest.importorskip("insightface")

antelope = face_fixtures.antelope  # the shared fixture


@pytest.fixture(scope="module")
def parts(antelope, tiny_factory, tiny_clip_folder):
    ckpt = tiny_factory(clip_dim=TINY_CLIP_WIDTH)
    hl = load_hyperlora(ckpt, unet=TINY_UNET)
    clip = ClipVisionEncoder.from_folder(tiny_clip_folder, device="cpu", dtype="fp32")
    return ckpt, hl, clip, FaceAnalyzer(antelope, providers="cpu")


def photo(seed: int, face: bool = True, side: int = 640) -> np.ndarray:
    image = np.random.default_rng(seed).integers(10, 40, size=(side, side, 3), dtype=np.uint8)
    if face:
        paint_face(image, centred_box(side / 2, side / 2 - 10, 160), seed=seed)
    return image


def test_photos_to_lora(parts):
    _, hl, clip, faces = parts
    pipeline = IdentityPipeline(hl, faces, clip)
    identity, cond = pipeline.identity([photo(1), photo(2)])
    assert cond.used == [0, 1] and cond.skipped == {}
    assert cond.clip_tokens.shape == (2, 257, TINY_CLIP_WIDTH) and cond.id_embeds.shape == (2, 512)
    assert torch.allclose(cond.id_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert identity.tokens.shape == (1120, 16) and identity.meta["images_used"] == "0,1"
    # the two photos differ, so each alone gives another identity than the pair
    alone, _ = pipeline.identity([photo(1)])
    assert float((alone.tokens - identity.tokens).abs().max()) > 1e-4
    assert len(hl.identity_to_lora(identity)) == 3 * 560
    assert all(p.shape[0] == p.shape[1] and p.dtype == np.uint8 for p in cond.previews)


def test_face_analysis_is_cached_by_content(parts):
    _, hl, clip, faces = parts
    pipeline = IdentityPipeline(hl, faces, clip)
    first, _ = pipeline.identity([photo(3), photo(4)])
    assert pipeline.analysed == 2
    again, _ = pipeline.identity([photo(3), photo(4)])  # e.g. only the seed changed downstream
    assert pipeline.analysed == 2 and torch.equal(first.tokens, again.tokens)
    pipeline.identity([photo(4), photo(3), photo(5)])  # reordered plus one new photo
    assert pipeline.analysed == 3


def test_failures_error_or_skip(parts):
    _, hl, clip, faces = parts
    pipeline = IdentityPipeline(hl, faces, clip)
    images = [photo(6), photo(7, face=False)]
    with pytest.raises(FaceNotFoundError, match="photo 2: no face") as raised:
        pipeline.identity(images)
    assert "set on_failure: skip" in str(raised.value)
    identity, cond = pipeline.identity(images, on_failure="skip")
    assert cond.used == [0] and list(cond.skipped) == [1] and "no face" in cond.skipped[1]
    assert identity.meta["images_skipped"] == "1"
    with pytest.raises(ConditionError, match="no usable face in any of the 1 photo"):
        pipeline.identity([photo(8, face=False)], on_failure="skip")


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_single_faceless_photo_gets_advice_for_the_mode_that_is_set(parts, mode):
    """The message numbers photos from 1 and never tells a user in skip mode to skip (issue 16, point 8)."""
    _, hl, clip, faces = parts
    with pytest.raises((FaceNotFoundError, ConditionError)) as raised:
        IdentityPipeline(hl, faces, clip).identity([photo(8, face=False)], on_failure=mode)
    message = str(raised.value)
    assert "photo 1" in message and "image 0" not in message, message
    assert "skip failed" not in message and "leave this image out" not in message, message
    assert "set on_failure: skip" not in message, message  # one photo: skipping it leaves nothing
    if mode == "skip":
        assert "on_failure: skip left none to use" in message, message


def test_options_are_checked():
    with pytest.raises(ValueError, match="face_index must be >= 0"):
        CropOptions(face_index=-1)


def test_astronaut_through_crop_preprocess_and_clip(parts):
    skimage = pytest.importorskip("skimage")
    _, _, clip, _ = parts
    image = skimage.data.astronaut()
    crop = clip_crop(image, astronaut_landmarks(), remove_background=True, grayscale=False)
    pixels = preprocess([crop])
    tokens = clip.encode(pixels)
    assert pixels.shape == (1, 3, 224, 224) and tokens.shape == (1, 257, TINY_CLIP_WIDTH)
    assert bool(torch.isfinite(tokens).all())


def test_generate_cli_writes_a_loadable_lora(parts, antelope, tiny_clip_folder, tmp_path, capsys):
    ckpt = parts[0]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(photo(10 + i)).save(paths[-1])
    Image.fromarray(photo(12, face=False)).save(tmp_path / "dark.png")
    args = ["generate", "--checkpoint", str(ckpt), "--clip", str(tiny_clip_folder), "--insightface", str(antelope),
            "--out", str(tmp_path / "me.safetensors"), "--identity", str(tmp_path / "me.id.safetensors"),
            "--provider", "cpu", "--unet", "16,32,24", "--image"]
    assert main(args + [str(p) for p in paths]) == 0
    lora = load_file(str(tmp_path / "me.safetensors"))
    assert len(lora) == 3 * 560 and lora[next(iter(lora))].dtype == torch.float16
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
    assert Identity.load(tmp_path / "me.id.safetensors").tokens.shape == (1120, 16)
    assert "photo 2: ok" in capsys.readouterr().out
    assert main(args + [str(paths[0]), str(tmp_path / "dark.png")]) == 1
    assert "photo 2" in capsys.readouterr().err
