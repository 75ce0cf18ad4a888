"""Any photo a user can hand us -> one HxWx3 uint8 RGB array.

Accepted: numpy arrays HxW, HxWx1 (grey), HxWx2 (grey + alpha), HxWx3 (RGB), HxWx4 (RGBA) of uint8, uint16,
other integers (8- or 16-bit range), bool or float in [0, 1]; torch tensors in the same layouts (a ComfyUI IMAGE
element is HxWxC float in [0, 1]; a batch of one is accepted); PIL images of any mode.

Decisions:
- grey is replicated to three channels;
- alpha is composited onto mid grey #7f7f7f (the colour the face crops use for "no content"), then dropped, so a
  cut-out portrait looks like it was shot against the crop's own background;
- 16-bit values are scaled to 8-bit with rounding (``v * 255 / 65535``);
- floats are clipped to [0, 1] (small HDR overshoots); values far outside that range are refused, since they mean
  the image was passed in 0..255 (or another scale) by mistake.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import ImageFileMissing, ImageFormatError

log = logging.getLogger(__name__)

BACKGROUND = 127  # #7f7f7f, what transparent pixels become
_FLOAT_SLACK = 1.5  # floats above this are taken for a wrong scale, not an HDR overshoot
MAX_PIXELS = 128 << 20  # ~134 MP (about 11600²): above it a photo is refused before any copy is made


def to_rgb8(image: object, index: int = 0) -> np.ndarray:
    """``image`` (numpy, torch or PIL) -> contiguous HxWx3 uint8 RGB. Errors name the image ``index``."""
    if hasattr(image, "getbands") and hasattr(image, "convert"):  # PIL, duck-typed to keep the import lazy
        return _from_pil(image, index)
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = image.float()
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ImageFormatError(f"photo {index + 1}: expected an image (numpy array, torch tensor or PIL image), "
                               f"got {type(image).__name__}")
    return _from_array(image, index)


def load_image(path: str | Path, index: int = 0) -> np.ndarray:
    """Read an image file with PIL (EXIF orientation applied; 16-bit, grey and RGBA handled) as HxWx3 uint8 RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageFileMissing(f"photo {index + 1}: '{path}' does not exist (check the path)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _from_pil(im, index)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageFormatError(f"photo {index + 1}: '{path}' could not be read as an image ({exc}); "
                               "save it as PNG or JPEG and try again") from exc


def _from_pil(im, index: int) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit PNGs open as one of these
        arr = np.asarray(im)
        return _from_array(np.clip(arr, 0, 65535).astype(np.uint16), index)
    if mode not in ("L", "LA", "RGB", "RGBA", "F"):
        has_alpha = "A" in im.getbands() or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    return _from_array(np.asarray(im), index)


def _from_array(arr: np.ndarray, index: int) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[0] == 1:  # a batch of one
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        hint = " (channels first? ComfyUI images are height x width x channels)" if (
            arr.ndim == 3 and arr.shape[0] in (1, 3, 4)) else ""
        raise ImageFormatError(f"photo {index + 1}: shape {tuple(arr.shape)} is not an image of height x width x "
                               f"1-4 channels{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageFormatError(f"photo {index + 1}: the image is empty (shape {tuple(arr.shape)})")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageFormatError(
            f"photo {index + 1}: {arr.shape[1]} × {arr.shape[0]} pixels ({arr.shape[0] * arr.shape[1] / 1e6:.0f} MP) "
            "is "
            f"above the {MAX_PIXELS / 1e6:.0f} MP limit; faces are analysed at 640 px, so downscale the photo "
            "first (e.g. Upscale Image By 0.25)")
    unit = _to_unit_range(arr, index)  # float32 in [0, 1], or None when arr is already uint8
    if unit is None:
        rgb8 = _channels_u8(arr)
    else:
        rgb8 = _channels_unit(unit)
    return np.ascontiguousarray(rgb8)


def _to_unit_range(arr: np.ndarray, index: int) -> np.ndarray | None:
    """None for uint8 (kept exact); otherwise float32 scaled to [0, 1]."""
    if arr.dtype == np.uint8:
        return None
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageFormatError(f"photo {index + 1}: integer values {lo}..{hi} are outside 8- and 16-bit range")
        scale = 65535.0 if (arr.dtype.itemsize >= 2 and (arr.dtype == np.uint16 or hi > 255)) else 255.0
        return arr.astype(np.float32) / scale
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise ImageFormatError(f"photo {index + 1}: contains NaN or infinite pixel values; it is not a usable "
                                   "photo. Check the node that made it (an fp16 VAE decode can give NaN) or load the "
                                   "photo from its file")
        lo, hi = float(arr.min()), float(arr.max())
        if hi > _FLOAT_SLACK or lo < -0.5:
            raise ImageFormatError(f"photo {index + 1}: float values {lo:.3g}..{hi:.3g}; images must be in [0, 1] "
                                   "(divide 0..255 values by 255)")
        return np.clip(arr, 0.0, 1.0)
    raise ImageFormatError(f"photo {index + 1}: unsupported pixel type {arr.dtype}")


def _channels_u8(arr: np.ndarray) -> np.ndarray:
    c = arr.shape[2]
    if c == 3:
        return arr
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    colour = arr[:, :, :1] if c == 2 else arr[:, :, :3]
    alpha = arr[:, :, -1:].astype(np.float32) / 255.0
    out = colour.astype(np.float32) * alpha + BACKGROUND * (1.0 - alpha)
    out = np.rint(out).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if c == 2 else out


def _channels_unit(unit: np.ndarray) -> np.ndarray:
    c = unit.shape[2]
    if c in (2, 4):
        alpha = unit[:, :, -1:]
        colour = unit[:, :, :1] if c == 2 else unit[:, :, :3]
        unit = colour * alpha + (BACKGROUND / 255.0) * (1.0 - alpha)
    out = np.rint(unit * 255.0).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out
