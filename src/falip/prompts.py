"""Visual-prompt baselines: image edits that mark a region (SPEC §3).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import InvalidRegionError

EDITS = ("crop", "blur", "circle", "blur_circle", "box", "shade", "grayscale", "reverse_blur")
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


def line_width(image: Image.Image) -> int:
    return max(1, int(max(image.size) / 200))


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


def _keep_inside(original: Image.Image, outside: Image.Image, inside_mask: np.ndarray) -> Image.Image:
    """``original`` where ``inside_mask`` is set, ``outside`` elsewhere."""
    return Image.composite(original, outside, Image.fromarray(inside_mask.astype(np.uint8) * 255))


def apply_edit(image: Image.Image, method: str, box, mask: Optional[np.ndarray] = None) -> EditedImage:
    """Apply one edit of :data:`EDITS` for the region ``box`` (xyxy pixels, clamped to the image)."""
    if method not in EDITS:
        raise ValueError(f"unknown visual prompt {method!r}; choose from {EDITS}")
    image = image.convert("RGB")
    W, H = image.size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(W)), min(y1, float(H))
    if x1 <= x0 or y1 <= y0:
        raise InvalidRegionError(f"box {tuple(box)} has no area inside the {W}x{H} image")
    box = (x0, y0, x1, y1)
    if mask is not None and mask.shape != (H, W):
        raise InvalidRegionError(f"mask has shape {mask.shape} but the image is H={H}, W={W}")

    if method == "crop":
        left, top = int(np.floor(x0)), int(np.floor(y0))
        right, bottom = max(int(np.ceil(x1)), left + 1), max(int(np.ceil(y1)), top + 1)
        cropped = image.crop((left, top, right, bottom))
        sub_mask = mask[top:bottom, left:right] if mask is not None else None
        return EditedImage(cropped, (0.0, 0.0, float(right - left), float(bottom - top)), sub_mask)

    if method in ("blur", "blur_circle", "reverse_blur"):
        blurred = image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
        if method == "blur":
            inside = _box_mask(image.size, box)
        elif method == "blur_circle":
            inside = _ellipse_mask(image.size, box)
        else:
            inside = mask if mask is not None else _box_mask(image.size, box)
        edited = _keep_inside(image, blurred, inside)
        if method == "blur_circle":
            ImageDraw.Draw(edited).ellipse(box, outline=RED, width=line_width(image))
        return EditedImage(edited, box, mask)

    if method == "grayscale":
        gray = image.convert("L").convert("RGB")
        inside = mask if mask is not None else _box_mask(image.size, box)
        return EditedImage(_keep_inside(image, gray, inside), box, mask)

    if method == "shade":
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
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
