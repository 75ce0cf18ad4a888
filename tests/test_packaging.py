"""Packaging: what pip installs from requirements.txt / pyproject.toml, on every platform ComfyUI runs on.

- requirements.txt and pyproject.toml declare the same packages, and requirements-cpu.txt (kept for old
  instructions) resolves to the same set;
- on Linux x86-64, Windows x86-64, macOS arm64 and Linux aarch64 (markers evaluated with packaging.markers),
  our requirements plus insightface's own give exactly one ONNX runtime and one OpenCV build;
- ``pip install --dry-run --report`` of requirements.txt on this machine installs exactly one of onnxruntime /
  onnxruntime-gpu, while adding onnxruntime-gpu beside insightface (what the old requirements.txt did) installs
  both: the state the doctor warns about;
- every third-party module that hyperlora_core and nodes import (also lazily, inside functions) is declared (as a
  requirement or an optional extra of pyproject.toml), or is
  provided by ComfyUI itself.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ONNX_RUNTIMES = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"}
OPENCV_BUILDS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
# ComfyUI's own modules and what its install brings (torch): used by the nodes, never declared by us
FROM_COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                "node_helpers", "latent_preview", "torch"}
PLATFORMS = {
    "Linux x86-64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                     "os_name": "posix"},
    "Windows x86-64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
                       "os_name": "nt"},
    "macOS arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64",
                    "os_name": "posix"},
    "Linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64",
                      "os_name": "posix"},
}


def read_requirements(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file, following ``-r`` includes."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            found += read_requirements(path.parent / line[3:].strip())
        else:
            found.append(Requirement(line))
    return found


def declared() -> list[Requirement]:
    return read_requirements(ROOT / "requirements.txt")


def selected(requirements: list[Requirement], platform: dict) -> set[str]:
    """Names of the requirements whose markers hold on ``platform`` (extras not asked for)."""
    env = {**default_environment(), **platform, "extra": ""}
    return {canonicalize_name(r.name) for r in requirements if r.marker is None or r.marker.evaluate(env)}


def insightface_requirements() -> list[Requirement]:
    """insightface's own Requires-Dist, from the installed distribution's metadata."""
    return [Requirement(r) for r in metadata.requires("insightface") or []]


def test_requirements_txt_and_pyproject_declare_the_same():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(map(str, declared())) == sorted(str(Requirement(r)) for r in project)
    assert sorted(map(str, read_requirements(ROOT / "requirements-cpu.txt"))) == sorted(map(str, declared()))


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_each_platform_gets_exactly_one_onnx_runtime_and_one_opencv(platform):
    ours = selected(declared(), PLATFORMS[platform])
    with_insightface = ours | selected(insightface_requirements(), PLATFORMS[platform])
    assert "insightface" in ours
    assert with_insightface & ONNX_RUNTIMES == {"onnxruntime"}, f"{platform}: {sorted(with_insightface)}"
    assert with_insightface & OPENCV_BUILDS == {"opencv-python"}, f"{platform}: {sorted(with_insightface)}"


def test_the_platform_check_catches_a_gpu_runtime_beside_insightface():
    """The check above can fail: the old requirement, onnxruntime-gpu on x86-64 by marker, gives two runtimes."""
    gpu = Requirement('onnxruntime-gpu; (sys_platform == "linux" or sys_platform == "win32") and '
                      '(platform_machine == "x86_64" or platform_machine == "AMD64")')
    for platform, expected in (("Linux x86-64", 2), ("Windows x86-64", 2), ("macOS arm64", 1), ("Linux aarch64", 1)):
        runtimes = selected([gpu, *insightface_requirements()], PLATFORMS[platform]) & ONNX_RUNTIMES
        assert len(runtimes) == expected, (platform, runtimes)


# -- what pip really resolves ----------------------------------------------------------------------------------------
def dry_run(tmp_path: Path, *args: str) -> set[str]:
    """Names pip would install into an empty environment (``pip install --dry-run --ignore-installed --report``)."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, f"pip install --dry-run {' '.join(args)} failed:\n{run.stderr[-3000:]}"
    return {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}


def test_pip_install_requirements_leaves_exactly_one_onnx_runtime(tmp_path):
    names = dry_run(tmp_path, "-r", "requirements.txt")
    assert names & ONNX_RUNTIMES == {"onnxruntime"}, sorted(names)
    assert names & OPENCV_BUILDS == {"opencv-python"}, sorted(names)
    assert {"insightface", "safetensors", "einops", "numpy", "pillow"} <= names


def test_pip_puts_both_runtimes_in_when_onnxruntime_gpu_is_added(tmp_path):
    """Why requirements.txt never names onnxruntime-gpu: insightface requires onnxruntime by name, so pip installs
    both into one onnxruntime/ folder (the doctor's 'both installed' warning)."""
    names = dry_run(tmp_path, "-r", "requirements.txt", "onnxruntime-gpu")
    assert names & ONNX_RUNTIMES == {"onnxruntime", "onnxruntime-gpu"}, sorted(names)


# -- every import declared ---------------------------------------------------------------------------------------
def imported_top_level(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in a module (lazy ones inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files of hyperlora_core and nodes importing it (stdlib and ComfyUI left out)."""
    found: dict[str, set[str]] = {}
    for folder in ("hyperlora_core", "nodes"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for name in imported_top_level(path) - set(sys.stdlib_module_names) - FROM_COMFYUI - {"hyperlora_core"}:
                found.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return found


def undeclared(imports: dict[str, set[str]], requirements: list[Requirement]) -> dict[str, str]:
    """Imported modules whose distribution is not among ``requirements``: module -> why."""
    names = {canonicalize_name(r.name) for r in requirements}
    distributions = metadata.packages_distributions()
    problems = {}
    for module, files in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not dists:
            problems[module] = f"not installed here, imported by {sorted(files)}"
        elif not dists & names:
            problems[module] = f"from {sorted(dists)}, not declared; imported by {sorted(files)}"
    return problems


def extras() -> list[Requirement]:
    """pyproject's optional dependencies (e.g. ``cli``: open_clip_torch for the standalone core's CLIP)."""
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return [Requirement(r) for group in groups.values() for r in group]


def test_every_third_party_import_is_declared():
    imports = third_party_imports()
    assert {"cv2", "numpy", "safetensors", "insightface", "onnxruntime"} <= set(imports), sorted(imports)
    assert undeclared(imports, declared() + extras()) == {}


def test_the_import_check_catches_an_undeclared_package():
    """Without opencv-python in the list, cv2 (imported by crops.py and face.py) is reported."""
    without = [r for r in declared() + extras() if canonicalize_name(r.name) != "opencv-python"]
    assert set(undeclared(third_party_imports(), without)) == {"cv2"}


CORE_MODULES = sorted(p.stem for p in (ROOT / "hyperlora_core").glob("*.py") if p.stem != "__main__")  # runs the CLI


@pytest.mark.parametrize("module", CORE_MODULES)
def test_each_core_module_imports(module):
    """hyperlora_core imports without ComfyUI (the nodes' modules are imported in the host tier)."""
    importlib.import_module(f"hyperlora_core.{module}" if module != "__init__" else "hyperlora_core")
