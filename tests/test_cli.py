"""``python -m hyperlora_core inspect``: a summary for a good folder, the exact problem for a broken one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from hyperlora_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_summary(tiny_ckpt, capsys):
    assert main(["inspect", str(tiny_ckpt), "--unet", "16,32,24"]) == 0
    out = capsys.readouterr().out
    assert "140 for UNet 16,32,24, kohya_diffusers names, SGM (down, mid, up) order" in out
    assert "K=16, ID rank 4, base rank 2" in out
    assert "arcface + clip, Base-LoRA: yes" in out
    assert "dim 32, depth 2, heads 2, dim_head 16, latent_tokens 1120" in out
    assert "problems     none" in out


def test_inspect_json(tiny_factory, capsys):
    assert main(["inspect", str(tiny_factory(naming="diffusers", order="diffusers")), "--unet", "16,32,24",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["module_naming"] == "diffusers" and info["module_order"].startswith("diffusers")
    assert info["id_projector"] == {"embed_dim": 512, "id_tokens": 4, "width": 24}
    assert info["files"]["hyper_lora_modules.safetensors"]["tensors"] == 1120


def test_inspect_reports_a_broken_folder(tiny_factory, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_factory(), folder)
    (folder / "resampler.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    run = subprocess.run([sys.executable, "-m", "hyperlora_core", "inspect", str(folder), "--unet", "16,32,24"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert "git-LFS pointer" in run.stdout and "resampler.safetensors" in run.stdout


def test_inspect_refuses_non_sdxl_by_default(tiny_ckpt, capsys):
    assert main(["inspect", str(tiny_ckpt)]) == 1
    assert "made for a different model than SDXL" in capsys.readouterr().out
