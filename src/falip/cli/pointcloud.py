"""``falip pointcloud`` (zero-shot point-cloud recognition) and ``falip render-depth``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..datasets.pointclouds import DATASETS, SCANOBJECTNN_VARIANTS, load_cloud, load_dataset
from ..errors import FalipError
from ..pointcloud import (
    AUTHOR_INFO,
    AUTHOR_PROJECTIONS,
    PROJECTIONS,
    PointCloudError,
    check_projection,
    depth_to_image,
    get_views,
    normalize_points,
    project,
    render_views,
    validate_points,
    views_grid,
)
from ..results import check_apart, check_output_path, predictions_path
from ..tasks.pointcloud import (
    DEFAULT_CLOUD_BATCH,
    DEFAULT_TEMPLATES,
    METHODS,
    PointCloudClassifier,
    evaluate,
    resolve_templates,
    v2_preset_key,
    v2_presets,
)
from ..zeroshot import Templates, load_templates
from .common import (
    add_bias_args,
    add_loader_args,
    add_model_args,
    add_run_args,
    check_loader_flags,
    load_from_args,
    settings_line,
)


def parse_weights(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"view weights are numbers separated by commas, got {text!r}") from None


def parse_projection(text: str) -> str:
    try:
        check_projection(text)
    except PointCloudError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def protocol_from_args(args: argparse.Namespace, dataset: str) -> tuple[Templates, Optional[list[float]], dict]:
    """Prompts, view weights and their record for the run: the user's, else the projection's authors' defaults."""
    if args.v2_preset and args.projection != "pointclip_v2":
        raise FalipError("--v2-preset applies to --projection pointclip_v2 only")
    weights = args.view_weights
    if args.projection == "pointclip_v2" and (args.templates is None or weights is None):
        key = args.v2_preset or v2_preset_key(dataset, args.model)
        if key not in v2_presets():
            raise FalipError(f"unknown --v2-preset {key!r}: use one of {sorted(v2_presets())}")
        preset = v2_presets()[key]
        templates = load_templates(args.templates) if args.templates else {c: [p] for c, p in preset["prompts"].items()}
        weights = preset["view_weights"] if weights is None else weights
        source = dict(v2_preset=key, templates=args.templates or f"pointclip_v2:{key}")
    else:
        templates, source = resolve_templates(args.templates), dict(templates=args.templates or DEFAULT_TEMPLATES)
    return templates, weights, source


def cmd_pointcloud(args: argparse.Namespace) -> int:
    check_loader_flags(args)
    check_output_path(args.output)
    dataset = load_dataset(args.dataset, args.data_root, args.variant, args.split)
    reads = [*dataset.files, args.templates, args.model, args.pretrained]
    check_apart(
        {"--output": args.output, "--predictions": predictions_path(args.output)}, [r for r in reads if r and Path(r).is_file()]
    )
    templates, weights, source = protocol_from_args(args, dataset.name)
    model = load_from_args(args)
    print(settings_line(model))
    classifier = PointCloudClassifier(
        model, dataset.classnames, projection=args.projection, views=args.views, method=args.method, templates=templates,
        view_weights=weights, config=model.config, mode=args.mode, up=args.up, max_points=args.max_points,
    )  # fmt: skip
    run_config = dict(
        variant=dataset.variant, model=args.model, pretrained=args.pretrained, preprocess=model.preprocess,
        precision=args.precision, **source,
    )  # fmt: skip
    result = evaluate(
        classifier, dataset, args.output, run_config, args.batch_size, args.limit, resume=not args.no_resume,
        workers=args.workers, allow_lost_inputs=args.allow_lost_inputs, progress=not args.quiet,
    )  # fmt: skip
    m = result["metrics"]
    acc = "n/a" if m["acc"] is None else f"{m['acc']:.2f}%"
    print(
        f"{dataset.name} {dataset.split} {args.method} {args.projection} ({len(classifier.view_names)} views): "
        f"acc {acc} on {m['n']} clouds, {m['skipped']} skipped -> {args.output}"
    )
    return 0


def cmd_render_depth(args: argparse.Namespace) -> int:
    points = load_cloud(args.cloud, n_points=args.points)
    if args.projection in AUTHOR_PROJECTIONS:
        if args.views is not None:
            raise FalipError(f"--views applies to ortho projections; {args.projection} has its own views")
        # Into the unit sphere, upright, as the PointNet HDF5 files the authors read already are.
        pts = normalize_points(validate_points(points, args.cloud), up=args.up)
        images = render_views(pts, args.projection, max_points=args.max_points, size=args.size)[:, 0]
        names, note = AUTHOR_INFO[args.projection].views, ""
        if args.projection == "pointclip":  # raw depths (≈ 0.6–2.6): shown divided by the largest
            note = f", depth shown / {images.max().item():.2f}"
            images = images / images.max()
        used = len(points) if args.max_points is None else min(len(points), args.max_points)
    else:
        depth = project(points, 6 if args.views is None else args.views, args.projection, size=args.size, up=args.up)
        images, names, used, note = depth_to_image(depth), [v.name for v in get_views(args.views or 6)], len(points), ""
    sheet = views_grid(images, names, labels=not args.no_labels)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output} ({len(names)} {args.projection} views of {used} points, {args.size}px each{note})")
    return 0


def register(sub) -> None:
    """Add ``falip pointcloud`` and ``falip render-depth`` to the CLI."""
    projections = ", ".join(PROJECTIONS)
    p = sub.add_parser("pointcloud", help="zero-shot point-cloud recognition from depth maps (ModelNet40, ScanObjectNN)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--variant", default=None, choices=list(SCANOBJECTNN_VARIANTS), help="ScanObjectNN variant (default obj_bg)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--data-root", required=True, help="folder holding modelnet40_ply_hdf5_2048/ or h5_files/ (or that folder itself)"
    )
    p.add_argument("--projection", default="pointclip", type=parse_projection, help=f"{projections} (default pointclip)")
    p.add_argument("--views", type=int, default=None, choices=[6, 10], help="ortho projections only: 6 or 10 views (default 6)")
    p.add_argument("--method", default="falip", choices=METHODS)
    p.add_argument(
        "--templates", default=None,
        help="template set or file (default: the projection's authors' prompts: 'point cloud depth map of a {}.', "
        "or for pointclip_v2 its searched per-class prompts)",
    )  # fmt: skip
    p.add_argument(
        "--v2-preset",
        default=None,
        help="pointclip_v2 prompts/weights preset, e.g. modelnet40_vit_b16 (default: dataset + model)",
    )
    p.add_argument(
        "--view-weights", type=parse_weights, default=None,
        help="one weight per view, e.g. 1,1,1,1,0.5,0.5 (default: all 1; pointclip_v2: the preset's)",
    )  # fmt: skip
    p.add_argument(
        "--max-points", type=int, default=1024, help="pointclip/pointclip_v2: first N points of each cloud (default 1024)"
    )
    p.add_argument(
        "--up", default="y", choices=["y", "z"], help="the clouds' up axis, ortho projections (default y, as in the HDF5 files)"
    )
    add_loader_args(p, "clouds (all their views)", DEFAULT_CLOUD_BATCH)
    p.add_argument("--limit", type=int, default=None, help="only the first N clouds")
    p.add_argument("--output", required=True, help="results JSON (predictions go next to it)")
    p.add_argument("--no-resume", action="store_true", help="overwrite earlier predictions instead of resuming")
    add_run_args(p)
    add_model_args(p)
    add_bias_args(p)
    p.set_defaults(func=cmd_pointcloud, distributed=True)

    r = sub.add_parser("render-depth", help="render a point cloud's views to a PNG (what CLIP sees)")
    r.add_argument("cloud", help="a .npy, .txt/.xyz, .ply or .off file")
    r.add_argument("--projection", default="pointclip_v2", type=parse_projection, help=f"{projections} (default pointclip_v2)")
    r.add_argument("--views", type=int, default=None, choices=[6, 10], help="ortho projections only (default 6)")
    r.add_argument("--max-points", type=int, default=1024, help="pointclip/pointclip_v2: first N points (default 1024)")
    r.add_argument("--size", type=int, default=224, help="pixels per view (default 224)")
    r.add_argument("--up", default="y", choices=["y", "z"])
    r.add_argument("--points", type=int, default=2048, help="points sampled on .off meshes (default 2048)")
    r.add_argument("--no-labels", action="store_true", help="do not caption the views")
    r.add_argument("--output", required=True, help="PNG file")
    r.set_defaults(func=cmd_render_depth)
