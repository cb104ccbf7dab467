"""Image regions with class labels: the record type every region dataset produces, and the generic JSONL reader.

Generic format — one JSON object per line::

    {"image": "birds/0001.jpg", "label": "cardinal", "box": [x0, y0, x1, y1]}
    {"image": "birds/0002.jpg", "label": "blue jay", "mask": "masks/0002.png"}

``image`` and ``mask`` are relative to an image root (absolute paths are kept). ``box`` is in
original-image pixels, xyxy (four numbers; booleans are not numbers). A mask is an image file of the
image's size, read by the rules of :func:`read_mask` (gray > 127, a 0/1 mask as is, the alpha of a
cut-out, the indices of a palette mask, > 0.5 for float, > 32767 for 16 bit). Optional keys: ``id``
(default: the line number), ``label`` and ``group`` (strings or integers; ``group`` is a subgroup
name reported separately, e.g. Waterbirds' groups). Blank lines are ignored. The file is UTF-8 (a
byte-order mark is allowed); every error names the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image

from ..errors import FalipError, ImageLoadError, InvalidRegionError
from ..inputs import check_path, field_of, text_lines

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RegionSample:
    """One region of one image and its class.

    ``box`` (xyxy pixels) or ``mask`` (a PNG path) gives the region; ``mask_id`` selects the
    region in a colour-coded mask (pixels with ``R + 256·G == mask_id``, the ImageNet-S layout)
    instead of the default grayscale threshold; ``mask_as_box`` asks for the mask's bounding box
    as a box region.
    """

    id: str
    image: Path
    label: Optional[str]
    box: Optional[Box] = None
    mask: Optional[Path] = None
    mask_id: Optional[int] = None
    mask_as_box: bool = False
    group: Optional[str] = None

    def load_mask(self) -> np.ndarray:
        """The region's boolean mask ``(H, W)``; raises FalipError when the file is missing or unreadable."""
        if self.mask is None:
            raise FalipError(f"sample {self.id} has no mask")
        return read_mask(self.mask, self.mask_id)


@dataclass
class RegionDataset:
    """Samples, their class names (in classifier order) and problems found while reading annotations.

    ``problems`` holds ``(sample id, reason, detail)`` for samples that could not be built; a run
    records them as skipped.
    """

    name: str
    split: str
    classnames: list[str]
    samples: list[RegionSample]
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # {name: path} of the files and folders read (run fingerprints)


class EmptyMaskError(InvalidRegionError):
    """A mask file has no pixel inside by the rule that reads it (the message states the rule)."""


MASK_RULES = {
    "id": "pixels with R + 256·G == the class id",
    "alpha": "alpha > 127 (the image has a non-opaque alpha channel)",
    "1": "set pixels of the 1-bit image",
    "palette": "palette index != 0 (VOC's void index 255 only when it is the sole non-zero index)",
    "float": "value > 0.5 (a soft float mask)",
    "16-bit": "value > 32767 (half the 16-bit range), or 1 in a 0/1 mask",
    "gray": "gray > 127, or 1 in a 0/1 mask",
}


def read_mask(path: Union[str, Path, BinaryIO], mask_id: Optional[int] = None) -> np.ndarray:
    """A boolean ``(H, W)`` mask from an image file, by the first rule of :data:`MASK_RULES` that applies:

    with ``mask_id``: pixels with ``R + 256·G == mask_id`` (ImageNet-S); a non-opaque alpha channel: alpha > 127
    (a cut-out); a 1-bit image: its set pixels; a palette (P-mode) image: its palette *indices* (not their
    colours), index != 0 — VOC's void index 255 (the outline between objects) counts only when it is the only
    non-zero index; a float image: > 0.5; a 16/32-bit integer image: > 32767; else grayscale > 127. A mask whose
    values are all 0 or 1 is read as is (> 0). ``path`` may also be an open binary file (an upload, named by its
    ``name``). The file is decoded by :func:`falip.images.read_image`.

    Raises FalipError for an unreadable file and :class:`EmptyMaskError`, stating the rule, when no pixel is inside.
    """
    from ..images import read_image

    try:
        if hasattr(path, "read"):
            path, img = getattr(path, "name", "the uploaded mask"), read_image(path.read(), name=getattr(path, "name", None))
        else:
            path = Path(path)
            img = read_image(check_path(path, "mask file"))
    except ImageLoadError as exc:
        raise FalipError(str(exc).replace("image", "mask", 1)) from None
    rule, mask = _mask_pixels(img, mask_id, path)
    if not mask.any():
        what = f"pixels with R + 256·G == {mask_id}" if rule == "id" else MASK_RULES[rule]
        raise EmptyMaskError(f"mask {path} is empty: no pixel inside by its rule, {what}")
    return mask


def _mask_pixels(img: Image.Image, mask_id: Optional[int], path) -> tuple[str, np.ndarray]:
    """``(rule, (H, W) bool)``: which rule of :data:`MASK_RULES` read ``img``, and the pixels inside."""
    if mask_id is not None:
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        return "id", rgb[..., 0] + 256 * rgb[..., 1] == mask_id
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return "alpha", alpha > 127
    if img.mode == "1":
        return "1", np.asarray(img, dtype=bool)
    if img.mode in ("P", "PA"):
        index = np.asarray(img.convert("P") if img.mode == "PA" else img)
        present = set(np.unique(index).tolist()) - {0}
        return "palette", (index != 0) if present == {255} else (index != 0) & (index != 255)
    if img.mode == "F":
        values = np.asarray(img)
        if not np.all(np.isfinite(values)):
            raise FalipError(f"mask {path} holds NaN or infinite values")
        return "float", values > 0.5
    wide = img.mode.startswith("I")
    values = np.asarray(img).astype(np.int64) if wide else np.asarray(img.convert("L"))
    rule = "16-bit" if wide else "gray"
    if values.max() <= 1:
        return rule, values > 0  # a 0/1 mask
    return rule, values > (32767 if wide else 127)


def read_classes(path: Union[str, Path]) -> list[str]:
    """Class names, one per line of a UTF-8 file (blank lines ignored, a byte-order mark dropped); they must be unique."""
    names = [line.strip() for line in text_lines(path, "class file") if line.strip()]
    if not names:
        raise FalipError(f"{path} lists no class names (one per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FalipError(f"{path} lists classes more than once: {duplicates[:5]}")
    return names


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def read_regions_jsonl(path: Union[str, Path], image_root: Union[str, Path, None] = None) -> list[RegionSample]:
    """Samples of a generic JSONL file (see the module docstring).

    Structural problems (invalid JSON, a line that is not an object, a missing or ill-typed field, neither or
    both of ``box``/``mask``, duplicate ids) raise FalipError naming the file, line and field; whether files
    exist and regions fit their images is checked when the samples are used.
    """
    path = Path(path)
    lines = text_lines(path, "annotation file")
    root = Path(image_root) if image_root is not None else path.parent
    samples, seen = [], {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
            raise FalipError(f"{where}: not valid JSON ({exc})") from None
        image = field_of(record, "image", "str", where)
        if ("box" in record) == ("mask" in record):
            raise FalipError(f"{where}: give exactly one of 'box' or 'mask'")
        sample_id = field_of(record, "id", "id", where, default=str(n))
        if sample_id in seen:
            raise FalipError(f"{where}: id {sample_id!r} appears twice (first on line {seen[sample_id]})")
        seen[sample_id] = n
        label = field_of(record, "label", "id", where, default=None)
        group = field_of(record, "group", "id", where, default=None)
        mask = field_of(record, "mask", "str", where, default=None)
        samples.append(
            RegionSample(
                id=sample_id,
                image=_resolve(root, image),
                label=label,
                box=field_of(record, "box", "box", where, default=None, form="[x0, y0, x1, y1] (4 numbers, pixels)"),
                mask=None if mask is None else _resolve(root, mask),
                group=group,
            )
        )
    if not samples:
        raise FalipError(f"{path} holds no samples")
    _check_box_convention(samples, path)
    return samples


def _check_box_convention(samples: list[RegionSample], path: Path) -> None:
    """Refuse files whose boxes are mostly not xyxy but all make sense as ``[x, y, w, h]``."""
    boxes = np.array([s.box for s in samples if s.box is not None], dtype=np.float64).reshape(-1, 4)
    if len(boxes) < 2:
        return
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    as_xywh = (boxes[:, 2] > 0) & (boxes[:, 3] > 0) & (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0)
    if bad.sum() >= max(2, 0.2 * len(boxes)) and as_xywh[bad].all():
        first = next(s for s in samples if s.box is not None and (s.box[2] <= s.box[0] or s.box[3] <= s.box[1]))
        raise FalipError(
            f"{path}: {int(bad.sum())} of {len(boxes)} boxes are not [x0, y0, x1, y1] (x1 <= x0 or y1 <= y0, e.g. sample "
            f"{first.id}: {list(first.box)}) but all are valid as [x, y, w, h]; this format wants xyxy: convert "
            "them with x1 = x + w, y1 = y + h"
        )


def load_generic(
    annotations: Union[str, Path], classes: Union[str, Path], image_root: Union[str, Path, None] = None
) -> RegionDataset:
    """A :class:`RegionDataset` from a generic JSONL file and a class file (one name per line)."""
    return RegionDataset(
        name="generic",
        split=Path(annotations).stem,
        classnames=read_classes(classes),
        samples=read_regions_jsonl(annotations, image_root),
        source=dict(annotations=annotations, classes=classes, image_root=image_root or Path(annotations).parent),
    )
