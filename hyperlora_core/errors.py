"""Errors a user can act on.

Each class derives from ``ValueError``, ``FileNotFoundError`` or ``RuntimeError`` so callers can catch the
broad kind, while tests (and the doctor) can tell the exact problem apart.
"""

from __future__ import annotations


class HyperLoRAError(Exception):
    """Base of every error raised by ``hyperlora_core``."""


class CheckpointFileMissing(HyperLoRAError, FileNotFoundError):
    """A file the checkpoint folder must contain is absent."""


class CheckpointFormatError(HyperLoRAError, ValueError):
    """A checkpoint file exists but is not what it should be."""


class LFSPointerError(CheckpointFormatError):
    """The file is a git-LFS pointer (a few hundred bytes of text), not the model weights."""


class NotSafetensorsError(CheckpointFormatError):
    """The file is not a safetensors file at all (e.g. an HTML error page or a pickle)."""


class TruncatedFileError(CheckpointFormatError):
    """The file is shorter (or its header larger) than its own header says: an interrupted download."""


class MissingKeyError(CheckpointFormatError):
    """A tensor the method needs is not in the file."""


class UnexpectedKeyError(CheckpointFormatError):
    """The file holds a tensor this loader does not know: probably a different model."""


class ShapeMismatchError(CheckpointFormatError):
    """A tensor has a shape other than the one the rest of the checkpoint implies."""


class ModuleMismatchError(CheckpointFormatError):
    """A module in ``hyper_lora_modules.json`` does not fit the target UNet."""


class IdentityMismatchError(HyperLoRAError, ValueError):
    """An identity was made by a different checkpoint than the one it is used with."""


class IdentityFormatError(HyperLoRAError, ValueError):
    """An identity file is damaged or not an identity file."""


class ConditionError(HyperLoRAError, ValueError):
    """Face conditions given to a prediction have the wrong shape or are missing."""


class ClipModelMissing(CheckpointFileMissing):
    """The CLIP vision folder or its model.safetensors is absent."""


class ClipConfigError(CheckpointFormatError):
    """The CLIP vision files exist but are not a usable CLIP ViT image tower (bad config, unknown layout)."""


class ClipInputError(HyperLoRAError, ValueError):
    """Images or pixels given to the CLIP encoder have the wrong type or shape."""


class ImageFormatError(HyperLoRAError, ValueError):
    """An input image has a layout, type or value range that cannot be read as a photo."""


class ImageFileMissing(HyperLoRAError, FileNotFoundError):
    """An image path does not exist."""


class FaceModelMissing(HyperLoRAError, FileNotFoundError):
    """The insightface antelopev2 folder, or a model file it must contain, is absent."""


class FaceModelError(HyperLoRAError, ValueError):
    """A face model file exists but is not a usable model (LFS pointer, truncated, or the wrong model)."""


class FaceNotFoundError(HyperLoRAError, ValueError):
    """No usable face was found in an input image."""


class InputValueError(HyperLoRAError, ValueError):
    """A node input holds a value the method cannot use (a NaN strength, a file name leading outside its folder)."""


class DependencyMissing(HyperLoRAError, RuntimeError):
    """An optional package a feature needs is not installed; the message names the pip command."""


class LidbFormatError(HyperLoRAError, ValueError):
    """A LiDB file is damaged or not a LiDB file."""


class LidbMismatchError(HyperLoRAError, ValueError):
    """LiDB weights do not fit the model, sizes or aux matrices they are used with."""
