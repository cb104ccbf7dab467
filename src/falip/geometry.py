"""Regions -> token coverage, through exactly the preprocessing applied to the image.

Three preprocessing modes map an original ``W×H`` image onto the model's ``S×S`` input:

- ``squash``: resize to ``S×S`` ignoring the aspect ratio (PIL bicubic) — the FALIP reference code;
- ``crop``: shortest side to ``S`` then centre crop — the CLIP default (same integer rounding as
  torchvision's ``Resize(S)`` + ``CenterCrop(S)``);
- ``pad``: longest side to ``S`` then letterbox onto an ``S×S`` canvas filled with the mean colour.

Each mode is an axis-aligned resize to ``(rw, rh)`` followed by a shift ``(ox, oy)``, so a pixel
``x`` of the original lands at ``x·rw/W + ox`` in the input. Boxes are mapped through that formula;
masks are resampled with the same resize (area filter) and shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InvalidRegionError, RegionClampWarning
from .notices import warn

PREPROCESS_MODES = ("squash", "crop", "pad")


@dataclass(frozen=True)
class ImageTransform:
    """How one original image of size ``image_size = (W, H)`` becomes the ``S×S`` model input."""

    mode: str
    image_size: tuple[int, int]
    input_size: int
    resized: tuple[int, int]  # (rw, rh): size of the resized image before crop/pad
    offset: tuple[int, int]  # (ox, oy): where the resized image's top-left lands in the input

    def apply(self, image: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
        """Resample a PIL image of ``image_size`` to the ``S×S`` model input."""
        if image.size != self.image_size:
            raise ValueError(f"image is {image.size}, transform was built for {self.image_size}")
        S = self.input_size
        resized = image.resize(self.resized, Image.BICUBIC)
        if self.mode == "squash":
            return resized
        ox, oy = self.offset
        if self.mode == "crop":
            return resized.crop((-ox, -oy, -ox + S, -oy + S))
        canvas = Image.new("RGB", (S, S), fill)
        canvas.paste(resized, (ox, oy))
        return canvas

    def map_box(self, box: Sequence[float], index: int = 0) -> tuple[float, float, float, float]:
        """Map a validated ``(x0, y0, x1, y1)`` box in original pixels to input pixels.

        The box is clamped to the image first (as the reference code does), then scaled per axis;
        in ``crop`` mode the part outside the crop is dropped, and a box entirely outside the crop
        raises :class:`InvalidRegionError`.
        """
        W, H = self.image_size
        rw, rh = self.resized
        ox, oy = self.offset
        S = self.input_size
        x0, y0, x1, y1 = (float(v) for v in box)
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            warn(
                f"box {index} ({', '.join(f'{float(v):g}' for v in box)}) extends outside the {W}x{H} image; clamped to it",
                RegionClampWarning,
            )
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, W), min(y1, H)
        # The scale first, then x * scale: the reference's float operations (executor.py,
        # `transform_box2token_base`: `scale0 = 224 / img.width; x0 = min(box[0] * scale0, 224)`).
        # `x * rw / W` rounds differently when x lands on a patch border: x = 43, W = 86 gives
        # exactly 112 there but 112.00000000000001 here, which touches the next patch column.
        sx, sy = rw / W, rh / H
        X0, X1 = x0 * sx + ox, x1 * sx + ox
        Y0, Y1 = y0 * sy + oy, y1 * sy + oy
        if X1 <= 0 or Y1 <= 0 or X0 >= S or Y0 >= S:
            raise InvalidRegionError(
                f"box {index} {tuple(box)} lies entirely outside the centre crop of the "
                f"{W}x{H} image (preprocess={self.mode!r}); use preprocess='squash' or 'pad' "
                "to keep the whole image"
            )
        return (max(X0, 0.0), max(Y0, 0.0), min(X1, S), min(Y1, S))

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """Resample an ``(H, W)`` mask to an ``(S, S)`` float32 coverage map in [0, 1]."""
        S = self.input_size
        rw, rh = self.resized
        ox, oy = self.offset
        resized = Image.fromarray(mask.astype(np.float32), mode="F").resize((rw, rh), Image.BOX)
        resized = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        out = np.zeros((S, S), dtype=np.float32)
        # Intersect the resized mask's footprint [ox, ox+rw) x [oy, oy+rh) with the input canvas.
        dx0, dy0 = max(ox, 0), max(oy, 0)
        dx1, dy1 = min(ox + rw, S), min(oy + rh, S)
        out[dy0:dy1, dx0:dx1] = resized[dy0 - oy : dy1 - oy, dx0 - ox : dx1 - ox]
        return out


def make_transform(mode: str, image_size: tuple[int, int], input_size: int) -> ImageTransform:
    """Build the transform for an image of ``image_size = (W, H)`` and a model input of ``S``."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")
    W, H = image_size
    S = input_size
    if W < 1 or H < 1:
        raise ValueError(f"image size must be positive, got {W}x{H}")
    if mode == "squash":
        return ImageTransform(mode, (W, H), S, (S, S), (0, 0))
    if mode == "crop":
        # torchvision Resize(S): the short side becomes S, the long side int(S * long / short).
        if W <= H:
            rw, rh = S, int(S * H / W)
        else:
            rw, rh = int(S * W / H), S
        ox = -int(round((rw - S) / 2.0))
        oy = -int(round((rh - S) / 2.0))
        return ImageTransform(mode, (W, H), S, (rw, rh), (ox, oy))
    if W >= H:
        rw, rh = S, max(1, round(H * S / W))
    else:
        rw, rh = max(1, round(W * S / H)), S
    return ImageTransform(mode, (W, H), S, (rw, rh), ((S - rw) // 2, (S - rh) // 2))


def _as_lists(value):
    """Nested iterables (generators, tuples, ranges) as nested lists; arrays, strings and scalars unchanged."""
    if isinstance(value, (np.ndarray, str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return [_as_lists(v) for v in value]


def _leaves(value):
    """The scalars of nested lists."""
    if isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def validate_boxes(boxes, image_size: tuple[int, int]) -> np.ndarray:
    """Check boxes given as ``(K, 4)`` xyxy pixels and return them as a float64 array.

    Raises :class:`InvalidRegionError` for a wrong shape, an empty list, NaN/inf, ``x1 <= x0``,
    ``y1 <= y0`` or a box entirely outside the ``W×H`` image.
    """
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    boxes = _as_lists(boxes)
    if (isinstance(boxes, np.ndarray) and boxes.dtype == bool) or any(isinstance(v, (bool, np.bool_)) for v in _leaves(boxes)):
        raise InvalidRegionError(f"boxes must be numbers, not booleans: got {boxes!r:.100}")
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRegionError(f"boxes must be finite numbers shaped (K, 4), got {boxes!r:.100} ({exc})") from None
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidRegionError(f"boxes must have shape (K, 4) as (x0, y0, x1, y1), got {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidRegionError("boxes is empty: give at least one (x0, y0, x1, y1) box")
    W, H = image_size
    for i, (x0, y0, x1, y1) in enumerate(arr):
        box = tuple(float(v) for v in arr[i])
        if not np.all(np.isfinite(arr[i])):
            raise InvalidRegionError(f"box {i} {box} has a NaN or infinite coordinate")
        if x1 <= x0 or y1 <= y0:
            raise InvalidRegionError(f"box {i} {box} is empty: need x1 > x0 and y1 > y0 (xyxy pixels)")
        if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
            raise InvalidRegionError(f"box {i} {box} lies entirely outside the {W}x{H} image")
    return arr


def validate_masks(masks, image_size: tuple[int, int]) -> list[np.ndarray]:
    """Check masks given as ``(K, H, W)`` (or a list of ``(H, W)``) and return boolean arrays."""
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    items = list(masks)
    if not items:
        raise InvalidRegionError("masks is empty: give at least one (H, W) mask")
    W, H = image_size
    out = []
    for i, m in enumerate(items):
        if hasattr(m, "detach"):
            m = m.detach().cpu().numpy()
        m = np.asarray(m)
        if m.ndim != 2:
            raise InvalidRegionError(f"mask {i} must be 2-D (H, W), got shape {m.shape}")
        if m.shape != (H, W):
            raise InvalidRegionError(f"mask {i} has shape {m.shape} but the image is H={H}, W={W}")
        if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
            raise InvalidRegionError(f"mask {i} contains NaN or infinite values")
        soft = m.dtype.kind == "f"
        m = m > 0.5 if soft else m.astype(bool)
        if not m.any():
            rule = "no value > 0.5, the rule for float masks" if soft else "no non-zero pixel"
            raise InvalidRegionError(f"mask {i} is empty: {rule}")
        out.append(m)
    return out


def box_token_weights(box_input: Sequence[float], input_size: int, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """Token weights ``(gh, gw)`` of a box already in input pixels: 1 on every touched patch.

    Exactly the reference code's rule (docs/method.md §3 steps 3–4), including its quirk: a left/top edge
    lying exactly on a patch border also selects the patch before it.
    """
    X0, Y0, X1, Y1 = box_input
    gh, gw = grid
    c0 = max(math.ceil(X0 / patch), 1) - 1
    c1 = max(math.ceil(X1 / patch), 1)  # exclusive
    r0 = max(math.ceil(Y0 / patch), 1) - 1
    r1 = max(math.ceil(Y1 / patch), 1) - 1  # inclusive
    weights = np.zeros((gh, gw), dtype=np.float64)
    weights[r0 : r1 + 1, c0:c1] = 1.0
    return weights


def mask_token_weights(coverage: np.ndarray, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """Token weights ``(gh, gw)`` of a mask coverage map ``(S, S)``: the covered fraction of each patch."""
    gh, gw = grid
    frac = coverage.reshape(gh, patch, gw, patch).astype(np.float64).mean(axis=(1, 3))
    frac[frac < 1e-6] = 0.0  # resampling round-off, not coverage
    return frac
