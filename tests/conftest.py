"""Shared fixtures. The machines are small and shared: keep torch to two threads."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

from hyperlora_core import load_hyperlora  # noqa: E402
from hyperlora_core.synthetic import TINY_UNET, write_checkpoint  # noqa: E402

from comfyui_checkout import ensure_comfyui  # noqa: E402
from helpers import TINY_CLIP_WIDTH  # noqa: E402
from tiers import TierCounter  # noqa: E402

ensure_comfyui()  # before tests/host/conftest.py reads COMFYUI_PATH


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; the only tests CI may skip")
    config.pluginmanager.register(TierCounter(), "hyperlora-tiers")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """write_checkpoint(**kw) cached per argument set for the whole session."""
    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = write_checkpoint(tmp_path_factory.mktemp("ckpt"), **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_factory):
    return tiny_factory(base=True)


@pytest.fixture()
def tiny_hl(tiny_ckpt):
    return load_hyperlora(tiny_ckpt, unet=TINY_UNET)


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A random CLIP vision tower in the HF format (config.json + model.safetensors), written by transformers."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the HF-format CLIP double")
    config = transformers.CLIPVisionConfig(hidden_size=TINY_CLIP_WIDTH, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=224, patch_size=14,
                                           hidden_act="quick_gelu")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "clip_vit_large_14"
    transformers.CLIPVisionModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder
