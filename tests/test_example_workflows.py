"""The example workflows use CLIP skip -2 (CLIP Set Last Layer), as HyperLoRA was trained, and say so.

Tier 1: reads the files only. The host tier (tests/host/test_workflows.py) validates them against the live server
and runs every API twin, CLIP Set Last Layer included, through /prompt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
SKIP_LAYER = -2


def ui_problems(ui: dict) -> list[str]:
    """Every CLIPTextEncode must read its CLIP through a CLIP Set Last Layer at -2 fed by the checkpoint."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {lk[0]: lk for lk in ui["links"]}
    if not any(n["type"] == "CheckpointLoaderSimple" for n in nodes.values()):
        return []

    def source(node: dict, name: str) -> dict | None:
        link = next((i["link"] for i in node.get("inputs", []) if i["name"] == name), None)
        return nodes[links[link][1]] if link is not None else None

    problems = []
    for node in nodes.values():
        if node["type"] != "CLIPTextEncode":
            continue
        skip = source(node, "clip")
        if skip is None or skip["type"] != "CLIPSetLastLayer":
            problems.append(f"node {node['id']} reads its CLIP without CLIP Set Last Layer")
        elif skip["widgets_values"] != [SKIP_LAYER]:
            problems.append(f"node {skip['id']}: stop_at_clip_layer {skip['widgets_values']} instead of -2")
        elif (source(skip, "clip") or {}).get("type") != "CheckpointLoaderSimple":
            problems.append(f"node {skip['id']}: CLIP Set Last Layer is not fed by the checkpoint")
    notes = [n["widgets_values"][0] for n in nodes.values() if n["type"] == "Note"]
    if not any(f"CLIP Set Last Layer at {SKIP_LAYER}" in text for text in notes):
        problems.append("no Note mentions CLIP Set Last Layer at -2")
    return problems


def api_problems(api: dict) -> list[str]:
    problems = []
    for node_id, node in api.items():
        if node["class_type"] != "CLIPTextEncode":
            continue
        skip = api.get(node["inputs"]["clip"][0], {})
        if skip.get("class_type") != "CLIPSetLastLayer" or skip["inputs"]["stop_at_clip_layer"] != SKIP_LAYER:
            problems.append(f"API node {node_id}: its CLIP does not come from CLIP Set Last Layer at -2")
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_sdxl_examples_use_clip_skip_2(name):
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    assert not ui_problems(ui) + api_problems(api)
    uses_sdxl = any(n["type"] == "CheckpointLoaderSimple" for n in ui["nodes"])
    assert uses_sdxl == any(n["class_type"] == "CLIPSetLastLayer" for n in api.values())


def test_most_examples_are_sdxl_graphs():
    """The check above must have something to check: all but the save-only example sample with SDXL."""
    sdxl = [n for n in NAMES if '"CheckpointLoaderSimple"' in (EXAMPLES / f"{n}.json").read_text()]
    assert len(sdxl) >= len(NAMES) - 1 >= 5


def test_a_text_encoder_wired_past_clip_skip_is_caught():
    ui = json.loads((EXAMPLES / "HyperLoRA portrait from one photo.json").read_text())
    api = json.loads((EXAMPLES / "api" / "HyperLoRA portrait from one photo.json").read_text())
    bad_api = copy.deepcopy(api)
    ckpt = next(k for k, v in api.items() if v["class_type"] == "CheckpointLoaderSimple")
    text = next(k for k, v in api.items() if v["class_type"] == "CLIPTextEncode")
    bad_api[text]["inputs"]["clip"] = [ckpt, 1]
    assert api_problems(bad_api)
    bad_ui = copy.deepcopy(ui)
    skip = next(n for n in bad_ui["nodes"] if n["type"] == "CLIPSetLastLayer")
    skip["widgets_values"] = [-1]
    assert ui_problems(bad_ui) == [f"node {skip['id']}: stop_at_clip_layer [-1] instead of -2"] * 2


def test_readme_says_clip_skip():
    text = (ROOT / "README.md").read_text()
    assert "CLIP Set Last\nLayer** at −2" in text or "CLIP Set Last Layer** at −2" in text
