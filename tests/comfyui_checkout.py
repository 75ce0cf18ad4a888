"""The ComfyUI the host tier runs against: ``COMFYUI_PATH`` if set, else the pinned v0.3.64 source tree
(``../shared/host/ComfyUI-v0.3.64.tar.gz`` beside the repository, or ``$HYPERLORA_COMFYUI_TARBALL``) unpacked into
a temporary folder for this test session. Nothing of ComfyUI is copied into the repository.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "host" / "ComfyUI-v0.3.64.tar.gz"
MAX_UNPACKED = 512 << 20  # the v0.3.64 tree is ~16 MiB unpacked; refuse anything far larger


def tarball() -> Path:
    return Path(os.environ.get("HYPERLORA_COMFYUI_TARBALL", TARBALL))


def _unpack(archive: Path) -> Path:
    """Unpack ``archive`` (which holds ``ComfyUI/``) into a fresh temp folder removed at exit; return the tree."""
    target = Path(tempfile.mkdtemp(prefix="hyperlora-comfyui-"))
    atexit.register(shutil.rmtree, target, True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        if sum(m.size for m in members) > MAX_UNPACKED:
            raise RuntimeError(f"{archive} unpacks to more than {MAX_UNPACKED >> 20} MiB: not the ComfyUI tree")
        tar.extractall(target, filter="data")
    tree = target / "ComfyUI"
    if not (tree / "comfy" / "lora.py").is_file():
        raise RuntimeError(f"{archive} does not hold ComfyUI/comfy/lora.py: not the ComfyUI source tree")
    return tree


def ensure_comfyui() -> str | None:
    """Set and return ``COMFYUI_PATH``: the given checkout, or the pinned tree unpacked; None if neither exists."""
    given = os.environ.get("COMFYUI_PATH")
    if given:
        return given
    archive = tarball()
    if not archive.is_file():
        return None
    os.environ["COMFYUI_PATH"] = str(_unpack(archive))
    return os.environ["COMFYUI_PATH"]
