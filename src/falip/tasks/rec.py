"""Referring expression comprehension (REC): which proposal box does a sentence describe? (docs/method.md §11.1)

Every proposal of an image is encoded by each method (FALIP bias, an image edit, or both) and
each model; the sentence becomes ``"a photo of {sentence}"`` (plus the method's text suffix);
a proposal's score is the model's own logit (``runtime.logits``: ``logit_scale · cosine`` for CLIP). Optional score subtraction "P" (Red Circle,
Shtedritski et al. 2023) subtracts each proposal's mean score over captions of other expressions
of the split; ensembles "E" combine methods (``sum`` or ``max``) and sum models' logits. The
prediction is the best-scoring proposal; it is correct iff IoU with a target box > 0.5.

Speed (docs/method.md §11.1): a region's embedding depends on the image and the box, not on the sentence,
so samples are grouped by image and each image's proposals are encoded **once** per (model,
method) — one batched call — and scored against all of that image's sentences; text features
are cached; each image is decoded once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .. import distributed
from ..bias import FovealConfig
from ..datasets.refer import (
    BoxConventionWarning,
    Proposal,
    RecDataset,
    RecSample,
    iou,
    segmentation_mask,
    xywh_to_xyxy,
)
from ..digests import describe_inputs
from ..encode import MODES
from ..errors import FalipError, ImageLoadError, InvalidRegionError
from ..geometry import validate_boxes
from ..images import ImageTooLargeError, load_image
from ..inputs import warn_overlong
from ..methods import METHOD_HELP, Method, encode_with_method_batch, parse_method
from ..model import PreparedImage, Preprocessor
from ..notices import warn
from ..prompts import STYLES
from ..results import RunRecorder
from .loader import DEFAULT_BATCH_SIZE
from .run import Run, Summary, fingerprint, skip_reasons, weights_files

PROMPT = "a photo of {}"
AGGREGATES = ("sum", "max")
# What an image without usable proposals does: the reference's whole image as the only proposal, or skipping it.
NO_PROPOSALS = ("whole-image", "skip")
N_CAPTIONS = 500
TEXT_BATCH = 256


def parse_methods(spec: Union[str, Sequence[Union[str, Method]]]) -> list[Method]:
    """``"crop,blur"`` or ``["crop", "falip+blur"]`` → Methods (a method ensemble when more than one)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = [m if isinstance(m, Method) else parse_method(m) for m in items if not isinstance(m, str) or m.strip()]
    if not methods:
        raise ValueError(f"no method given: use {METHOD_HELP}")
    if len({m.name for m in methods}) != len(methods):
        raise ValueError(f"method {spec!r} lists a method twice")
    return methods


def draw_captions(expressions: Sequence[str], n: int = N_CAPTIONS, seed: int = 0) -> list[str]:
    """``n + 1`` distinct expressions drawn at random (seeded): each sample uses ``n`` that differ from its own."""
    pool = list(dict.fromkeys(expressions))
    if len(pool) < 2:
        raise FalipError("score subtraction needs at least 2 distinct expressions in the split")
    if n < 1:
        raise ValueError(f"the number of captions must be >= 1, got {n}")
    return random.Random(seed).sample(pool, min(n + 1, len(pool)))


class RegionScorer:
    """Scores an image's proposals against sentences with one or more models and methods.

    ``score = Σ_models agg_methods(runtime.logits(r_k, t − n̄))`` (``logit_scale · r_k · (t − n̄)`` for CLIP) with ``r_k`` the region's
    embedding, ``t`` the sentence's and ``n̄`` the mean embedding of the negative captions
    (score subtraction; 0 without it). ``agg`` is ``sum`` or ``max`` over methods.
    ``edit_style``: edits drawn as ReCLIP and the FALIP reference code draw them (``reference``,
    the default for REC) or ``clean`` (see :mod:`falip.prompts`).
    """

    def __init__(
        self,
        models: Sequence,
        methods: Union[str, Sequence[Union[str, Method]]] = "falip",
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        aggregate: str = "sum",
        template: str = PROMPT,
        captions: Optional[Sequence[str]] = None,
        n_captions: int = N_CAPTIONS,
        edit_style: str = "reference",
    ):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if "{}" not in template:
            raise ValueError(f"the prompt template needs a '{{}}' for the expression, got {template!r}")
        if not models:
            raise ValueError("give at least one model")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if edit_style not in STYLES:
            raise ValueError(f"edit_style must be one of {STYLES}, got {edit_style!r}")
        self.models = list(models)
        self.methods = parse_methods(methods)
        self.config = config
        self.mode = mode
        self.aggregate = aggregate
        self.template = template
        self.captions = list(captions) if captions is not None else None
        self.n_captions = n_captions
        self.edit_style = edit_style
        self._text: dict[tuple[int, str], torch.Tensor] = {}
        self._negatives: dict[tuple[int, str], torch.Tensor] = {}

    def describe(self) -> dict:
        """Everything that determines the scores, JSON-able (stored with results, checked on resume)."""
        return dict(
            models=[{k: v for k, v in m.info().items() if k != "device"} for m in self.models],
            preprocess=[m.preprocess for m in self.models],
            bias=[(self.config or m.config).to_dict() for m in self.models],
            bias_layers=[list(m.bias_layers(self.config)) for m in self.models],
            mode=self.mode,
            methods=[m.name for m in self.methods],
            edit_style=self.edit_style if any(m.edit for m in self.methods) else None,
            aggregate=self.aggregate,
            template=self.template,
            subtract=dict(captions=self.n_captions, drawn=self.captions) if self.captions is not None else None,
        )

    def prompt(self, expression: str, method: Method) -> str:
        return self.template.format(expression.lower()) + method.text_suffix

    def text_features(self, model_index: int, texts: Sequence[str]) -> torch.Tensor:
        """``(T, E)`` normalised text embeddings, each text encoded once per model."""
        missing = list(dict.fromkeys(t for t in texts if (model_index, t) not in self._text))
        for start in range(0, len(missing), TEXT_BATCH):
            chunk = missing[start : start + TEXT_BATCH]
            emb = self.models[model_index].encode_text(chunk).cpu()
            self._text.update({(model_index, t): e for t, e in zip(chunk, emb)})
        return torch.stack([self._text[(model_index, t)] for t in texts])

    def negative_means(self, model_index: int, method: Method, expressions: Sequence[str]) -> torch.Tensor:
        """``(T, E)``: per expression, the mean embedding of ``n_captions`` drawn captions other than itself."""
        key = (model_index, method.text_suffix)
        if key not in self._negatives:
            self._negatives[key] = self.text_features(model_index, [self.prompt(c, method) for c in self.captions])
        pool = self._negatives[key]
        rows = []
        for e in expressions:
            idx = [j for j, c in enumerate(self.captions) if c != e][: self.n_captions]
            rows.append(pool[idx].mean(0))
        return torch.stack(rows)

    @torch.no_grad()
    def encode(self, image, boxes: np.ndarray, masks: Optional[list[np.ndarray]] = None) -> list[list[torch.Tensor]]:
        """Region embeddings ``[model][method] → (K, E)`` of K boxes ``(K, 4)`` xyxy; masks feed ``reverse_blur`` only."""
        return self.encode_batch([image], [boxes], [masks])[0]

    @torch.no_grad()
    def encode_batch(
        self,
        images: Sequence,
        boxes_per_image: Sequence[np.ndarray],
        masks_per_image: Optional[Sequence[Optional[list[np.ndarray]]]] = None,
        prepared: Optional[Sequence[Sequence[PreparedImage]]] = None,
    ) -> list[list[list[torch.Tensor]]]:
        """:meth:`encode` of N images in batched calls: ``[image][model][method] → (K_i, E)``.

        prepared: ``prepared[i][m]``, image i preprocessed for model m (``model.preprocessor()``, e.g. in
        DataLoader workers), used by methods without an edit; ``images`` may then be None for them.
        """
        n = len(boxes_per_image)
        masks_per_image = list(masks_per_image) if masks_per_image is not None else [None] * n
        out: list[list[list[torch.Tensor]]] = [[[] for _ in self.models] for _ in range(n)]
        for m, model in enumerate(self.models):
            for method in self.methods:
                sources = [p[m] for p in prepared] if prepared is not None and method.edit is None else images
                encoded = encode_with_method_batch(
                    model,
                    sources,
                    boxes_per_image,
                    method=method,
                    masks_per_image=masks_per_image if method.edit == "reverse_blur" else None,
                    config=self.config,
                    mode=self.mode,
                    edit_style=self.edit_style,
                )
                for i, e in enumerate(encoded):
                    out[i][m].append(e.cpu())
        return out

    @torch.no_grad()
    def score(self, features: list[list[torch.Tensor]], expressions: Sequence[str]) -> torch.Tensor:
        """Logits ``(T, K)`` of T expressions against the K regions encoded by :meth:`encode`."""
        total = 0.0
        for i, model in enumerate(self.models):
            per_method = []
            for method, regions in zip(self.methods, features[i]):
                text = self.text_features(i, [self.prompt(e, method) for e in expressions])
                if self.captions is not None:
                    text = text - self.negative_means(i, method, expressions)
                per_method.append(model.runtime.logits(regions, text).T)
            stacked = torch.stack(per_method)
            total = total + (stacked.sum(0) if self.aggregate == "sum" else stacked.max(0).values)
        return total


@dataclass(frozen=True)
class Grounding:
    """``scores (K,)`` of every box, the ``index`` of the best one and that ``box`` (xyxy pixels)."""

    scores: torch.Tensor
    index: int
    box: tuple[float, float, float, float]


def ground(
    model,
    image,
    boxes,
    text: str,
    *,
    method: Union[str, Sequence[str]] = "falip",
    masks: Optional[Sequence[np.ndarray]] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
    aggregate: str = "sum",
    template: str = PROMPT,
    edit_style: str = "reference",
) -> Grounding:
    """Which of K boxes ``(K, 4)`` (xyxy pixels) of ``image`` does ``text`` describe?

    ``model``: a :class:`falip.FalipModel` or a list of them (logits summed); ``method``: ``falip``,
    ``none``, an edit (``crop``, ``blur``, ``circle`` …), ``falip+<edit>``, or several separated by
    commas (combined with ``aggregate``). ``masks`` (K of ``(H, W)``) are used by ``reverse_blur``.
    ``edit_style``: ``reference`` (ReCLIP's drawing, default) or ``clean`` (see :mod:`falip.prompts`).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    scorer = RegionScorer(models, method, config=config, mode=mode, aggregate=aggregate, template=template, edit_style=edit_style)
    pil = load_image(image)
    xyxy = validate_boxes(boxes, pil.size)
    mask_list = list(masks) if masks is not None else None
    scores = scorer.score(scorer.encode(pil, xyxy, mask_list), [text])[0]
    best = int(scores.argmax())
    return Grounding(scores, best, tuple(float(v) for v in xyxy[best]))


# ----------------------------------------------------------------------------------------------
# Dataset evaluation


CLAMP_WARNING_SHARE = 0.1  # clamped proposals above this share of all proposals suggest xyxy boxes read as xywh


def _image_paths(data: RecDataset, image_root, image_id: str) -> list[Path]:
    """The files an image may be stored as (the first existing one is used)."""
    return [Path(image_root) / n for n in data.images.get(image_id) or []]


def _open_image(data: RecDataset, image_root, image_id: str, on_rotation=None):
    """The image as RGB PIL, or ``(reason, detail)`` when it is missing or cannot be decoded."""
    paths = _image_paths(data, image_root, image_id)
    existing = [p for p in paths if p.exists() or p.is_symlink()]  # a folder or pipe: load_image says what it is
    if not existing:
        tried = " or ".join(str(p) for p in paths) or "no file name in the annotations"
        return "missing image", f"image {image_id}: file not found: {tried}"
    try:
        return load_image(existing[0], exif=False, on_rotation=on_rotation)
    except ImageTooLargeError as exc:
        return "image too large", str(exc)
    except ImageLoadError as exc:
        return "unreadable image", str(exc)


def _prepare_proposals(proposals: list[Proposal], size: tuple[int, int]) -> tuple[np.ndarray, list[int], int]:
    """Proposals clamped to the image for encoding: ``(boxes (K', 4) xyxy, kept indices, number clamped)``.

    Boxes with no area inside the image (or NaN) cannot be encoded and are dropped.
    """
    W, H = size
    boxes, keep, clamped = [], [], 0
    for k, p in enumerate(proposals):
        x0, y0, x1, y1 = xywh_to_xyxy(p.bbox)
        c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(W)), min(y1, float(H)))
        if not np.all(np.isfinite(c)) or c[2] <= c[0] or c[3] <= c[1]:
            continue
        clamped += c != (x0, y0, x1, y1)
        boxes.append(c)
        keep.append(k)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), keep, clamped


def _proposal_masks(
    proposals: list[Proposal], keep: list[int], boxes: np.ndarray, size
) -> tuple[Optional[list[np.ndarray]], int]:
    """Segmentation masks of the kept proposals (a box-shaped mask where one is missing), and how many were missing."""
    if all(proposals[k].segmentation is None for k in keep):
        return None, len(keep)
    W, H = size
    masks, missing = [], 0
    for k, (x0, y0, x1, y1) in zip(keep, boxes):
        mask = segmentation_mask(proposals[k].segmentation, size)
        if mask is None:
            missing += 1
            mask = np.zeros((H, W), dtype=bool)
            mask[int(y0) : max(int(np.ceil(y1)), int(y0) + 1), int(x0) : max(int(np.ceil(x1)), int(x0) + 1)] = True
        masks.append(mask)
    return masks, missing


@dataclass
class RecImage:
    """One image of a REC run as a DataLoader worker prepares it.

    ``samples``: its pending samples without a known problem, ``problems``: those with one. ``error``: ``(reason, detail)`` when none of
    them can be scored (unreadable image, no proposals under ``no_proposals="skip"``). Otherwise
    ``proposals`` (the whole image when it had none usable: ``fallback``), the kept ``boxes (K', 4)`` xyxy
    and their indices ``keep``, ``masks`` for ``reverse_blur``, ``image`` (decoded, when a method edits
    it) and ``prepared[m]`` (the image preprocessed for model m, when a method does not edit it).
    """

    image_id: str
    samples: list[RecSample]
    problems: list[RecSample] = field(default_factory=list)
    error: Optional[tuple[str, str]] = None
    proposals: list[Proposal] = field(default_factory=list)
    boxes: Optional[np.ndarray] = None
    keep: list[int] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # proposals, clamped, dropped, masks_missing
    fallback: Optional[str] = None
    masks: Optional[list[np.ndarray]] = None
    image: Optional[object] = None
    prepared: Optional[list[PreparedImage]] = None
    rotations: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class RecImageLoader:
    """Reads one image, its proposals and masks, and preprocesses it (picklable: runs in DataLoader workers)."""

    data: RecDataset
    image_root: object
    no_proposals: str
    need_masks: bool
    need_image: bool  # a method edits the image
    preprocessors: Optional[tuple[Preprocessor, ...]]  # one per model, when a method does not edit the image

    def __call__(self, item: tuple[str, list[RecSample]]) -> RecImage:
        image_id, todo = item
        loaded = RecImage(image_id, [s for s in todo if not s.problem], [s for s in todo if s.problem])
        if not loaded.samples:
            return loaded
        image = _open_image(self.data, self.image_root, image_id, lambda name, tag: loaded.rotations.append((name, tag)))
        if isinstance(image, tuple):
            loaded.error = image
            return loaded
        proposals = self.data.proposals(image_id)
        boxes, keep, clamped = _prepare_proposals(proposals, image.size)
        loaded.counts = dict(proposals=len(proposals), clamped=clamped, dropped=len(proposals) - len(keep), masks_missing=0)
        if not keep:
            detail = f"image {image_id} has no {self.data.proposal_source} proposals"
            if proposals:
                detail += f" ({len(proposals)} with no area inside the image)"
            if self.no_proposals == "skip":
                loaded.error = ("no proposals", detail)
                return loaded
            # The reference code (main.py): `if len(boxes) == 0: boxes = [Box(x=0, y=0, w=img.width, h=img.height)]`.
            W, H = image.size
            proposals = [Proposal(bbox=(0.0, 0.0, float(W), float(H)))]
            boxes, keep, _ = _prepare_proposals(proposals, image.size)
            loaded.fallback = "whole image"
        loaded.proposals, loaded.boxes, loaded.keep = proposals, boxes, keep
        if self.need_masks:
            loaded.masks, loaded.counts["masks_missing"] = _proposal_masks(proposals, keep, boxes, image.size)
        if self.preprocessors is not None:
            cache: dict[Preprocessor, PreparedImage] = {}  # models with the same preprocessing share it
            for p in self.preprocessors:
                if p not in cache:
                    cache[p] = p(image)
            loaded.prepared = [cache[p] for p in self.preprocessors]
        if self.need_image:
            loaded.image = image
        return loaded


def method_label(methods: Sequence[Method], aggregate: str, subtract: bool) -> str:
    """``falip``, ``crop,blur:max``, ``falip+P`` … — the method column of results tables."""
    label = ",".join(m.name for m in methods)
    if len(methods) > 1 and aggregate != "sum":
        label += f":{aggregate}"
    return label + ("+P" if subtract else "")


def _encode(scorer: RegionScorer, batch: list[RecImage]) -> dict[int, list]:
    """Region features of every image of ``batch`` that loaded (``id(image) → [model][method] → (K', E)``),
    in one batched call; an image whose regions the model cannot use (e.g. outside the centre crop) fails
    alone: its ``error`` becomes ``invalid region``."""
    ready = [x for x in batch if x.samples and x.error is None]

    def encode(xs: list[RecImage]) -> list:
        prepared = [x.prepared for x in xs] if xs[0].prepared is not None else None
        return scorer.encode_batch([x.image for x in xs], [x.boxes for x in xs], [x.masks for x in xs], prepared)

    try:
        return dict(zip(map(id, ready), encode(ready))) if ready else {}
    except InvalidRegionError:
        pass
    features = {}
    for x in ready:
        try:
            features[id(x)] = encode([x])[0]
        except InvalidRegionError as exc:
            x.error = ("invalid region", f"image {x.image_id}: {exc}")
    return features


def _record(run: Run, scorer: RegionScorer, data: RecDataset, image_root, loaded: RecImage, features) -> None:
    """Record one image's sentences: each one's best proposal from the image's region ``features``, or a
    skip (the sample's own problem, or the image's ``error``)."""

    def skip(s: RecSample, reason: str, detail: str) -> None:
        run.rec.add(s.id, skipped=reason, detail=detail, image_id=s.image_id, sentence=s.sentence)

    for s in loaded.problems:
        skip(s, *s.problem)
    for name, tag in loaded.rotations:
        run.rotated(name, tag)
    run.count(**loaded.counts, whole_images=loaded.fallback is not None)
    if loaded.error is not None:
        for s in loaded.samples:
            skip(s, *loaded.error)
        return
    if not loaded.samples:
        return
    run.count(images=1, expressions=len(loaded.samples))
    proposals, gold = loaded.proposals, data.proposal_source == "gold"
    kept = {proposals[k].ann_id for k in loaded.keep}
    image = _existing(data, image_root, loaded.image_id)
    logits = scorer.score(features, [s.sentence for s in loaded.samples])  # (T, K')
    for s, row in zip(loaded.samples, logits):
        k = loaded.keep[int(row.argmax())]
        pred = proposals[k].bbox
        targets = data.target_boxes(s)
        overlap = max(iou(pred, t) for t in targets)
        dropped = gold and not loaded.fallback and not kept & set(s.targets)  # its gold box had no area inside the image
        run.rec.add(
            s.id,
            image_id=loaded.image_id,
            ref_id=s.ref_id,
            sentence=s.sentence,
            target_ann_ids=list(s.targets),
            target_boxes=[list(t) for t in targets],
            pred_index=k,
            pred_box=list(pred),
            pred_ann_id=proposals[k].ann_id,
            image_stamp=run.stamp(image) if image is not None else None,
            iou=round(overlap, 4),
            n_proposals=len(proposals),
            scores=[round(float(v), 4) for v in row],
            correct=overlap > 0.5,
            **({"fallback": loaded.fallback} if loaded.fallback else {}),
            **({"lost": "target box dropped"} if dropped else {}),
        )


def _existing(data: RecDataset, image_root, image_id: str) -> Optional[Path]:
    """The file an image is read from (the first of its names that exists), or None."""
    return next((p for p in _image_paths(data, image_root, image_id) if p.is_file()), None)


def rec_metrics(records: Sequence[dict], skipped: int, counts: dict, seconds: float) -> dict:
    """Accuracy (IoU > 0.5) in % over the scored expressions (``acc``) and over all of them (``acc_all``),
    ``None`` when there are none; speed of this run's work."""
    n_correct = sum(bool(r["correct"]) for r in records)
    return {
        "acc": 100.0 * n_correct / len(records) if records else None,
        "n": len(records),
        "skipped": skipped,
        "acc_all": 100.0 * n_correct / (len(records) + skipped) if records else None,
        "expr_per_s": counts["expressions"] / seconds if counts["expressions"] else None,
        "images_per_s": counts["images"] / seconds if counts["images"] else None,
    }


def evaluate(
    scorer: RegionScorer,
    data: RecDataset,
    image_root,
    output,
    *,
    predictions=None,
    run_config: Optional[dict] = None,
    limit: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
    no_proposals: str = "whole-image",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: Optional[int] = None,
    allow_lost_inputs: bool = False,
    **extra,
) -> dict:
    """Run REC over ``data`` and write the results JSON (and per-sample JSONL); returns the results dict.

    The run's fingerprint is :meth:`RegionScorer.describe` with the dataset, split, proposals and
    ``no_proposals``, plus the caller's ``run_config`` fields (:func:`falip.tasks.run.fingerprint`); a
    resume with a different one refuses to mix predictions. ``extra`` adds top-level fields.
    Samples that cannot be evaluated are recorded as skipped with a reason; skipped samples are
    retried when a run is resumed. ``no_proposals``: an image without usable proposals is scored
    with the whole image as its only proposal, as the reference code does (``whole-image``: its
    sentences count, and ``run.no_proposals`` counts them), or its sentences are skipped (``skip``).
    Skipped sentences, whole-image fallbacks and sentences whose gold target box was dropped are
    *lost*: past half of the run, it refuses unless ``allow_lost_inputs`` (:func:`falip.tasks.run.lost_inputs`).
    ``batch_size``: images encoded together; ``workers``: DataLoader processes reading images and
    proposals (default :func:`falip.tasks.loader.default_workers`; 0: inline). Predictions do not depend on either.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if no_proposals not in NO_PROPOSALS:
        raise ValueError(f"no_proposals must be one of {NO_PROPOSALS}, got {no_proposals!r}")
    samples = data.samples[:limit] if limit is not None else data.samples
    # Expressions longer than a model's text context are cut by its tokenizer: warned about and counted.
    longest = [max((scorer.prompt(s.sentence, m) for m in scorer.methods), key=len) for s in samples]
    truncated = (
        max(warn_overlong(m, longest, "expressions (in their prompt)") for m in scorer.models) if distributed.is_main() else 0
    )
    described = dict(task="rec", dataset=data.name, split=data.split, proposals=data.proposal_source, no_proposals=no_proposals)
    files = {k: data.source.get(k) for k in ("refs", "instances", "annotations", "detections")}
    run = Run(
        "rec",
        output,
        fingerprint({**scorer.describe(), **described}, run_config),
        inputs=describe_inputs(scorer.models, files=files, image_root=image_root),
        reads=[
            *files.values(),
            *weights_files(scorer.models),
            *(p for i in data.images for p in _image_paths(data, image_root, i)),
        ],
        resume=resume,
        predictions=predictions,
        retry_skipped=True,
        allow_lost_inputs=allow_lost_inputs,
        progress=progress,
        desc=f"rec {data.name} {data.split}",
        unit="expression",
    )
    groups: dict[str, list[RecSample]] = {}
    for s in samples:
        groups.setdefault(s.image_id, []).append(s)
    image_of = {image_id: _existing(data, image_root, image_id) for image_id in groups}
    work = run.plan(list(groups.values()), lambda s: (s.id, image_of[s.image_id]))
    # Workers read images and proposals and preprocess; each batch of images is encoded in one call per (model, method).
    need_masks = any(m.edit == "reverse_blur" for m in scorer.methods)
    need_image = any(m.edit is not None for m in scorer.methods)
    preprocessors = tuple(m.preprocessor() for m in scorer.models) if any(m.edit is None for m in scorer.methods) else None
    loader = RecImageLoader(data, image_root, no_proposals, need_masks, need_image, preprocessors)
    for batch in run.batches([(todo[0].image_id, todo) for todo in work], loader, batch_size, workers, scorer.models[0].device):
        features = _encode(scorer, batch)
        for loaded in batch:
            _record(run, scorer, data, image_root, loaded, features.get(id(loaded)))
            run.advance([s.id for s in loaded.problems + loaded.samples])
    seconds = run.seconds()
    counts = run.totals("images", "expressions", "proposals", "clamped", "dropped", "masks_missing", "whole_images")
    if counts["clamped"] >= max(3, CLAMP_WARNING_SHARE * counts["proposals"]) and distributed.is_main():
        warn(
            f"{counts['clamped']} of {counts['proposals']} {data.proposal_source} proposal boxes extended past their image "
            "and were clamped: are they [x, y, w, h] (COCO) and not [x0, y0, x1, y1]?",
            BoxConventionWarning,
        )

    def summarize(rec: RunRecorder) -> Summary:
        """The metrics over every sample (on rank 0 of a distributed run: of all ranks)."""
        current = [rec.done[s.id] for s in samples if s.id in rec.done]
        records = [r for r in current if "correct" in r]
        whole = [r for r in records if r.get("fallback") == "whole image"]
        run_info = dict(
            computed=counts["expressions"],
            resumed=rec.resumed,
            recomputed_changed_images=run.changed,
            images_encoded=counts["images"],
            proposals_clamped=counts["clamped"],
            proposals_dropped=counts["dropped"],
            masks_missing=counts["masks_missing"] if need_masks else None,
            no_proposals=dict(policy=no_proposals, images=counts["whole_images"], expressions=len(whole)),
            exif_rotated_images=counts["rotated"],
            expressions_truncated=truncated,
            limit=limit,
        )
        fields = dict(
            dataset=data.name,
            split=data.split,
            model=[m.name for m in scorer.models],
            method=method_label(scorer.methods, scorer.aggregate, scorer.captions is not None),
            proposals=data.proposal_source,
        )
        lost = {
            **skip_reasons(current),
            "scored on the whole image (no usable proposal)": len(whole),
            "scored without their target (its gold box has no area inside the image)": sum("lost" in r for r in records),
        }
        return Summary(
            metrics=rec_metrics(records, len(current) - len(records), counts, seconds),
            order=[s.id for s in samples],
            items=len(samples),
            lost=lost,
            notes={
                f"{data.proposal_source} proposal boxes dropped (no area inside their image)": (
                    counts["dropped"],
                    counts["proposals"],
                )
            },
            fields={**fields, **extra, "run": run_info},
        )

    return run.finish(summarize)
