"""Region-aware zero-shot classification (docs/method.md §11.2): what class is the object in this box or mask?

A zero-shot classifier (class names × prompt templates, text side computed once and cached) scores
the embedding of each region, encoded by any method of :mod:`falip.methods` (``falip``, ``none``,
an image edit such as ``blur`` or ``circle``, or ``falip+<edit>``) — the code path REC uses.

- :func:`classify`: one image, one region → class probabilities.
- :func:`evaluate`: a :class:`~falip.datasets.generic.RegionDataset` → top-1/top-5 accuracy
  (and per-group and worst-group accuracy when samples carry groups), results JSON + per-sample
  JSONL with resume, through :class:`falip.results.RunRecorder`.
- ``falip classify``: the command line (:mod:`falip.cli.classify`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .. import distributed
from ..bias import FovealConfig
from ..datasets.generic import EmptyMaskError, RegionDataset, RegionSample, read_mask
from ..digests import describe_inputs
from ..errors import FalipError, ImageLoadError, InvalidRegionError
from ..geometry import validate_boxes
from ..images import ImageTooLargeError, load_image
from ..inputs import warn_overlong
from ..methods import Method, encode_with_method, encode_with_method_batch, parse_method
from ..model import PreparedImage, Preprocessor
from ..results import RunRecorder
from ..zeroshot import Templates, class_prompts, load_templates, zero_shot_classifier
from .loader import DEFAULT_BATCH_SIZE
from .run import Run, Summary, digest, fingerprint, skip_reasons, weights_files


class SampleError(FalipError):
    """A sample that cannot be classified; ``reason`` is the short key counted in ``skipped``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable, to travel back from DataLoader workers
        return SampleError, (self.reason, self.detail)


# ----------------------------------------------------------------------------------------------
# The classifier and the one-image API


def text_classifier(
    model, classnames: Sequence[str], templates: Union[Templates, str, None] = None, method: Union[str, Method] = "falip"
) -> torch.Tensor:
    """``(C, E)`` normalised class embeddings; a method's text suffix (``shade``) is appended to every prompt.

    templates: ``None`` (the 80 OpenAI ImageNet templates), a built-in name or file
    (:func:`falip.zeroshot.load_templates`), a list of templates, or ``{class: [prompts]}``.
    """
    method = parse_method(method) if isinstance(method, str) else method
    templates = load_templates(templates) if templates is None or isinstance(templates, str) else templates
    prompts = class_prompts(classnames, templates)
    if method.text_suffix:
        templates = {c: [p + method.text_suffix for p in ps] for c, ps in zip(classnames, prompts)}
        prompts = list(templates.values())
    warn_overlong(model, [p for ps in prompts for p in ps], "class prompts")
    return zero_shot_classifier(model, classnames, templates)


def _logits(model, embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """The model's own logits ``(K, C)`` (``runtime.logits``) of K region embeddings ``(K, E)`` and C classes ``(C, E)``."""
    return model.runtime.logits(embeddings, classifier)


def classify(
    model,
    image,
    region,
    classnames: Sequence[str],
    *,
    templates: Union[Templates, str, None] = None,
    method: Union[str, Method] = "falip",
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
) -> torch.Tensor:
    """Probabilities ``(C,)`` over ``classnames`` for the object in ``region`` of ``image``.

    region: a box ``(x0, y0, x1, y1)`` in pixels, or a boolean mask ``(H, W)`` of the image's size.
    method: ``falip`` (default), ``none``, an edit (``crop``, ``blur``, ``circle`` …) or ``falip+<edit>``.
    """
    arr = np.asarray(region.detach().cpu() if hasattr(region, "detach") else region)
    if arr.ndim == 2 and arr.shape != (1, 4):
        regions = dict(masks=[arr])
    elif arr.size == 4:
        regions = dict(boxes=arr.reshape(1, 4))
    else:
        raise InvalidRegionError(f"region must be a box (x0, y0, x1, y1) or an (H, W) mask, got shape {arr.shape}")
    classifier = text_classifier(model, classnames, templates, method)
    embedding = encode_with_method(model, image, method=method, config=config, mode=mode, **regions)
    return _logits(model, embedding, classifier).softmax(-1)[0]


# ----------------------------------------------------------------------------------------------
# Reading samples


@dataclass
class ImageGroup:
    """The regions of one image that are encoded in one call: boxes ``(K, 4)`` or K masks ``(H, W)``.

    ``prepared``: the image preprocessed for the model (methods without an edit; ``image`` is then
    dropped so that worker processes do not ship it); ``rotations``: ``(name, EXIF tag)`` of a tagged image.
    """

    image_path: Path
    samples: list[RegionSample]
    image: Optional[Image.Image] = None
    boxes: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    ready: list[RegionSample] = field(default_factory=list)  # samples whose region is in boxes/masks
    failed: list[tuple[RegionSample, SampleError]] = field(default_factory=list)
    prepared: Optional[PreparedImage] = None
    rotations: list[tuple[str, int]] = field(default_factory=list)

    @property
    def source(self):
        """What the model encodes: the prepared pixels, else the decoded image."""
        return self.prepared if self.prepared is not None else self.image


def _uses_mask(sample: RegionSample) -> bool:
    return sample.mask is not None and not sample.mask_as_box


def group_by_image(samples: Iterable[RegionSample]) -> list[list[RegionSample]]:
    """Samples grouped by (image, region kind), in order of first appearance."""
    groups: dict[tuple[Path, bool], list[RegionSample]] = {}
    for s in samples:
        groups.setdefault((s.image, _uses_mask(s)), []).append(s)
    return list(groups.values())


def _sample_region(sample: RegionSample, size: tuple[int, int], class_index: dict[str, int]) -> np.ndarray:
    """The region of one sample: a box ``(4,)`` or a mask ``(H, W)``; raises SampleError."""
    if sample.label is None or sample.label not in class_index:
        raise SampleError("unknown label", f"{sample.id}: label {sample.label!r} is not one of the {len(class_index)} classes")
    W, H = size
    if sample.mask is not None:
        if not (sample.mask.exists() or sample.mask.is_symlink()):  # present but not a file: read_mask says what it is
            raise SampleError("missing file", f"mask file not found: {sample.mask}")
        try:
            mask = read_mask(sample.mask, sample.mask_id)
        except EmptyMaskError as exc:  # its message states the rule that read the mask
            raise SampleError("empty mask", str(exc)) from exc
        except FalipError as exc:
            raise SampleError("unreadable file", str(exc)) from exc
        if mask.shape != (H, W):
            raise SampleError(
                "mask size mismatch",
                f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but image {sample.image} is {W}x{H}",
            )
        if not sample.mask_as_box:
            return mask
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    elif sample.box is not None:
        box = sample.box
    else:
        raise SampleError("bad region", f"{sample.id}: no box and no mask")
    try:
        return validate_boxes(box, size)[0]
    except InvalidRegionError as exc:
        raise SampleError("bad region", f"{sample.image}: {exc}") from exc


def load_group(samples: list[RegionSample], class_index: dict[str, int], on_rotation=None) -> ImageGroup:
    """Open the image of a group once and build every sample's region; failures are collected, not raised.

    The image is read in its stored pixel orientation (EXIF ignored, as dataset annotations assume);
    ``on_rotation`` hears of tagged images."""
    group = ImageGroup(samples[0].image, samples)
    path = group.image_path
    if not (path.exists() or path.is_symlink()):  # present but not a file: load_image says what it is
        group.failed = [(s, SampleError("missing file", f"image file not found: {path}")) for s in samples]
        return group
    try:
        group.image = load_image(path, exif=False, on_rotation=on_rotation)
    except ImageTooLargeError as exc:
        group.failed = [(s, SampleError("image too large", str(exc))) for s in samples]
        return group
    except ImageLoadError as exc:
        group.failed = [(s, SampleError("unreadable file", str(exc))) for s in samples]
        return group
    for s in samples:
        try:
            region = _sample_region(s, group.image.size, class_index)
        except SampleError as exc:
            group.failed.append((s, exc))
            continue
        (group.masks if region.ndim == 2 else group.boxes).append(region)
        group.ready.append(s)
    return group


@dataclass(frozen=True)
class GroupLoader:
    """``load_group`` as a picklable callable for DataLoader workers; with a ``preprocessor`` (methods
    without an edit) the worker also preprocesses the image and ships pixels instead of the image."""

    class_index: dict[str, int]
    preprocessor: Optional[Preprocessor] = None

    def __call__(self, samples: list[RegionSample]) -> ImageGroup:
        rotations: list[tuple[str, int]] = []
        group = load_group(samples, self.class_index, on_rotation=lambda name, tag: rotations.append((name, tag)))
        group.rotations = rotations
        if self.preprocessor is not None and group.image is not None and group.ready:
            group.prepared, group.image = self.preprocessor(group.image), None
        return group


# ----------------------------------------------------------------------------------------------
# Evaluation


def _encode_group(model, group: ImageGroup, method: Method, config, mode: str, batch_size: int) -> tuple[list, list]:
    """Embeddings of a group's ready samples: ``([(sample, (E,) tensor)], [(sample, SampleError)])``.

    A region the model cannot use (e.g. entirely outside the centre crop) fails alone.
    """
    regions = dict(masks=group.masks) if group.masks else dict(boxes=np.stack(group.boxes))
    try:
        emb = encode_with_method(model, group.source, method=method, config=config, mode=mode, batch_size=batch_size, **regions)
        return list(zip(group.ready, emb)), []
    except InvalidRegionError as exc:
        if len(group.ready) == 1:
            return [], [(group.ready[0], SampleError("bad region", f"{group.image_path}: {exc}"))]
    done, failed = [], []
    for k, s in enumerate(group.ready):
        single = replace(group, samples=[s], boxes=group.boxes[k : k + 1], masks=group.masks[k : k + 1], ready=[s], failed=[])
        d, f = _encode_group(model, single, method, config, mode, batch_size)
        done += d
        failed += f
    return done, failed


def _encode_groups(
    model, groups: list[ImageGroup], method: Method, config, mode: str, batch_size: int
) -> list[tuple[list, list]]:
    """:func:`_encode_group` of many groups in one batched call; when a region fails, group by group (it fails alone)."""
    ready = [g for g in groups if g.ready]
    try:
        embeddings = encode_with_method_batch(
            model,
            [g.source for g in ready],
            [np.stack(g.boxes) if g.boxes else None for g in ready],
            method=method,
            masks_per_image=[g.masks or None for g in ready],
            config=config,
            mode=mode,
            batch_size=batch_size,
        )
    except InvalidRegionError:
        return [_encode_group(model, g, method, config, mode, batch_size) if g.ready else ([], []) for g in groups]
    encoded = iter(embeddings)
    return [(list(zip(g.ready, next(encoded))), []) if g.ready else ([], []) for g in groups]


def classification_metrics(records: Sequence[dict], num_classes: int, skipped: int) -> tuple[dict, dict]:
    """``(metrics, groups)``: top-1/top-5 accuracy in %, n, skipped; per-group top-1 and the worst group.

    top5 is ``None`` when there are 5 classes or fewer (it would be 100 by construction).
    """
    n = len(records)
    metrics: dict = {
        "top1": 100.0 * sum(r["correct"] for r in records) / n if n else None,
        "top5": 100.0 * sum(r["correct5"] for r in records) / n if n and num_classes > 5 else None,
        "n": n,
        "skipped": skipped,
    }
    groups: dict[str, dict] = {}
    for r in records:
        if r.get("group"):
            g = groups.setdefault(r["group"], {"n": 0, "correct": 0})
            g["n"] += 1
            g["correct"] += int(r["correct"])
    for name in sorted(groups):
        g = groups[name]
        g["top1"] = 100.0 * g.pop("correct") / g["n"]
        metrics[f"top1_{name}"] = g["top1"]
    if groups:
        metrics["worst_group"] = min(g["top1"] for g in groups.values())
        metrics["mean_group"] = sum(g["top1"] for g in groups.values()) / len(groups)
    return metrics, {k: groups[k] for k in sorted(groups)}


def describe(
    model,
    classnames: Sequence[str],
    templates: Union[Templates, str, None] = None,
    method: Union[str, Method] = "falip",
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
) -> dict:
    """Everything that determines a classification run's answers, JSON-able (its fingerprint): the model's
    description, preprocessing, method, mode, bias, the classes and the digest of every class prompt (``prompts``)."""
    method = parse_method(method) if isinstance(method, str) else method
    templates = load_templates(templates) if templates is None or isinstance(templates, str) else templates
    prompts = [[p + method.text_suffix for p in ps] for ps in class_prompts(classnames, templates)]
    return dict(
        models=[{k: v for k, v in model.info().items() if k != "device"}],
        preprocess=model.preprocess,
        method=method.name,
        mode=mode,
        bias=(config or model.config).to_dict(),
        classes=digest(list(classnames)),
        num_classes=len(classnames),
        prompts=digest(prompts),
    )


def sample_key(sample: RegionSample) -> str:
    """The digest of what a reader made of a sample (image, label, box or mask, group): a resumed record
    whose sample reads differently now (e.g. a dataset's box file edited) is computed again."""
    return digest(
        [str(sample.image), sample.label, sample.box, str(sample.mask), sample.mask_id, sample.mask_as_box, sample.group]
    )


def evaluate(
    model,
    dataset: RegionDataset,
    output: Union[str, Path],
    method: Union[str, Method] = "falip",
    templates: Union[Templates, str, None] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
    run_config: Optional[dict] = None,
    resume: bool = True,
    workers: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    allow_lost_inputs: bool = False,
) -> dict:
    """Classify every sample of ``dataset`` and write ``output`` (results JSON) and its predictions JSONL.

    The run's fingerprint is :func:`describe` (model, method, mode, bias, classes, prompts by content)
    with the dataset and split, plus the caller's ``run_config`` fields (:func:`falip.tasks.run.fingerprint`);
    a resume with a different one is refused. Skipped samples count as lost: past half of the run, it
    refuses unless ``allow_lost_inputs``.
    batch_size: images encoded together (and edited images per forward pass); workers: DataLoader
    processes reading and preprocessing images (default :func:`falip.tasks.loader.default_workers`; 0:
    inline). Predictions do not depend on either.
    Returns the results dict (``metrics``: top1, top5, n, skipped, and per-group entries).
    """
    method = parse_method(method) if isinstance(method, str) else method
    config = config or model.config
    classnames = list(dataset.classnames)
    template_file = Path(templates) if isinstance(templates, str) and Path(templates).is_file() else None
    templates = load_templates(templates) if templates is None or isinstance(templates, str) else templates
    described = {**describe(model, classnames, templates, method, config, mode), "dataset": dataset.name, "split": dataset.split}
    masks = [s.mask for s in dataset.samples if s.mask is not None]
    run = Run(
        "classify",
        output,
        fingerprint(described, run_config),
        inputs=describe_inputs([model], files=dataset.source),
        reads=[*dataset.source.values(), template_file, *weights_files([model]), *(s.image for s in dataset.samples), *masks],
        resume=resume,
        allow_lost_inputs=allow_lost_inputs,
        progress=progress,
        desc=f"classify {dataset.name} {method.name}",
        unit="region",
    )
    for sample_id, reason, detail in dataset.problems if distributed.is_main() else ():
        if sample_id not in run.rec.done:
            run.rec.skip(sample_id, reason, detail)
    classifier = text_classifier(model, classnames, templates, method)  # (C, E), once per run
    class_index = {c: i for i, c in enumerate(classnames)}
    images: set[Path] = set()  # images encoded in this run

    def record(group: ImageGroup, done: list, failed: list) -> None:
        """Record a group's predictions (top-k of its region embeddings ``done``) and its skipped samples."""
        if done:
            logits = _logits(model, torch.stack([e for _, e in done]), classifier)  # (K, C)
            best = logits.topk(min(5, len(classnames)), dim=-1).indices.tolist()
            for (s, _), top in zip(done, best):
                truth = class_index[s.label]
                fields = dict(
                    label=s.label,
                    pred=classnames[top[0]],
                    top5=[classnames[i] for i in top],
                    correct=top[0] == truth,
                    correct5=truth in top,
                )
                stamp = run.stamp(s.image, s.mask)
                run.rec.add(s.id, **fields, image_stamp=stamp, sample=sample_key(s), **({"group": s.group} if s.group else {}))
            images.add(group.image_path)
            run.count(regions=len(done))
        for s, err in list(group.failed) + failed:
            run.rec.add(s.id, skipped=err.reason, detail=err.detail, sample=sample_key(s))

    work = run.plan(group_by_image(dataset.samples), lambda s: (s.id, (s.image, s.mask), sample_key(s)))
    # Workers decode and preprocess (pixels for methods without an edit); the model encodes a batch of images at once.
    loader = GroupLoader(class_index, None if method.edit else model.preprocessor())
    with torch.no_grad():
        for batch in run.batches(work, loader, batch_size, workers, model.device):
            for group in batch:
                for name, tag in group.rotations:
                    run.rotated(name, tag)
            for group, (done, failed) in zip(batch, _encode_groups(model, batch, method, config, mode, batch_size)):
                record(group, done, failed)
                run.advance([s.id for s in group.samples])
    seconds = run.seconds()
    images = set().union(*distributed.all_gather(images, "classify images"))
    counts = run.totals("regions")

    def summarize(rec: RunRecorder) -> Summary:
        """The metrics over every sample (on rank 0 of a distributed run: of all ranks)."""
        current = [s.id for s in dataset.samples] + [p[0] for p in dataset.problems]
        records = [rec.done[i] for i in current if i in rec.done]
        ok = [r for r in records if "skipped" not in r]
        metrics, group_table = classification_metrics(ok, len(classnames), skipped=len(records) - len(ok))
        speed = dict(
            images=len(images),
            regions=counts["regions"],
            seconds=round(seconds, 3),
            images_per_s=round(len(images) / seconds, 2) if images and seconds > 0 else None,
            regions_per_s=round(counts["regions"] / seconds, 2) if counts["regions"] and seconds > 0 else None,
            resumed=rec.resumed,
            exif_rotated_images=counts["rotated"],
            recomputed_changed_images=run.changed,
        )
        fields = dict(dataset=dataset.name, split=dataset.split, method=method.name, speed=speed)
        if group_table:
            fields["groups"] = group_table
        return Summary(metrics, order=current, items=len(current), lost=skip_reasons(records), fields=fields)

    return run.finish(summarize)


def rename_classes(dataset: RegionDataset, names: Sequence[str]) -> RegionDataset:
    """The dataset with its class names replaced by ``names`` (same order and count)."""
    if len(names) != len(dataset.classnames):
        raise FalipError(f"--classnames lists {len(names)} names but {dataset.name} has {len(dataset.classnames)} classes")
    mapping = dict(zip(dataset.classnames, names))
    samples = [replace(s, label=mapping.get(s.label, s.label)) for s in dataset.samples]
    return replace(dataset, classnames=list(names), samples=samples)
