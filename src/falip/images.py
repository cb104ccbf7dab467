"""Reading images: paths, PIL images and arrays become 8-bit RGB PIL images.

Orientation: photos the user gives (paths and PIL images passed to the API, ``score``, ``demo``,
``attention``) are turned upright by their EXIF orientation tag, so boxes are in the image *as
displayed*. Dataset images are read in their stored pixel orientation (``exif=False``), which is
what COCO/RefCOCO annotations and the reference code assume (the ``refer`` API and the FALIP code
read images with ``skimage.io.imread``/``PIL.Image.open``, neither of which applies the tag); the
caller is told about tagged images through ``on_rotation`` so a run can warn.

Bit depth: 16-bit images (PIL modes ``I;16*``) are scaled by 255/65535; 32-bit integer images
(mode ``I``) by the smallest of 8, 16 or 31 bits that holds their maximum; float images (mode
``F``) must lie in [0, 1]. Images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused
(:class:`ImageTooLargeError`) before they are decoded.

Damaged files: every file is decoded completely, and PNG chunk checksums are verified, by
:func:`read_image` (used for paths and uploaded bytes alike); a truncated or corrupt file is an
:class:`~falip.errors.ImageLoadError` naming it, never a partly decoded image.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError
from .inputs import check_path
from .notices import warn

EXIF_ORIENTATION = 0x0112


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than PIL's decompression-bomb limit allows."""


class ExifIgnoredWarning(UserWarning):
    """A dataset image carries an EXIF rotation tag that its annotations do not follow."""


class RotationNotice:
    """``on_rotation`` for one dataset run: warns at the first tagged image and counts them all (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, name: str, tag: int) -> None:
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            warn(
                f"{name} carries EXIF orientation {tag}: dataset images are read in their stored pixel orientation, "
                "which COCO/RefCOCO annotations assume (further tagged images are counted in the results, not reported)",
                ExifIgnoredWarning,
            )


ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# What PIL's decoders raise for a damaged file (besides OSError): broken chunks, bad CRCs, short reads.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error)


def load_image(
    image: ImageSource,
    *,
    exif: bool = True,
    on_rotation: Optional[Callable[[str, int], None]] = None,
    name: Optional[str] = None,
    max_pixels: Optional[int] = None,
) -> Image.Image:
    """Return an 8-bit RGB PIL image from a path, the bytes of an image file, a PIL image, or an array.

    Arrays may be ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``: uint8 in [0, 255], uint16 in [0, 65535],
    or float in [0, 1]. Torch tensors are also accepted in ``(3, H, W)`` float [0, 1] layout (torchvision's).
    exif: apply the EXIF orientation of files and PIL images (default); with False the stored pixel
    orientation is kept and ``on_rotation(name, tag)`` is called for an image whose tag is not 1.
    name: what messages call the image (default: its path, or "the image"); max_pixels: the pixel limit
    checked before decoding (default ``PIL.Image.MAX_IMAGE_PIXELS``). Files are decoded by :func:`read_image`.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        img = read_image(image, name=name, max_pixels=max_pixels)
        return _upright_rgb(img, name or _source_name(image), exif, on_rotation)
    if isinstance(image, Image.Image):
        label = name or "the image"
        with _decoding(label):
            image.load()
        return _upright_rgb(image, label, exif, on_rotation)
    if hasattr(image, "detach"):
        arr = image.detach().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ImageLoadError(f"image must be a path, image bytes, a PIL image or an array, got {type(image).__name__}")
    return _array_to_pil(arr, name or "image array")


def read_image(
    source: Union[str, os.PathLike, bytes, bytearray, memoryview], *, name: Optional[str] = None, max_pixels: Optional[int] = None
) -> Image.Image:
    """The one way falip decodes an image file (a path, or the bytes of an upload): a PIL image in its stored mode.

    The file is checked (:func:`falip.inputs.check_path`), its pixel count against ``max_pixels`` (default
    ``PIL.Image.MAX_IMAGE_PIXELS``) before decoding, its chunk checksums where the format has them (PNG), and
    its pixels decoded completely: a truncated or damaged file is an :class:`ImageLoadError` naming it, never a
    half-decoded image. Over the pixel limit: :class:`ImageTooLargeError`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "the uploaded image"
        if not data:
            raise ImageLoadError(f"{label} is empty (0 bytes)")

        def reopen():
            return io.BytesIO(data)
    else:
        path = check_path(source, "image file", error=ImageLoadError)
        label = name or str(path)

        def reopen():
            return path

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with _decoding(label):
        with Image.open(reopen()) as img:
            _check_size(img.size, label, limit)
            img.verify()  # chunk checksums and structure (PNG); closes the file
        img = Image.open(reopen())
        with img:
            img.load()
    return img


@contextlib.contextmanager
def _decoding(label: str):
    """Every decoder error inside is an ImageLoadError naming ``label`` (bombs: ImageTooLargeError)."""
    try:
        yield
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"image {label} is over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels ({exc}); "
            "shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"cannot read image {label}: not an image file (PIL cannot identify its format)") from None
    except DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot read image {label}: damaged or truncated file ({exc or type(exc).__name__})") from None


def _source_name(source) -> str:
    return "the uploaded image" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of a decoded ``img`` (1 = upright, also when there is none or the EXIF is unreadable).

    The pixels must already be loaded (:func:`read_image` does it), so only the EXIF block is parsed here."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (ValueError, TypeError, SyntaxError, struct.error):
        return 1  # unreadable EXIF block: nothing to apply


def _check_size(size: tuple[int, int], name: str, limit: Optional[int]) -> None:
    if limit is not None and size[0] * size[1] > limit:
        where = "PIL's decompression-bomb limit" if limit == Image.MAX_IMAGE_PIXELS else "the limit"
        advice = ", or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file" if limit == Image.MAX_IMAGE_PIXELS else ""
        raise ImageTooLargeError(
            f"image {name} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over {where} of {limit}; shrink it{advice}"
        )


def _upright_rgb(img: Image.Image, name: str, exif: bool, on_rotation) -> Image.Image:
    tag = orientation(img)
    if tag != 1:
        if exif:
            img = ImageOps.exif_transpose(img)
        elif on_rotation is not None:
            on_rotation(name, tag)
    out = _to_rgb(img, name)
    if out is img:
        out = img.copy()
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):  # the orientation is settled: do not apply it twice
        out.info.pop(key, None)
    return out


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """8-bit RGB, scaling high-bit-depth and float modes by their range instead of clipping them."""
    if img.mode.startswith("I;16"):
        return _array_to_pil(np.asarray(img).astype(np.uint16), name)
    if img.mode in ("I", "F"):
        return _array_to_pil(np.asarray(img), name)
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray, name: str = "image array") -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageLoadError(f"{name} must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageLoadError(f"{name} is empty, shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ImageLoadError(f"{name} contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageLoadError(
                f"float images must lie in [0, 1], {name} spans [{arr.min():.3g}, {arr.max():.3g}]; pass uint8 for 0-255 data"
            )
        out = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ImageLoadError(f"integer {name} has negative values (min {lo}); cannot map it to 8-bit RGB")
        bits = 16 if arr.dtype.itemsize == 2 else next(b for b in (8, 16, 31, 32, 63, 64) if hi < 2**b)
        out = np.round(arr.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)
    else:
        raise ImageLoadError(f"{name} dtype must be uint8, uint16 or float, got {arr.dtype}")
    return Image.fromarray(out).convert("RGB")
