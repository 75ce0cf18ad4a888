"""Host tier fixtures: the real ComfyUI found through COMFYUI_PATH, imported in-process on the CPU."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from comfy_server import ComfyServer, show
from nodepack import tiny

from hyperlora_core.synthetic import write_checkpoint

COMFYUI = os.environ.get("COMFYUI_PATH")
HAS_COMFYUI = bool(COMFYUI) and (Path(COMFYUI) / "comfy" / "lora.py").is_file()
SKIP_REASON = "host tier: set COMFYUI_PATH to a ComfyUI v0.3.64 checkout to run it"

TINY_SDXL_CONFIG = tiny.TINY_SDXL_CONFIG  # SDXL's real block structure at tiny widths (HOST.md)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's modules, CPU mode set before model management is imported."""
    if not HAS_COMFYUI:
        pytest.skip(SKIP_REASON)
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


@pytest.fixture()
def tiny_sdxl(comfy):
    """A ModelPatcher around a 23.6 M-parameter SDXL built from ComfyUI's own classes, seeded random weights."""
    return tiny.tiny_sdxl(seed=0)


# -- the real server ---------------------------------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1]  # the repository root: loaded as custom_nodes/ComfyUI-HyperLoRA
HOST_UNET = tiny.host_unet()
# hyper_lora/<name>: two good checkpoints (other seeds: identities do not cross), a truncated basis, and one the
# missing-checkpoint test deletes while the server runs
CHECKPOINTS = {"tiny_a": 0, "tiny_b": 1}


@dataclass
class ServerRoot:
    """A running server and the throw-away ComfyUI root it reads and writes."""

    server: ComfyServer
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def identity_folders(self) -> list[Path]:
        """Where identities are looked up: the default (first: saves go there), then the extra_model_paths one."""
        return [self.models / "hyper_lora" / "identities", self.root / "extra_models" / "identities"]


def write_tiny_hdb(path: Path, targets, *, seed: int = 5) -> Path:
    """A tiny random HyperDreamBooth file (the core's own save_hdb) predicting LiDBs for ``targets``; its delta
    layer is randomised, since a fresh network's is zero and its prediction would not depend on the face."""
    import torch

    from hyperlora_core.hdb.checkpoint import save_hdb
    from hyperlora_core.hdb.config import HdbConfig
    from hyperlora_core.hdb.network import HyperDreamBooth

    net = HyperDreamBooth(HdbConfig(encoder_width=32, encoder_layers=2, encoder_heads=4, patch_size=14,
                                    image_size=28, dim=16, depth=1, heads=2, iterations=2), targets, a=4, c=2)
    with torch.no_grad():
        torch.nn.init.normal_(net.delta[1].weight, std=0.5, generator=torch.Generator().manual_seed(3))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_hdb(net, path, seed=seed, dtype=torch.float32)


def build_root(root: Path, clip_folder: Path) -> Path:
    """models/ (hyper_lora checkpoints + shared CLIP, insightface doubles) and custom_nodes/ (both packs)."""
    from face_doubles import write_antelopev2
    from helpers import TINY_CLIP_WIDTH

    hyper = root / "models" / "hyper_lora"
    for name, seed in CHECKPOINTS.items():
        write_checkpoint(hyper / name, unet=HOST_UNET, clip_dim=TINY_CLIP_WIDTH, seed=seed)
    shutil.copytree(clip_folder, hyper / "clip_vit" / "clip_vit_large_14")
    shutil.copytree(hyper / "tiny_a", hyper / "tiny_gone")
    shutil.copytree(hyper / "tiny_a", hyper / "tiny_vanishing")  # removed while its prompt waits in the queue
    shutil.copytree(hyper / "tiny_a", hyper / "tiny_corrupt")
    basis = hyper / "tiny_corrupt" / "hyper_lora_modules.safetensors"
    basis.write_bytes(basis.read_bytes()[: basis.stat().st_size // 2])  # an interrupted download
    write_antelopev2(root / "models" / "insightface" / "models" / "antelopev2")
    from hyperlora_core.targets import sdxl_target_layers

    write_tiny_hdb(root / "models" / "hyperdreambooth" / "tiny.safetensors", sdxl_target_layers(HOST_UNET))
    extra = root / "extra_models"  # a second identities folder, as extra_model_paths.yaml adds one; listed after
    (extra / "identities").mkdir(parents=True)  # the default, so that saves still go to models/hyper_lora/identities
    (root / "extra_model_paths.yaml").write_text(
        f"hyperlora_tests:\n    base_path: {root}\n    hyper_lora_identities: |\n"
        "        models/hyper_lora/identities\n        extra_models/identities\n")
    nodes = root / "custom_nodes"
    nodes.mkdir()
    (nodes / "ComfyUI-HyperLoRA").symlink_to(PACKAGE, target_is_directory=True)
    (nodes / "hyperlora_test_nodes").symlink_to(HERE / "nodepack", target_is_directory=True)
    return root


def serve(tmp_path_factory, request):
    """Start the real ComfyUI (``main.py --cpu``) on a free loopback port over a fresh throw-away root; yield it."""
    if not HAS_COMFYUI:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("aiohttp", reason="the host tier follows /ws with aiohttp (a ComfyUI requirement)")
    root = build_root(tmp_path_factory.mktemp("comfy_root"), request.getfixturevalue("tiny_clip_folder"))
    started = time.monotonic()
    running = ComfyServer(Path(COMFYUI), root,
                          extra_args=("--extra-model-paths-config", str(root / "extra_model_paths.yaml"))).start()
    show(f"\nComfyUI answered in {time.monotonic() - started:.1f} s on {running.url}; log {running.log_path}")
    try:
        yield ServerRoot(running, root)
    finally:
        running.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, request):
    """The real ComfyUI shared by the host tier. Its log is <root>/comfyui.log; a failing test that used it shows
    the log's tail."""
    yield from serve(tmp_path_factory, request)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, request):
    """A server for one module alone (the soak measures its memory, not what other modules left in it)."""
    yield from serve(tmp_path_factory, request)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the server gets the tail of the server's log in its report."""
    outcome = yield
    report = outcome.get_result()
    holders = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, ServerRoot)]
    if report.failed and holders:
        report.sections.append(("ComfyUI log (tail)", holders[0].server.log_tail(80)))
