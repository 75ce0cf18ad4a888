"""Host tier, in-process: Save LiDB / Load LiDB against ComfyUI's real folder_paths (the pack's ``lidb`` folder
pointed at a temporary directory): saves stay inside it whatever the prefix, loads rebuild the LoRA, and bad files
and names are refused with our errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_lidb import tiny_targets

from hyperlora_core.lidb import LiDB as CoreLiDB
from hyperlora_core.lora_io import lora_delta, lora_prefixes

from helpers import pack_module


@pytest.fixture()
def lidb_folder(comfy, tmp_path, monkeypatch):
    import folder_paths

    folders = pack_module("nodes.folders")
    folders.register()
    root = tmp_path / "models" / "lidb"
    root.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folders.LIDB, ([str(root)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return root


@pytest.fixture()
def weights(lidb_folder):
    """A LiDB of tiny layers as the pack's own class (written by the test's core, read by the pack's)."""
    g = torch.Generator().manual_seed(0)
    path = CoreLiDB(tiny_targets(), torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g) * 0.1,
                    seed=2).save(lidb_folder.parent / "source.safetensors", storage="fp32")
    return pack_module("hyperlora_core.lidb").LiDB.load(path)


def test_save_then_load_rebuilds_the_lora(lidb_folder, weights):
    nodes = pack_module("nodes.lidb")
    out = nodes.SaveLiDB.execute(weights, "people/anna", "fp32")
    name = out.result[0]
    assert name == "people/anna_00001_.safetensors" and (lidb_folder / name).is_file()
    assert out.ui["saved_path"][0].endswith("lidb/people/anna_00001_.safetensors")
    assert nodes.SaveLiDB.execute(weights, "people/anna", "int8").result[0] == "people/anna_00002_.safetensors"
    schema = nodes.LoadLiDB.define_schema()
    assert name in schema.inputs[0].options and all(i.tooltip for i in schema.inputs)
    assert nodes.LoadLiDB.validate_inputs(name) is True
    loaded, lora = nodes.LoadLiDB.execute(name).result
    assert torch.equal(loaded.a_train, weights.a_train) and loaded.targets == weights.targets
    want = weights.lora()
    assert lora_prefixes(lora) == [lin.key for lin in tiny_targets().linears]
    for p in lora_prefixes(want):
        torch.testing.assert_close(lora_delta(lora, p), lora_delta(want, p))
    # the file is an ordinary LiDB file: the standalone core reads it too
    assert CoreLiDB.load(lidb_folder / name).seed == 2


@pytest.mark.parametrize("prefix,words", [("../../escaped", "'..'"), ("/tmp/escaped", "absolute"),
                                          ("C:\\escaped", "drive"), ("a\x00b", "NUL")])
def test_save_stays_inside_the_folder(lidb_folder, weights, prefix, words):
    nodes = pack_module("nodes.lidb")
    with pytest.raises(ValueError, match=words) as refused:
        nodes.SaveLiDB.execute(weights, prefix, "fp16")
    assert type(refused.value).__name__ == "InputValueError" and "filename_prefix" in str(refused.value)
    assert not list(Path(lidb_folder).parents[1].rglob("escaped*"))


def test_save_of_an_empty_output_and_bad_files_are_named(lidb_folder):
    nodes = pack_module("nodes.lidb")
    with pytest.raises(ValueError, match="mode lidb"):
        nodes.SaveLiDB.execute(None, "x", "fp16")
    message = nodes.LoadLiDB.validate_inputs("nobody.safetensors")
    assert isinstance(message, str) and "Save LiDB" in message
    (lidb_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    pack_module("hyperlora_core.identity").Identity(torch.ones(8, 4) / 2, ("m",), "f").save(
        lidb_folder / "identity.safetensors")
    with pytest.raises(ValueError, match="truncated|damaged|stray") as broken:
        nodes.LoadLiDB.execute("broken.safetensors")
    assert "broken.safetensors" in str(broken.value)
    with pytest.raises(ValueError, match="not a LiDB file") as foreign:
        nodes.LoadLiDB.execute("identity.safetensors")
    assert type(foreign.value).__name__ == "LidbFormatError"


def test_load_reuses_the_aux_matrices_and_can_be_cancelled(lidb_folder, weights, monkeypatch):
    """A second Load LiDB of the same layout generates nothing (the bar fills at once) and gives the same LoRA;
    cancelling the run during the generation stops it and keeps nothing half-made."""
    import comfy.model_management as mm
    import comfy.utils

    nodes, core = pack_module("nodes.lidb"), pack_module("hyperlora_core.lidb")
    cache = pack_module("hyperlora_core.lidb_aux").AuxCache()
    monkeypatch.setattr(core, "AUX_CACHE", cache)
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total)))
    name = nodes.SaveLiDB.execute(weights, "anna", "fp32").result[0]
    monkeypatch.setattr(mm, "interrupt_processing", True)  # the Cancel button (put back after the test)
    with pytest.raises(mm.InterruptProcessingException):
        nodes.LoadLiDB.execute(name)
    assert len(cache) == 0 and seen == []
    _, first = nodes.LoadLiDB.execute(name).result
    assert seen == [(j + 1, 8) for j in range(8)] and len(cache) == 1
    seen.clear()
    _, second = nodes.LoadLiDB.execute(name).result
    assert seen == [(8, 8)]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
