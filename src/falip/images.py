"""Reading user images: paths, PIL images and arrays become RGB PIL images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError


def load_image(image) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image, or an array.

    Arrays may be ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``: uint8 in [0, 255], or float in [0, 1].
    Torch tensors are also accepted in ``(3, H, W)`` float [0, 1] layout (torchvision's).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageLoadError(f"cannot read image {path}: {exc}") from exc
    if hasattr(image, "detach"):
        arr = image.detach().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ImageLoadError(f"image must be a path, a PIL image or an array, got {type(image).__name__}")
    return _array_to_pil(arr)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageLoadError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageLoadError(f"image array is empty, shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ImageLoadError("image array contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageLoadError(
                f"float image arrays must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; pass uint8 for 0-255 data"
            )
        out = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(f"image array dtype must be uint8 or float, got {arr.dtype}")
    return Image.fromarray(out).convert("RGB")
