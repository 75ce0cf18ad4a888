"""Training configuration: one validated dataclass per component, read from one TOML file.

A run file has the sections ``[model]``, ``[stage]``, ``[optim]``, ``[run]``, ``[data]`` and
``[validation]`` (and, for the HyperDreamBooth stage ``stage = "hdb"``, ``[hdb]`` and ``[lidb]``); every field
has a default, and an unknown section or key is an error that names it (never silently ignored). The whole
config is stored in every training checkpoint, so a resumed run is the run that was started.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport has the same API
    import tomli as tomllib

from ..config import TRIGGER_WORDS
from ..errors import HyperLoRAError
from ..hdb.config import HdbConfig, HdbConfigError
from ..lidb import LIDB_A, LIDB_B, LIDB_SEED

PRECISIONS = ("fp32", "bf16")  # autocast choice for the frozen denoiser and the hypernetwork forward
TRIGGER_POSITIONS = ("prefix", "suffix")
HDB = "hdb"  # the HyperDreamBooth stage: the LiDB-predicting hypernetwork of [hdb], supervised by [lidb] weights
STAGES = (1, 2, 3, HDB)
BACKENDS = ("toy", "comfy")
TEXT_ENCODER_TYPE = "stable_diffusion"  # ComfyUI's CLIPLoader default type (two CLIP files then read as SDXL's)
MAX_TEXT_ENCODERS = 4  # comfy.sd.load_clip reads one to four text encoder files


class TrainConfigError(HyperLoRAError, ValueError):
    """A training config file or value cannot be used."""


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise TrainConfigError(f"{owner}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The trainable hypernetwork. Defaults are the released sizes; target widths come from the base model."""

    k: int = 128  # basis size K: coefficients per token
    id_rank: int = 8  # ID-LoRA rank (the Base-LoRA has id_rank // 2)
    base: bool = True  # train a Base-LoRA (base resampler + base bases): needed for stages 1 and 2
    dim: int = 1024  # resampler width
    depth: int = 4  # resampler blocks
    heads: int = 12  # attention heads
    dim_head: int = 64  # width of one head
    ff_mult: int = 4  # feed-forward inner width = ff_mult × dim
    id_tokens: int = 16  # tokens the ID projector makes from one ArcFace embedding
    embed_dim: int = 512  # ArcFace embedding width (antelopev2 glintr100)
    clip_dim: int = 1024  # CLIP token width (ViT-L/14 penultimate layer)
    up_basis_std: float = 1e-3  # init std of the up bases (down bases: 1/sqrt(fan_in)); small, so a LoRA starts small
    init_seed: int = 0  # seed of the initial weights

    def __post_init__(self) -> None:
        _positive("model", k=self.k, id_rank=self.id_rank, dim=self.dim, depth=self.depth, heads=self.heads,
                  dim_head=self.dim_head, ff_mult=self.ff_mult, id_tokens=self.id_tokens, embed_dim=self.embed_dim,
                  clip_dim=self.clip_dim)
        if self.base and self.id_rank < 2:
            raise TrainConfigError("model.id_rank must be at least 2 when model.base is on (base rank = id_rank // 2)")
        if not (math.isfinite(self.up_basis_std) and self.up_basis_std >= 0):
            raise TrainConfigError(f"model.up_basis_std must be >= 0, got {self.up_basis_std}")

    @property
    def base_rank(self) -> int:
        return self.id_rank // 2


@dataclass(frozen=True)
class StageConfig:
    """Which of the paper's three stages this run trains, and stage 2/3's trigger-word rules.

    case_mix is the probability of each of the three cases a sample of stages 2 and 3 draws:
    (reconstruct: trigger words in the caption, both LoRAs on, the image is the target;
    match base: no trigger words, ID-LoRA only, the frozen base model's prediction is the target;
    match Base-LoRA: no trigger words, both LoRAs on, the base model + Base-LoRA prediction is the target).
    The paper gives no numbers; the default spends half the samples on learning the identity.
    """

    stage: int | str = 1  # 1 Base-LoRA, 2 ID-LoRA from CLIP, 3 ID-LoRA from ArcFace (CLIP branch frozen), "hdb"
    init: str = ""  # training checkpoint (a step folder) whose weights start this stage; "" = fresh weights
    trigger_words: str = TRIGGER_WORDS  # words that switch the ID-LoRA on
    trigger_position: str = "prefix"  # where they go: "prefix" ("<words>, caption") or "suffix" ("caption, <words>")
    case_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)  # (reconstruct, match base, match Base-LoRA)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainConfigError(f"stage.stage must be 1, 2, 3 or \"{HDB}\", got {self.stage!r}")
        if self.trigger_position not in TRIGGER_POSITIONS:
            raise TrainConfigError(f"stage.trigger_position must be one of {TRIGGER_POSITIONS}, "
                                   f"got {self.trigger_position!r}")
        mix = tuple(float(v) for v in self.case_mix)
        if len(mix) != 3 or min(mix) < 0 or not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
            raise TrainConfigError(f"stage.case_mix must be three probabilities summing to 1, got {self.case_mix!r}")
        object.__setattr__(self, "case_mix", mix)
        if not self.trigger_words.strip():
            raise TrainConfigError("stage.trigger_words must not be empty")

    def with_trigger(self, caption: str) -> str:
        if self.trigger_position == "prefix":
            return f"{self.trigger_words}, {caption}" if caption else self.trigger_words
        return f"{caption}, {self.trigger_words}" if caption else self.trigger_words


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, gradient accumulation, clipping and an optional EMA."""

    steps: int = 1000  # optimiser steps of this stage
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr × min_lr_ratio
    warmup: int = 100  # linear warm-up steps (0: none)
    weight_decay: float = 1e-2  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    accumulation: int = 1  # micro-batches per optimiser step
    ema: float = 0.0  # EMA decay of the trainable weights (0: no EMA; 0.999 is usual); export uses the EMA

    def __post_init__(self) -> None:
        _positive("optim", steps=self.steps, lr=self.lr, accumulation=self.accumulation)
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0 or self.weight_decay < 0:
            raise TrainConfigError("optim.warmup, min_lr_ratio (0..1), grad_clip and weight_decay must be >= 0")
        if not 0 <= self.ema < 1:
            raise TrainConfigError(f"optim.ema must be in [0, 1), got {self.ema}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes."""

    out: str = "runs/hyperlora"  # output folder: step checkpoints, exports, TensorBoard logs
    batch: int = 8  # global samples per optimiser step (all ranks, all accumulation micro-batches)
    seed: int = 0  # data order, noise, timesteps and case draws are functions of (seed, step, sample)
    precision: str = "fp32"  # "bf16": autocast of the forward passes (weights and optimiser stay fp32)
    shard: bool = False  # FSDP fully_shard of the hypernetwork (bases and optimiser state) instead of DDP
    gradient_checkpointing: bool = False  # ask the denoiser to recompute its frozen activations in backward
    checkpoint_every: int = 500  # write a training checkpoint every N optimiser steps (and at the end)
    keep: int = 2  # training checkpoints kept (older ones are deleted)
    validate_every: int = 0  # validation every N steps (0: never)
    log_every: int = 10  # TensorBoard / progress-bar update every N steps
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda"

    def __post_init__(self) -> None:
        _positive("run", batch=self.batch, checkpoint_every=self.checkpoint_every, keep=self.keep,
                  log_every=self.log_every)
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.validate_every < 0:
            raise TrainConfigError("run.validate_every must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """The training data and the frozen base model."""

    backend: str = "toy"  # "toy" (the tiny synthetic denoiser and identities) or "comfy" (ComfyUI's loaders)
    shards: str = ""  # folder of prepared .tar shards (python -m hyperlora_core.train prepare)
    validation_shards: str = ""  # folder of held-out shards (other identities) for run.validate_every
    validation_samples: int = 16  # held-out samples validated (the first of the validation shards)
    # comfy backend, the frozen base model: a checkpoint (base_model), or a diffusion model plus text encoders and a
    # VAE (diffusion_model + text_encoders + vae). With a checkpoint, text_encoders or vae replace its own.
    base_model: str = ""  # a checkpoint file (.safetensors), as CheckpointLoaderSimple loads from models/checkpoints
    diffusion_model: str = ""  # a diffusion-model-only file, as UNETLoader loads from models/diffusion_models
    text_encoders: tuple[str, ...] = ()  # text encoder files, as (Dual)CLIPLoader loads them (SDXL: clip_l, clip_g)
    text_encoder_type: str = TEXT_ENCODER_TYPE  # how ComfyUI reads text_encoders: CLIPLoader's type ("sdxl", "flux"…)
    vae: str = ""  # a VAE file, as VAELoader loads from models/vae
    comfyui: str = ""  # comfy backend: a ComfyUI checkout to import comfy from ("" = already importable)
    clip_vision: str = ""  # comfy backend: CLIP ViT-L/14 vision folder or .safetensors (encodes the two crops)
    resolution: int = 1024  # training resolution in pixels (the comfy backend's latents are 1/8 of it)
    feed_forward: bool = False  # comfy backend: also target the feed-forward linears (default: attention only)
    toy_identities: int = 8  # toy backend: number of synthetic identities
    toy_images: int = 12  # toy backend: training images per identity
    toy_pretrain: int = 300  # toy backend: generic denoising steps that make the frozen base model

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise TrainConfigError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.text_encoders, str):  # one file written without the list brackets
            object.__setattr__(self, "text_encoders", (self.text_encoders,) if self.text_encoders else ())
        if not (isinstance(self.text_encoders, tuple) and all(isinstance(f, str) and f for f in self.text_encoders)
                and len(self.text_encoders) <= MAX_TEXT_ENCODERS):
            raise TrainConfigError(f"data.text_encoders must be a list of up to {MAX_TEXT_ENCODERS} file paths, "
                                   f"got {self.text_encoders!r}")
        if self.backend == "comfy":
            self._check_comfy_files()
        _positive("data", resolution=self.resolution, toy_identities=self.toy_identities, toy_images=self.toy_images,
                  toy_pretrain=self.toy_pretrain, validation_samples=self.validation_samples)
        if not isinstance(self.feed_forward, bool):
            raise TrainConfigError(f"data.feed_forward must be true or false, got {self.feed_forward!r}")

    def _check_comfy_files(self) -> None:
        """The comfy backend needs shards, CLIP vision, and one whole base model: a checkpoint, or a diffusion model
        with its text encoders and VAE."""
        if bool(self.base_model) == bool(self.diffusion_model):
            raise TrainConfigError(
                "backend 'comfy' needs the base model: set data.base_model (a checkpoint .safetensors) or "
                "data.diffusion_model (a diffusion-model-only file) with data.text_encoders and data.vae; "
                f"got base_model={self.base_model!r}, diffusion_model={self.diffusion_model!r}")
        if self.diffusion_model and not (self.text_encoders and self.vae):
            raise TrainConfigError("data.diffusion_model holds no text encoders or VAE: set data.text_encoders "
                                   "(e.g. [\"clip_l.safetensors\", \"clip_g.safetensors\"] for SDXL) and data.vae")
        if not (self.shards and self.clip_vision):
            raise TrainConfigError("data.shards (prepared shards) and data.clip_vision (CLIP ViT-L/14) are required "
                                   "with backend 'comfy'")
        if not (isinstance(self.text_encoder_type, str) and self.text_encoder_type.isidentifier()
                and self.text_encoder_type.islower()):
            raise TrainConfigError(f"data.text_encoder_type must be a type name of ComfyUI's CLIPLoader such as "
                                   f"'sdxl' or 'flux', got {self.text_encoder_type!r}")


@dataclass(frozen=True)
class ValidationConfig:
    """How validation (every ``run.validate_every`` steps) samples images for the face-similarity score.

    For each of the first ``identities`` held-out identities of ``data.validation_shards``, the ID-LoRA (and
    Base-LoRA) predicted from its first sample makes ``images`` pictures with that sample's caption and the trigger
    words; the score is the mean ArcFace cosine between the faces found in them and the identity's photos
    (``hyperlora_core.evaluate.face_similarity``; an image without a face scores 0). The defaults aim at a
    readable SDXL face in little time: 16 steps of dpmpp_2m/karras at CFG 5, 1024², 2 images × 4 identities.
    """

    identities: int = 4  # held-out identities sampled (in the order they first appear in the validation shards)
    images: int = 2  # images sampled per identity (image i uses noise seed seed + i)
    steps: int = 16  # sampling steps
    resolution: int = 1024  # side of the sampled square images in pixels (latents are 1/8 of it)
    cfg: float = 5.0  # classifier-free guidance scale; 1.0 skips the unconditional pass (half the model calls)
    sampler: str = "dpmpp_2m"  # sampler name (ComfyUI's KSampler names; the toy backend always runs DDIM)
    scheduler: str = "karras"  # scheduler name (ComfyUI's; ignored by the toy backend)
    negative: str = ""  # negative prompt, used when cfg != 1
    seed: int = 0  # noise seed: every validation samples from the same noise, so scores are comparable
    insightface: str = ""  # antelopev2 folder for the face score ("" = no face score: only the loss is logged)
    provider: str = "auto"  # onnxruntime provider of the face analysis: "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        _positive("validation", identities=self.identities, images=self.images, steps=self.steps,
                  resolution=self.resolution, cfg=self.cfg)
        if self.resolution % 8:
            raise TrainConfigError(f"validation.resolution must be a multiple of 8 (the latents are 1/8), "
                                   f"got {self.resolution}")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"validation.provider must be 'auto', 'cpu' or 'cuda', got {self.provider!r}")


@dataclass(frozen=True)
class LidbConfig:
    """LiDB weights (hyperlora_core.lidb) and their pre-optimisation per identity (the hypernetwork's supervision)."""

    a: int = LIDB_A  # A_train is 1 × a (a ≤ every target linear's in_features)
    b: int = LIDB_B  # B_train is b × 1 (b ≤ every target linear's out_features)
    seed: int = LIDB_SEED  # seed of the frozen aux matrices (stored in every LiDB file)
    steps: int = 400  # lidb-preopt: optimiser steps per identity
    lr: float = 5e-3  # lidb-preopt: Adam learning rate
    batch: int = 4  # lidb-preopt: images per step (drawn from the identity's images)
    init_seed: int = 0  # lidb-preopt: seed of A_train's random start (the same for every identity)

    def __post_init__(self) -> None:
        _positive("lidb", a=self.a, b=self.b, steps=self.steps, lr=self.lr, batch=self.batch)


SECTIONS = {"model": ModelConfig, "stage": StageConfig, "optim": OptimConfig, "run": RunConfig, "data": DataConfig,
            "validation": ValidationConfig, "hdb": HdbConfig, "lidb": LidbConfig}


@dataclass(frozen=True)
class TrainConfig:
    """A whole run: one dataclass per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    hdb: HdbConfig = field(default_factory=HdbConfig)  # used by stage "hdb" only
    lidb: LidbConfig = field(default_factory=LidbConfig)  # used by stage "hdb" and lidb-preopt only

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> TrainConfig:
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise TrainConfigError(f"{where}: unknown section(s) {unknown}; the sections are {sorted(SECTIONS)}")
        parts = {}
        for name, kind in SECTIONS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise TrainConfigError(f"{where}: [{name}] must be a table of keys")
            known = {f.name for f in fields(kind)}
            extra = sorted(set(values) - known)
            if extra:
                raise TrainConfigError(f"{where}: unknown key(s) {extra} in [{name}]; known keys: {sorted(known)}")
            try:
                parts[name] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            except (TypeError, HdbConfigError) as exc:
                raise TrainConfigError(f"{where}: [{name}]: {exc}") from exc
        return cls(**parts)

    def replace(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of some sections changed, e.g. ``replace(optim={"steps": 12})``."""
        raw = self.to_dict()
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return TrainConfig.from_dict(raw)


def load_config(path: str | Path) -> TrainConfig:
    """Read a run's TOML file (see the module docstring for its sections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config '{path}' does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"training config '{path}' is not valid TOML: {exc}") from exc
    return TrainConfig.from_dict(raw, where=f"training config '{path}'")
