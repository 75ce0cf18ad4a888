"""The frozen base model of a training run, read by ComfyUI's own loaders (``comfy.sd``) from the files of ``[data]``.

Either a checkpoint (``base_model``: what CheckpointLoaderSimple loads), or a diffusion model (``diffusion_model``:
UNETLoader) with its text encoders (``text_encoders``: CLIPLoader / DualCLIPLoader, read as ``text_encoder_type``)
and a VAE (``vae``: VAELoader). With a checkpoint, ``text_encoders`` or ``vae`` replace the checkpoint's own.

Every file is checked before ComfyUI reads it: it exists, it is safetensors (pickles are never loaded) and it is
whole. What ComfyUI would only log (a text encoder or VAE with weights missing from the file, a checkpoint without
text encoders) becomes an error naming the config key and the file, so that a run never trains against a model
with random parts.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperlora_core.errors import CheckpointFileMissing, HyperLoRAError
from hyperlora_core.safetensors_file import read_header
from hyperlora_core.train.config import DataConfig

SUFFIXES = (".safetensors", ".sft")  # the only weight files read (ComfyUI would also unpickle .ckpt/.pt)
OPTIONAL_TEXT_KEYS = ("logit_scale", "text_projection")  # absent from many text encoder files; ComfyUI ignores them
CLIP_TYPE_ALIASES = {"sdxl": "stable_diffusion"}  # DualCLIPLoader's "sdxl" is CLIPType.STABLE_DIFFUSION
OPEN_CLIP_KEY = "transformer.resblocks.0.ln_1.weight"  # an open_clip-format text tower, converted by ComfyUI


class BaseModelError(HyperLoRAError, ValueError):
    """A base-model file named by the training config cannot be used."""


class BaseModelFileMissing(CheckpointFileMissing):
    """A base-model file named by the training config does not exist."""


@dataclass
class BaseModel:
    """What ComfyUI's loaders gave: the diffusion model (ModelPatcher), its text encoders (comfy.sd.CLIP), its VAE."""

    patcher: object
    clip: object
    vae: object


def checked_file(name: str, key: str) -> Path:
    """``name`` as a path, after checking it exists, is safetensors and is whole (``key`` names it in errors)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise BaseModelFileMissing(f"{key} '{path}' does not exist: give the path of the .safetensors file")
    if path.suffix.lower() not in SUFFIXES:
        raise BaseModelError(f"{key} '{path}' is not a .safetensors file: for safety only safetensors weights are "
                             "loaded (use the model's .safetensors release, or convert it)")
    read_header(path, key)  # a truncated download, a git-LFS pointer, a web page or a pickle: refused here
    return path


class _Complaints(logging.Handler):
    """Collects the messages ComfyUI logs that start with one of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__(logging.WARNING)
        self.prefixes, self.messages = tuple(prefixes), []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefixes):
            self.messages.append(message)


@contextmanager
def complaints(*prefixes: str) -> Iterator[list[str]]:
    """The warnings ComfyUI logs while the block runs that start with ``prefixes`` (e.g. "clip missing")."""
    handler = _Complaints(prefixes)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def missing_keys(messages: Sequence[str], ignored: Sequence[str] = ()) -> list[str]:
    """The keys listed by ComfyUI's "<what> missing: [...]" warnings, less those containing an ``ignored`` part."""
    keys = []
    for message in messages:
        listed = message[message.find("["):] if "[" in message else message  # "unet missing: [...]", "... keys [...]"
        try:
            names = ast.literal_eval(listed)
        except (ValueError, SyntaxError):
            names = [listed]
        keys += [str(k) for k in names if not any(part in str(k) for part in ignored)]
    return keys


def _clip_type(name: str):
    import comfy.sd

    member = CLIP_TYPE_ALIASES.get(name, name).upper()
    if member not in comfy.sd.CLIPType.__members__:
        names = sorted(set(CLIP_TYPE_ALIASES) | {m.lower() for m in comfy.sd.CLIPType.__members__})
        raise BaseModelError(f"data.text_encoder_type {name!r} is not a type ComfyUI's CLIPLoader knows; use one "
                             f"of {names}")
    return comfy.sd.CLIPType[member]


def load_text_encoders(files: Sequence[str], kind: str, options: dict | None = None):
    """comfy.sd.CLIP from text encoder files, as (Dual)CLIPLoader builds it (``kind``: its type name)."""
    import comfy.sd
    import comfy.utils

    clip_type = _clip_type(kind)
    state_dicts = []
    for i, name in enumerate(files):
        key = f"data.text_encoders[{i}]"
        sd = comfy.utils.load_torch_file(str(checked_file(name, key)), safe_load=True)
        if comfy.sd.detect_te_model(sd) is None and OPEN_CLIP_KEY not in sd:
            raise BaseModelError(f"{key} '{name}' is not a text encoder ComfyUI recognises (CLIP-L/G/H, T5, Llama, "
                                 "Qwen, Gemma): name the text encoder files of the base model there")
        state_dicts.append(sd)
    advice = "give the base model's own text encoder files, all of them, and the matching data.text_encoder_type"
    with complaints("clip missing") as said:
        try:
            clip = comfy.sd.load_text_encoder_state_dicts(state_dicts, clip_type=clip_type,
                                                          model_options=options or {})
        except RuntimeError as exc:  # torch's load_state_dict: weights of other sizes than the type's model
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise BaseModelError(f"data.text_encoders {list(files)} do not fit ComfyUI's {kind!r} text encoder "
                                 f"({first}): {advice}") from exc
    missing = missing_keys(said, OPTIONAL_TEXT_KEYS)
    if missing:
        raise BaseModelError(f"data.text_encoders {list(files)} read as type {kind!r} leave {len(missing)} weights "
                             f"of ComfyUI's text encoder unset (e.g. {missing[0]}): {advice}")
    return clip


def load_vae(name: str):
    """comfy.sd.VAE from a VAE file, as VAELoader builds it."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(checked_file(name, "data.vae")), safe_load=True)
    advice = "give the base model's VAE .safetensors, whole"
    with complaints("Missing VAE keys") as said:
        try:
            vae = comfy.sd.VAE(sd=sd)
        except (IndexError, KeyError, RuntimeError) as exc:  # ComfyUI's detection indexes tensors it expects
            raise BaseModelError(f"data.vae '{name}' is not a whole VAE ComfyUI recognises ({type(exc).__name__}: "
                                 f"{exc}): {advice}") from exc
    if vae.first_stage_model is None or said:
        detail = f" ({len(missing_keys(said))} of its weights are not in the file)" if said else ""
        raise BaseModelError(f"data.vae '{name}' is not a VAE ComfyUI recognises{detail}: {advice}")
    return vae


def _diffusion_model(name: str, options: dict):
    import comfy.sd

    path = checked_file(name, "data.diffusion_model")
    with complaints("unet missing") as said:
        try:
            patcher = comfy.sd.load_diffusion_model(str(path), model_options=options)
        except RuntimeError as exc:  # ComfyUI: "Could not detect model type"
            raise BaseModelError(f"data.diffusion_model '{name}' is not a diffusion model ComfyUI recognises: give "
                                 f"the diffusion-model file (a text encoder or VAE goes elsewhere) ({exc})") from exc
    _no_missing(said, "data.diffusion_model", name)
    return patcher


def _checkpoint(data: DataConfig, options: dict, te_options: dict):
    import comfy.sd

    path = checked_file(data.base_model, "data.base_model")
    with complaints("unet missing") as said:
        try:
            patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=not data.vae, output_clip=not data.text_encoders, model_options=options,
                te_model_options=te_options)
        except RuntimeError as exc:
            raise BaseModelError(f"data.base_model '{data.base_model}' is not a checkpoint ComfyUI recognises "
                                 f"({exc})") from exc
    _no_missing(said, "data.base_model", data.base_model)
    if clip is None and not data.text_encoders:
        raise BaseModelError(f"data.base_model '{data.base_model}' holds no text encoders: set data.text_encoders "
                             "(for a diffusion-model-only file, use data.diffusion_model with data.text_encoders "
                             "and data.vae)")
    if vae is not None and vae.first_stage_model is None:
        raise BaseModelError(f"data.base_model '{data.base_model}' holds no VAE: set data.vae")
    return patcher, clip, vae


def _no_missing(said: list[str], key: str, name: str) -> None:
    missing = missing_keys(said)
    if missing:
        raise BaseModelError(f"{key} '{name}' lacks {len(missing)} weights of the model ComfyUI detected in it "
                             f"(e.g. {missing[0]}): the file is damaged or mixes models; download it again")


def check_context(patcher, clip, data: DataConfig) -> None:
    """The text encoders give the context width the diffusion model's cross-attention takes (SDXL: 2048 = CLIP-L
    768 + CLIP-G 1280), when the model's config names it."""
    config = patcher.model.model_config.unet_config
    width = config.get("context_dim", config.get("context_in_dim"))
    if not isinstance(width, int):
        return
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize("a photo"))
    if cond.shape[-1] != width:
        source = (f"data.text_encoders {list(data.text_encoders)} read as {data.text_encoder_type!r}"
                  if data.text_encoders else f"the text encoders of data.base_model '{data.base_model}'")
        raise BaseModelError(f"{source} give a {cond.shape[-1]}-wide text context but the diffusion "
                             f"model takes {width}: give all of the base model's text encoders (SDXL: clip_l and "
                             "clip_g) and the matching data.text_encoder_type")


def load_base_model(data: DataConfig, *, precision: str = "fp32", te_options: dict | None = None) -> BaseModel:
    """The base model of ``data`` by ComfyUI's loaders. With bf16 training the frozen diffusion model is kept in bf16
    so that autocast does not cast its weights at every call (the text encoders get ComfyUI's choice, usually fp16
    on a GPU); with fp32 training both are fp32.
    ``te_options``: ComfyUI's text-encoder ``model_options`` (e.g. ``clip_l_model_config``)."""
    options = {"dtype": torch.bfloat16} if precision == "bf16" else {}
    te_options = dict(te_options or {})
    if precision == "fp32":  # ComfyUI would pick fp16 text encoders; an fp32 run encodes its captions in fp32
        te_options.setdefault("dtype", torch.float32)
    if data.base_model:
        patcher, clip, vae = _checkpoint(data, options, te_options)
    else:
        patcher, clip, vae = _diffusion_model(data.diffusion_model, options), None, None
    if data.text_encoders:
        clip = load_text_encoders(data.text_encoders, data.text_encoder_type, te_options)
    if data.vae:
        vae = load_vae(data.vae)
    check_context(patcher, clip, data)
    return BaseModel(patcher, clip, vae)
