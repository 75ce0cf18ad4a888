"""Host tier: the example workflows (example_workflows/*.json, UI format) and their API twins (api/*.json).

- Every UI file is checked against the live server's /object_info: node types exist, links join an output to an
  input of the same type, widget values are in range and in their combo's options (model-file combos name files
  the user has: those are only checked to be strings), and a Note names the models and the trigger words.
- Every API twin describes the same graph as its UI file, and runs over /prompt to ``success`` on the tiny test
  models: the test swaps the loaders for the test pack's nodes (never in the files).

``pytest -s`` prints how many were validated and run. The files come from tests/host/workflow_builder.py.
"""

from __future__ import annotations

import copy
import json
import urllib.parse
from pathlib import Path

import pytest
from comfy_server import show
from graphs import ANALYZER
from workflow_builder import FRONTEND_ONLY, TRIGGER, UPLOAD, build

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
PACKAGE = "ComfyUI-HyperLoRA"  # the folder name the server sees (conftest links the repository under it)
FRONTEND_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # drawn by the frontend, never queued
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("ControlNetLoader", "control_net_name"),
                     ("LoadImage", "image"), ("LoadHyperLoRA", "checkpoint"), ("LoadHyperLoRA", "face_analyzer"),
                     ("CLIPVisionLoader", "clip_name"), ("LoadHyperLoRAIdentity", "identity"),
                     ("LoadHyperDreamBooth", "hdb"), ("HyperDreamBoothFromImage", "face_analyzer")}
# where the Note must send each model (the first three with the HyperLoRA loader), and which node needs which folder
ALWAYS = ("models/hyper_lora/", "models/hyper_lora/clip_vit/clip_vit_large_14", "models/insightface/models/antelopev2")
FOLDER_OF = {"CheckpointLoaderSimple": "models/checkpoints", "ControlNetLoader": "models/controlnet",
             "LoadHyperDreamBooth": "models/hyperdreambooth", "HyperDreamBoothFromImage": ALWAYS[2]}
COUNTS = {"validated": 0, "same graph": 0, "run": 0, "clip skip": 0}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    show(f"\nexample workflows: {len(NAMES)} found; {COUNTS['validated']} validated against /object_info, "
         f"{COUNTS['same graph']} API twins equal to their UI graph, {COUNTS['run']} API twins run to success "
         f"({COUNTS['clip skip']} of them through CLIP Set Last Layer at -2)")


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.server.get_json("/object_info")


def load(name: str, api: bool = False) -> dict:
    return json.loads((EXAMPLES / ("api" if api else "") / f"{name}.json").read_text())


# -- what the frontend makes of /object_info ----------------------------------------------------------------------
def schema_inputs(info: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type or combo list, options, optional) in the schema's order."""
    out = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, info["input"].get(section, {})):
            spec = info["input"][section][name]
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}, section == "optional"))
    return out


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_names(info: dict) -> list[str]:
    """widgets_values order: each widget input, a control after a seed, the upload button after an image combo."""
    names = []
    for name, kind, options, _ in schema_inputs(info):
        if not is_widget(kind, options):
            continue
        names.append(name)
        if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
            names.append("control_after_generate")
        if options.get("image_upload"):
            names.append(UPLOAD)
    return names


def accepts(input_type: str, link_type: str) -> bool:
    return input_type == "*" or link_type in input_type.split(",")


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this UI graph (``_meta`` left out)."""
    links = {lk[0]: lk for lk in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_NODES:
            continue
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node.get("inputs", []) if i.get("link") is not None}
        for name, value in zip(widget_names(object_info[node["type"]]), node.get("widgets_values", []), strict=True):
            if name not in FRONTEND_ONLY and name not in inputs:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# -- checks ------------------------------------------------------------------------------------------------------
def widget_problems(node: dict, info: dict) -> list[str]:
    where = f"node {node['id']} {node['type']}"
    specs = {name: (kind, options) for name, kind, options, _ in schema_inputs(info)}
    names, values = widget_names(info), node.get("widgets_values", [])
    if len(names) != len(values):
        return [f"{where}: widgets_values {values} do not fit the widgets {names}"]
    problems = []
    for name, value in zip(names, values, strict=True):
        if name == "control_after_generate":
            ok = value in CONTROL_VALUES
        elif name == UPLOAD:
            ok = value == "image"
        else:
            kind, options = specs[name]
            combo = options.get("options") if kind == "COMBO" else kind if isinstance(kind, list) else None
            if combo is not None:
                ok = isinstance(value, str) if (node["type"], name) in MODEL_FILE_COMBOS else value in combo
            elif kind == "INT":
                ok = isinstance(value, int) and not isinstance(value, bool) and (
                    options.get("min", -2**63) <= value <= options.get("max", 2**64))
            elif kind == "FLOAT":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and (
                    options.get("min", float("-inf")) <= value <= options.get("max", float("inf")))
            elif kind == "BOOLEAN":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, str)
        if not ok:
            problems.append(f"{where}: {name} = {value!r} is not valid")
    return problems


def graph_problems(ui: dict, object_info: dict) -> list[str]:
    nodes = {n["id"]: n for n in ui["nodes"]}
    problems = []
    if len(nodes) != len(ui["nodes"]) or len({lk[0] for lk in ui["links"]}) != len(ui["links"]):
        problems.append("node or link ids repeat")
    if ui.get("version") != 0.4 or ui["last_node_id"] < max(nodes) or ui["last_link_id"] < max(
            [lk[0] for lk in ui["links"]] or [0]):
        problems.append("version / last_node_id / last_link_id wrong")
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        outs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        if [t for _, t in outs] != info["output"]:
            problems.append(f"node {node['id']} {node['type']}: outputs {outs} != {info['output']}")
        sockets = {name: (kind, optional) for name, kind, options, optional in schema_inputs(info)
                   if not is_widget(kind, options)}
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for i in node.get("inputs", []):
            if i["name"] not in sockets and i.get("widget") is None:
                problems.append(f"node {node['id']} {node['type']}: no input {i['name']}")
        for name, (_, optional) in sockets.items():
            if not optional and name not in linked:
                problems.append(f"node {node['id']} {node['type']}: required input {name} is not connected")
        problems += widget_problems(node, info)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: joins a missing node")
            continue
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        if link_id not in (out.get("links") or []) or inp.get("link") != link_id:
            problems.append(f"link {link_id}: not recorded on both of its slots")
        if not {nodes[src]["type"], nodes[dst]["type"]} <= object_info.keys():
            continue  # an unknown type is reported above; a Reroute / Primitive carries any type
        real_out = object_info[nodes[src]["type"]]["output"][src_slot]
        real_in = next(k for n, k, _, _ in schema_inputs(object_info[nodes[dst]["type"]]) if n == inp["name"])
        if kind != real_out or not accepts(real_in, real_out):
            problems.append(f"link {link_id}: {nodes[src]['type']} gives {real_out}, {nodes[dst]['type']}."
                            f"{inp['name']} takes {real_in} (link says {kind})")
    return problems


def note_problems(ui: dict) -> list[str]:
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    types = {n["type"] for n in ui["nodes"]}
    needed = [*(ALWAYS if "LoadHyperLoRA" in types else ()), TRIGGER,
              *(FOLDER_OF[t] for t in sorted(types & FOLDER_OF.keys()))]
    if not any(all(want in text for want in needed) for text in notes):
        return [f"no Note names all of {needed}"]
    prompts = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CLIPTextEncode"]
    if prompts and not any(TRIGGER in p for p in prompts):
        return ["no prompt contains the trigger words"]
    return []


@pytest.mark.parametrize("name", NAMES)
def test_example_is_valid_against_object_info(server, object_info, name):
    ui = load(name)
    problems = graph_problems(ui, object_info) + note_problems(ui)
    assert not problems, "\n".join(problems)
    thumb = EXAMPLES / f"{name}.jpg"  # the template browser asks /api/workflow_templates/<pack>/<name>.jpg
    status, body = server.server.get(f"/api/workflow_templates/{PACKAGE}/{urllib.parse.quote(thumb.name)}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff" and 1_000 < len(body) < 100_000, (status, len(body))
    COUNTS["validated"] += 1


def test_template_browser_lists_every_example(server):
    listed = server.server.get_json("/workflow_templates").get(PACKAGE, [])
    assert sorted(listed) == NAMES and len(NAMES) >= 6, listed  # api/ twins are not listed: one level only


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_same_graph(object_info, name):
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in load(name, api=True).items()}
    assert api == ui_to_api(load(name), object_info)
    COUNTS["same graph"] += 1


def test_files_are_what_the_builder_writes(tmp_path):
    build(tmp_path)
    for ui in sorted(tmp_path.glob("*.json")) + sorted((tmp_path / "api").glob("*.json")):
        rel = ui.relative_to(tmp_path)
        assert json.loads(ui.read_text()) == json.loads((EXAMPLES / rel).read_text()), (
            f"{rel} is stale: run python tests/host/workflow_builder.py")


# -- running the API twins on the tiny models ---------------------------------------------------------------------
def for_tiny_models(prompt: dict, *, keep_photos: bool = False) -> dict:
    """The same graph with the loaders swapped for the test pack's tiny models and the picture made small;
    ``keep_photos``: leave LoadImage nodes as they are (for uploaded photos)."""
    prompt = copy.deepcopy(prompt)
    moved = {}  # (node, output slot) -> new link
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "HLTestTinySDXL", "inputs": {"seed": 0, "model_channels": 32}}
            for slot, part in ((1, "HLTestTinyCLIP"), (2, "HLTestTinyVAE")):
                prompt[f"{node_id}_{slot}"] = {"class_type": part, "inputs": {"seed": 0}}
                moved[(node_id, slot)] = [f"{node_id}_{slot}", 0]
        elif kind == "LoadImage" and not keep_photos:  # a different synthetic face per photo
            prompt[node_id] = {"class_type": "HLTestFaceImage", "inputs": {"seed": int(node_id), "face": True}}
            moved[(node_id, 1)] = None  # its MASK: nothing may use it
        elif kind == "ControlNetLoader":
            prompt[node_id] = {"class_type": "HLTestTinyControlNet", "inputs": {"seed": 0}}
        elif kind == "LoadHyperLoRA":
            inputs.update(checkpoint="tiny_a", face_analyzer=ANALYZER, provider="cpu", dtype="fp32")
        elif kind == "LoadHyperDreamBooth":
            inputs.update(hdb="tiny.safetensors")
        elif kind == "HyperDreamBoothFromImage":
            inputs.update(provider="cpu")
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=2)
        elif kind == "HyperLoRARefine":
            inputs.update(steps=3, resolution=256, lidb_a=32, lidb_b=16)  # the tiny UNet's layers are 64+ wide
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and (value[0], value[1]) in moved:
                assert moved[(value[0], value[1])] is not None, f"{name} uses a LoadImage MASK"
                node["inputs"][name] = moved[(value[0], value[1])]
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_on_tiny_models(server, name):
    prompt = for_tiny_models(load(name, api=True))
    skips = [v for v in prompt.values() if v["class_type"] == "CLIPSetLastLayer"]
    if any(v["class_type"] == "CLIPTextEncode" for v in prompt.values()):  # SDXL text: CLIP skip -2, as trained
        assert skips and all(v["inputs"]["stop_at_clip_layer"] == -2 for v in skips), name
    run = server.server.run(prompt, timeout=300)
    assert run.status == "success", (run.error, run.response)
    outputs = {k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage", "SaveHyperLoRA",
                                                                     "SaveHyperLoRAIdentity", "SaveLiDB")}
    assert outputs <= set(run.history["outputs"]) | set(run.cached), (outputs, run.history["outputs"].keys())
    COUNTS["run"] += 1
    COUNTS["clip skip"] += bool(skips)


def test_docs_api_recipe_works(server, tmp_path):
    """docs/api.md's helpers, run as written against the server: upload a photo, queue, wait, read the images."""
    import numpy as np
    from nodepack import tiny
    from PIL import Image

    blocks = (ROOT / "docs" / "api.md").read_text().split("```python\n")[1:]
    helpers = {}
    exec(blocks[0].split("```")[0], helpers)  # our own documentation
    helpers["SERVER"] = server.server.url
    photo = tmp_path / "me.png"
    Image.fromarray((tiny.face_photo(seed=5)[0].numpy() * 255).round().astype(np.uint8)).save(photo)

    prompt = for_tiny_models(load("HyperLoRA portrait from one photo", api=True), keep_photos=True)
    prompt[helpers["node"](prompt, "Photo of the person")]["inputs"]["image"] = helpers["upload_image"](photo)
    prompt[helpers["node"](prompt, "KSampler")]["inputs"]["seed"] = 1234
    entry = helpers["wait"](helpers["queue"](prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    got = list(helpers["images"](entry))
    kinds = {prompt[node_id]["class_type"] for node_id, _, _ in got}
    assert kinds == {"SaveImage", "PreviewImage"} and all(data[:8] == b"\x89PNG\r\n\x1a\n" for _, _, data in got)
