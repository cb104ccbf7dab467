"""``falip classify``: region-aware zero-shot classification of a dataset."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..datasets.classification import DATASETS, REGIONS, load_dataset
from ..datasets.generic import RegionDataset, load_generic, read_classes
from ..errors import FalipError
from ..methods import METHOD_HELP, parse_method
from ..results import check_apart, check_output_path, predictions_path
from ..tasks.classify import evaluate, rename_classes
from ..zeroshot import load_templates
from .common import (
    add_bias_args,
    add_loader_args,
    add_model_args,
    add_run_args,
    check_loader_flags,
    load_from_args,
    settings_line,
)


def dataset_from_args(args: argparse.Namespace) -> RegionDataset:
    """The dataset a ``falip classify`` command line names (``--dataset`` or ``--annotations``)."""
    if (args.dataset is None) == (args.annotations is None):
        raise FalipError("give either --dataset NAME --data-root DIR, or --annotations FILE.jsonl --classes FILE")
    if args.annotations is not None:
        if args.classes is None:
            raise FalipError("--annotations needs --classes FILE (one class name per line)")
        if args.classnames is not None:
            raise FalipError("--classnames renames a dataset's classes; with --annotations put the names in --classes")
        return load_generic(args.annotations, args.classes, args.image_root)
    if args.data_root is None:
        raise FalipError(f"--dataset {args.dataset} needs --data-root DIR")
    dataset = load_dataset(args.dataset, args.data_root, split=args.split, region=args.region, cub_root=args.cub_root)
    if args.classnames is not None:
        dataset = rename_classes(dataset, read_classes(args.classnames))
    return dataset


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def cmd_classify(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    reads = [args.annotations, args.classes, args.classnames, args.templates, args.model, args.pretrained]
    check_apart(
        {"--output": args.output, "--predictions": predictions_path(args.output)}, [r for r in reads if r and Path(r).is_file()]
    )
    check_loader_flags(args)
    method = parse_method(args.method)
    dataset = dataset_from_args(args)
    if args.limit is not None:
        dataset = replace(dataset, samples=dataset.samples[: args.limit])
    templates = load_templates(args.templates)
    model = load_from_args(args)
    print(settings_line(model))
    run_config = dict(
        model=args.model,
        pretrained=args.pretrained,
        precision=args.precision,
        templates=args.templates,
        region=args.region,
        source=str(args.annotations or args.data_root),
    )
    result = evaluate(
        model,
        dataset,
        args.output,
        method=method,
        templates=templates,
        config=model.config,
        mode=args.mode,
        run_config=run_config,
        resume=not args.no_resume,
        workers=args.workers,
        batch_size=args.batch_size,
        allow_lost_inputs=args.allow_lost_inputs,
        progress=not args.quiet,
    )
    m, speed = result["metrics"], result["speed"]
    print(
        f"{dataset.name} {dataset.split} {method.name}: top1 {_fmt(m['top1'])}  top5 {_fmt(m['top5'])}  "
        f"n {m['n']}  skipped {m['skipped']}"
    )
    if "worst_group" in m:
        groups = "  ".join(f"{k} {_fmt(v['top1'])} (n {v['n']})" for k, v in result["groups"].items())
        print(f"  groups: {groups}  worst {_fmt(m['worst_group'])}")
    if speed["images_per_s"] is not None:
        print(f"  {speed['images_per_s']:.2f} images/s, {speed['regions_per_s']:.2f} regions/s ({args.device})")
    print(f"wrote {args.output} and {Path(args.output).parent / result['predictions']}")
    return 0


def register(sub) -> None:
    """Add ``falip classify`` to the CLI."""
    p = sub.add_parser("classify", help="region-aware zero-shot classification (CUB, Dogs, ImageNet-S, Waterbirds, JSONL)")
    g = p.add_argument_group("data (a dataset in its native layout, or a generic JSONL file)")
    g.add_argument("--dataset", choices=DATASETS, default=None, help="a dataset in its native layout (see docs/classify.md)")
    g.add_argument("--data-root", default=None, help="the dataset's folder")
    g.add_argument("--cub-root", default=None, help="CUB_200_2011 folder (Waterbirds takes its bird boxes/masks from it)")
    g.add_argument("--split", default=None, help="cub/dogs: test (default), train, all; waterbirds: test, val, train")
    g.add_argument("--region", choices=REGIONS, default=None, help="box or mask (default: box; mask for imagenet-s)")
    g.add_argument("--classnames", default=None, help="file with one readable name per dataset class, in class order")
    g.add_argument("--annotations", default=None, help="generic JSONL: {image, label, box | mask} per line")
    g.add_argument("--image-root", default=None, help="folder the JSONL's paths are relative to (default: its folder)")
    g.add_argument("--classes", default=None, help="with --annotations: class names, one per line")
    r = p.add_argument_group("run")
    r.add_argument("--method", default="falip", help=f"{METHOD_HELP} (default: falip)")
    r.add_argument("--templates", default="openai", help="openai (80 templates, default), simple, or a file")
    r.add_argument("--output", required=True, help="results JSON; predictions go to <stem>.predictions.jsonl")
    r.add_argument("--no-resume", action="store_true", help="recompute everything instead of resuming")
    r.add_argument("--limit", type=int, default=None, help="only the first N samples")
    add_loader_args(r, "images (and edited images per forward pass)")
    add_run_args(r)
    add_model_args(p)
    add_bias_args(p)
    p.set_defaults(func=cmd_classify, distributed=True)
