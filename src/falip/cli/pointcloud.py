"""``falip pointcloud`` (zero-shot point-cloud recognition) and ``falip render-depth``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..datasets.pointclouds import DATASETS, SCANOBJECTNN_VARIANTS, load_cloud, load_dataset
from ..pointcloud import PROJECTIONS, depth_to_image, get_views, project, views_grid
from ..tasks.pointcloud import DEFAULT_TEMPLATES, METHODS, PointCloudClassifier, evaluate, resolve_templates
from .common import add_bias_args, add_model_args, config_from_args, load_from_args


def parse_weights(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"view weights are numbers separated by commas, got {text!r}") from None


def cmd_pointcloud(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    dataset = load_dataset(args.dataset, args.data_root, args.variant, args.split)
    model = load_from_args(args, config)
    templates = resolve_templates(args.templates)
    classifier = PointCloudClassifier(
        model, dataset.classnames, views=args.views, projection=args.projection, method=args.method, templates=templates,
        view_weights=args.view_weights, config=config, mode=args.mode, up=args.up,
    )  # fmt: skip
    run_config = dict(
        dataset=dataset.name, variant=dataset.variant, split=dataset.split, method=args.method, views=args.views,
        projection=args.projection, templates=args.templates or DEFAULT_TEMPLATES, view_weights=classifier.view_weights.tolist(),
        up=args.up, mask_dilation=classifier.mask_dilation, model=args.model, pretrained=args.pretrained,
        preprocess=args.preprocess, precision=args.precision,
    )  # fmt: skip
    if args.method == "falip":
        run_config.update(bias=config.to_dict(), mode=args.mode)
    result = evaluate(classifier, dataset, args.output, run_config, args.batch_size, args.limit, resume=not args.no_resume)
    m = result["metrics"]
    print(
        f"{dataset.name} {dataset.split} {args.method} {args.views} views ({args.projection}): "
        f"acc {m['acc']:.2f}% on {m['n']} clouds, {m['skipped']} skipped -> {args.output}"
    )
    return 0


def cmd_render_depth(args: argparse.Namespace) -> int:
    points = load_cloud(args.cloud, n_points=args.points)
    depth = project(points, args.views, args.projection, size=args.size, up=args.up)
    views = get_views(args.views)
    sheet = views_grid(depth_to_image(depth), [v.name for v in views], labels=not args.no_labels)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output} ({len(views)} {args.projection} views of {len(points)} points, {args.size}px each)")
    return 0


def register(sub) -> None:
    """Add ``falip pointcloud`` and ``falip render-depth`` to the CLI."""
    p = sub.add_parser("pointcloud", help="zero-shot point-cloud recognition from depth maps (ModelNet40, ScanObjectNN)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--variant", default=None, choices=list(SCANOBJECTNN_VARIANTS), help="ScanObjectNN variant (default obj_bg)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--data-root", required=True, help="folder holding modelnet40_ply_hdf5_2048/ or h5_files/ (or that folder itself)"
    )
    p.add_argument("--views", type=int, default=6, choices=[6, 10])
    p.add_argument("--projection", default="sparse", choices=PROJECTIONS)
    p.add_argument("--method", default="falip", choices=METHODS)
    p.add_argument("--templates", default=None, help="template set or file (default: 'point cloud depth map of a {}.')")
    p.add_argument(
        "--view-weights", type=parse_weights, default=None, help="one weight per view, e.g. 1,1,1,1,0.5,0.5 (default uniform)"
    )
    p.add_argument("--up", default="y", choices=["y", "z"], help="the clouds' up axis (default y, as in the HDF5 files)")
    p.add_argument("--batch-size", type=int, default=32, help="clouds projected per call (default 32)")
    p.add_argument("--limit", type=int, default=None, help="only the first N clouds")
    p.add_argument("--output", required=True, help="results JSON (predictions go next to it)")
    p.add_argument("--no-resume", action="store_true", help="overwrite earlier predictions instead of resuming")
    add_model_args(p)
    add_bias_args(p)
    p.set_defaults(func=cmd_pointcloud)

    r = sub.add_parser("render-depth", help="render a point cloud's depth views to a PNG (what CLIP sees)")
    r.add_argument("cloud", help="a .npy, .txt/.xyz, .ply or .off file")
    r.add_argument("--views", type=int, default=6, choices=[6, 10])
    r.add_argument("--projection", default="sparse", choices=PROJECTIONS)
    r.add_argument("--size", type=int, default=224, help="pixels per view (default 224)")
    r.add_argument("--up", default="y", choices=["y", "z"])
    r.add_argument("--points", type=int, default=2048, help="points sampled on .off meshes (default 2048)")
    r.add_argument("--no-labels", action="store_true", help="do not caption the views")
    r.add_argument("--output", required=True, help="PNG file")
    r.set_defaults(func=cmd_render_depth)
