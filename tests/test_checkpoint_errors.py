"""Every corrupt input gets its own error class and a message naming the file, the key and the values."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hyperlora_core as hc
from hyperlora_core.synthetic import TINY_UNET


@pytest.fixture()
def ckpt(tiny_factory, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_factory(), folder)
    return folder


def rewrite(path, edit):
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def load(folder):
    return hc.load_hyperlora(folder, unet=TINY_UNET)


def expect(exc_type, folder, *fragments):
    with pytest.raises(exc_type) as info:
        load(folder)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in: {text}"
    return info.value


def test_missing_folder(tmp_path):
    err = expect(hc.CheckpointFileMissing, tmp_path / "nope", "does not exist", "hyper_lora_modules.json")
    assert isinstance(err, FileNotFoundError)


@pytest.mark.parametrize("name,role", [("resampler.safetensors", "resampler"),
                                       ("hyper_lora_modules.safetensors", "LoRA basis"),
                                       ("id_projector.safetensors", "ID projector"),
                                       ("hyper_lora_modules.json", "hyper_lora_modules.json")])
def test_missing_file(ckpt, name, role):
    (ckpt / name).unlink()
    expect(hc.CheckpointFileMissing, ckpt, role, name)


def test_lfs_pointer(ckpt):
    (ckpt / "resampler.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 150000000\n")
    err = expect(hc.LFSPointerError, ckpt, "resampler", "git-LFS pointer", "resampler.safetensors")
    assert isinstance(err, ValueError)


def test_truncated_file(ckpt):
    path = ckpt / "hyper_lora_modules.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    expect(hc.TruncatedFileError, ckpt, "LoRA basis", "is truncated", "only", "download it again")


def test_oversized_header(ckpt):
    path = ckpt / "resampler.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    expect(hc.TruncatedFileError, ckpt, "resampler", "declares a 1099511627776-byte header", "limit")


def test_header_longer_than_file(ckpt):
    (ckpt / "id_projector.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    expect(hc.TruncatedFileError, ckpt, "ID projector", "header needs 5008 bytes but the file has 10")


def test_stray_bytes(ckpt):
    path = ckpt / "resampler.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    expect(hc.CheckpointFormatError, ckpt, "64 stray bytes")


@pytest.mark.parametrize("payload,fragment", [(b"<!DOCTYPE html><html>404</html>", "web page"),
                                              (b"PK\x03\x04pickled-zip", "pickle")])
def test_not_safetensors(ckpt, payload, fragment):
    (ckpt / "resampler.safetensors").write_bytes(payload + b"\0" * 64)
    expect(hc.NotSafetensorsError, ckpt, fragment, "resampler.safetensors")


def test_wrong_shape_key(ckpt):
    rewrite(ckpt / "resampler.safetensors", lambda t: t.__setitem__("layers.1.norm_ff.bias", torch.zeros(31)))
    expect(hc.ShapeMismatchError, ckpt, "'layers.1.norm_ff.bias'", "shape [31]", "expected [32]")


def test_wrong_shape_basis(ckpt):
    rewrite(ckpt / "hyper_lora_modules.safetensors",
            lambda t: t.__setitem__("7.to_v.id_up_basis", torch.zeros(16, 4, 17)))
    expect(hc.ShapeMismatchError, ckpt, "LoRA basis", "'7.to_v.id_up_basis'", "[16, 4, 17]", "[16, 4, 16]")


def test_missing_key(ckpt):
    rewrite(ckpt / "resampler.safetensors", lambda t: t.pop("layers.1.ff.net.2.bias"))
    expect(hc.MissingKeyError, ckpt, "resampler", "'layers.1.ff.net.2.bias'", "expected shape [32]")


def test_unexpected_key(ckpt):
    rewrite(ckpt / "resampler.safetensors", lambda t: t.__setitem__("layers.0.attn1.to_q.bias", torch.zeros(32)))
    expect(hc.UnexpectedKeyError, ckpt, "resampler", "'layers.0.attn1.to_q.bias'", "shape [32]")


def test_module_not_in_sdxl(ckpt):
    table = json.loads((ckpt / "hyper_lora_modules.json").read_text())
    first = next(iter(table))
    table = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1" if k == first else k: v
             for k, v in table.items()}
    (ckpt / "hyper_lora_modules.json").write_text(json.dumps(table))
    expect(hc.ModuleMismatchError, ckpt, "'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1'",
           "not an attention module")


def test_module_size_mismatch_names_the_module(ckpt):
    table = json.loads((ckpt / "hyper_lora_modules.json").read_text())
    name = list(table)[5]
    table[name]["hidden_size"] = 99
    (ckpt / "hyper_lora_modules.json").write_text(json.dumps(table))
    expect(hc.ModuleMismatchError, ckpt, repr(name), "hidden_size=99", "this module has hidden_size=16")


def test_sdxl_checkpoint_refused_for_other_widths(tiny_factory):
    """The tiny checkpoint is not SDXL-sized: the default SDXL check refuses it, naming the first module."""
    with pytest.raises(hc.ModuleMismatchError, match="down_blocks_1_attentions_0_transformer_blocks_0_attn1"):
        hc.load_hyperlora(tiny_factory())


def test_latents_disagree_with_module_count(ckpt):
    rewrite(ckpt / "resampler.safetensors", lambda t: t.__setitem__("latents", t["latents"][:, :-8].clone()))
    expect(hc.CheckpointFormatError, ckpt, "1112 latent tokens", "140 modules")


def test_nested_folder_is_accepted(tiny_factory, tmp_path):
    shutil.copytree(tiny_factory(), tmp_path / "outer" / "inner")
    assert load(tmp_path / "outer").checkpoint.folder.name == "inner"


def test_identity_refused_by_other_checkpoint(tiny_factory):
    from helpers import conditions

    a = load(tiny_factory(seed=0))
    b = load(tiny_factory(seed=1))
    clip, arc = conditions(1)
    identity = a.predict_identity(clip_tokens=clip, id_embeds=arc)
    with pytest.raises(hc.IdentityMismatchError, match="made by checkpoint"):
        b.identity_to_lora(identity)


def test_widths_from_the_module_list(tiny_factory, ckpt):
    """unet=None: widths come from the json; a host checks them against its model. Inconsistency is refused."""
    hl = hc.load_hyperlora(tiny_factory(), unet=None)
    assert hl.checkpoint.unet.level_widths == (16, 32) and hl.checkpoint.unet.context_dim == 24
    table = json.loads((ckpt / "hyper_lora_modules.json").read_text())
    name = list(table)[-1]
    table[name]["hidden_size"] = 48
    (ckpt / "hyper_lora_modules.json").write_text(json.dumps(table))
    with pytest.raises(hc.ModuleMismatchError, match=f"{name}.*hidden_size=48"):
        hc.load_hyperlora(ckpt, unet=None)
