"""Host tier over the real server: the test pack alone, /object_info and the docs pages of every node."""

from __future__ import annotations

import json
import shutil

import pytest
from graphs import Graph, conditioning, decode_and_save, sample, saved_image, tiny_model

# issue 4's contract: node id -> input names (public API)
CONTRACT = {
    "LoadHyperLoRA": ["checkpoint", "face_analyzer", "provider", "dtype", "clip_vision", "keep_networks"],
    "HyperLoRAFromImage": ["hyper_lora", "image", "remove_background", "grayscale", "face_index", "on_failure",
                           "crop", "crop_scale_LRTB", "safe_crop"],
    "ApplyHyperLoRA": ["model", "hyper_lora", "identity", "id_strength", "base_strength"],
    "ConceptSlider": ["hyper_lora", "mode", "strength", "start_image", "end_image", "start_identity",
                      "end_identity", "model"],
    "HyperLoRAToLoRA": ["hyper_lora", "identity", "kind"],
    "SaveHyperLoRA": ["hyper_lora", "identity", "filename_prefix", "model"],
    "SaveHyperLoRAIdentity": ["identity", "filename_prefix", "storage"],
    "LoadHyperLoRAIdentity": ["identity"],
    "HyperLoRAHook": ["hyper_lora", "identity", "strength", "start_percent", "end_percent"],
    "HyperLoRARefine": ["model", "vae", "positive", "hyper_lora", "identity", "image", "mode", "steps", "lr", "rank",
                        "seed", "batch_size", "resolution", "precision", "gradient_checkpointing", "id_strength",
                        "lidb", "lidb_a", "lidb_b"],
    "SaveLiDB": ["lidb", "filename_prefix", "storage"],
    "LoadLiDB": ["lidb"],
    "LoadHyperDreamBooth": ["hdb"],
    "HyperDreamBoothFromImage": ["hdb", "image", "face_analyzer", "provider", "remove_background", "face_index",
                                 "on_failure"],
}


def combo_options(spec: list) -> list:
    """A combo's values in /object_info: V1 ``[[values], {...}]`` or V3 ``["COMBO", {"options": [values]}]``."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_the_test_pack_generates(server):
    """HLTestTinySDXL + tiny CLIP -> KSampler -> VAEDecode -> SaveImage: the harness itself works."""
    g = Graph()
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, tiny_model(g), positive, negative), "pack_only")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    image = saved_image(server, run)
    assert image.shape == (64, 64, 3) and image.std() > 5  # a real picture, not a flat or clipped one


@pytest.fixture(scope="module")
def object_info(server):
    return server.server.get_json("/object_info")


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_object_info_lists_the_node_with_tooltips(object_info, node_id):
    assert node_id in object_info, f"{node_id} missing from /object_info"
    info = object_info[node_id]
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    assert sorted(inputs) == sorted(CONTRACT[node_id])
    untipped = [name for name, spec in inputs.items() if len(spec) < 2 or not spec[1].get("tooltip")]
    assert not untipped, f"{node_id}: inputs without a tooltip: {untipped}"
    assert info["python_module"].startswith("custom_nodes.ComfyUI-HyperLoRA"), info["python_module"]


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_docs_page_is_served(server, node_id):
    status, body = server.server.get(f"/extensions/ComfyUI-HyperLoRA/docs/{node_id}.md")
    assert status == 200, f"docs/{node_id}.md: HTTP {status}"
    assert len(body.strip()) > 100 and node_id.encode() in body or b"#" in body


def test_combo_lists_come_from_the_model_folders(object_info):
    required = object_info["LoadHyperLoRA"]["input"]["required"]
    checkpoints, analyzers = combo_options(required["checkpoint"]), combo_options(required["face_analyzer"])
    assert {"tiny_a", "tiny_b", "tiny_corrupt"} <= set(checkpoints), checkpoints
    assert "clip_vit" not in checkpoints
    assert analyzers == ["models/antelopev2"], json.dumps(analyzers)


def test_a_checkpoint_added_while_running_is_listed(server):
    """The dropdown is read from the folders on every /object_info: a new folder shows after a page refresh."""
    shutil.copytree(server.models / "hyper_lora" / "tiny_a", server.models / "hyper_lora" / "tiny_new")
    info = server.server.get_json("/object_info/LoadHyperLoRA")["LoadHyperLoRA"]
    assert "tiny_new" in combo_options(info["input"]["required"]["checkpoint"])
