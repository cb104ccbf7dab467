"""Zero-shot point-cloud recognition from depth maps, with a foveal bias on each view's foreground.

PointCLIP's recipe (Zhang et al., CVPR 2022; V2: Zhu et al., ICCV 2023) with FALIP's region
bias: project the cloud to V depth maps (:mod:`falip.pointcloud`), encode each view with CLIP —
``none``: the plain image; ``falip``: the image with the bias on the view's foreground mask —
score every view against the class prompts and sum the view logits with per-view weights.

CLI (:mod:`falip.cli.pointcloud`): ``falip pointcloud`` (evaluate on ModelNet40 / ScanObjectNN) and ``falip render-depth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from ..bias import FovealConfig
from ..datasets.pointclouds import PointCloudDataset
from ..errors import FalipError
from ..methods import encode_with_method
from ..pointcloud import (
    PROJECTIONS,
    PointCloudError,
    View,
    depth_to_image,
    foreground,
    get_views,
    normalize_points,
    project,
    validate_points,
)
from ..results import RunRecorder, describe_inputs
from ..zeroshot import Templates, load_templates, zero_shot_classifier

DEFAULT_TEMPLATES = ["point cloud depth map of a {}."]
METHODS = ("none", "falip")


def resolve_templates(spec: Optional[str]) -> Templates:
    """``None`` → ``["point cloud depth map of a {}."]``; otherwise :func:`falip.zeroshot.load_templates`."""
    return list(DEFAULT_TEMPLATES) if spec is None else load_templates(spec)


class PointCloudClassifier:
    """Zero-shot classifier of point clouds through V depth views of one CLIP model.

    model: a :class:`falip.FalipModel`; classnames: C names (``_`` is read as a space in prompts);
    views: 6, 10 or a list of :class:`falip.pointcloud.View`; projection: ``sparse`` or ``realistic``; method: ``none`` or ``falip``;
    templates: prompt templates (default ``"point cloud depth map of a {}."``);
    view_weights: V non-negative weights (default uniform); config/mode: the foveal bias and its
    execution (``falip`` only); mask_dilation: pixels by which each view's foreground grows
    (default: a quarter patch for sparse maps, whose points are single pixels; 0 for realistic).
    """

    def __init__(
        self,
        model,
        classnames: Sequence[str],
        *,
        views: Union[int, Sequence[View]] = 6,
        projection: str = "sparse",
        method: str = "falip",
        templates: Optional[Templates] = None,
        view_weights: Optional[Sequence[float]] = None,
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        up: str = "y",
        mask_dilation: Optional[int] = None,
    ):
        if method not in METHODS:
            raise FalipError(f"point-cloud method must be one of {METHODS}, got {method!r}")
        if projection not in PROJECTIONS:
            raise PointCloudError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.model = model
        self.views = get_views(views)
        self.projection, self.method, self.config, self.mode, self.up = projection, method, config, mode, up
        weights = (
            torch.ones(len(self.views)) if view_weights is None else torch.as_tensor(list(view_weights), dtype=torch.float32)
        )
        if weights.shape != (len(self.views),) or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise FalipError(
                f"view weights must be {len(self.views)} non-negative numbers, not all 0; got {list(view_weights or [])}"
            )
        self.view_weights = weights / weights.sum()
        if mask_dilation is None:
            mask_dilation = model.patch_size // 4 if projection == "sparse" else 0
        self.mask_dilation = mask_dilation
        names = [str(c).replace("_", " ") for c in classnames]
        self.classnames = list(classnames)
        self.text = zero_shot_classifier(model, names, resolve_templates(None) if templates is None else templates)  # (C, E)

    def render(self, points) -> tuple[np.ndarray, np.ndarray]:
        """``(B, P, 3)`` clouds → images ``(B, V, S, S)`` uint8 and foreground masks ``(B, V, S, S)`` bool."""
        pts = validate_points(points).to(self.model.device)
        depth = project(pts, self.views, self.projection, size=self.model.image_size, up=self.up)
        images = (depth_to_image(depth) * 255).round().to(torch.uint8).cpu().numpy()
        masks = foreground(depth, self.mask_dilation).cpu().numpy()
        return images, masks

    @torch.no_grad()
    def view_embeddings(self, points) -> torch.Tensor:
        """L2-normalised embeddings ``(B, V, E)`` of every view of a batch of clouds ``(B, P, 3)``."""
        images, masks = self.render(points)
        B, V = images.shape[:2]
        flat_images = list(images.reshape(B * V, *images.shape[2:]))
        if self.method == "none":
            emb = self.model.encode_image(flat_images)
        else:
            flat_masks = masks.reshape(B * V, *masks.shape[2:])
            emb = torch.cat(
                [
                    encode_with_method(self.model, img, "falip", masks=[m], config=self.config, mode=self.mode)
                    for img, m in zip(flat_images, flat_masks)
                ]
            )
        return emb.cpu().reshape(B, V, -1)

    def logits(self, points) -> torch.Tensor:
        """Class logits ``(B, C)``: the weighted mean over views of logit_scale · cosine (weights sum to 1)."""
        emb = self.view_embeddings(points)  # (B, V, E)
        per_view = self.model.runtime.logit_scale.float().cpu() * emb @ self.text.T  # (B, V, C)
        return (per_view * self.view_weights[None, :, None]).sum(dim=1)


def classify_points(model, points, classnames: Sequence[str], **options) -> torch.Tensor:
    """Zero-shot class logits of one cloud ``(P, 3)`` → ``(C,)``, or of a batch ``(B, P, 3)`` → ``(B, C)``.

    ``options`` are those of :class:`PointCloudClassifier` (``views``, ``projection``, ``method``,
    ``templates``, ``view_weights``, ``config``, ``mode``, ``up``, ``mask_dilation``).
    """
    pts = validate_points(points)
    single = pts.ndim == 2
    logits = PointCloudClassifier(model, classnames, **options).logits(pts[None] if single else pts)
    return logits[0] if single else logits


def _check_sample(points: np.ndarray, label: int, num_classes: int, up: str) -> Optional[tuple[str, str]]:
    """``None`` for a usable sample, else ``(reason, detail)`` for the results' ``skipped``."""
    if not 0 <= label < num_classes:
        return "bad label", f"label {label} is outside the {num_classes} classes"
    try:
        normalize_points(validate_points(points, "cloud"), up=up)
    except PointCloudError as exc:
        return "bad points", str(exc)
    return None


def evaluate(
    classifier: PointCloudClassifier,
    dataset: PointCloudDataset,
    output,
    run_config: dict,
    batch_size: int = 32,
    limit: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Classify the first ``limit`` (default all) clouds of ``dataset``; write and return the results.

    Metrics: ``acc`` (top-1, %), ``n`` (clouds classified), ``skipped`` (clouds that could not be).
    """
    if batch_size < 1:
        raise FalipError(f"batch size must be >= 1, got {batch_size}")
    inputs = describe_inputs([classifier.model], files={f"file{i}": p for i, p in enumerate(dataset.files)})
    rec = RunRecorder(output, task="pointcloud", config=run_config, resume=resume, inputs=inputs)
    C = len(classifier.classnames)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    batch: list[tuple[str, np.ndarray, int]] = []

    def flush() -> None:
        points = np.stack([b[1] for b in batch])
        try:
            pred = classifier.logits(points).argmax(dim=1).tolist()
        except FalipError as exc:
            for sample_id, _, _ in batch:
                rec.skip(sample_id, "encode error", str(exc))
        else:
            for (sample_id, _, label), p in zip(batch, pred):
                names = classifier.classnames
                rec.add(sample_id, label=label, pred=p, correct=bool(p == label), label_name=names[label], pred_name=names[p])
        batch.clear()

    for index, (sample_id, points, label) in enumerate(
        tqdm(dataset, total=total, desc=f"{dataset.name} {dataset.split}", disable=not progress)
    ):
        if index >= total:
            break
        if sample_id in rec.done:
            continue
        problem = _check_sample(points, label, C, classifier.up)
        if problem:
            rec.skip(sample_id, *problem)
            continue
        if batch and len(points) != len(batch[0][1]):
            flush()  # clouds of different sizes are projected in separate batches
        batch.append((sample_id, points, label))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    records = rec.records()
    acc = 100.0 * sum(r["correct"] for r in records) / len(records) if records else 0.0
    skipped = rec.skipped_summary()["count"]
    return rec.finish({"acc": acc, "n": len(records), "skipped": skipped}, dataset=dataset.name, split=dataset.split)
