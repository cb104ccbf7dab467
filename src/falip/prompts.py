"""Visual-prompt baselines: image edits that mark a region (docs/method.md §10).

Each edit takes the original image and one region (a box, optionally a mask) and returns the
edited image, the region's box *in the edited image* (for combining an edit with the FALIP bias),
the region's mask in the edited image (or None) and a text suffix (only ``shade`` has one).

| edit | what it does (source) |
|---|---|
| ``crop`` | crop to the box (ReCLIP) |
| ``blur`` | Gaussian-blur everything outside the box, radius 100 (ReCLIP) |
| ``circle`` | red ellipse outline inscribed in the box, width max(W,H)/200 (Red Circle) |
| ``blur_circle`` | blur outside the ellipse, then the red outline (the FALIP reference code's "circle") |
| ``box`` | red rectangle outline on the box |
| ``shade`` | box tinted with (240, 0, 30) at alpha 127; text + " is in red color." (CPT) |
| ``grayscale`` | everything outside the region in grayscale |
| ``reverse_blur`` | blur outside the region's mask (FGVP); the box when there is no mask |

Two drawing styles (``style``):

- ``reference`` draws what ReCLIP and the FALIP reference code draw (executor.py,
  ``tensorize_inputs``), pixel for pixel: ``blur`` keeps PIL's ``rectangle`` sharp, which includes
  its end pixels — a ``(w+1)×(h+1)`` area for integer boxes; ``crop`` is PIL's ``crop`` of the
  fractional box, which rounds each coordinate half to even; ``blur_circle`` keeps PIL's filled
  ellipse sharp with its 1-px rim drawn at level 76 (the luminance of "red" in an ``L`` mask, so the
  rim is a 30 % blend), then draws the red outline ``int(max(W, H) / 200)`` px wide — none at all
  for images under 200 px.
- ``clean`` marks exactly the region: ``blur``/``grayscale`` keep the box's own pixels (rounded
  to the pixel grid) sharp, ``crop`` takes every pixel the box touches (floor/ceil), the ellipse
  mask is binary and the outline is at least 1 px wide (so small images still get a circle).

``circle``, ``box``, ``shade``, ``grayscale`` and ``reverse_blur`` draw the same in both styles
(outlines at least 1 px wide): the reference has no ``box``/``grayscale``/``reverse_blur``, its
plain red-circle branch is unreachable code (ReCLIP has none), and its ``shade`` equals ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import InvalidRegionError

EDITS = ("crop", "blur", "circle", "blur_circle", "box", "shade", "grayscale", "reverse_blur")
STYLES = ("reference", "clean")
RED = (255, 0, 0)
SHADE_RGBA = (240, 0, 30, 127)
SHADE_SUFFIX = " is in red color."
BLUR_RADIUS = 100


@dataclass(frozen=True)
class EditedImage:
    image: Image.Image
    box: tuple[float, float, float, float]  # the region in the edited image's pixels
    mask: Optional[np.ndarray] = None  # (H', W') bool, the region in the edited image
    text_suffix: str = ""


def line_width(image: Image.Image, style: str = "clean") -> int:
    """Outline width: ``int(max(W, H) / 200)`` (``reference``: 0, i.e. no outline, under 200 px; ``clean``: at least 1)."""
    width = int(max(image.size) / 200)
    return width if style == "reference" else max(1, width)


def _box_mask(size: tuple[int, int], box) -> np.ndarray:
    W, H = size
    x0, y0, x1, y1 = box
    mask = np.zeros((H, W), dtype=bool)
    mask[max(int(round(y0)), 0) : max(int(round(y1)), 0), max(int(round(x0)), 0) : max(int(round(x1)), 0)] = True
    return mask


def _ellipse_mask(size: tuple[int, int], box) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).ellipse(tuple(float(v) for v in box), fill=255)
    return np.asarray(canvas) > 0


def _reference_mask(size: tuple[int, int], box, shape: str) -> Image.Image:
    """The reference's ``L`` mask: PIL's filled rectangle (end pixels included), or filled ellipse with a "red" (76) rim."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    corners = [(box[0], box[1]), (box[2], box[3])]
    if shape == "rectangle":
        draw.rectangle(corners, fill=255)
    else:
        draw.ellipse(corners, outline="red", fill=255)
    return canvas


def _keep_inside(original: Image.Image, outside: Image.Image, inside_mask) -> Image.Image:
    """``original`` where ``inside_mask`` (bool array, or an ``L`` image used as alpha) is set, ``outside`` elsewhere."""
    if isinstance(inside_mask, np.ndarray):
        inside_mask = Image.fromarray(inside_mask.astype(np.uint8) * 255)
    return Image.composite(original, outside, inside_mask)


def _crop_bounds(box, size: tuple[int, int], style: str) -> tuple[int, int, int, int]:
    """Integer crop rectangle: PIL's rounding of the fractional box (``reference``) or every touched pixel (``clean``)."""
    x0, y0, x1, y1 = box
    W, H = size
    if style == "reference":
        # What Image.crop does with a fractional box (Python's round: half to even). Only a box
        # that rounds to nothing (the reference would fail on it) is widened to one pixel.
        left, top, right, bottom = (int(round(v)) for v in box)
        left, top = min(left, W - 1), min(top, H - 1)
    else:
        left, top, right, bottom = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def apply_edit(image: Image.Image, method: str, box, mask: Optional[np.ndarray] = None, style: str = "clean") -> EditedImage:
    """Apply one edit of :data:`EDITS` for the region ``box`` (xyxy pixels, clamped to the image).

    ``style``: ``reference`` (ReCLIP / the FALIP reference code, pixel for pixel) or ``clean``; see
    the module docstring for what differs.
    """
    if method not in EDITS:
        raise ValueError(f"unknown visual prompt {method!r}; choose from {EDITS}")
    if style not in STYLES:
        raise ValueError(f"unknown edit style {style!r}; choose from {STYLES}")
    image = image.convert("RGB")
    W, H = image.size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(W)), min(y1, float(H))
    if x1 <= x0 or y1 <= y0:
        raise InvalidRegionError(f"box {tuple(box)} has no area inside the {W}x{H} image")
    box = (x0, y0, x1, y1)
    if mask is not None and mask.shape != (H, W):
        raise InvalidRegionError(f"mask has shape {mask.shape} but the image is H={H}, W={W}")
    reference = style == "reference"

    if method == "crop":
        left, top, right, bottom = _crop_bounds(box, image.size, style)
        cropped = image.crop((left, top, right, bottom))
        sub_mask = mask[top:bottom, left:right] if mask is not None else None
        return EditedImage(cropped, (0.0, 0.0, float(right - left), float(bottom - top)), sub_mask)

    if method in ("blur", "blur_circle", "reverse_blur"):
        blurred = image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
        if method == "reverse_blur" and mask is not None:
            inside = mask
        elif method == "blur_circle":
            inside = _reference_mask(image.size, box, "ellipse") if reference else _ellipse_mask(image.size, box)
        else:
            inside = (
                _reference_mask(image.size, box, "rectangle") if reference and method == "blur" else _box_mask(image.size, box)
            )
        edited = _keep_inside(image, blurred, inside)
        width = line_width(image, style)
        if method == "blur_circle" and width:
            ImageDraw.Draw(edited).ellipse(box, outline=RED, width=width)
        return EditedImage(edited, box, mask)

    if method == "grayscale":
        gray = image.convert("L").convert("RGB")
        inside = mask if mask is not None else _box_mask(image.size, box)
        return EditedImage(_keep_inside(image, gray, inside), box, mask)

    if method == "shade":
        overlay = Image.new("RGBA", image.size, SHADE_RGBA[:3] + (0,))
        ImageDraw.Draw(overlay).rectangle(box, fill=SHADE_RGBA)
        edited = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
        return EditedImage(edited, box, mask, SHADE_SUFFIX)

    edited = image.copy()
    draw = ImageDraw.Draw(edited)
    if method == "circle":
        draw.ellipse(box, outline=RED, width=line_width(image))
    else:  # box
        draw.rectangle(box, outline=RED, width=line_width(image))
    return EditedImage(edited, box, mask)
