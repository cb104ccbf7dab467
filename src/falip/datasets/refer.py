"""Referring-expression data (RefCOCO, RefCOCO+, RefCOCOg) in the formats users already have.

Two annotation layouts give one :class:`RecDataset`:

- the ``refer`` layout (Licheng Yu's ``refer`` toolkit): ``DATA_ROOT/<dataset>/refs(<split_by>).p``
  (a pickled list of refs: ``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences[{raw, ...}]``)
  and ``DATA_ROOT/<dataset>/instances.json`` (COCO ``images``/``annotations``; bbox ``[x, y, w, h]``);
- ReCLIP's JSONL: one object per line with ``file_name``, ``image_id``, ``anns[{id, bbox}]``,
  ``ann_id`` (int, string or list) and ``sentences[{raw}]``.

Every sentence is one :class:`RecSample`. Gold proposals are all annotated boxes of the image;
detector proposals come from a ``{image_id: [[x, y, w, h], ...]}`` JSON file (ReCLIP's
``<dataset>_dets_dict.json``). Problems with one sample (a ref pointing to an unknown annotation)
are kept on the sample (``problem``) so that the evaluation counts it as skipped; problems with a
whole file raise :class:`falip.FalipError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..errors import FalipError
from ..inputs import check, check_path, field_of, read_text, require, text_lines
from ..notices import warn

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # other folders: unc

XYWH = tuple[float, float, float, float]
XYWH_FORM = "[x, y, w, h] (4 numbers, COCO pixels)"


@dataclass(frozen=True)
class Proposal:
    """A candidate box ``[x, y, w, h]`` (COCO pixels); ``ann_id`` and ``segmentation`` for gold boxes."""

    bbox: XYWH
    ann_id: Optional[str] = None
    segmentation: object = None  # COCO polygons or uncompressed RLE, when the data has them


@dataclass(frozen=True)
class RecSample:
    """One referring expression: ``targets`` are the annotation ids it refers to (any one counts)."""

    id: str
    image_id: str
    sentence: str
    targets: tuple[str, ...]
    ref_id: Optional[str] = None
    problem: Optional[tuple[str, str]] = None  # (reason, detail) when the sample cannot be evaluated


@dataclass
class RecDataset:
    """Samples of one split, with each image's file names and gold annotations.

    ``images[image_id]`` → candidate file names (first existing one wins);
    ``annotations[image_id]`` → gold :class:`Proposal` list; ``detections`` → detector boxes or None.
    """

    name: str
    split: str
    samples: list[RecSample]
    images: dict[str, list[str]]
    annotations: dict[str, list[Proposal]]
    detections: Optional[dict[str, list[XYWH]]] = None
    source: dict = field(default_factory=dict)

    @property
    def proposal_source(self) -> str:
        return "detector" if self.detections is not None else "gold"

    def proposals(self, image_id: str) -> list[Proposal]:
        """The candidate boxes of an image: detector boxes if loaded, else every gold annotation."""
        if self.detections is not None:
            return [Proposal(tuple(b)) for b in self.detections.get(image_id, [])]
        return list(self.annotations.get(image_id, []))

    def target_boxes(self, sample: RecSample) -> list[XYWH]:
        by_id = {p.ann_id: p.bbox for p in self.annotations.get(sample.image_id, [])}
        return [by_id[t] for t in sample.targets if t in by_id]

    def split_expressions(self) -> list[str]:
        """Distinct sentences of the split, in file order (the pool for score subtraction)."""
        return list(dict.fromkeys(s.sentence for s in self.samples))


# ----------------------------------------------------------------------------------------------
# Reading helpers


class _PlainUnpickler(pickle.Unpickler):
    """Loads lists, dicts, strings and numbers only: a refs file never needs code to rebuild."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load the Python object {module}.{name}")


def _read_pickle(path: Path):
    check_path(path, "refs file")
    for encoding in ("ASCII", "latin1"):  # the original refs files were written by Python 2
        try:
            with open(path, "rb") as f:
                return _PlainUnpickler(f, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            AttributeError,
            RecursionError,
        ) as exc:
            raise FalipError(f"{path} is not a refs pickle (a list of refs): {exc}") from None
    raise FalipError(f"{path}: cannot decode its strings")


def _read_json(path: Path, what: str):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise FalipError(f"{path} is not valid JSON ({what}): {exc}") from None


def _image_file_names(file_name: str) -> list[str]:
    """``COCO_train2014_000000581857_16.jpg`` → the image file without the trailing annotation id first."""
    stripped = re.sub(r"^(COCO_[A-Za-z]+\d*_\d+)_\d+(\.\w+)$", r"\1\2", file_name)
    return [stripped, file_name] if stripped != file_name else [file_name]


EMPTY_EXPRESSION = "empty expression"  # the skip reason of a sentence whose text is empty or blank


def _sentences(raw_sentences, where: str) -> list[tuple[str, Optional[str]]]:
    """``(text, sent_id)`` of each sentence (``{"raw": ...}`` or ``{"sent": ...}`` objects, or plain strings)."""
    out = []
    for j, s in enumerate(check(raw_sentences, "list", where, "'sentences'")):
        at = f"{where} sentence {j}"
        if isinstance(s, dict):
            text = field_of(s, "raw" if "raw" in s or "sent" not in s else "sent", "str", at)
            out.append((text, field_of(s, "sent_id", "id", at, default=None)))
        else:
            out.append((check(s, "str", at), None))
    return out


def _text_problem(text: str, where: str) -> Optional[tuple[str, str]]:
    """The skip ``(reason, detail)`` of an empty expression (it would be scored as the bare prompt), else None."""
    return None if text.strip() else (EMPTY_EXPRESSION, f"{where}: the expression is empty; there is nothing to ground")


class BoxConventionWarning(UserWarning):
    """Boxes that look like they were written in another convention (xyxy for xywh)."""


def _unique(seen: dict[str, str], sample_id: str, where: str) -> None:
    """Record ``sample_id`` as read at ``where``; a second sentence with the same id is an error naming both."""
    if sample_id in seen:
        raise FalipError(
            f"sentence id {sample_id!r} appears twice: {seen[sample_id]} and {where}; ids must be unique "
            "(one would replace the other's prediction)"
        )
    seen[sample_id] = where


def _check_split(samples: list[RecSample], available: Sequence[str], split: str, source: str) -> None:
    if not samples:
        raise FalipError(
            f"split {split!r} does not exist in {source}; available splits: {', '.join(sorted(set(available))) or 'none'}"
        )


# ----------------------------------------------------------------------------------------------
# Loaders


def load_refer(data_root, dataset: str, split: str, split_by: Optional[str] = None, detections=None) -> RecDataset:
    """Load ``DATA_ROOT/<dataset>/refs(<split_by>).p`` + ``instances.json`` (split_by: unc, umd, google).

    ``dataset`` is the folder name: ``refcoco``, ``refcoco+``, ``refcocog`` or any other folder in
    the same layout (``split_by`` then defaults to ``unc``).
    """
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    folder = Path(data_root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    if not (refs_path.exists() or refs_path.is_symlink()):  # present but not a readable file: _read_pickle says what it is
        if not folder.is_dir():
            others = sorted(p.name for p in Path(data_root).iterdir() if p.is_dir()) if Path(data_root).is_dir() else []
            raise FalipError(f"dataset folder not found: {folder}" + (f" (present: {', '.join(others)})" if others else ""))
        present = sorted(p.name for p in folder.glob("refs(*).p"))
        raise FalipError(f"refs file not found: {refs_path}" + (f" (present: {', '.join(present)})" if present else ""))
    refs = check(_read_pickle(refs_path), "list", str(refs_path), "the refs pickle")
    instances_path = folder / "instances.json"
    instances = _read_json(instances_path, "COCO instances file")
    where = f"{instances_path} (COCO instances)"
    images: dict[str, list[str]] = {}
    for i, img in enumerate(field_of(instances, "images", "list", where, default=[])):
        at = f"{instances_path}: images[{i}]"
        images[field_of(img, "id", "id", at)] = [field_of(img, "file_name", "str", at)]
    annotations: dict[str, list[Proposal]] = {}
    for i, ann in enumerate(field_of(instances, "annotations", "list", where)):
        at = f"{instances_path}: annotations[{i}]"
        key, ann_id = field_of(ann, "image_id", "id", at), field_of(ann, "id", "id", at)
        annotations.setdefault(key, []).append(
            Proposal(field_of(ann, "bbox", "box", at, form=XYWH_FORM), ann_id, ann.get("segmentation") or None)
        )

    samples, seen = [], {}
    for i, ref in enumerate(refs):
        where = f"{refs_path}: ref {i}"
        ref_split = field_of(require(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"), where), "split", "str", where)
        ref_id, ann_id, image_id = (field_of(ref, k, "id", where) for k in ("ref_id", "ann_id", "image_id"))
        sentences = _sentences(field_of(ref, "sentences", "list", where), where)
        if ref_split != split:
            continue
        file_name = field_of(ref, "file_name", "str", where, default=None)
        if image_id not in images and file_name is not None:
            images[image_id] = _image_file_names(file_name)
        known = any(p.ann_id == ann_id for p in annotations.get(image_id, []))
        problem = (
            None
            if known
            else (
                "unknown annotation",
                f"ref {ref_id} points to annotation {ann_id} of image {image_id}, which {instances_path.name} lacks",
            )
        )
        for j, (text, sent_id) in enumerate(sentences):
            sid = sent_id if sent_id is not None else f"{ref_id}:{j}"
            at = f"{where} (ref_id {ref_id}) sentence {j}"
            _unique(seen, sid, at)
            samples.append(RecSample(sid, image_id, text, (ann_id,), ref_id, problem or _text_problem(text, at)))
    _check_split(samples, [r["split"] for r in refs], split, str(refs_path))
    for s in samples:
        images.setdefault(s.image_id, [])
    source = dict(format="refer", refs=str(refs_path), instances=str(instances_path), split_by=split_by)
    return _with_detections(RecDataset(dataset, split, samples, images, annotations, source=source), detections)


def load_reclip(path, split: str = "", name: str = "", detections=None) -> RecDataset:
    """Load ReCLIP's JSONL (one image-and-referent per line). ``split`` and ``name`` are labels only."""
    path = Path(path)
    images: dict[str, list[str]] = {}
    annotations: dict[str, list[Proposal]] = {}
    samples, seen = [], {}
    for lineno, line in enumerate(text_lines(path, "annotations file"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            datum = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
            raise FalipError(f"{where} is not valid JSON: {exc}") from None
        require(datum, ("file_name", "image_id", "anns", "ann_id", "sentences"), where, "ReCLIP JSONL")
        image_id = field_of(datum, "image_id", "id", where)
        file_name = field_of(datum, "file_name", "str", where)
        images.setdefault(image_id, _image_file_names(file_name))
        known = {p.ann_id for p in annotations.get(image_id, [])}
        for k, ann in enumerate(field_of(datum, "anns", "list", where)):
            at = f"{where}: anns[{k}]"
            ann_id = field_of(ann, "id", "id", at)
            if ann_id not in known:
                known.add(ann_id)
                proposal = Proposal(field_of(ann, "bbox", "box", at, form=XYWH_FORM), ann_id, ann.get("segmentation") or None)
                annotations.setdefault(image_id, []).append(proposal)
        raw_targets = datum.get("ann_id")
        targets = tuple(
            check(t, "id", where, "'ann_id'")
            for t in (field_of(datum, "ann_id", "list", where) if isinstance(raw_targets, list) else [raw_targets])
        )
        unknown = [t for t in targets if t not in known]
        problem = (
            ("unknown annotation", f"{where}: ann_id {', '.join(unknown)} is not among the line's anns")
            if unknown or not targets
            else None
        )
        for j, (text, sent_id) in enumerate(_sentences(field_of(datum, "sentences", "list", where), where)):
            sid = sent_id if sent_id is not None else f"{lineno}:{j}"
            at = f"{where} sentence {j}"
            _unique(seen, sid, at)
            samples.append(RecSample(sid, image_id, text, targets, None, problem or _text_problem(text, at)))
    if not samples:
        raise FalipError(f"{path} holds no referring expressions")
    source = dict(format="reclip", annotations=str(path))
    return _with_detections(
        RecDataset(name or path.stem, split or path.stem, samples, images, annotations, source=source), detections
    )


def load_detections(path) -> dict[str, list[XYWH]]:
    """``{image_id: [[x, y, w, h], ...]}`` (entries may also be ``{"bbox": [...]}``)."""
    path = Path(path)
    data = _read_json(path, "detections file")
    if not isinstance(data, dict):
        raise FalipError(f"{path} must map image ids to lists of [x, y, w, h] boxes, got a {type(data).__name__}")
    out = {}
    for image_id, boxes in data.items():
        at = f"{path}: image {image_id}"
        out[str(image_id)] = [
            field_of(b, "bbox" if "bbox" in b or "box" not in b else "box", "box", f"{at} box {k}", form=XYWH_FORM)
            if isinstance(b, dict)
            else check(b, "box", f"{at} box {k}", "a box", XYWH_FORM)
            for k, b in enumerate(check(boxes, "list", at, "its boxes"))
        ]
    _warn_if_xyxy(out, path)
    return out


XYXY_SUSPICION = 0.95  # share of boxes with w > x and h > y above which [x, y, w, h] boxes look like xyxy


def _warn_if_xyxy(detections: dict[str, list[XYWH]], path: Path) -> None:
    """Warn when the boxes look like ``[x0, y0, x1, y1]``: then every "width" exceeds its x and every
    "height" its y, which real [x, y, w, h] detections of a whole data set almost never do."""
    boxes = np.array([b for bs in detections.values() for b in bs], dtype=np.float64).reshape(-1, 4)
    if len(boxes) < 10:
        return
    share = float(np.mean((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])))
    if share >= XYXY_SUSPICION and np.any(boxes[:, 0] > 0):
        warn(
            f"{path}: {share:.0%} of the {len(boxes)} detections have w > x and h > y, as [x0, y0, x1, y1] boxes would; "
            "detections must be [x, y, w, h] (COCO): convert with w = x1 - x0, h = y1 - y0",
            BoxConventionWarning,
        )


def _with_detections(data: RecDataset, detections) -> RecDataset:
    if detections is not None:
        data.detections = detections if isinstance(detections, dict) else load_detections(detections)
        if not isinstance(detections, dict):
            data.source["detections"] = str(detections)
    return data


# ----------------------------------------------------------------------------------------------
# Geometry helpers


def xywh_to_xyxy(box: XYWH) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def iou(a: XYWH, b: XYWH) -> float:
    """Intersection over union of two ``[x, y, w, h]`` boxes (continuous pixels, as ReCLIP)."""
    ax0, ay0, ax1, ay1 = xywh_to_xyxy(a)
    bx0, by0, bx1, by1 = xywh_to_xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def segmentation_mask(segmentation, size: tuple[int, int]) -> Optional[np.ndarray]:
    """Rasterise COCO polygons or an uncompressed RLE into an ``(H, W)`` bool mask of ``size = (W, H)``.

    Returns None for what it cannot read (compressed RLE strings, sizes that differ from the image).
    """
    W, H = size
    if isinstance(segmentation, list) and segmentation:
        canvas = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in segmentation:
            if isinstance(poly, list) and len(poly) >= 6:
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
        mask = np.asarray(canvas, dtype=bool)
        return mask if mask.any() else None
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        h, w = segmentation.get("size", (None, None))
        if (h, w) != (H, W):
            return None
        flat = np.zeros(H * W, dtype=bool)
        pos = 0
        for i, run in enumerate(segmentation["counts"]):  # runs alternate 0s and 1s, column-major
            if i % 2:
                flat[pos : pos + run] = True
            pos += run
        mask = flat.reshape(W, H).T
        return mask if mask.any() else None
    return None
