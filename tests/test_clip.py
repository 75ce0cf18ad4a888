"""CLIP path against transformers on the same random weights: tokens, preprocessing, layouts and errors.

transformers is the reference here only (test-time); hyperlora_core.clip never imports it.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import hyperlora_core as hc
from hyperlora_core import clip
from hyperlora_core.clip import ClipEncoder, ClipVisionEncoder, encode_crops, preprocess

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # acceptance bound, fp32
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=224,
            patch_size=14, hidden_act="quick_gelu", projection_dim=8)
log = logging.getLogger(__name__)


def reference_processor():
    """The PIL CLIPImageProcessor (named CLIPImageProcessorPil from transformers 5; the default before)."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, LayerNorms included (their init of 1/0 would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny CLIPVisionModel with random weights, saved by transformers; returns (folder, model)."""
    torch.manual_seed(0)
    model = perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)), seed=1)
    folder = tmp_path_factory.mktemp("hf_vision")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def hidden(reference, pixels):
    with torch.no_grad():
        return reference[1](pixel_values=pixels, output_hidden_states=True).hidden_states


def tower_state(model) -> dict[str, torch.Tensor]:
    """The vision tower's weights under HF names without prefix (transformers 5's CLIPVisionModel is the tower)."""
    tower = getattr(model, "vision_model", model)
    return {k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}


def to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent HF -> open_clip renaming, written from the two modules' definitions."""
    out = {"class_embedding": hf["embeddings.class_embedding"], "conv1.weight": hf["embeddings.patch_embedding.weight"],
           "positional_embedding": hf["embeddings.position_embedding.weight"]}
    plain = {"pre_layrnorm": "ln_pre", "post_layernorm": "ln_post", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj",
             "encoder.layers": "transformer.resblocks"}
    for key, value in hf.items():
        if key.startswith("embeddings.") or "_proj." in key and "out_proj" not in key:
            continue
        for old, new in plain.items():
            key = key.replace(old, new)
        out[key] = value
    for i in range(TINY["num_hidden_layers"]):
        for kind in ("weight", "bias"):
            parts = [hf[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    out["proj"] = torch.randn(TINY["hidden_size"], TINY["projection_dim"])
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- equivalence
def test_tokens_equal_hidden_states_minus_2(reference, pixels, hidden):
    enc = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="fp32")
    tokens = enc.encode(pixels)
    assert tokens.shape == (2, 257, TINY["hidden_size"]) and tokens.dtype == torch.float32
    diff = max_diff(tokens, hidden[-2])
    log.info("tokens vs hidden_states[-2]: max abs diff %.3g", diff)
    assert diff <= TOL


def test_equivalence_check_can_fail(reference, pixels, hidden):
    """The bound above is meaningful: the neighbouring layers, or q/k swapped in the file, miss it widely."""
    tokens = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="fp32").encode(pixels)
    assert max_diff(tokens, hidden[-1]) > 1e-3
    assert max_diff(tokens, hidden[-3]) > 1e-3


def test_swapped_q_k_is_caught(reference, pixels, hidden, tmp_path):
    state = tower_state(reference[1])
    q, k = "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.k_proj.weight"
    state[q], state[k] = state[k], state[q]
    shutil.copy(reference[0] / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    tokens = ClipVisionEncoder.from_folder(tmp_path, device="cpu", dtype="fp32").encode(pixels)
    assert max_diff(tokens, hidden[-2]) > 1e-3


def save_as(kind: str, model, folder) -> None:
    """Write the reference tower in one of the file layouts users have."""
    state, cfg = tower_state(model), transformers.CLIPVisionConfig(**TINY)
    if kind in ("CLIPVisionModelWithProjection", "CLIPModel"):
        if kind == "CLIPModel":
            text = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2)
            other = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=cfg.to_dict(),
                                                                   projection_dim=8))
        else:
            other = transformers.CLIPVisionModelWithProjection(cfg)
        other.vision_model.load_state_dict(state)
        other.save_pretrained(folder)
        return
    cfg.save_pretrained(folder)
    if kind == "v4 vision_model. prefix + position_ids":
        state = {f"vision_model.{k}": v for k, v in state.items()}
        state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    save_file(state, str(folder / "model.safetensors"))


LAYOUTS = ["CLIPVisionModelWithProjection", "CLIPModel", "v4 vision_model. prefix + position_ids", "bare keys"]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_hf_layouts(kind, reference, pixels, hidden, tmp_path):
    save_as(kind, reference[1], tmp_path)
    tokens = ClipVisionEncoder.from_folder(tmp_path, device="cpu", dtype=torch.float32).encode(pixels)
    assert max_diff(tokens, hidden[-2]) <= TOL


def write_open_clip(reference, folder, *, with_config: bool = True, prefix: str = "visual."):
    state = {prefix + k: v for k, v in to_open_clip(tower_state(reference[1])).items()}
    if prefix:  # a whole CLIP: the text tower sits beside the image tower and is ignored
        state.update({"token_embedding.weight": torch.randn(10, 16), "positional_embedding": torch.randn(77, 16),
                      "ln_final.weight": torch.ones(16), "text_projection": torch.randn(16, 8),
                      "logit_scale": torch.tensor(4.6)})
    path = folder / "open_clip_model.safetensors"
    save_file(state, str(path))
    if with_config:
        vision_cfg = {"image_size": 224, "layers": 3, "width": 32, "head_width": 8, "patch_size": 14}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
            "embed_dim": 8, "quick_gelu": True, "vision_cfg": vision_cfg}}))
    return path


@pytest.mark.parametrize("prefix", ["visual.", ""])
@pytest.mark.parametrize("as_file", [True, False])
def test_open_clip_checkpoint(prefix, as_file, reference, pixels, hidden, tmp_path):
    path = write_open_clip(reference, tmp_path, prefix=prefix)
    enc = ClipVisionEncoder.from_folder(path if as_file else tmp_path, device="cpu", dtype="fp32")
    assert enc.config.heads == 4 and enc.config.quick_gelu
    assert max_diff(enc.encode(pixels), hidden[-2]) <= TOL


@pytest.mark.parametrize("dtype,bound", [("fp16", 2e-2), ("bf16", 1.5e-1)])
def test_half_precision(dtype, bound, reference, pixels, hidden):
    enc = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype=dtype)
    assert enc.dtype == clip._DTYPES[dtype]
    tokens = enc.encode(pixels)
    assert tokens.dtype == torch.float32
    assert max_diff(tokens, hidden[-2]) <= bound


@pytest.mark.parametrize("kind", LAYOUTS)
def test_inspect_reads_headers_only(kind, reference, tmp_path):
    save_as(kind, reference[1], tmp_path)
    config, sf, layout, _ = clip.inspect_clip(tmp_path)
    assert layout == "hf" and sf.path.name == "model.safetensors"
    assert (config.width, config.layers, config.heads, config.mlp_dim, config.num_tokens) == (32, 3, 4, 37, 257)
    assert config.quick_gelu and config.patch_size == 14 and config.image_size == 224


def test_bad_dtype(reference):
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="int8")


def test_protocol_and_encode_crops(reference):
    enc = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="fp32")
    assert isinstance(enc, ClipEncoder)

    class Recorder:  # any object with encode() is a ClipEncoder, e.g. the ComfyUI clip_vision adapter
        def encode(self, pixels):
            self.seen = pixels
            return torch.zeros(pixels.shape[0], 257, 4)

    rec = Recorder()
    assert isinstance(rec, ClipEncoder)
    crops = [np.full((50, 60, 3), 128, np.uint8)] * 3
    assert encode_crops(rec, crops).shape == (3, 257, 4)
    assert torch.equal(rec.seen, preprocess(crops))


# ---------------------------------------------------------------------------------------------- preprocessing
def hf_pixels(images):
    return reference_processor()()(images=list(images), return_tensors="pt")["pixel_values"]


# (height, width): square, odd margins both ways (43 and 45 pixels), upscaling, already 224, a long strip
SHAPES = [(300, 300), (299, 250), (250, 299), (301, 250), (100, 100), (224, 224), (97, 403)]


@pytest.mark.parametrize("shape", SHAPES)
def test_preprocess_equals_clip_image_processor(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, theirs = preprocess([image]), hf_pixels([image])
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    diff = max_diff(ours, theirs)
    log.info("preprocess %s vs CLIPImageProcessor: max abs diff %.3g", shape, diff)
    assert diff == 0.0


def test_odd_margin_case_discriminates():
    """(299, 250) resizes to 267×224: a 43-pixel margin, where floor (HF) and round (torchvision) disagree."""
    margin = int(224 * 299 / 250) - 224
    assert margin == 43 and margin // 2 != round(margin / 2)


def test_torchvision_processor_within_one_level():
    """transformers 5's default (torchvision) CLIPImageProcessor differs from the PIL one by <= 1 uint8 level."""
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("transformers < 5: CLIPImageProcessor is the PIL one")
    import torchvision  # noqa: F401  (with it, transformers 5 uses the torchvision processor)
    image = np.random.default_rng(0).integers(0, 256, (301, 250, 3), dtype=np.uint8)
    theirs = transformers.CLIPImageProcessor()(images=[image], return_tensors="pt")["pixel_values"]
    assert max_diff(preprocess([image]), theirs) <= 1 / 255 / clip.OPENAI_STD.min() + 1e-6


def test_preprocess_batch_and_pil_input():
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, (s, s + 7, 3), dtype=np.uint8) for s in (120, 333))
    batch = preprocess([a, Image.fromarray(b)])
    assert torch.equal(batch, torch.cat([preprocess([a]), preprocess([b])]))


@pytest.mark.parametrize("bad,fragment", [(np.zeros((10, 10), np.uint8), "crop 1"),
                                          (np.zeros((10, 10, 3), np.float32), "uint8"),
                                          (np.zeros((10, 10, 4), np.uint8), "HxWx3"),
                                          (np.zeros((0, 10, 3), np.uint8), "empty")])
def test_preprocess_rejects(bad, fragment):
    with pytest.raises(hc.HyperLoRAError) as info:
        preprocess([np.zeros((5, 5, 3), np.uint8), bad])
    assert isinstance(info.value, ValueError) and fragment in str(info.value)
    with pytest.raises(ValueError, match="no crops"):
        preprocess([])


def test_real_photo_end_to_end(reference):
    """skimage's astronaut (512² photo) and a non-square crop of it: our path equals processor + CLIPVisionModel."""
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()
    crops = [photo, photo[30:281, 140:350]]  # the second is 251×210 with an odd margin
    pixels = preprocess(crops)
    assert max_diff(pixels, hf_pixels(crops)) == 0.0
    enc = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="fp32")
    tokens = encode_crops(enc, crops[:1])
    assert tokens.shape == (1, 257, TINY["hidden_size"]) and torch.isfinite(tokens).all()
    with torch.no_grad():
        ref = reference[1](pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert max_diff(enc.encode(pixels), ref) <= TOL


def test_encode_rejects_wrong_pixels(reference):
    enc = ClipVisionEncoder.from_folder(reference[0], device="cpu", dtype="fp32")
    with pytest.raises(hc.HyperLoRAError, match=r"\[b, 3, 224, 224\]"):
        enc.encode(torch.zeros(1, 3, 200, 200))


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture()
def folder(reference, tmp_path):
    target = tmp_path / "clip"
    shutil.copytree(reference[0], target)
    return target


def edit_tensors(path, edit):

    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def expect(exc_type, path, *fragments):
    with pytest.raises(exc_type) as info:
        ClipVisionEncoder.from_folder(path, device="cpu", dtype="fp32")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    return info.value


def test_missing_folder(tmp_path):
    err = expect(hc.CheckpointFileMissing, tmp_path / "nope", "does not exist", "clip-vit-large-patch14")
    assert isinstance(err, FileNotFoundError)


def test_single_custom_named_file(folder, pixels, hidden):
    (folder / "model.safetensors").rename(folder / "clip_vision_l.safetensors")
    tokens = ClipVisionEncoder.from_folder(folder, device="cpu", dtype="fp32").encode(pixels)
    assert max_diff(tokens, hidden[-2]) <= TOL


def test_ambiguous_folder(folder):
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    expect(hc.CheckpointFileMissing, folder, "a.safetensors, b.safetensors", "pass the .safetensors file")


def test_pickle_only_folder(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02junk")
    expect(hc.CheckpointFileMissing, tmp_path, "pytorch_model.bin", "only .safetensors")


def test_lfs_pointer(folder):
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    expect(hc.LFSPointerError, folder, "git-LFS", "model.safetensors")


def test_truncated(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect(hc.TruncatedFileError, folder, "truncated")


def test_not_clip(folder):
    save_file({"foo.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    expect(clip.ClipConfigError, folder, "no CLIP image tower", "foo.weight")


def test_missing_key(folder):
    edit_tensors(folder / "model.safetensors", lambda s: s.pop("encoder.layers.1.self_attn.v_proj.bias"))
    expect(hc.MissingKeyError, folder, "encoder.layers.1.self_attn.v_proj.bias", "[32]")


def test_wrong_shape(folder):
    def edit(state):
        state["encoder.layers.2.mlp.fc2.weight"] = torch.zeros(32, 36)

    edit_tensors(folder / "model.safetensors", edit)
    expect(hc.ShapeMismatchError, folder, "encoder.layers.2.mlp.fc2.weight", "[32, 36]", "[32, 37]")


def test_unexpected_key_in_tower(folder):
    edit_tensors(folder / "model.safetensors", lambda s: s.update({"encoder.layers.0.extra.weight": torch.zeros(1)}))
    expect(hc.UnexpectedKeyError, folder, "encoder.layers.0.extra.weight")


def test_config_disagrees_with_tensors(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    expect(hc.ShapeMismatchError, folder, "config.json", "width=64", "32")


def test_broken_config_json(folder):
    (folder / "config.json").write_text("{not json")
    expect(clip.ClipConfigError, folder, "config.json", "not valid JSON")


def test_no_config_unknown_heads(folder):
    (folder / "config.json").unlink()
    expect(clip.ClipConfigError, folder, "attention heads", "config.json")


def test_open_clip_without_config_unknown_heads(reference, tmp_path):
    path = write_open_clip(reference, tmp_path, with_config=False)
    expect(clip.ClipConfigError, path, "attention heads", "open_clip_config.json")


# ---------------------------------------------------------------------------------------------- opt-in full size
def test_full_size_vit_l14(tmp_path):
    """ViT-L/14 dims, random weights: [1, 257, 1024] equal to hidden_states[-2]."""
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel(cfg).eval()
    model.save_pretrained(tmp_path)
    del cfg
    (tmp_path / "config.json").unlink()  # the ComfyUI clip_vision case: one file, dims from the shapes
    pixels = preprocess([np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)])
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    del model
    enc = ClipVisionEncoder.from_folder(tmp_path / "model.safetensors", device="cpu", dtype="fp32")
    assert (enc.config.heads, enc.config.layers, enc.config.num_tokens) == (16, 24, 257)
    tokens = enc.encode(pixels)
    assert tokens.shape == (1, 257, 1024)
    log.info("ViT-L/14 tokens vs hidden_states[-2]: max abs diff %.3g", max_diff(tokens, ref))
    assert max_diff(tokens, ref) <= TOL


def test_missing_open_clip_is_explained(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    monkeypatch.setitem(sys.modules, "open_clip.transformer", None)
    with pytest.raises(hc.errors.DependencyMissing, match="pip install open_clip_torch"):
        ClipVisionEncoder.from_folder(reference[0], device="cpu")
