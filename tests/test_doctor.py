"""The doctor: one test per problem kind, each checking the status and the fix it prints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hyperlora_core.cli import main
from hyperlora_core.doctor import ANTELOPE_FILES, check_packages, run_doctor
from hyperlora_core.synthetic import TINY_UNET

from helpers import TINY_CLIP_WIDTH

LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"


@pytest.fixture()
def models(tmp_path, tiny_factory, tiny_clip_folder):
    """A complete models folder: tiny checkpoint, tiny CLIP folder, antelopev2 files of plausible size."""
    root = tmp_path / "models"
    shutil.copytree(tiny_factory(), root / "hyper_lora" / "sdxl_tiny")
    shutil.copytree(tiny_clip_folder, root / "hyper_lora" / "clip_vit" / "clip_vit_large_14")
    ante = root / "insightface" / "models" / "antelopev2"
    ante.mkdir(parents=True)
    for name in ANTELOPE_FILES:
        (ante / name).write_bytes(b"\x08\x07" + b"\0" * 4096)
    return root


def by_name(checks):
    return {c.name: c for c in checks}


def run(models):
    return by_name(run_doctor(models, packages=False, unet=TINY_UNET, clip_width=TINY_CLIP_WIDTH))


def test_healthy_folder(models):
    checks = run(models)
    assert {c.status for c in checks.values()} == {"ok"}, [c for c in checks.values() if c.status != "ok"]
    assert "140 modules" in checks["checkpoint sdxl_tiny"].detail


def test_missing_models_folder(tmp_path):
    (check,) = run_doctor(tmp_path / "nope", packages=False)
    assert check.status == "problem" and "--models" in check.fix


def test_no_checkpoint(models):
    shutil.rmtree(models / "hyper_lora" / "sdxl_tiny")
    check = run(models)["HyperLoRA checkpoint"]
    assert check.status == "problem" and "sdxl_hyper_id_lora_v1_fidelity" in check.fix


def test_checkpoint_lfs_pointer(models):
    (models / "hyper_lora" / "sdxl_tiny" / "hyper_lora_modules.safetensors").write_text(LFS)
    check = run(models)["checkpoint sdxl_tiny/hyper_lora_modules.safetensors"]
    assert check.status == "problem" and "git-LFS pointer" in check.detail and "git lfs pull" in check.fix


def test_checkpoint_truncated(models):
    path = models / "hyper_lora" / "sdxl_tiny" / "resampler.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    check = run(models)["checkpoint sdxl_tiny/resampler.safetensors"]
    assert check.status == "problem" and "truncated" in check.detail and "download it again" in check.fix


def test_checkpoint_for_another_model(models):
    check = by_name(run_doctor(models, packages=False))["checkpoint sdxl_tiny/hyper_lora_modules.json"]  # SDXL
    assert check.status == "problem" and "different model than SDXL" in check.detail


def test_every_broken_file_gets_its_own_line(models):
    """Four broken files, four problem lines in one run, one per file; the good CLIP and face files stay ok."""
    folder = models / "hyper_lora" / "sdxl_tiny"
    (folder / "hyper_lora_modules.json").write_text("{}")  # an empty module list
    (folder / "hyper_lora_modules.safetensors").write_text(LFS)  # a git-LFS pointer instead of the basis
    resampler = folder / "resampler.safetensors"
    resampler.write_bytes(resampler.read_bytes()[:-100])  # an interrupted download
    (folder / "id_projector.safetensors").unlink()  # missing
    checks = run_doctor(models, packages=False, unet=TINY_UNET, clip_width=TINY_CLIP_WIDTH)
    problems = {c.name: c for c in checks if c.status == "problem"}
    assert sorted(problems) == [f"checkpoint sdxl_tiny/{f}" for f in ("hyper_lora_modules.json",
                                "hyper_lora_modules.safetensors", "id_projector.safetensors",
                                "resampler.safetensors")], [(c.name, c.detail) for c in checks]
    assert "non-empty" in problems["checkpoint sdxl_tiny/hyper_lora_modules.json"].detail
    assert "git-LFS" in problems["checkpoint sdxl_tiny/hyper_lora_modules.safetensors"].detail
    assert "truncated" in problems["checkpoint sdxl_tiny/resampler.safetensors"].detail
    assert "missing" in problems["checkpoint sdxl_tiny/id_projector.safetensors"].detail
    assert all(c.fix for c in problems.values())


def test_nested_checkpoint(models):
    folder = models / "hyper_lora" / "sdxl_tiny"
    shutil.move(str(folder), str(models / "tmp"))
    folder.mkdir()
    shutil.move(str(models / "tmp"), str(folder / "sdxl_tiny"))
    check = run(models)["checkpoint sdxl_tiny"]
    assert check.status == "warn" and "nested" in check.detail and "move the files" in check.fix


def test_no_clip(models):
    shutil.rmtree(models / "hyper_lora" / "clip_vit")
    check = run(models)["CLIP ViT-L/14"]
    assert check.status == "problem" and "clip-vit-large-patch14" in check.fix


def test_clip_wrong_width(models):
    check = by_name(run_doctor(models, packages=False, unet=TINY_UNET))["CLIP clip_vit_large_14"]
    assert check.status == "problem" and "reads 1024-wide" in check.detail and "ViT-L/14" in check.fix


def test_clip_lfs(models):
    clip = models / "hyper_lora" / "clip_vit" / "clip_vit_large_14"
    (clip / "model.safetensors").write_text(LFS)
    check = run(models)["CLIP clip_vit_large_14"]
    assert check.status == "problem" and "git-LFS" in check.detail


def test_antelopev2_missing(models):
    shutil.rmtree(models / "insightface")
    check = run(models)["antelopev2"]
    assert check.status == "problem" and all(name in check.fix for name in ANTELOPE_FILES)


def test_antelopev2_nested_is_a_warning(models):
    base = models / "insightface" / "models" / "antelopev2"
    (base / "antelopev2").mkdir()
    for name in ANTELOPE_FILES:
        shutil.move(str(base / name), str(base / "antelopev2" / name))
    checks = run(models)
    assert checks["antelopev2 folder"].status == "warn"
    assert checks["antelopev2/glintr100.onnx"].status == "ok"


@pytest.mark.parametrize("content,fragment", [(None, "missing"), (LFS, "git-LFS"), ("x" * 10, "only 10 bytes")])
def test_antelopev2_bad_file(models, content, fragment):
    path = models / "insightface" / "models" / "antelopev2" / "glintr100.onnx"
    path.unlink()
    if content is not None:
        path.write_text(content)
    check = run(models)["antelopev2/glintr100.onnx"]
    assert check.status == "problem" and fragment in check.detail and "glintr100.onnx" in check.fix


def test_packages_both_onnxruntimes_and_missing_insightface():
    from importlib.metadata import PackageNotFoundError

    def version(dist):
        if dist == "insightface":
            raise PackageNotFoundError(dist)
        return "1.31.1"

    checks = by_name(check_packages(version=version, providers=lambda: ["CPUExecutionProvider"]))
    assert checks["package insightface"].status == "problem" and checks["package insightface"].fix == \
        "pip install insightface"
    assert checks["onnxruntime"].status == "warn" and checks["onnxruntime"].fix == \
        "pip uninstall -y onnxruntime-gpu onnxruntime && pip install onnxruntime"
    assert checks["onnxruntime providers"].detail == "CPUExecutionProvider"


def test_cli_prints_table_and_fails_on_problems(models, capsys):
    shutil.rmtree(models / "insightface")
    assert main(["doctor", "--models", str(models)]) == 1
    out = capsys.readouterr().out
    assert "antelopev2" in out and "fix: download antelopev2" in out and "problem(s)" in out


def test_models_the_nodes_never_use_are_notes_not_problems(models, capsys):
    """genderage.onnx and 1k3d68.onnx come with antelopev2 but are never loaded: missing or broken, a note."""
    ante = models / "insightface" / "models" / "antelopev2"
    (ante / "genderage.onnx").unlink()
    (ante / "1k3d68.onnx").write_text(LFS)
    checks = run(models)
    assert checks["antelopev2/genderage.onnx"].status == "note" and "never use" in \
        checks["antelopev2/genderage.onnx"].detail
    assert checks["antelopev2/1k3d68.onnx"].status == "note" and not checks["antelopev2/1k3d68.onnx"].fix
    assert {c.status for c in checks.values()} == {"ok", "note"}


def test_doctor_script_runs_from_comfyuis_folder(models, tmp_path):
    """What the README says: from ComfyUI's folder, ``python custom_nodes/ComfyUI-HyperLoRA/doctor.py`` checks
    ComfyUI/models (the package folder a symlink, as for many installs)."""
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    shutil.move(str(models), str(comfyui / "models"))
    (comfyui / "custom_nodes" / "ComfyUI-HyperLoRA").symlink_to(Path(__file__).resolve().parents[1])
    (comfyui / "models" / "insightface" / "models" / "antelopev2" / "genderage.onnx").unlink()
    run = subprocess.run([sys.executable, "custom_nodes/ComfyUI-HyperLoRA/doctor.py"], cwd=comfyui,
                         capture_output=True, text=True, timeout=300)
    assert "No module named" not in run.stderr, run.stderr[-2000:]
    assert "checkpoint sdxl_tiny" in run.stdout and "antelopev2/glintr100.onnx" in run.stdout, run.stdout
    assert str(comfyui / "models") in run.stdout or "clip_vit_large_14" in run.stdout, run.stdout
    genderage = next(line for line in run.stdout.splitlines() if "genderage.onnx" in line)
    assert " note " in genderage, run.stdout
    # the tiny checkpoint and CLIP are not SDXL-sized: those are the only problems, and they give exit code 1
    problems = [line for line in run.stdout.splitlines() if " problem " in line]
    assert run.returncode == 1 and problems and all("sdxl_tiny" in p or "CLIP" in p for p in problems), run.stdout
