"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

TINY_CLIP_WIDTH = 32  # width of the tiny HF-format CLIP double written by the tiny_clip_folder fixture


def conditions(batch: int, seed: int = 0, clip_dim: int = 1024, embed_dim: int = 512):
    """Random face conditions: CLIP tokens [b, 257, clip_dim] and unit-norm ArcFace embeddings [b, embed_dim]."""
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, 257, clip_dim, generator=g)
    arc = torch.nn.functional.normalize(torch.randn(batch, embed_dim, generator=g), dim=-1)
    return clip, arc


def pack_module(name: str):
    """``nodes.<name>`` of this repository imported as a package (its nodes use relative imports), once per run."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    package = "hyperlora_pack_under_test"
    if package not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(package, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")
