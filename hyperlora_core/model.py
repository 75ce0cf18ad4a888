"""The public object: a loaded HyperLoRA checkpoint that predicts identities and turns them into LoRAs."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from .basis import BasisBank, FlatRows, Progress
from .checkpoint import KINDS, Checkpoint, open_checkpoint
from .errors import ConditionError
from .identity import Identity
from .lora_io import KeyFormat, build_lora
from .readahead import ReadAhead, Span
from .resampler import IdProjector, Resampler
from .targets import TargetLayers
from .topology import SDXL, UNetSpec

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None/"auto": fp32 on the CPU (fast and exact there), fp16 on an accelerator."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    return dtype


NETWORK_ROLES = ("id_projector", "resampler", "base_resampler")  # files that hold networks, in order of use


class HyperLoRA:
    """A checked checkpoint. Networks are built on first use; the bases stay memory-mapped until mixed.

    Opening reads headers only. ``prefetch`` asks the disk for the networks' and the basis' pages in the
    background; ``release_networks`` drops the built networks once an identity exists (they rebuild on demand).
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self._resampler: Resampler | None = None
        self._base_resampler: Resampler | None = None
        self._id_projector: IdProjector | None = None
        self._banks: dict[str, BasisBank] = {}
        self._flat: FlatRows | None = None
        self._readahead: ReadAhead | None = None
        self.builds: Counter[str] = Counter()  # role -> how many times its network was built from the file

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint

    @property
    def module_names(self) -> tuple[str, ...]:
        return self.checkpoint.names

    @property
    def targets(self) -> TargetLayers:
        """The linears this checkpoint adapts, with their sizes and model family, in token order."""
        return self.checkpoint.targets

    @property
    def encoders(self) -> tuple[str, ...]:
        return self.checkpoint.encoders

    @property
    def has_base(self) -> bool:
        return self.checkpoint.has_base

    @property
    def clip_width(self) -> int | None:
        """Width of the CLIP tokens the resamplers read (1024: ViT-L/14's penultimate hidden states); None when
        neither reads any."""
        cfg = self.checkpoint.resampler
        if "clip" in self.encoders:
            return cfg.y_dim if cfg.two_conditions else cfg.x_dim
        return self.checkpoint.base_resampler.x_dim if self.has_base else None

    # -- lazy networks -----------------------------------------------------------------------------------
    def _build(self, cls: type[torch.nn.Module], config: object, role: str) -> torch.nn.Module:
        """Build on the meta device and adopt the memory-mapped tensors: no random init, no extra copy."""
        file = self.checkpoint.files[role]
        with torch.device("meta"):
            module = cls(config)
        module.load_state_dict({key: file.tensor(key) for key in file.keys()}, strict=True, assign=True)
        self.builds[role] += 1
        log.debug("built the %s from %s", role, file.path)
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @property
    def built(self) -> tuple[str, ...]:
        """The networks held now (built and not released)."""
        held = {"resampler": self._resampler, "base_resampler": self._base_resampler,
                "id_projector": self._id_projector}
        return tuple(role for role in NETWORK_ROLES if held[role] is not None)

    def resampler(self, kind: str = "id") -> Resampler:
        if kind == "id":
            if self._resampler is None:
                self._resampler = self._build(Resampler, self.checkpoint.resampler, "resampler")
            return self._resampler
        if not self.has_base:
            raise ValueError("this checkpoint has no Base-LoRA (no base_resampler.safetensors)")
        if self._base_resampler is None:
            self._base_resampler = self._build(Resampler, self.checkpoint.base_resampler, "base_resampler")
        return self._base_resampler

    def id_projector(self) -> IdProjector:
        if self._id_projector is None:
            self._id_projector = self._build(IdProjector, self.checkpoint.id_projector, "id_projector")
        return self._id_projector

    @property
    def compute_device(self) -> torch.device:
        """Where the networks are now: a host's model management may have moved them since they were built."""
        return next(self.resampler().parameters()).device

    def networks(self) -> torch.nn.ModuleDict:
        """The networks (built if needed) in one module, for a host's model management to load and offload."""
        nets = {"resampler": self.resampler()}
        if self.checkpoint.id_projector is not None:
            nets["id_projector"] = self.id_projector()
        if self.has_base:
            nets["base_resampler"] = self.resampler("base")
        return torch.nn.ModuleDict(nets)

    def prefetch(self, networks: bool = True, first: Iterable[Span] = ()) -> ReadAhead:
        """Start reading into the page cache, in the background and in this order: ``first`` (a host's CLIP
        tower, say), the networks' files (``networks``), the basis. A read-ahead still running is returned
        instead of a second one."""
        if self._readahead is None or not self._readahead.running:
            files = self.checkpoint.files
            roles = [r for r in NETWORK_ROLES if networks and r in files] + ["basis"]
            self._readahead = ReadAhead([*first, *(span for role in roles for span in files[role].spans())])
        return self._readahead

    def release_networks(self) -> None:
        """Drop the built networks (the resampler and ID projector, ~330 MB in fp32 at the released size).
        The bases stay mapped; the networks rebuild from the files when the next photos arrive."""
        self._resampler = self._base_resampler = self._id_projector = None

    def bank(self, kind: str) -> BasisBank:
        """The bases of ``kind``; both kinds share one flat view of the file (moved once to the device)."""
        if kind not in self._banks:
            if self._readahead is None:  # a first mixing with no photo before it (a saved identity)
                self.prefetch(networks=False)
            if self._flat is None:
                self._flat = FlatRows(self.checkpoint.files["basis"])
                if self._flat.ok and self.device.type != "cpu":
                    self._flat.to(self.device)
            self._banks[kind] = BasisBank(self.checkpoint.files["basis"], self.checkpoint.targets, kind, self._flat)
        return self._banks[kind]

    def release_bases(self) -> None:
        """Drop the mapped (or device) basis until the next mix, which maps it again in milliseconds: its pages
        stop counting in this process's memory (fine-tuning needs the memory for the diffusion model)."""
        self._banks.clear()
        self._flat = None

    def unload(self) -> None:
        """Drop built networks and device copies; the files stay mapped and everything rebuilds on demand."""
        self.release_networks()
        self._banks.clear()
        self._flat = None

    # -- the method ----------------------------------------------------------------------------------------
    def _conditions(self, clip_tokens: torch.Tensor | None, id_embeds: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The resampler's x (and y) from the face conditions this checkpoint reads."""
        cfg = self.checkpoint.resampler
        needs = self.encoders
        if "arcface" in needs and id_embeds is None:
            raise ConditionError(f"this checkpoint reads ArcFace embeddings ({' + '.join(needs)}); "
                                 "pass id_embeds [B, 512] from the face analyzer")
        if "clip" in needs and clip_tokens is None:
            raise ConditionError(f"this checkpoint reads CLIP tokens ({' + '.join(needs)}); "
                                 "pass clip_tokens [B, 257, 1024] from CLIP ViT-L/14")
        clip = _check("clip_tokens", clip_tokens, 3, cfg.y_dim if cfg.two_conditions else cfg.x_dim)
        if "arcface" in needs:
            embeds = _check("id_embeds", id_embeds, 2, self.checkpoint.id_projector.embed_dim)
            x = self.id_projector()(embeds.to(self.compute_device, self.dtype))
            if clip is not None and clip.shape[0] != x.shape[0]:
                raise ConditionError(f"clip_tokens has {clip.shape[0]} images but id_embeds has {x.shape[0]}; "
                                     "pass one of each per reference image")
            return x, (clip.to(self.compute_device, self.dtype) if cfg.two_conditions else None)
        return clip.to(self.compute_device, self.dtype), None

    @torch.inference_mode()
    def predict_identity(self, clip_tokens: torch.Tensor | None = None, id_embeds: torch.Tensor | None = None,
                         base_clip_tokens: torch.Tensor | None = None) -> Identity:
        """Face conditions of B reference images of one person -> one identity (the B images are averaged).

        clip_tokens: [B, 257, 1024] penultimate CLIP ViT-L/14 tokens of the face crops.
        id_embeds: [B, 512] normed ArcFace embeddings.
        base_clip_tokens: CLIP tokens of the face-blurred images for the Base-LoRA (checkpoints with one).
        """
        x, y = self._conditions(clip_tokens, id_embeds)
        tokens = self.resampler("id")(x, y).float().cpu()
        base = None
        if self.has_base and base_clip_tokens is not None:
            base_in = _check("base_clip_tokens", base_clip_tokens, 3, self.checkpoint.base_resampler.x_dim)
            base = self.resampler("base")(base_in.to(self.compute_device, self.dtype)).float().cpu()
        return Identity(tokens=tokens, module_names=self.module_names, fingerprint=self.fingerprint,
                        base_tokens=base)

    @torch.inference_mode()
    def identity_to_lora(self, identity: Identity, kind: str = "id", key_format: KeyFormat = "kohya",
                         dtype: torch.dtype = torch.float32, progress: Progress | None = None,
                         release: bool = False) -> dict[str, torch.Tensor]:
        """Mix the bases with the identity's coefficients: a LoRA state dict of every target linear.

        key_format: "kohya", "comfy", or {target key: LoRA key prefix} (see :func:`~.lora_io.key_function`).
        release: the basis file's pages leave this process's memory as they are mixed (see BasisBank.mix)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        identity.check_compatible(self.fingerprint, self.module_names)
        tokens = identity.tokens if kind == "id" else identity.base_tokens
        if kind == "base" and (tokens is None or self.checkpoint.basis.base_rank is None):
            raise ValueError("no Base-LoRA: the checkpoint has no base bases or the identity has no base tokens")
        if tokens.shape != (self.targets.token_count, self.checkpoint.basis.k):
            raise ValueError(f"identity has {list(tokens.shape)} coefficient tokens; the checkpoint needs "
                             f"[{self.targets.token_count}, K={self.checkpoint.basis.k}]")
        mixed = self.bank(kind).mix(tokens.to(self.device), progress, release)
        return build_lora(mixed, self.targets, key_format, dtype)

    def __repr__(self) -> str:
        c = self.checkpoint
        return (f"HyperLoRA({c.folder.name}: {c.family}, {len(c.names)} modules, K={c.basis.k}, "
                f"rank={c.basis.id_rank}, "
                f"encoders={'+'.join(self.encoders)}, base={self.has_base}, {self.dtype}, {self.device})")


def _check(name: str, value: torch.Tensor | None, ndim: int, width: int | None) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or (width is not None and value.shape[-1] != width):
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        want = "[B, 512]" if ndim == 2 else "[B, tokens, width]"
        raise ConditionError(f"{name} must be a {want} tensor with last dimension {width}; got {shape}")
    if value.shape[0] == 0:
        raise ConditionError(f"{name} holds no images; give at least one reference photo")
    if not torch.isfinite(value).all():
        raise ConditionError(f"{name} contains NaN or infinite values; check the encoder that produced it")
    return value


def load_hyperlora(path: str | Path, device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = None, *, unet: UNetSpec | None = SDXL,
                   dim_head: int | None = None) -> HyperLoRA:
    """Open and check a checkpoint folder. Reads headers only; the networks build on first prediction.

    device: where prediction and mixing run (default CPU). dtype: "auto"/None, "fp32", "fp16" or "bf16".
    unet: the UNet a released-style module list must fit (SDXL); None takes the widths the list gives (a host then
    checks them against its model). An extended list (any family) carries its own linears and sizes: ``unet`` does
    not apply to it. dim_head: the resampler's head width; by default what the
    resampler file's metadata says, else the release's 64.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    checkpoint = open_checkpoint(path, unet=unet, dim_head=dim_head)
    model = HyperLoRA(checkpoint, device, resolve_dtype(dtype, device))
    log.info("loaded %r", model)
    return model
