"""Host tier, in a browser: Debian's chromium, driven by playwright-core (tests/browser/driver.cjs), on the real server.

The driver loads every example workflow through the frontend's ``app.loadGraphData``, keeps a screenshot of one,
and builds a graph to try the trigger-word guard (web/js/trigger_guard.js) with real mouse clicks. It runs once for
the module and prints what it saw as JSON; the tests below judge it.

Needs: COMFYUI_PATH, ``chromium`` (``apt-get install chromium``; or $CHROMIUM), ``node`` and playwright-core
(``npm ci --prefix tests/browser``). ``UPDATE_DOCS_IMAGES=1`` also writes the screenshot to docs/images/workflow.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from comfy_server import show

ROOT = Path(__file__).resolve().parents[2]
BROWSER = ROOT / "tests" / "browser"
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
BUILT = "built: guard graph"  # stands in for the examples while there are none
WORKFLOWS = [p.name for p in EXAMPLES] or [BUILT]
DOCS_IMAGE = ROOT / "docs" / "images" / "workflow.png"
TRIGGER = "fcsks fxhks fhyks"
GUARD_BUTTON = "insert trigger words"
# the category title our locales/en/main.json gives the package folder in the template browser
TEMPLATE_CATEGORY = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"][
    "ComfyUI-HyperLoRA"]


def screenshot_example() -> Path | None:
    """The single-photo portrait example if there is one, else the first."""
    portraits = [p for p in EXAMPLES if "portrait" in p.name.lower()]
    return (portraits or EXAMPLES or [None])[0]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not shutil.which(os.environ.get("CHROMIUM", "chromium")):
        return "browser tests: no chromium (apt-get install chromium, or set CHROMIUM to its path)"
    if not shutil.which("node"):
        return "browser tests: no node (Node.js 20+)"
    found = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], cwd=BROWSER, capture_output=True)
    if found.returncode:
        return "browser tests: no playwright-core (npm ci --prefix tests/browser)"
    return None


@pytest.fixture(scope="module")
def seen(request, tmp_path_factory) -> dict:
    """What the driver saw: one chromium session over every workflow and the guard's graphs."""
    reason = browser_missing()
    if reason:
        show(f"\nSKIP {reason}")
        pytest.skip(reason)
    server = request.getfixturevalue("server").server  # skips, saying why, without COMFYUI_PATH
    tmp = tmp_path_factory.mktemp("browser")
    shot = screenshot_example()
    config = {"url": server.url + "/", "chromium": shutil.which(os.environ.get("CHROMIUM", "chromium")),
              "workflows": [str(p) for p in EXAMPLES], "guard": True, "words": TRIGGER, "tmp": str(tmp),
              "screenshot": {"workflow": str(shot) if shot else None, "path": str(tmp / "workflow.png")},
              "guardSelected": {"workflow": str(shot)} if shot else None,
              "saves": {"checkpoint": "tiny_a", "analyzer": "models/antelopev2"}, "search": ["hyperlora", "face"],
              "templates": {"category": TEMPLATE_CATEGORY} if EXAMPLES else None}
    (tmp / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    run = subprocess.run(["node", str(BROWSER / "driver.cjs"), str(tmp / "config.json")], cwd=BROWSER,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"driver failed:\n{run.stderr[-4000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    show(f"\nbrowser: UI ready in {result['readyMs'] / 1000:.1f} s, all checks in {time.monotonic() - started:.1f} s; "
         f"{len(result['workflows'])} workflow(s) loaded: {', '.join(Path(k).name for k in result['workflows'])}")
    if result["prunedModelProviders"]:
        show(f"browser: frontend model providers without a node dropped: {result['prunedModelProviders']} "
             "(ComfyUI without spandrel lacks UpscaleModelLoader)")
    result["workflows"] = {Path(k).name if k != BUILT else k: v for k, v in result["workflows"].items()}
    result["screenshot"] = tmp / "workflow.png"
    result["tmp"] = tmp
    return result


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_without_missing_nodes_or_errors(seen, name):
    assert seen["openAtStart"] == []  # no dialog left open by the start-up, which would hide a missing-node one
    state = seen["workflows"][name]
    if name != BUILT:
        assert state["nodes"] == len(json.loads((ROOT / "example_workflows" / name).read_text())["nodes"])
    assert state["unknownTypes"] == []
    dialogs = [d for d in state["dialogs"] if d["key"] != "global-missing-models-warning"]
    assert dialogs == [], f"{name} opened dialogs: {dialogs}"  # global-load-workflow-warning: missing nodes
    if len(dialogs) != len(state["dialogs"]):
        show(f"browser: {name} lists models to download (the test root lacks them)")
    errors = [t for t in state["toasts"] if '"severity":"error"' in t["message"] or t["name"] == "addAlert"]
    assert errors == [] and state["errorToasts"] == [], f"{name} showed error toasts: {errors or state['errorToasts']}"
    assert state["guardShown"] == [], f"{name}: a prompt lacks the trigger words, the guard shows on {state}"
    assert seen["pageErrors"] == [] and seen["consoleErrors"] == [], (seen["pageErrors"], seen["consoleErrors"])


def test_docs_screenshot(seen):
    from PIL import Image

    with Image.open(seen["screenshot"]) as image:
        assert image.format == "PNG" and image.size == (1600, 1000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    size = seen["screenshot"].stat().st_size
    assert size < 400_000, f"{size} bytes: too big for a docs image"
    if os.environ.get("UPDATE_DOCS_IMAGES") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seen["screenshot"], DOCS_IMAGE)
        show(f"browser: wrote {DOCS_IMAGE.relative_to(ROOT)} ({size} bytes)")
    assert DOCS_IMAGE.is_file(), f"no {DOCS_IMAGE.relative_to(ROOT)}: run this test with UPDATE_DOCS_IMAGES=1"


def test_guard_appears_and_insert_fixes_the_positive_prompt(seen):
    missing = seen["guard"]["missing"]
    assert missing["apply"] == {"before": True, "after": False}  # shown, then gone after one click
    assert missing["afterApply"]["positive"] == f"{TRIGGER}, portrait photo of a woman, studio light"
    assert missing["afterApply"]["negative"] == "blurry, lowres"  # through Apply ControlNet: only the positive
    assert missing["afterApply"]["hookPrompt"] == "a man on the left"  # another identity's prompt: its own guard


def test_guard_on_hook_fixes_its_conditioning_prompt(seen):
    missing = seen["guard"]["missing"]
    assert missing["hook"] == {"before": True, "after": False}
    assert missing["afterHook"]["hookPrompt"] == f"{TRIGGER}, a man on the left"
    assert missing["afterHook"]["negative"] == "blurry, lowres"


def test_guard_silent_when_the_words_are_present(seen):
    assert seen["guard"]["present"] == {"apply": False, "hook": False}


def test_guard_changes_nothing_saved_or_queued(seen):
    serialized = seen["guard"]["serialized"]
    assert GUARD_BUTTON not in serialized["inputs"]
    assert serialized["widgets_values"] == [0.85, 0]  # id_strength, base_strength: no value for the button


def test_guard_button_stays_visible_with_the_prompt_selected(seen):
    """Issue 16 point 12: in the portrait example, the prompt (just below Apply HyperLoRA) selected by a click; its
    selection toolbox shows, and the guard's button is neither under it nor anything else, and a click works."""
    state = seen["guardSelected"]
    show(f"\nguard with the prompt selected: toolbox at {state['toolbox']}, button at "
         f"({state['before']['x']:.0f}, {state['before']['y']:.0f}), covered by {state['before']['covered']}")
    assert state["selected"] and state["toolbox"] is not None, state  # the situation of the report, reproduced
    assert state["before"]["shown"] and state["before"]["covered"] is None, state
    assert state["after"] is False and state["prompt"].startswith(TRIGGER), state


def test_save_nodes_show_where_they_wrote(seen, server):
    """Point 9: queued from the UI, Save HyperLoRA as LoRA and Save HyperLoRA Identity show the saved path on the
    node; the line is not saved with the workflow."""
    saves = seen["saves"]
    assert "error" not in saves, saves
    show(f"\nsave nodes show: {saves['after']}")
    assert saves["before"] == {"lora": "", "identity": ""}, saves
    assert saves["after"]["lora"].startswith("models/loras/browser/me_"), saves
    assert saves["after"]["lora"].endswith(".safetensors"), saves
    identity = Path(saves["after"]["identity"])  # the first identities folder, relative to ComfyUI's root
    assert identity.name.startswith("browser_me_"), saves
    assert (server.root / identity).parent == server.identity_folders[0], saves
    assert (server.root / identity).is_file(), saves
    assert saves["widgetsValues"] == ["browser/me"], saves


def test_template_cards_have_titles_and_thumbnails(seen):
    """Point 10: this package's category in the template browser, one card per example, titled by its name, with
    its drawn thumbnail (title and one-line description)."""
    templates = seen["templates"]
    cards = templates["cards"]
    show(f"\ntemplate cards: {[c['title'] for c in cards]}")
    assert TEMPLATE_CATEGORY in templates["categories"], templates["categories"]
    assert sorted(c["title"] for c in cards) == sorted(p.stem for p in EXAMPLES), cards
    assert all(c["title"].startswith("HyperLoRA ") and "_" not in c["title"] for c in cards), cards
    assert all(c["thumbnail"] and (c["thumbnail"]["width"], c["thumbnail"]["height"]) == (512, 384)
               for c in cards), cards


def test_search_puts_the_loader_and_the_face_node_first(seen):
    """Point 11: the frontend's own search (1.27.10 matches node ids and display names, an exact name first, then
    prefixes by length): "hyperlora" starts with the loader, "face" with the node that reads face photos."""
    found = {q: [n for n in names if not n.startswith("HLTest")] for q, names in seen["search"].items()}  # test pack
    show(f"\nsearch: {found}")
    assert found["hyperlora"][0] == "LoadHyperLoRA", found
    assert "HyperLoRAFromImage" in found["hyperlora"][:3], found
    assert found["face"][0] == "HyperLoRAFromImage", found
