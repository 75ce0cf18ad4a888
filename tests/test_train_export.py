"""``python -m hyperlora_core.train export`` on training checkpoints of each state.json shape the trainer wrote.

The first trainer stored the target modules as a list of SGM names plus "unet" (a UNetSpec); today's stores the
whole TargetLayers description. A checkpoint of the old shape is made here from a real toy run by rewriting its
state.json the way the old trainer wrote it; it must export to the same files as the checkpoint it came from.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from hyperlora_core.train.cli import main
from hyperlora_core.train.config import TrainConfig
from hyperlora_core.train.loop import STATE_FILE, Trainer, stored_targets
from hyperlora_core.train.toy import SyntheticIdentities, ToyDenoiser

MODEL = dict(k=8, id_rank=2, dim=16, depth=1, heads=2, dim_head=8, id_tokens=2, clip_dim=32, up_basis_std=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the toy denoiser, a stage 2 training checkpoint of 2 steps written by today's trainer)."""
    denoiser = ToyDenoiser()
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig().replace(model=MODEL, stage={"stage": 2}, optim={"steps": 2, "lr": 3e-3, "warmup": 1},
                                   run={"out": str(out), "batch": 4, "checkpoint_every": 1000, "log_every": 1000})
    trainer = Trainer(config, denoiser, SyntheticIdentities())
    trainer.train(progress=False)
    return denoiser, trainer.save()


def _rewritten(step, folder, change) -> str:
    """A copy of the step folder ``step`` at ``folder`` whose state.json went through ``change``."""
    shutil.copytree(step, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    change(state)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    return str(folder)


def _first_trainer_shape(denoiser):
    """What the first trainer wrote: "targets" = the modules' SGM names in token order, "unet" = its UNetSpec."""
    unet = denoiser.unet

    def change(state):
        state["targets"] = [module.name for module in denoiser.targets.modules]
        state["unet"] = {"name": unet.name, "level_widths": list(unet.level_widths), "context_dim": unet.context_dim}
    return change


def _exported(folder) -> dict[str, object]:
    files = {p.name: load_file(str(p)) for p in folder.glob("*.safetensors")}
    return {**files, "hyper_lora_modules.json": json.loads((folder / "hyper_lora_modules.json").read_text())}


def test_a_checkpoint_of_the_first_trainer_exports_as_it_did(run, tmp_path):
    denoiser, step = run
    old = _rewritten(step, tmp_path / "old_step", _first_trainer_shape(denoiser))
    assert stored_targets(json.loads((step / STATE_FILE).read_text()), "new") == denoiser.targets
    assert stored_targets(json.loads((tmp_path / "old_step" / STATE_FILE).read_text()), "old") == denoiser.targets
    assert main(["export", str(step), "--out", str(tmp_path / "new_export")]) == 0
    assert main(["export", old, "--out", str(tmp_path / "old_export")]) == 0
    new, got = _exported(tmp_path / "new_export"), _exported(tmp_path / "old_export")
    assert sorted(got) == sorted(new) and "base_resampler.safetensors" in got
    assert got["hyper_lora_modules.json"] == new["hyper_lora_modules.json"]
    for name in sorted(new):
        if name.endswith(".safetensors"):
            assert got[name].keys() == new[name].keys(), name
            assert all(got[name][k].equal(new[name][k]) for k in new[name]), name


@pytest.mark.parametrize("change,words", [
    (lambda state: state.pop("targets"), ["does not record the layers", "--resume", "--steps <its step, 2>"]),
    (lambda state: state.update(targets=["no_such_block.attn1"], unet={"name": "x", "level_widths": [16, 32],
                                                                        "context_dim": 24}),
     ["'no_such_block.attn1'", "no SDXL attention module"]),
    (lambda state: state.update(targets=["input_blocks.4.1.transformer_blocks.0.attn1"], unet={"name": "x"}),
     ['"unet" entry', "no UNet description"]),
], ids=["no_targets", "unknown_module", "bad_unet"])
def test_a_checkpoint_without_usable_targets_is_refused_naming_the_file(run, tmp_path, capsys, change, words):
    _, step = run
    folder = _rewritten(step, tmp_path / "step", change)
    assert main(["export", folder, "--out", str(tmp_path / "export")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "step" / STATE_FILE) in err
    for word in words:
        assert word in err
    assert not (tmp_path / "export").exists()
