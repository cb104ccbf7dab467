"""Zero-shot point-cloud recognition from depth views, with a foveal bias on each view's foreground.

The protocols of PointCLIP (Zhang et al., CVPR 2022) and PointCLIP V2 (Zhu et al., ICCV 2023),
with FALIP's region bias: render the cloud to V views (:mod:`falip.pointcloud`), encode each view
with CLIP — ``none``: the plain view; ``falip``: the view with the bias on its foreground — score
every view against the class prompts and combine the view scores with per-view weights as the
authors do: ``logit_scale · Σ_v w_v · cos(view_v, class) / √V`` (their concatenated, normalised
features; PointCLIP: w = 1; V2: its searched weights).

- ``pointclip``: 6 views, prompt ``"point cloud depth map of a {}."``, uniform weights.
- ``pointclip_v2``: 10 views, one searched prompt per class and searched view weights — a preset
  of :data:`V2_PRESETS_FILE` (data from PointCLIP V2's ``best_param.py``, MIT licence), chosen by
  dataset and backbone — or the user's prompt file and weights.
- ``ortho_sparse`` / ``ortho_dense``: our own orthographic projections (6 or 10 views).

CLI (:mod:`falip.cli.pointcloud`): ``falip pointcloud`` (evaluate on ModelNet40 / ScanObjectNN) and ``falip render-depth``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..bias import FovealConfig
from ..datasets.pointclouds import PointCloudDataset
from ..digests import describe_inputs
from ..errors import FalipError
from ..pointcloud import (
    AUTHOR_INFO,
    AUTHOR_PROJECTIONS,
    PointCloudError,
    View,
    check_projection,
    depth_to_image,
    foreground,
    get_views,
    normalize_points,
    project,
    render_views,
    validate_points,
    view_foreground,
)
from ..results import RunRecorder
from ..zeroshot import Templates, class_prompts, load_templates, zero_shot_classifier
from .run import Run, Summary, digest, fingerprint, skip_reasons, weights_files

DEFAULT_TEMPLATES = ["point cloud depth map of a {}."]  # PointCLIP's trainers/zeroshot.py CUSTOM_TEMPLATES
METHODS = ("none", "falip")
V2_PRESETS_FILE = Path(__file__).resolve().parents[1] / "assets" / "pointclip_v2_presets.json"
DEFAULT_CLOUD_BATCH = 16  # clouds per batch (all their views encoded together)
SPARSE_VIEWS = ("pointclip", "ortho_sparse")  # views made of isolated points: their foreground is dilated by default


def v2_presets() -> dict:
    """PointCLIP V2's searched prompts and view weights: ``{key: {dataset, backbone, prompts {class: prompt}, view_weights}}``."""
    return json.loads(V2_PRESETS_FILE.read_text(encoding="utf-8"))["presets"]


def v2_preset_key(dataset: str, model_name: str) -> str:
    """``("modelnet40", "ViT-B-16")`` → ``"modelnet40_vit_b16"``; raises :class:`FalipError` where V2 has no preset."""
    backbone = {"vitb16": "vit_b16", "vitb32": "vit_b32"}.get(model_name.lower().replace("-", "").replace("/", "")[:6])
    key = f"{dataset}_{backbone}"
    if backbone is None or key not in v2_presets():
        raise FalipError(
            f"PointCLIP V2 searched prompts/weights exist for {sorted(v2_presets())}, not for dataset {dataset!r} with model "
            f"{model_name!r}: pass --v2-preset KEY, or your own --templates and --view-weights"
        )
    return key


def resolve_templates(spec: Optional[str]) -> Templates:
    """``None`` → ``["point cloud depth map of a {}."]``; otherwise :func:`falip.zeroshot.load_templates`."""
    return list(DEFAULT_TEMPLATES) if spec is None else load_templates(spec)


class PointCloudClassifier:
    """Zero-shot classifier of point clouds through V views of one CLIP model.

    model: a :class:`falip.FalipModel`; classnames: C names (``_`` is read as a space in prompts);
    projection: ``pointclip``, ``pointclip_v2`` (the authors' views, fed to the ViT without mean/std,
    as they do) or ``ortho_sparse`` / ``ortho_dense`` (ours, with the model's mean/std); views: 6, 10
    or a list of :class:`falip.pointcloud.View` (ortho projections only; default 6); method: ``none``
    or ``falip``; templates: prompt templates or ``{class: [prompts]}`` (default
    ``"point cloud depth map of a {}."``); view_weights: V non-negative weights (default all 1);
    config/mode: the foveal bias and its execution (``falip`` only); up: the clouds' up axis (ortho
    only: the authors' projections take clouds as the HDF5 files give them); max_points: the authors'
    first-N-points rule (default 1024; ortho projections use every point); mask_dilation: pixels by
    which each view's foreground grows (default: a quarter patch for views of isolated points —
    ``pointclip``, ``ortho_sparse`` — else 0).
    """

    def __init__(
        self,
        model,
        classnames: Sequence[str],
        *,
        projection: str = "pointclip",
        views: Union[int, Sequence[View], None] = None,
        method: str = "falip",
        templates: Optional[Templates] = None,
        view_weights: Optional[Sequence[float]] = None,
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        up: str = "y",
        max_points: Optional[int] = 1024,
        mask_dilation: Optional[int] = None,
    ):
        if method not in METHODS:
            raise FalipError(f"point-cloud method must be one of {METHODS}, got {method!r}")
        check_projection(projection)
        self.authors = projection in AUTHOR_PROJECTIONS
        if self.authors:
            if views is not None:
                raise PointCloudError(f"{projection} has its own fixed views; views= applies to ortho projections only")
            if up != "y":
                raise PointCloudError(f"up={up!r} applies to ortho projections; {projection} takes the clouds as given (y up)")
            self.view_names = AUTHOR_INFO[projection].views
            self.views = None
        else:
            self.views = get_views(6 if views is None else views)
            self.view_names = tuple(v.name for v in self.views)
        self.model = model
        self.projection, self.method, self.config, self.mode, self.up = projection, method, config, mode, up
        self.max_points = max_points
        V = len(self.view_names)
        weights = torch.ones(V) if view_weights is None else torch.as_tensor(list(view_weights), dtype=torch.float32)
        if weights.shape != (V,) or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise FalipError(f"view weights must be {V} non-negative numbers, not all 0; got {list(view_weights or [])}")
        self.view_weights = weights
        if mask_dilation is None:
            mask_dilation = model.patch_size // 4 if projection in SPARSE_VIEWS else 0
        self.mask_dilation = mask_dilation
        names = [str(c).replace("_", " ") for c in classnames]
        if isinstance(templates, dict):
            templates = {str(k).replace("_", " "): v for k, v in templates.items()}
        self.classnames = list(classnames)
        templates = resolve_templates(None) if templates is None else templates
        self.prompts = class_prompts(names, templates)
        self.text = zero_shot_classifier(model, names, templates)  # (C, E)

    def describe(self) -> dict:
        """Everything that determines the predictions, JSON-able (the run's fingerprint): the model, the
        projection and its views and weights, the pixels, the method (with its bias and mode), the
        classes and the digest of every class prompt (``prompts``)."""
        return dict(
            models=[{k: v for k, v in self.model.info().items() if k != "device"}],
            method=self.method,
            projection=self.projection,
            views=list(self.view_names),
            view_weights=self.view_weights.tolist(),
            up=self.up,
            max_points=self.max_points if self.authors else None,
            mask_dilation=self.mask_dilation,
            pixels="no CLIP mean/std (as the authors)" if self.authors else "CLIP mean/std",
            **(dict(bias=(self.config or self.model.config).to_dict(), mode=self.mode) if self.method == "falip" else {}),
            classes=digest(self.classnames),
            prompts=digest(self.prompts),
        )

    def render(self, points) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, P, 3)`` clouds → the pixels the ViT gets ``(B, V, 3, S, S)`` float32 (for ortho projections
        before the model's mean/std; for the authors' exactly) and foreground masks ``(B, V, S, S)`` bool.
        :class:`PointCloudError` naming the clouds (by batch index) whose views are not finite."""
        pts = validate_points(points).to(self.model.device)
        S = self.model.image_size
        if self.authors:
            pixels = render_views(pts, self.projection, max_points=self.max_points, size=S)
            masks = view_foreground(pixels, self.projection, self.mask_dilation)
        else:
            depth = project(pts, self.views, self.projection, size=S, up=self.up)
            pixels = depth_to_image(depth)[:, :, None].expand(-1, -1, 3, -1, -1)
            masks = foreground(depth, self.mask_dilation)
        bad = (~torch.isfinite(pixels.flatten(1)).all(1)).nonzero().flatten().tolist()
        if bad:
            scale = [f"{float(pts[b].abs().amax()):.3g}" for b in bad]
            raise PointCloudError(
                f"cloud(s) {bad} of the batch render to NaN or infinite {self.projection} views (largest coordinate "
                f"{', '.join(scale)}: too large for float32 arithmetic)"
            )
        return pixels.cpu(), masks.cpu()

    @torch.no_grad()
    def view_embeddings(self, points) -> torch.Tensor:
        """L2-normalised embeddings ``(B, V, E)`` of every view of a batch of clouds ``(B, P, 3)``."""
        pixels, masks = self.render(points)
        B, V = pixels.shape[:2]
        emb = self.model.encode_pixels(
            pixels.flatten(0, 1),
            normalized=self.authors,  # the authors give CLIP their views without its mean/std
            masks=None if self.method == "none" else masks.flatten(0, 1),
            config=self.config,
            mode=self.mode,
        )
        return emb.cpu().reshape(B, V, -1)

    def logits(self, points) -> torch.Tensor:
        """Class logits ``(B, C)``: the model's own logits (``runtime.logits``) of the authors' combined features —
        the weighted views ``[w_1·f_1, …, w_V·f_V]`` against the class text repeated ``[t, …, t] / √V`` — i.e.
        ``logit_scale · Σ_v w_v · cos(view v, class) / √V`` for CLIP (plus ``logit_bias`` for SigLIP)."""
        emb = self.view_embeddings(points)  # (B, V, E)
        V = emb.shape[1]
        views = (emb * self.view_weights[None, :, None]).flatten(1)  # (B, V·E)
        return self.model.runtime.logits(views, self.text.repeat(1, V) / math.sqrt(V))


def classify_points(model, points, classnames: Sequence[str], **options) -> torch.Tensor:
    """Zero-shot class logits of one cloud ``(P, 3)`` → ``(C,)``, or of a batch ``(B, P, 3)`` → ``(B, C)``.

    ``options`` are those of :class:`PointCloudClassifier` (``projection``, ``views``, ``method``,
    ``templates``, ``view_weights``, ``config``, ``mode``, ``up``, ``max_points``, ``mask_dilation``).
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


@dataclass(frozen=True)
class CloudChecker:
    """Checks one ``(sample_id, points, label)`` in a DataLoader worker: the item with ``(reason, detail)`` or None."""

    num_classes: int
    up: str

    def __call__(self, item: tuple[str, np.ndarray, int]) -> tuple[str, np.ndarray, int, Optional[tuple[str, str]]]:
        sample_id, points, label = item
        return sample_id, points, label, _check_sample(points, label, self.num_classes, self.up)


def _predict(classifier: PointCloudClassifier, clouds: list[tuple[str, np.ndarray, int, None]]) -> dict:
    """Predicted class of each cloud (its id → class), or ``(reason, detail)`` where it fails. Clouds of
    different sizes are projected in separate calls; a call that fails is retried cloud by cloud, so a bad
    cloud fails alone and no result depends on the batch size."""
    out: dict[str, Union[int, tuple[str, str]]] = {}
    for size in dict.fromkeys(len(c[1]) for c in clouds):
        same = [c for c in clouds if len(c[1]) == size]
        try:
            pred = classifier.logits(np.stack([c[1] for c in same])).argmax(dim=1).tolist()
        except FalipError as exc:
            if len(same) == 1 and isinstance(exc, PointCloudError):
                out[same[0][0]] = ("bad points", str(exc))
            elif len(same) == 1:
                largest = float(np.abs(same[0][1]).max())
                out[same[0][0]] = ("encode error", f"this cloud (largest |coordinate| {largest:.3g}) failed alone: {exc}")
            else:
                for c in same:
                    out.update(_predict(classifier, [c]))
        else:
            out.update({c[0]: p for c, p in zip(same, pred)})
    return out


def evaluate(
    classifier: PointCloudClassifier,
    dataset: PointCloudDataset,
    output,
    run_config: Optional[dict] = None,
    batch_size: int = DEFAULT_CLOUD_BATCH,
    limit: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
    workers: Optional[int] = None,
    allow_lost_inputs: bool = False,
) -> dict:
    """Classify the first ``limit`` (default all) clouds of ``dataset``; write and return the results.

    The run's fingerprint is :meth:`PointCloudClassifier.describe` with the dataset and split, plus the
    caller's ``run_config`` fields (:func:`falip.tasks.run.fingerprint`); a resume with a different one is
    refused. ``batch_size`` clouds are checked by ``workers`` DataLoader processes (default
    :func:`falip.tasks.loader.default_workers`; 0: inline) and their views (V per cloud) rendered and
    encoded together. Metrics: ``acc`` (top-1, %; None without a classified cloud), ``n`` (clouds
    classified), ``skipped`` (clouds that could not be). Skipped clouds are lost: past half of the run,
    it refuses unless ``allow_lost_inputs``.
    """
    if batch_size < 1:
        raise FalipError(f"batch size must be >= 1, got {batch_size}")
    described = {**classifier.describe(), "dataset": dataset.name, "split": dataset.split}
    run = Run(
        "pointcloud",
        output,
        fingerprint(described, run_config),
        inputs=describe_inputs([classifier.model], files={f"file{i}": p for i, p in enumerate(dataset.files)}),
        reads=[*dataset.files, *weights_files([classifier.model])],
        resume=resume,
        allow_lost_inputs=allow_lost_inputs,
        progress=progress,
        desc=f"{dataset.name} {dataset.split}",
        unit="cloud",
    )
    total = len(dataset) if limit is None else min(limit, len(dataset))
    items = [item for _, item in zip(range(total), dataset)]
    work = [c for unit in run.plan([[item] for item in items], lambda item: (item[0], None)) for c in unit]
    checker = CloudChecker(len(classifier.classnames), classifier.up)
    for loaded in run.batches(work, checker, batch_size, workers, classifier.model.device):
        predicted = _predict(classifier, [c for c in loaded if c[3] is None])
        for sample_id, _, label, problem in loaded:  # in dataset order, whatever the batch size
            outcome = problem or predicted[sample_id]
            if isinstance(outcome, tuple):
                run.rec.skip(sample_id, *outcome)
            else:
                names = classifier.classnames
                run.rec.add(
                    sample_id,
                    label=label,
                    pred=outcome,
                    correct=bool(outcome == label),
                    label_name=names[label],
                    pred_name=names[outcome],
                )
        run.advance([c[0] for c in loaded])

    def summarize(rec: RunRecorder) -> Summary:
        """The metrics over every cloud (on rank 0 of a distributed run: of all ranks)."""
        order = [item[0] for item in items]
        current = [rec.done[i] for i in order if i in rec.done]
        records = [r for r in current if "skipped" not in r]
        acc = 100.0 * sum(r["correct"] for r in records) / len(records) if records else None
        metrics = {"acc": acc, "n": len(records), "skipped": len(current) - len(records)}
        fields = dict(dataset=dataset.name, split=dataset.split)
        return Summary(metrics, order=order, items=len(order), lost=skip_reasons(current), fields=fields)

    return run.finish(summarize)
