"""Checks every file and package HyperLoRA's nodes need, and prints the fix for each problem.

Run it from ComfyUI's folder, with ComfyUI's Python (the one that runs main.py):

    python custom_nodes/ComfyUI-HyperLoRA/doctor.py

It checks ComfyUI's models folder (two levels up from this file); pass ``--models <folder>`` for another one.
Exit code 1 when something the nodes need is missing or broken. This file is not loaded by ComfyUI.
"""

import sys
from pathlib import Path

HERE = Path(__file__).absolute().parent  # not resolved: custom_nodes/<this folder>, even when it is a symlink
sys.path.insert(0, str(HERE))

from hyperlora_core.cli import main  # noqa: E402


def doctor_args(argv: list[str]) -> list[str]:
    """``doctor`` with ComfyUI's models folder unless the user named one."""
    if "--models" in argv or any(a.startswith("--models=") for a in argv):
        return ["doctor", *argv]
    return ["doctor", "--models", str(HERE.parent.parent / "models"), *argv]


if __name__ == "__main__":
    sys.exit(main(doctor_args(sys.argv[1:])))
