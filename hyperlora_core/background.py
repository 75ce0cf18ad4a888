"""The face-outline mask of the authors' preprocessing (DESIGN.md §1), with PIL, at the photo's full size.

The outline is a polygon through 43 of the 106 landmarks: the jaw contour, then the eyebrows, so the forehead
above the brows lies outside it. With ``c`` the mean of those 43 points and ``L`` = 0.8·max(w, h) of their box:

1. fill the polygon (255), scaled by ``mask_scale`` about ``c``, on a black full-size 8-bit mask (ImageDraw);
2. cut the photo and the mask to the square (c − L, c + L) (PIL ``crop``: outside the photo is 0);
3. resize the cut mask to 512², blur it (``GaussianBlur(15)``), resize it back;
4. paste the cut photo through that mask at ``(int(cx − L), int(cy − L))``: onto a #7f7f7f canvas
   (``remove_background``, ID conditions), or, after blurring the cut photo the same way with radius 45, into the
   photo itself (``blur_face``, Base conditions, mask scale 1.4).

PIL images in, PIL images out; the input is never modified.
"""

from __future__ import annotations

import numpy as np

# jaw contour (17 + 16 points), then the eyebrows (10 points), in drawing order
OUTLINE = (1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0,
           24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17,
           101, 105, 104, 103, 102, 50, 51, 49, 48, 43)
CUT_SCALE = 0.8  # half-side of the cut, as a fraction of the outline box's longer side
MASK_SIDE = 512  # the cut mask (and the Base face) is blurred at this size
MASK_BLUR = 15  # GaussianBlur radius of the mask at MASK_SIDE
BASE_BLUR = 45  # GaussianBlur radius of the Base conditions' face at MASK_SIDE
BASE_MASK_SCALE = 1.4  # the Base conditions' outline is this much larger
GREY = "#7f7f7f"  # what replaces the background


def outline_cut(photo, landmark_106: np.ndarray, mask_scale: float = 1.0):
    """(photo cut, mask cut, (int(cx − L), int(cy − L))): steps 1 and 2 of the module docstring."""
    from PIL import Image, ImageDraw

    pts = np.asarray(landmark_106)[list(OUTLINE)]
    centre = pts.mean(axis=0, keepdims=True)
    polygon = (pts - centre) * mask_scale + centre
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in polygon], fill=255)
    half = max(*(pts.max(axis=0) - pts.min(axis=0))) * CUT_SCALE
    cx, cy = centre[0]
    box = (cx - half, cy - half, cx + half, cy + half)
    return photo.crop(box), mask.crop(box), (int(cx - half), int(cy - half))


def _blurred(image, radius: int):
    """Resized to MASK_SIDE², blurred with ``radius``, resized back (PIL's default filters)."""
    from PIL import ImageFilter

    return image.resize((MASK_SIDE, MASK_SIDE)).filter(ImageFilter.GaussianBlur(radius=radius)).resize(image.size)


def remove_background(photo, landmark_106: np.ndarray):
    """The photo's face on a full-size #7f7f7f canvas, everything outside the blurred outline grey."""
    from PIL import Image

    cut, mask, at = outline_cut(photo, landmark_106)
    canvas = Image.new("RGB", photo.size, GREY)
    canvas.paste(cut, at, _blurred(mask, MASK_BLUR))
    return canvas


def blur_face(photo, landmark_106: np.ndarray):
    """A copy of the photo with the face (the 1.4-scaled outline) blurred away: the Base conditions' image."""
    cut, mask, at = outline_cut(photo, landmark_106, BASE_MASK_SCALE)
    out = photo.copy()
    out.paste(_blurred(cut, BASE_BLUR), at, _blurred(mask, MASK_BLUR))
    return out
