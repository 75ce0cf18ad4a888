"""Host tier: the trainer's base model from files, by ComfyUI's own loaders (train_comfy/models.py).

A tiny SDXL (ComfyUI's classes, seeded weights) is written in the formats users download: a checkpoint (ComfyUI's
own ``save_checkpoint``, as CheckpointSave writes it), and the same model as a diffusion-model-only file, two text
encoder files in the Hugging Face layout (as CLIPSave splits them: clip_l, clip_g) and a VAE file. Both ways must
give the same denoiser as the model in memory.

ComfyUI detects a checkpoint's family by exact sizes (SDXL: model_channels 320, context 2048), so the fixture
registers the tiny widths as an SDXL variant in ``comfy.supported_models.models`` for the module's duration, as
a custom node registering a model family would; the loaders, key conversions and detection all run unchanged.
The text encoder widths come from ComfyUI's ``model_options`` (``clip_l_model_config``, ``clip_g_model_config``).
"""

from __future__ import annotations

import pytest
import torch
from comfy_server import show
from nodepack import tiny

from hyperlora_core.train.config import DataConfig

# Tiny text encoders at width 32 with ComfyUI's default depths (CLIP-L 12 layers, CLIP-G 32: a G file is told from
# an L file by its 31st layer). Separate files read the generic "model_config" (ComfyUI's long-CLIP check replaces
# the per-encoder entries); a checkpoint reads the per-encoder ones: all three carry the same widths.
WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}


def te_options() -> dict:
    """ComfyUI's text-encoder model_options for the tiny widths (fresh dicts: ComfyUI writes into them)."""
    return {key: dict(WIDTHS) for key in ("model_config", "clip_l_model_config", "clip_g_model_config")}
SIDE = 64


@pytest.fixture(scope="module")
def tiny_family(comfy):
    """The tiny SDXL's sizes registered as an SDXL family (named SDXL, so that targets read as SDXL's)."""
    import comfy.supported_models

    sizes = {k: tiny.TINY_SDXL_CONFIG[k] for k in ("model_channels", "use_linear_in_transformer",
                                                    "transformer_depth", "context_dim", "adm_in_channels")}
    family = type("SDXL", (comfy.supported_models.SDXL,), {
        "unet_config": dict(sizes, use_temporal_attention=False),
        "unet_extra_config": {"num_heads": -1, "num_head_channels": 16}})
    comfy.supported_models.models.insert(0, family)
    yield family
    comfy.supported_models.models.remove(family)


@pytest.fixture(scope="module")
def files(tiny_family, tmp_path_factory):
    """{name: path} of the written files, and the in-memory (patcher, clip, vae) they hold."""
    import comfy.sd
    import comfy.utils

    root = tmp_path_factory.mktemp("base_model")
    patcher, clip, vae = tiny.tiny_sdxl(seed=3), tiny.tiny_clip(seed=4, options=te_options()), tiny.tiny_vae(5)
    paths = {"checkpoint": root / "checkpoints" / "tiny_sdxl.safetensors"}
    paths["checkpoint"].parent.mkdir()
    comfy.sd.save_checkpoint(str(paths["checkpoint"]), patcher, clip, vae)
    whole = comfy.utils.load_torch_file(str(paths["checkpoint"]), safe_load=True)
    prefix = "model.diffusion_model."
    paths["unet"] = root / "diffusion_models" / "tiny_sdxl_unet.safetensors"
    parts = {"unet": {k[len(prefix):]: v for k, v in whole.items() if k.startswith(prefix)}}
    text = clip.get_sd()
    for name in ("clip_l", "clip_g"):  # CLIPSave's split: one file per encoder, "transformer." dropped
        paths[name] = root / "text_encoders" / f"tiny_{name}.safetensors"
        parts[name] = {k[len(name) + len(".transformer."):]: v for k, v in text.items() if k.startswith(name)}
    paths["vae"] = root / "vae" / "tiny_vae.safetensors"
    parts["vae"] = vae.get_sd()
    for name, sd in parts.items():
        paths[name].parent.mkdir(exist_ok=True)
        comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, str(paths[name]))
    return paths, (patcher, clip, vae)


def data(**files) -> DataConfig:
    return DataConfig(backend="comfy", shards="unused", clip_vision="unused", resolution=SIDE,
                      **{k: str(v) if not isinstance(v, tuple) else tuple(map(str, v)) for k, v in files.items()})


def separate(paths, **changes) -> DataConfig:
    return data(**{"diffusion_model": paths["unet"], "text_encoders": (paths["clip_l"], paths["clip_g"]),
                   "vae": paths["vae"], **changes})


def load(config: DataConfig):
    from train_comfy.backend import load_comfy_denoiser

    return load_comfy_denoiser(config, device="cpu", te_options=te_options())


def _prediction(denoiser, lora_seed: int = 0) -> torch.Tensor:
    """The denoiser's output for a fixed noisy latent and caption, with a small random LoRA on every target."""
    g = torch.Generator().manual_seed(lora_seed)
    lora = {lin.key: (torch.randn(1, 2, lin.in_features, generator=g) * 0.1,
                      torch.randn(1, lin.out_features, 2, generator=g) * 0.1) for lin in denoiser.targets.linears}
    x0 = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=g)
    t = torch.tensor([400])
    x_t = denoiser.noisy(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        return denoiser.predict(x_t, t, denoiser.encode_text(["a portrait photo"]), lora)


def test_checkpoint_and_separate_files_give_the_model_in_memory(files):
    from train_comfy.backend import ComfyDenoiser

    paths, (patcher, clip, vae) = files
    reference = _prediction(ComfyDenoiser(patcher, clip, resolution=SIDE))
    image = torch.rand(1, SIDE, SIDE, 3, generator=torch.Generator().manual_seed(9))
    latents = vae.encode(image)
    for way, config in (("checkpoint", data(base_model=paths["checkpoint"])), ("separate files", separate(paths))):
        denoiser, loaded_vae = load(config)
        assert denoiser.targets.family == "SDXL" and len(denoiser.targets.modules) == 140
        worst = float((_prediction(denoiser) - reference).abs().max())
        vae_worst = float((loaded_vae.encode(image) - latents).abs().max())
        show(f"\n{way}: prediction max |diff| to the model in memory {worst:.1e} (scale "
             f"{float(reference.abs().max()):.2f}); VAE latents {vae_worst:.1e}")
        assert worst < 1e-5 and vae_worst < 1e-6


def test_the_lora_reaches_the_loaded_model(files):
    """Another LoRA changes the loaded model's prediction (so the equality above can fail)."""
    paths, _ = files
    denoiser, _ = load(separate(paths))
    assert float((_prediction(denoiser, 0) - _prediction(denoiser, 1)).abs().max()) > 1e-3


def test_a_checkpoint_vae_and_text_encoders_can_be_replaced(files):
    paths, (_, _, vae) = files
    other = tiny.tiny_vae(6)
    replacement = paths["vae"].with_name("other_vae.safetensors")
    import comfy.utils

    comfy.utils.save_torch_file(other.get_sd(), str(replacement))
    _, loaded = load(data(base_model=paths["checkpoint"], vae=replacement,
                          text_encoders=(paths["clip_l"], paths["clip_g"])))
    image = torch.rand(1, SIDE, SIDE, 3, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(loaded.encode(image), other.encode(image), atol=1e-6)
    assert not torch.allclose(other.encode(image), vae.encode(image), atol=1e-3)


def _truncated(path, tmp_path):
    cut = tmp_path / path.name
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def _without(path, tmp_path, part: str):
    """A copy of the file without the tensors whose names contain ``part`` (an incomplete export)."""
    from safetensors.torch import load_file, save_file

    cut = tmp_path / f"partial_{path.name}"
    save_file({k: v for k, v in load_file(str(path)).items() if part not in k}, str(cut))
    return cut


def _pickle(tmp_path):
    bad = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, bad)
    return bad


BAD = {  # name: (config from the paths and tmp_path, error class name, words the message must hold)
    "missing unet": (lambda p, t: separate(p, diffusion_model=t / "gone.safetensors"),
                     "BaseModelFileMissing", ["data.diffusion_model", "does not exist"]),
    "pickle checkpoint": (lambda p, t: data(base_model=_pickle(t)), "BaseModelError",
                          ["data.base_model", "only safetensors"]),
    "truncated vae": (lambda p, t: separate(p, vae=_truncated(p["vae"], t)), "TruncatedFileError",
                      ["data.vae", "truncated"]),
    "vae as unet": (lambda p, t: separate(p, diffusion_model=p["vae"]), "BaseModelError",
                    ["data.diffusion_model", "not a diffusion model"]),
    "unet as text encoder": (lambda p, t: separate(p, text_encoders=(p["unet"], p["clip_g"])), "BaseModelError",
                             ["data.text_encoders[0]", "not a text encoder"]),
    "vae without its encoder": (lambda p, t: separate(p, vae=_without(p["vae"], t, "encoder")), "BaseModelError",
                                ["data.vae", "not in the file"]),
    "clip_g without its last layer": (lambda p, t: separate(p, text_encoders=(
        p["clip_l"], _without(p["clip_g"], t, "layers.31."))), "BaseModelError", ["data.text_encoders", "unset"]),
    "unet as vae": (lambda p, t: separate(p, vae=p["unet"]), "BaseModelError", ["data.vae", "not a VAE"]),
    "clip_l only": (lambda p, t: separate(p, text_encoders=(p["clip_l"],)), "BaseModelError",
                    ["32-wide text context", "takes 64", "clip_g"]),
    "clip_g read as flux": (lambda p, t: separate(p, text_encoders=(p["clip_l"], p["clip_g"]),
                                                  text_encoder_type="flux"), "BaseModelError",
                            ["data.text_encoders", "'flux'", "takes 64"]),
    "unknown type": (lambda p, t: separate(p, text_encoder_type="sdxxl"), "BaseModelError",
                     ["'sdxxl'", "'sdxl'", "'flux'"]),
    "diffusion model as checkpoint": (lambda p, t: data(base_model=p["unet"]), "BaseModelError",
                                      ["data.base_model", "no text encoders", "data.diffusion_model"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_base_model_files_are_named(files, tmp_path, case):
    make, kind, words = BAD[case]
    with pytest.raises(Exception) as err:
        load(make(files[0], tmp_path))
    assert type(err.value).__name__ == kind, err.value
    assert isinstance(err.value, (ValueError, FileNotFoundError, RuntimeError))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_the_run_command_reaches_the_loaders(files, tmp_path):
    """``train run``'s backend builder hands [data] to these loaders (a missing diffusion model is named)."""
    from hyperlora_core.train.cli import build_backend
    from hyperlora_core.train.config import TrainConfig

    paths, _ = files
    config = TrainConfig().replace(data={"backend": "comfy", "shards": str(tmp_path), "clip_vision": str(tmp_path),
                                         "diffusion_model": str(tmp_path / "gone.safetensors"),
                                         "text_encoders": [str(paths["clip_l"]), str(paths["clip_g"])],
                                         "vae": str(paths["vae"])}, run={"device": "cpu"})
    with pytest.raises(FileNotFoundError, match="data.diffusion_model .*gone.safetensors' does not exist"):
        build_backend(config)
