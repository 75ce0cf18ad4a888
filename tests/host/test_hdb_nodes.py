"""Host tier, in-process: Load HyperDreamBooth and HyperDreamBooth Identity from Image against ComfyUI's real
folder_paths and model management, on a tiny random HyperDreamBooth file written by the core's own ``save_hdb`` and
the antelopev2 doubles (insightface on onnxruntime). The node's LoRA must equal ``predict_lidb(...).lora()`` computed
here from the core, and two different photos must give two different LoRAs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_hdb
from test_lidb import tiny_targets

from hyperlora_core.clip import preprocess
from hyperlora_core.crops import clip_crop
from hyperlora_core.face import FaceAnalyzer
from hyperlora_core.hdb.checkpoint import load_hdb, predict_lidb
from hyperlora_core.lora_io import lora_delta, lora_prefixes

from face_doubles import centred_box, paint_face, write_antelopev2
from helpers import pack_module


@pytest.fixture()
def hdb_setup(comfy, tmp_path, monkeypatch):
    import folder_paths

    folders = pack_module("nodes.folders")
    folders.register()
    hdb_root, face_root = tmp_path / "models" / "hyperdreambooth", tmp_path / "models" / "insightface"
    hdb_root.mkdir(parents=True)
    write_antelopev2(face_root / "models" / "antelopev2")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folders.HDB, ([str(hdb_root)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folders.INSIGHTFACE, ([str(face_root)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    write_tiny_hdb(hdb_root / "tiny.safetensors", tiny_targets())
    return hdb_root, face_root / "models" / "antelopev2"


def photo(seed: int) -> np.ndarray:
    return paint_face(np.zeros((640, 640, 3), np.uint8), centred_box(320, 320, 150), seed=seed)


def direct_lora(path, antelope, image: np.ndarray) -> dict:
    """The core alone: face analysis, the HyperLoRA Face crop, CLIP preprocessing, predict_lidb, .lora()."""
    net, seed = load_hdb(path)
    result = FaceAnalyzer(antelope, providers="cpu").analyze(image, embed=False)
    crop = clip_crop(image, result.face.landmark_106, remove_background=True, grayscale=False)
    return predict_lidb(net, preprocess([crop], size=net.image_size), seed=seed).lora()


def run_nodes(image: np.ndarray, **options):
    nodes = pack_module("nodes.hyperdreambooth")
    (hdb,) = nodes.LoadHyperDreamBooth.execute("tiny.safetensors").result
    batch = torch.from_numpy(image).float()[None] / 255.0
    args = dict(face_analyzer="models/antelopev2", provider="cpu", remove_background=True, face_index=-1,
                on_failure="error") | options
    return nodes.HyperDreamBoothFromImage.execute(hdb, batch, **args).result


def test_identity_from_image_equals_the_core_and_follows_the_photo(hdb_setup):
    hdb_root, antelope = hdb_setup
    nodes = pack_module("nodes.hyperdreambooth")
    for schema in (nodes.LoadHyperDreamBooth.define_schema(), nodes.HyperDreamBoothFromImage.define_schema()):
        assert all(i.tooltip for i in schema.inputs)
    assert nodes.LoadHyperDreamBooth.validate_inputs("tiny.safetensors") is True
    assert nodes.HyperDreamBoothFromImage.validate_inputs("models/antelopev2") is True
    loras = []
    for seed in (0, 1):
        lidb, lora, crops = run_nodes(photo(seed))
        want = direct_lora(hdb_root / "tiny.safetensors", antelope, photo(seed))
        assert lora_prefixes(lora) == lora_prefixes(want) == [lin.key for lin in tiny_targets().linears]
        for p in lora_prefixes(want):
            torch.testing.assert_close(lora_delta(lora, p), lora_delta(want, p), rtol=1e-5, atol=1e-6)
        assert lidb.seed == 5 and crops.shape == (1, 224, 224, 3)
        loras.append(lora)
    gaps = [float((lora_delta(loras[0], p) - lora_delta(loras[1], p)).abs().max()) for p in lora_prefixes(loras[0])]
    print(f"largest LoRA-delta difference between the two photos: {max(gaps):.3e}")  # noqa: T201 - shown with -s
    assert max(gaps) > 1e-4


def test_no_face_and_bad_files_are_named(hdb_setup):
    hdb_root, _ = hdb_setup
    nodes = pack_module("nodes.hyperdreambooth")
    with pytest.raises(ValueError, match="photo 1") as no_face:
        run_nodes(np.zeros((640, 640, 3), np.uint8))
    assert type(no_face.value).__name__ == "FaceNotFoundError"
    two = paint_face(photo(0), centred_box(120, 120, 150), seed=2)
    with pytest.raises(ValueError, match="photo 1") as several:
        run_nodes(two, face_index=5)
    assert type(several.value).__name__ == "FaceNotFoundError"
    message = nodes.LoadHyperDreamBooth.validate_inputs("nobody.safetensors")
    assert isinstance(message, str) and "Load HyperDreamBooth" in message and "tiny.safetensors" in message
    (hdb_root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    lidb_like = (hdb_root / "tiny.safetensors").read_bytes()
    (hdb_root / "short.safetensors").write_bytes(lidb_like[: len(lidb_like) // 2])
    pack_module("hyperlora_core.identity").Identity(torch.ones(8, 4) / 2, ("m",), "f").save(
        hdb_root / "identity.safetensors")
    for name, words in (("broken.safetensors", "truncated|damaged|stray"), ("short.safetensors", "truncated"),
                        ("identity.safetensors", "not a HyperDreamBooth checkpoint")):
        with pytest.raises(ValueError, match=words) as refused:
            nodes.LoadHyperDreamBooth.execute(name)
        assert name in str(refused.value)


def test_the_lora_patches_every_layer_of_the_tiny_sdxl(hdb_setup, comfy, tiny_sdxl, caplog):
    """A network for the tiny SDXL's 560 linears: its LORA_MODEL loads fully in ComfyUI's LoRA path, as Load LoRA
    Model (comfy_extras' LoraModelLoader) loads it, and changes the weights."""
    import logging

    from conftest import HOST_UNET

    from hyperlora_core.targets import sdxl_target_layers

    hdb_root, _ = hdb_setup
    write_tiny_hdb(hdb_root / "tiny.safetensors", sdxl_target_layers(HOST_UNET))
    _, lora, _ = run_nodes(photo(0))
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(tiny_sdxl, None, lora, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == 560 == len(lora_prefixes(lora))
    target = "diffusion_model.output_blocks.2.1.transformer_blocks.7.attn2.to_k.weight"
    before = tiny_sdxl.model.state_dict()[target].clone()
    patched.patch_model()
    try:
        moved = float((patched.model.state_dict()[target] - before).abs().max())
    finally:
        patched.unpatch_model()
    assert moved > 0


def test_a_batch_is_refused_and_skipped_as_hyperlora_face_does(hdb_setup):
    """The photos go through the pipeline's usable_faces, as HyperLoRA Face's do: a photo without a face stops the
    run naming it (with the way to skip it), on_failure skip leaves it out, and nothing usable at all is refused."""
    nodes = pack_module("nodes.hyperdreambooth")
    (hdb,) = nodes.LoadHyperDreamBooth.execute("tiny.safetensors").result
    batch = torch.from_numpy(np.stack([photo(0), np.zeros((640, 640, 3), np.uint8)])).float() / 255.0
    args = dict(face_analyzer="models/antelopev2", provider="cpu", remove_background=True, face_index=-1)
    with pytest.raises(ValueError, match=r"photo 2.*set on_failure: skip") as stopped:
        nodes.HyperDreamBoothFromImage.execute(hdb, batch, on_failure="error", **args)
    assert type(stopped.value).__name__ == "FaceNotFoundError"
    _, _, crops = nodes.HyperDreamBoothFromImage.execute(hdb, batch, on_failure="skip", **args).result
    assert crops.shape[0] == 1
    with pytest.raises(ValueError, match=r"no usable face in any of the 2 photo\(s\).*photo 1: .*; photo 2: "):
        nodes.HyperDreamBoothFromImage.execute(hdb, batch[[1, 1]], on_failure="skip", **args)
    with pytest.raises(ValueError, match="the image batch is empty"):
        nodes.HyperDreamBoothFromImage.execute(hdb, batch[:0], on_failure="error", **args)
