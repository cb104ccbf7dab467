"""Region classification datasets in their native layouts: CUB-200-2011, Stanford Dogs, ImageNet-S, Waterbirds.

Each loader reads only the annotation files (images and masks are opened when a sample is used)
and returns a :class:`~falip.datasets.generic.RegionDataset` with readable class names in the
dataset's class order. Layouts and download sources are described in ``docs/classify.md``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import FalipError
from ..inputs import check_path, read_text, text_lines
from .generic import Box, RegionDataset, RegionSample

REGIONS = ("box", "mask")
DATASETS = ("cub", "dogs", "imagenet-s", "waterbirds")
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")
IMAGENET_S_SIZES = (50, 300, 919)

PathLike = Union[str, Path]
_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _need(path: Path, what: str) -> Path:
    """``path`` when it is a folder (names ending in ``/`` folder) or a readable file, else an error saying what it is."""
    return check_path(path, what, "folder" if what.endswith("/ folder") else "file")


def _check_choice(value: str, choices, what: str) -> None:
    if value not in choices:
        raise FalipError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _table(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of a CUB text file, each of ``columns`` fields (an error names the file and line)."""
    rows = []
    for n, line in enumerate(text_lines(path, "CUB file"), start=1):
        if line.strip():
            row = line.split(None, columns - 1) if columns == 2 else line.split()
            if len(row) != columns:
                raise FalipError(f"{path}:{n}: expected {columns} fields separated by spaces, got {line.strip()[:80]!r}")
            rows.append(row)
    return rows


def _number(text: str, where: str) -> float:
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise FalipError(f"{where}: expected a finite number, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------
# CUB-200-2011


def cub_readable(folder: str) -> str:
    """``"001.Black_footed_Albatross"`` → ``"Black footed Albatross"``."""
    return folder.split(".", 1)[-1].replace("_", " ")


class CubIndex:
    """The annotation files of CUB-200-2011 (``root`` holds ``images.txt``)."""

    def __init__(self, root: PathLike):
        root = Path(root)
        if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        if not (root / "images.txt").is_file():
            raise FalipError(f"{root} is not a CUB-200-2011 folder: images.txt not found")
        self.root = root
        self.paths = {i: p for i, p in _table(root / "images.txt", 2)}  # id → "001.X/X_0001.jpg"
        labels = root / "image_class_labels.txt"
        self.class_of = {i: int(_number(c, f"{labels}: image {i}")) for i, c in _table(labels, 2)}
        self.is_train = {i: s == "1" for i, s in _table(root / "train_test_split.txt", 2)}
        self.boxes: dict[str, Box] = {}
        boxes = root / "bounding_boxes.txt"
        for i, *xywh in _table(boxes, 5):
            x0, y0, w, h = (_number(v, f"{boxes}: image {i}") for v in xywh)
            self.boxes[i] = (x0, y0, x0 + w, y0 + h)
        classes_txt = root / "classes.txt"
        classes = sorted((int(_number(c, f"{classes_txt}: class {name}")), name) for c, name in _table(classes_txt, 2))
        self.classnames = [cub_readable(name) for _, name in classes]
        self.class_ids = [c for c, _ in classes]
        self.id_of_path = {p: i for i, p in self.paths.items()}

    def segmentations(self) -> Path:
        """The ``segmentations/`` folder (separate download): inside the root or next to it."""
        for candidate in (self.root / "segmentations", self.root.parent / "segmentations"):
            if candidate.is_dir():
                return candidate
        raise FalipError(
            f"CUB segmentations not found in {self.root / 'segmentations'} or {self.root.parent / 'segmentations'}; "
            "download segmentations.tgz (CUB-200-2011 page) or use --region box"
        )

    def label(self, image_id: str) -> str:
        return self.classnames[self.class_ids.index(self.class_of[image_id])]


def load_cub(root: PathLike, split: str = "test", region: str = "box") -> RegionDataset:
    """CUB-200-2011: 200 bird species; the region is the annotated box, or the segmentation mask."""
    _check_choice(split, ("test", "train", "all"), "split")
    _check_choice(region, REGIONS, "region")
    cub = CubIndex(root)
    seg = cub.segmentations() if region == "mask" else None
    samples, problems = [], []
    for image_id, rel in cub.paths.items():
        if split != "all" and cub.is_train.get(image_id) != (split == "train"):
            continue
        if image_id not in cub.boxes or image_id not in cub.class_of:
            problems.append((image_id, "missing annotation", f"image {image_id} ({rel}) has no box or class in the CUB files"))
            continue
        samples.append(
            RegionSample(
                id=image_id,
                image=cub.root / "images" / rel,
                label=cub.label(image_id),
                box=cub.boxes[image_id] if region == "box" else None,
                mask=seg / Path(rel).with_suffix(".png") if seg is not None else None,
            )
        )
    return RegionDataset("cub", split, cub.classnames, samples, problems)


# ----------------------------------------------------------------------------------------------
# Stanford Dogs


def dogs_readable(folder: str) -> str:
    """``"n02085782-Japanese_spaniel"`` → ``"Japanese spaniel"``."""
    return folder.split("-", 1)[-1].replace("_", " ")


def read_voc_boxes(path: Path) -> list[Box]:
    """Boxes ``(xmin, ymin, xmax, ymax)`` of every object in a VOC-style XML file."""
    try:
        tree = ET.parse(check_path(path, "annotation file"))
    except (ET.ParseError, OSError) as exc:
        raise FalipError(f"cannot read annotation {path}: {exc}") from exc
    boxes = []
    for bndbox in tree.getroot().iter("bndbox"):
        values = [(bndbox.findtext(k) or "").strip() for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(tuple(_number(v, f"{path}: <bndbox> xmin/ymin/xmax/ymax") for v in values))
    if not boxes:
        raise FalipError(f"{path} holds no <bndbox>")
    return boxes  # type: ignore[return-value]


def read_mat_file_list(path: Path) -> list[str]:
    """The ``file_list`` entries of a Stanford Dogs list (``test_list.mat`` …)."""
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except (OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError) as exc:
        raise FalipError(f"cannot read {path}: {exc}") from None
    if "file_list" not in data:
        raise FalipError(f"{path} has no 'file_list' (is it a Stanford Dogs list?)")
    try:
        return [str(np.asarray(entry).ravel()[0]) for entry in data["file_list"].ravel()]  # (N, 1) cells of 1-element arrays
    except (IndexError, AttributeError) as exc:
        raise FalipError(f"{path}: 'file_list' is not a list of file names ({exc})") from None


def load_dogs(root: PathLike, split: str = "test") -> RegionDataset:
    """Stanford Dogs: 120 breeds; the region is the box enclosing every dog annotated in the image.

    ``root`` holds ``Images/``, ``Annotation/`` and the official lists (``test_list.mat``,
    ``train_list.mat``, ``file_list.mat``; also looked up in ``root/lists/``).
    """
    _check_choice(split, ("test", "train", "all"), "split")
    root = Path(root)
    images = _need(root / "Images", "Stanford Dogs Images/ folder")
    list_name = {"test": "test_list.mat", "train": "train_list.mat", "all": "file_list.mat"}[split]
    candidates = [root / list_name, root / "lists" / list_name]
    list_path = next((p for p in candidates if p.is_file()), None)
    if list_path is None:
        raise FalipError(f"Stanford Dogs list not found: {candidates[0]} (from lists.tar)")
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    classnames = [dogs_readable(f) for f in folders]
    samples, problems = [], []
    for rel in read_mat_file_list(list_path):
        folder = rel.split("/")[0]
        if folder not in folders:
            problems.append((rel, "unknown label", f"{rel}: class folder {folder!r} is not in {images}"))
            continue
        xml = root / "Annotation" / Path(rel).with_suffix("")
        try:
            boxes = read_voc_boxes(xml) if xml.is_file() else None
        except FalipError as exc:
            problems.append((rel, "bad annotation", str(exc)))
            continue
        if boxes is None:
            problems.append((rel, "missing file", f"annotation not found: {xml}"))
            continue
        box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        samples.append(RegionSample(id=rel, image=images / rel, label=dogs_readable(folder), box=box))
    return RegionDataset("dogs", split, classnames, samples, problems)


# ----------------------------------------------------------------------------------------------
# ImageNet-S


def imagenet_readable(wnids: list[str]) -> list[str]:
    """CLIP's ImageNet class names (open_clip) for WordNet ids; unknown ids stay as they are."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    return [IMAGENET_CLASSNAMES[index[w]] if w in index else w for w in wnids]


def load_imagenet_s(root: PathLike, region: str = "mask") -> RegionDataset:
    """ImageNet-S validation set (50, 300 or 919 classes); the region is the image's class in its mask.

    ``root`` is an ``ImageNetS{50,300,919}`` folder with ``validation/<wnid>/<name>.JPEG`` and
    ``validation-segmentation/<wnid>/<name>.png``. A mask pixel's class id is ``R + 256·G``;
    class ids number the sorted wnids from 1 (0 = other category, 1000 = ignored). With
    ``region="box"`` the region is the bounding box of that mask.
    """
    _check_choice(region, REGIONS, "region")
    root = Path(root)
    images = _need(root / "validation", "ImageNet-S validation/ folder")
    masks = _need(root / "validation-segmentation", "ImageNet-S validation-segmentation/ folder")
    wnids = sorted({p.name for p in images.iterdir() if p.is_dir()} | {p.name for p in masks.iterdir() if p.is_dir()})
    if len(wnids) not in IMAGENET_S_SIZES:
        raise FalipError(
            f"{root} has {len(wnids)} class folders; ImageNet-S has 50, 300 or 919 "
            "(class ids in the masks count the sorted folders, so all of them must be present)"
        )
    classnames = imagenet_readable(wnids)
    samples = []
    for class_id, (wnid, name) in enumerate(zip(wnids, classnames), start=1):
        folder = images / wnid
        for image in sorted(folder.iterdir()) if folder.is_dir() else []:
            if image.is_file():
                samples.append(
                    RegionSample(
                        id=f"{wnid}/{image.stem}",
                        image=image,
                        label=name,
                        mask=masks / wnid / (image.stem + ".png"),
                        mask_id=class_id,
                        mask_as_box=region == "box",
                    )
                )
    return RegionDataset(f"imagenet-s{len(wnids)}", "validation", classnames, samples)


# ----------------------------------------------------------------------------------------------
# Waterbirds


def load_waterbirds(root: PathLike, cub_root: PathLike, split: str = "test", region: str = "box") -> RegionDataset:
    """Waterbirds: landbird vs waterbird on land or water backgrounds; four groups.

    ``root`` holds ``metadata.csv`` (``img_id, img_filename, y, split, place``; split 0/1/2 =
    train/val/test) and the images. The bird region is the CUB-200-2011 box (or segmentation)
    of the CUB image each Waterbirds image was made from — same file name, same pixel size.
    """
    _check_choice(split, ("test", "val", "train"), "split")
    _check_choice(region, REGIONS, "region")
    root = Path(root)
    meta = _need(root / "metadata.csv", "Waterbirds metadata.csv")
    cub = CubIndex(cub_root)
    seg = cub.segmentations() if region == "mask" else None
    split_code = {"train": "0", "val": "1", "test": "2"}[split]
    samples, problems = [], []
    for row in _csv_rows(meta, ("img_id", "img_filename", "y", "split", "place")):
        if row["split"].strip() != split_code:
            continue
        sid, rel = row["img_id"].strip(), row["img_filename"].strip()
        try:
            y, place = WATERBIRDS_CLASSES[int(row["y"])], WATERBIRDS_PLACES[int(row["place"])]
        except (ValueError, IndexError):
            problems.append((sid, "unknown label", f"{rel}: y={row['y']!r}, place={row['place']!r} must be 0 or 1"))
            continue
        cub_id = cub.id_of_path.get(rel)
        if cub_id is None or cub_id not in cub.boxes:
            problems.append((sid, "missing annotation", f"{rel} is not a CUB-200-2011 image with a box in {cub.root}"))
            continue
        samples.append(
            RegionSample(
                id=sid,
                image=root / rel,
                label=y,
                box=cub.boxes[cub_id] if region == "box" else None,
                mask=seg / Path(rel).with_suffix(".png") if seg is not None else None,
                group=f"{y}_on_{place}",
            )
        )
    return RegionDataset("waterbirds", split, list(WATERBIRDS_CLASSES), samples, problems)


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a UTF-8 CSV file with a header holding ``columns``; a malformed row is an error naming its line."""
    with io.StringIO(read_text(path, "CSV file"), newline="") as f:
        reader = csv.DictReader(f)
        try:
            missing = set(columns) - set(reader.fieldnames or ())
            if missing:
                raise FalipError(f"{path} lacks columns {sorted(missing)}")
            rows = []
            for row in reader:
                if None in row.values() or None in row:
                    raise FalipError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} comma-separated fields")
                rows.append(row)
        except csv.Error as exc:
            raise FalipError(f"{path}:{reader.line_num}: not a CSV row ({exc})") from None
    return rows


def load_dataset(
    name: str,
    root: PathLike,
    split: Optional[str] = None,
    region: Optional[str] = None,
    cub_root: Optional[PathLike] = None,
) -> RegionDataset:
    """Load one of :data:`DATASETS` with its default split and region when not given."""
    dataset = _load_native(name, root, split, region, cub_root)
    dataset.source = dict(data_root=root, cub_root=cub_root)
    return dataset


def _load_native(name: str, root: PathLike, split, region, cub_root) -> RegionDataset:
    _check_choice(name, DATASETS, "dataset")
    if name == "cub":
        return load_cub(root, split or "test", region or "box")
    if name == "dogs":
        if region not in (None, "box"):
            raise FalipError("Stanford Dogs has boxes only: use --region box")
        return load_dogs(root, split or "test")
    if name == "imagenet-s":
        if split not in (None, "validation"):
            raise FalipError("ImageNet-S masks exist for the validation split only")
        return load_imagenet_s(root, region or "mask")
    if cub_root is None:
        raise FalipError("Waterbirds takes its bird regions from CUB-200-2011: give --cub-root")
    return load_waterbirds(root, cub_root, split or "test", region or "box")
