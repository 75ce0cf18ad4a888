"""HyperLoRA core: released checkpoints -> identities -> LoRA state dicts. Pure torch; no host imports.

Stable public API (other hosts and tools call it):

>>> hl = load_hyperlora("models/hyper_lora/sdxl_hyper_id_lora_v1_fidelity")
>>> identity = hl.predict_identity(clip_tokens=clip, id_embeds=arcface)   # [B,257,1024], [B,512]
>>> lora = hl.identity_to_lora(identity, kind="id", key_format="kohya")
"""

from .arithmetic import average, interpolate, lora_difference
from .checkpoint import Checkpoint, open_checkpoint
from .errors import (
    CheckpointFileMissing,
    CheckpointFormatError,
    ClipModelMissing,
    ConditionError,
    FaceModelError,
    FaceModelMissing,
    FaceNotFoundError,
    HyperLoRAError,
    IdentityFormatError,
    IdentityMismatchError,
    LFSPointerError,
    MissingKeyError,
    ModuleMismatchError,
    NotSafetensorsError,
    ShapeMismatchError,
    TruncatedFileError,
    UnexpectedKeyError,
)
from .identity import Identity
from .lora_io import lora_delta, save_lora
from .model import HyperLoRA, load_hyperlora
from .targets import TargetLayers, TargetLinear, TargetModule
from .topology import SDXL, UNetSpec

__all__ = [
    "Checkpoint", "CheckpointFileMissing", "CheckpointFormatError", "ClipModelMissing", "ConditionError",
    "FaceModelError", "FaceModelMissing", "FaceNotFoundError", "HyperLoRA", "HyperLoRAError", "Identity",
    "IdentityFormatError", "IdentityMismatchError", "LFSPointerError", "MissingKeyError", "ModuleMismatchError",
    "NotSafetensorsError", "SDXL", "ShapeMismatchError", "TargetLayers", "TargetLinear", "TargetModule",
    "TruncatedFileError", "UNetSpec", "UnexpectedKeyError",
    "average", "interpolate", "load_hyperlora", "lora_delta", "lora_difference", "open_checkpoint", "save_lora",
]
