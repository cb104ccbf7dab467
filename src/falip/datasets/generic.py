"""Image regions with class labels: the record type every region dataset produces, and the generic JSONL reader.

Generic format — one JSON object per line::

    {"image": "birds/0001.jpg", "label": "cardinal", "box": [x0, y0, x1, y1]}
    {"image": "birds/0002.jpg", "label": "blue jay", "mask": "masks/0002.png"}

``image`` and ``mask`` are relative to an image root (absolute paths are kept). ``box`` is in
original-image pixels, xyxy. A mask is a PNG of the image's size; pixels > 127 (after conversion
to grayscale) are inside; a 0/1 mask (all values 0 or 1) is read as is, and a PNG with a non-opaque
alpha channel is read from its alpha. Optional keys: ``id`` (default: the line number), ``group`` (a
subgroup name, reported separately, e.g. Waterbirds' groups). Blank lines are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import FalipError

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


def read_mask(path: Union[str, Path, BinaryIO], mask_id: Optional[int] = None) -> np.ndarray:
    """A boolean ``(H, W)`` mask from a PNG (a path, or an open binary file such as an upload, named by its ``name``).

    With ``mask_id``: pixels with ``R + 256·G == mask_id``. Otherwise: the alpha channel > 127 when the
    image has a non-opaque alpha channel (a cut-out), else grayscale > 127 — or > 0 for a 0/1 mask
    (one whose values are all 0 or 1).
    """
    if not hasattr(path, "read"):
        path = Path(path)
        if not path.is_file():
            raise FalipError(f"mask file not found: {path}")
    try:
        with Image.open(path) as img:
            if mask_id is None:
                return _binary(img)
            rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    except (UnidentifiedImageError, OSError) as exc:
        raise FalipError(f"cannot read mask {getattr(path, 'name', path)}: {exc}") from exc
    return rgb[..., 0] + 256 * rgb[..., 1] == mask_id


def _binary(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha > 127
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    values = np.asarray(img.convert("I") if img.mode.startswith("I") else img.convert("L"))
    if values.max() <= 1:
        return values > 0  # a 0/1 mask
    if img.mode.startswith("I"):  # 16-bit masks: half of the 16-bit range
        return values > 32767
    return values > 127


def read_classes(path: Union[str, Path]) -> list[str]:
    """Class names, one per line (blank lines ignored); they must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FalipError(f"class file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise FalipError(f"{path} lists no class names (one per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FalipError(f"{path} lists classes more than once: {duplicates[:5]}")
    return names


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _parse_box(value, where: str) -> Box:
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise FalipError(f"{where}: 'box' must be [x0, y0, x1, y1] (numbers, pixels), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def read_regions_jsonl(path: Union[str, Path], image_root: Union[str, Path, None] = None) -> list[RegionSample]:
    """Samples of a generic JSONL file (see the module docstring).

    Structural problems (invalid JSON, a missing ``image``, neither or both of ``box``/``mask``,
    duplicate ids) raise FalipError naming the file and line; whether files exist and regions fit
    their images is checked when the samples are used.
    """
    path = Path(path)
    if not path.is_file():
        raise FalipError(f"annotation file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    samples, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FalipError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise FalipError(f"{where}: each line needs an 'image' path, got {line.strip()[:80]!r}")
        if ("box" in record) == ("mask" in record):
            raise FalipError(f"{where}: give exactly one of 'box' or 'mask'")
        sample_id = str(record.get("id", n))
        if sample_id in seen:
            raise FalipError(f"{where}: id {sample_id!r} appears twice (first on line {seen[sample_id]})")
        seen[sample_id] = n
        label = record.get("label")
        samples.append(
            RegionSample(
                id=sample_id,
                image=_resolve(root, record["image"]),
                label=None if label is None else str(label),
                box=_parse_box(record["box"], where) if "box" in record else None,
                mask=_resolve(root, str(record["mask"])) if "mask" in record else None,
                group=None if record.get("group") is None else str(record["group"]),
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
