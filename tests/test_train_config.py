"""Training config: TOML sections, defaults, unknown keys and bad values refused by name, the schedule."""

from __future__ import annotations

import math

import pytest

from hyperlora_core.config import TRIGGER_WORDS
from hyperlora_core.train.config import OptimConfig, StageConfig, TrainConfigError, load_config

BAD = [  # (toml text, words the message must contain)
    ("[model]\nrank = 8\n", ["unknown key", "'rank'", "[model]"]),
    ("[modle]\nk = 8\n", ["unknown section", "modle"]),
    ("[stage]\nstage = 4\n", ["stage.stage", "1, 2, 3 or \"hdb\""]),
    ("[hdb]\niterations = 0\n", ["hdb.iterations", "positive"]),
    ("[hdb]\nweight_loss = 0.0\ndenoise_loss = 0.0\n", ["weight_loss", "nothing would train"]),
    ("[hdb]\niterate_decay = 1.5\n", ["hdb.iterate_decay"]),
    ("[hdb]\nlayers = 2\n", ["unknown key", "'layers'", "[hdb]"]),
    ("[lidb]\na = 0\n", ["lidb.a", "positive"]),
    ("[stage]\ncase_mix = [0.5, 0.5, 0.5]\n", ["case_mix", "summing to 1"]),
    ("[stage]\ntrigger_position = 'middle'\n", ["trigger_position"]),
    ("[optim]\nlr = -1.0\n", ["optim.lr", "positive"]),
    ("[optim]\nema = 1.0\n", ["optim.ema"]),
    ("[run]\nprecision = 'fp8'\n", ["run.precision"]),
    ("[data]\nbackend = 'comfy'\n", ["data.base_model"]),
    ("[data]\nbackend = 'comfy'\nbase_model = 'a.safetensors'\ndiffusion_model = 'b.safetensors'\n",
     ["data.base_model", "data.diffusion_model"]),
    ("[data]\nbackend = 'comfy'\ndiffusion_model = 'unet.safetensors'\nshards = 's'\nclip_vision = 'c'\n",
     ["data.text_encoders", "data.vae"]),
    ("[data]\nbackend = 'comfy'\nbase_model = 'a.safetensors'\n", ["data.shards", "data.clip_vision"]),
    ("[data]\ntext_encoders = [1, 2]\n", ["data.text_encoders", "list"]),
    ("[data]\ntext_encoders = ['a', 'b', 'c', 'd', 'e']\n", ["data.text_encoders", "up to 4"]),
    ("[data]\nbackend = 'comfy'\nbase_model = 'a'\nshards = 's'\nclip_vision = 'c'\ntext_encoder_type = 'SDXL'\n",
     ["data.text_encoder_type", "'sdxl'"]),
    ("[model\n", ["not valid TOML"]),
]


@pytest.mark.parametrize("text,words", BAD)
def test_bad_configs_are_refused_by_name(tmp_path, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(TrainConfigError) as err:
        load_config(path)
    for word in words:
        assert word in str(err.value)


def test_a_stage_file_reads_and_defaults_fill_the_rest(tmp_path):
    path = tmp_path / "stage2.toml"
    path.write_text("[stage]\nstage = 2\ncase_mix = [0.6, 0.2, 0.2]\n[optim]\nsteps = 15000\n[run]\nshard = true\n")
    config = load_config(path)
    assert config.stage.stage == 2 and config.stage.case_mix == (0.6, 0.2, 0.2)
    assert config.optim.steps == 15000 and config.run.shard and config.model.k == 128 and config.model.base_rank == 4
    assert config.stage.trigger_words == TRIGGER_WORDS
    assert type(config).from_dict(config.to_dict()) == config  # what a checkpoint stores reads back equal


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_shipped_stage_configs_load(stage):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "docs" / "training" / f"stage{stage}.toml")
    assert config.stage.stage == stage and config.data.backend == "comfy" and config.run.precision == "bf16"
    assert (config.stage.init == "") == (stage == 1)


def test_trigger_position():
    assert StageConfig(trigger_position="prefix").with_trigger("a photo") == f"{TRIGGER_WORDS}, a photo"
    assert StageConfig(trigger_position="suffix").with_trigger("a photo") == f"a photo, {TRIGGER_WORDS}"


def test_warmup_then_cosine():
    optim = OptimConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert optim.lr_at(0) == pytest.approx(0.1) and optim.lr_at(9) == pytest.approx(1.0)
    assert optim.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optim.lr_at(110) == pytest.approx(0.1)


def test_the_training_package_imports_no_host():
    """hyperlora_core.train and all its modules import without ComfyUI (the comfy backend is train_comfy/)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pkgutil, importlib, hyperlora_core.train as t\n"
            "names = [m.name for m in pkgutil.iter_modules(t.__path__) if m.name != '__main__']\n"
            "[importlib.import_module('hyperlora_core.train.' + n) for n in names]\n"
            "import hyperlora_core.evaluate\n"
            "bad = [m for m in ('comfy', 'folder_paths', 'server', 'nodes', 'comfy_api') if m in sys.modules]\n"
            "print(len(names), bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[0]) >= 10 and out[1] == "[]"


def test_the_shipped_hyperdreambooth_config_loads():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "docs" / "training" / "hdb.toml")
    assert config.stage.stage == "hdb" and config.hdb.supervision == "runs/lidb" and config.hdb.encoder
    assert (config.lidb.a, config.lidb.b) == (100, 50) and config.data.backend == "comfy"
    assert type(config).from_dict(config.to_dict()) == config


def test_separate_base_model_files_read(tmp_path):
    """A diffusion model with its text encoders and VAE (one text encoder may be written without the list)."""
    path = tmp_path / "run.toml"
    path.write_text("[data]\nbackend = 'comfy'\ndiffusion_model = 'unet.safetensors'\nvae = 'vae.safetensors'\n"
                    "text_encoders = ['clip_l.safetensors', 'clip_g.safetensors']\ntext_encoder_type = 'sdxl'\n"
                    "shards = 's'\nclip_vision = 'c'\n")
    data = load_config(path).data
    assert data.text_encoders == ("clip_l.safetensors", "clip_g.safetensors") and data.text_encoder_type == "sdxl"
    assert type(load_config(path)).from_dict(load_config(path).to_dict()).data == data
    path.write_text("[data]\ntext_encoders = 't5xxl.safetensors'\n")
    assert load_config(path).data.text_encoders == ("t5xxl.safetensors",)

