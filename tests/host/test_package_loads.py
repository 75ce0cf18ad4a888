"""Host tier: the real ComfyUI (found through COMFYUI_PATH) loads this package through its V3 entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")

pytestmark = pytest.mark.skipif(
    not COMFYUI or not (Path(COMFYUI) / "nodes.py").is_file(),
    reason="host tier: set COMFYUI_PATH to a ComfyUI v0.3.64 checkout to run it",
)

LOADER = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, sys.argv[1])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import nodes
    ok = asyncio.run(nodes.load_custom_node(sys.argv[2]))
    print(json.dumps({"ok": ok, "web": nodes.EXTENSION_WEB_DIRS.get("ComfyUI-HyperLoRA")}))
""")


def load_in_comfyui(tmp_path, script: str):
    """Run ``script`` (ComfyUI path, package path) in a fresh interpreter; returns (last stdout line, run)."""
    package = tmp_path / "custom_nodes" / "ComfyUI-HyperLoRA"
    package.parent.mkdir()
    package.symlink_to(ROOT, target_is_directory=True)
    run = subprocess.run([sys.executable, "-c", script, COMFYUI, str(package)], capture_output=True, text=True,
                         cwd=COMFYUI, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1], run, package


def test_comfyui_loads_the_package(tmp_path):
    result, run, package = load_in_comfyui(tmp_path, LOADER)
    assert '"ok": true' in result, run.stderr[-3000:]
    assert f'"web": "{package / "web"}"' in result  # WEB_DIRECTORY served at /extensions/ComfyUI-HyperLoRA/
    assert "Error while calling comfy_entrypoint" not in run.stderr


MISSING = textwrap.dedent("""
    import asyncio, importlib.util, json, logging, sys
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, sys.argv[1])
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "insightface" else real(name, *a)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import nodes
    ok = asyncio.run(nodes.load_custom_node(sys.argv[2]))
    ours = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                  if "ComfyUI-HyperLoRA" in getattr(v, "RELATIVE_PYTHON_MODULE", ""))
    print(json.dumps({"ok": ok, "nodes": ours}))
""")


def test_missing_insightface_is_one_clear_line_and_the_nodes_still_load(tmp_path):
    result, run, _ = load_in_comfyui(tmp_path, MISSING)
    assert '"ok": true' in result and "ApplyHyperLoRA" in result and "HyperLoRAFromImage" in result
    lines = [line for line in run.stderr.splitlines() if "insightface is not installed" in line]
    assert len(lines) == 1 and "pip install insightface" in lines[0]
