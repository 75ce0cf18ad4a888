"""Host tier, over the real server: what a new user hit in the first hour (issue 16).

The model folders as users lay them out (the official nodes' hyper_lora/hyper_lora/, symlinks to shared disks),
dropdown values checked when the prompt is queued, docs/api.md's queue() on a partly invalid graph, the saved
path on the save nodes, and the server-side trigger-word warning for API prompts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from comfy_server import show
from graphs import Graph, apply, conditioning, decode_and_save, identity, sample, tiny_model

ROOT = Path(__file__).resolve().parents[2]
NO_TRIGGER_WARNING = "no text encoder in it was given the trigger words"
CANNOT_CHECK = "could not be checked"


def options(server, node: str, name: str) -> list[str]:
    info = server.server.get_json(f"/object_info/{node}")[node]["input"]
    spec = {**info["required"], **info.get("optional", {})}[name]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def preview_identity(g: Graph, ident: list, node_id: str = "crops") -> str:
    return g.add(node_id, "PreviewImage", images=[ident[0], 1])


@pytest.fixture()
def shared_disk(server):
    """A 'shared disk' outside ComfyUI's root, linked in as users do: models/hyper_lora/hyper_lora -> it (the
    official nodes' layout, two checkpoints inside) and models/insightface/models/linked -> an antelopev2 copy.
    The links go again afterwards, so the other tests see the usual folders."""
    disk = server.root.parent / f"{server.root.name}_shared_disk"
    hyper = server.models / "hyper_lora"
    for name in ("ckpt_a", "ckpt_b"):
        shutil.copytree(hyper / "tiny_a", disk / "hyper_lora" / name)
    shutil.copytree(server.models / "insightface" / "models" / "antelopev2", disk / "antelopev2")
    links = [hyper / "hyper_lora", server.models / "insightface" / "models" / "linked"]
    links[0].symlink_to(disk / "hyper_lora", target_is_directory=True)
    links[1].symlink_to(disk / "antelopev2", target_is_directory=True)
    try:
        yield disk
    finally:
        for link in links:
            link.unlink()
        shutil.rmtree(disk)


def test_authors_layout_lists_only_checkpoints(server, shared_disk):
    """Point 1: hyper_lora/hyper_lora/<ckpt> lists each checkpoint, never the folder that holds them."""
    listed = options(server, "LoadHyperLoRA", "checkpoint")
    show(f"\ncheckpoint dropdown with the authors' layout: {listed}")
    assert {"hyper_lora/ckpt_a", "hyper_lora/ckpt_b"} <= set(listed), listed
    assert "hyper_lora" not in listed, listed


def test_symlinked_model_folders_are_listed_and_run(server, shared_disk):
    """Point 2: a checkpoint and a face analyzer reached through symlinks load and predict."""
    assert "models/linked" in options(server, "LoadHyperLoRA", "face_analyzer")
    g = Graph()
    hl, ident = identity(g, checkpoint="hyper_lora/ckpt_b", tag="_linked", image_seed=7)
    g.nodes["load_linked"]["inputs"]["face_analyzer"] = "models/linked"
    preview_identity(g, ident, "crops_linked")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    assert {"load_linked", "from_image_linked"} <= set(run.executed), run.executed


def test_identity_files_in_a_symlinked_folder_load(server, tmp_path):
    """Point 2 for identities: a subfolder of models/hyper_lora/identities linked to a shared disk."""
    g = Graph()
    hl, ident = identity(g, tag="_to_share", image_seed=9)
    g.add("save_to_share", "SaveHyperLoRAIdentity", identity=ident, filename_prefix="to_share", storage="fp16")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    saved = server.root / run.outputs("save_to_share")["saved_path"][0]  # a full path stays one
    disk = tmp_path / "shared_identities"
    disk.mkdir()
    saved.rename(disk / "me.safetensors")
    link = saved.parent / "shared"
    link.symlink_to(disk, target_is_directory=True)
    try:
        assert "shared/me.safetensors" in options(server, "LoadHyperLoRAIdentity", "identity")
        g = Graph()
        loaded = g.add("load_shared", "LoadHyperLoRAIdentity", identity="shared/me.safetensors")
        g.add("resave", "SaveHyperLoRAIdentity", identity=g.out(loaded), filename_prefix="from_shared", storage="fp16")
        run = server.server.run(g.prompt())
        assert run.status == "success", (run.error, run.response)
    finally:
        link.unlink()


def test_a_name_leading_out_of_the_folder_is_refused(server):
    """Point 2's guard stays: '..' and absolute names never reach the file system, even though they exist."""
    g = Graph()
    hl, ident = identity(g, checkpoint="../hyper_lora/tiny_a", tag="_dots")
    preview_identity(g, ident, "crops_dots")
    run = server.server.run(g.prompt())
    assert run.http_status == 400 and run.prompt_id is None, run.response
    assert "checkpoint '../hyper_lora/tiny_a' is not installed" in str(run.response["node_errors"]["load_dots"])


def test_an_unknown_checkpoint_is_refused_when_queued_with_the_choices(server):
    """Point 5: the template's default checkpoint, absent here, fails at queue time and lists what there is."""
    g = Graph()
    model = tiny_model(g)
    hl, ident = identity(g, checkpoint="sdxl_hyper_id_lora_v1_fidelity")
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, model, hl, ident), positive, negative), "unknown_ckpt")
    run = server.server.run(g.prompt())
    show(f"\nunknown checkpoint: HTTP {run.http_status}: {run.response.get('node_errors', {}).get('load')}")
    assert run.http_status == 400 and run.prompt_id is None, run.response  # nothing ran
    errors = run.response["node_errors"]["load"]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"}, errors
    details = " ".join(e["details"] for e in errors)
    assert "checkpoint 'sdxl_hyper_id_lora_v1_fidelity' is not installed" in details, details
    assert "tiny_a" in details and "tiny_b" in details, details  # the ones that are
    assert "Pick one in the HyperLoRA node's checkpoint list" in details, details


def test_an_unknown_identity_file_is_refused_when_queued(server):
    g = Graph()
    ident = g.add("load_identity", "LoadHyperLoRAIdentity", identity="nobody.safetensors")
    model = tiny_model(g)
    hl = g.add("load", "LoadHyperLoRA", checkpoint="tiny_a", face_analyzer="models/antelopev2", provider="cpu",
               dtype="fp32")
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, model, g.out(hl), g.out(ident)), positive, negative), "unknown_identity")
    run = server.server.run(g.prompt())
    assert run.http_status == 400, run.response
    details = " ".join(e["details"] for e in run.response["node_errors"]["load_identity"]["errors"])
    assert "identity 'nobody.safetensors' is not installed" in details, details


def test_no_checkpoint_at_all_says_where_to_put_one(comfy, tmp_path, monkeypatch):
    """Point 5, empty folders: the message says there is none and where the folder goes."""
    import folder_paths

    from helpers import pack_module

    folders = pack_module("nodes.folders")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "hyper_lora", ([str(tmp_path)], set()))
    message = folders.check_checkpoint("sdxl_hyper_id_lora_v1_fidelity")
    assert "there is none yet" in message and str(tmp_path) in message and "press R" in message, message
    (tmp_path / "hyper_lora" / "hyper_lora").mkdir(parents=True)  # the authors' layout, still without a checkpoint
    (tmp_path / "hyper_lora" / "hyper_lora" / "x").mkdir()
    assert folders.checkpoints() == []
    (tmp_path / "outside").mkdir()
    assert folders._find_dir("hyper_lora", "hyper_lora") == tmp_path / "hyper_lora"
    for name in ("../" + tmp_path.name, str(tmp_path / "outside"), "hyper_lora/../outside", "C:/outside", "a\0b"):
        assert folders._find_dir("hyper_lora", name) is None, name


# -- docs/api.md ---------------------------------------------------------------------------------------------------
def api_helpers(server) -> dict:
    helpers: dict = {}
    block = (ROOT / "docs" / "api.md").read_text().split("```python\n")[1].split("```")[0]
    exec(block, helpers)  # our own documentation, as written
    helpers["SERVER"] = server.server.url
    return helpers


def test_docs_queue_refuses_a_graph_with_node_errors(server):
    """Point 3: id_strength 50 invalidates the portrait branch only; ComfyUI answers 200 and would run the face-crop
    preview alone. The recipe's queue() must raise, naming the node and the input."""
    g = Graph()
    model = tiny_model(g)
    hl, ident = identity(g, tag="_api")
    preview_identity(g, ident, "crops_api")
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, model, hl, ident, strength=50.0), positive, negative), "api_partial")
    trap = server.server.run(g.prompt())
    show(f"\npartly invalid graph: HTTP {trap.http_status}, node_errors for {sorted(trap.response['node_errors'])}, "
         f"run {trap.status}, outputs {sorted(trap.history.get('outputs', {}))}")
    assert trap.http_status == 200 and trap.response["node_errors"] and "save" not in trap.history["outputs"]
    with pytest.raises(RuntimeError, match="did not accept the whole graph") as raised:
        api_helpers(server)["queue"](g.prompt())
    assert "id_strength" in str(raised.value) and "apply" in str(raised.value), raised.value


# -- point 9: saves say where they wrote ---------------------------------------------------------------------------
def test_saves_report_the_path_they_wrote(server):
    g = Graph()
    hl, ident = identity(g, tag="_save")
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix="first_hour/me")
    g.add("save_identity", "SaveHyperLoRAIdentity", identity=ident, filename_prefix="first_hour_me", storage="fp16")
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    lora = run.outputs("save_lora")["saved_path"][0]
    ident_path = run.outputs("save_identity")["saved_path"][0]
    show(f"\nsaved: {lora}, {ident_path}")
    assert lora.startswith("models/loras/first_hour/me_") and lora.endswith(".safetensors"), lora
    # identities go to the first identities folder (models/hyper_lora/identities), shown relative to ComfyUI's root
    assert (server.root / ident_path).parent == server.identity_folders[0], ident_path
    assert Path(ident_path).name.startswith("first_hour_me_"), ident_path
    assert (server.root / lora).is_file() and (server.root / ident_path).is_file()


# -- point 13: API users get the trigger-word warning ----------------------------------------------------------------
def warnings_after(server, prompt: dict) -> list[str]:
    """The server log lines this prompt's queueing added about the trigger words."""
    before = len(server.server.log_text().splitlines())
    run = server.server.run(prompt)
    assert run.http_status == 200, run.response
    new = server.server.log_text().splitlines()[before:]
    return [line for line in new if NO_TRIGGER_WARNING in line or CANNOT_CHECK in line]


def generation_with(text: str | list, *, hooks: bool = False) -> dict:
    g = Graph()
    model = tiny_model(g)
    hl, ident = identity(g)
    model = apply(g, model, hl, ident)
    positive, negative = conditioning(g)
    g.nodes["positive"]["inputs"]["text"] = text
    decode_and_save(g, sample(g, model, positive, negative), "trigger_check")
    return g.prompt()


def test_api_prompt_without_trigger_words_logs_one_warning(server):
    lines = warnings_after(server, generation_with("a portrait photo of a person"))
    show(f"\nno trigger words: {lines}")
    assert len(lines) == 1 and NO_TRIGGER_WARNING in lines[0] and "ApplyHyperLoRA" in lines[0], lines


def test_api_prompt_with_trigger_words_logs_nothing(server):
    assert warnings_after(server, generation_with("fcsks fxhks fhyks, a portrait photo")) == []


def test_api_prompt_whose_text_comes_from_a_node_says_it_cannot_check(server):
    lines = warnings_after(server, generation_with(["apply", 1]))  # Apply HyperLoRA's trigger_words output
    show(f"\nlinked prompt text: {lines}")
    assert len(lines) == 1 and CANNOT_CHECK in lines[0] and "positive" in lines[0], lines


# -- packaging: every module of nodes/ imports in the real ComfyUI (tests/test_packaging.py checks the imports) -------
@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "nodes").glob("*.py") if p.stem != "__init__"))
def test_each_nodes_module_imports_in_comfyui(comfy, module):
    from helpers import pack_module

    assert pack_module(f"nodes.{module}").__name__.endswith(f".nodes.{module}")
