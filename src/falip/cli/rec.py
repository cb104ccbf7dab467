"""``falip rec``: referring expression comprehension on RefCOCO/+/g or ReCLIP JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..datasets.refer import DATASETS, RecDataset, load_reclip, load_refer
from ..errors import FalipError
from ..methods import METHOD_HELP
from ..prompts import STYLES
from ..results import check_apart, check_output_path, predictions_path
from ..tasks.rec import AGGREGATES, N_CAPTIONS, NO_PROPOSALS, PROMPT, RegionScorer, draw_captions, evaluate, parse_methods
from .common import (
    add_bias_args,
    add_loader_args,
    add_model_args,
    add_run_args,
    check_loader_flags,
    load_from_args,
    settings_line,
)


def _load_data(args: argparse.Namespace) -> RecDataset:
    if args.format == "reclip":
        if not args.annotations:
            raise FalipError("--format reclip needs --annotations FILE.jsonl")
        return load_reclip(args.annotations, split=args.split or "", name=args.dataset or "", detections=args.detections)
    if not args.data_root or not args.split:
        raise FalipError("the refer layout needs --data-root DIR and --split (e.g. val, testA, testB, test)")
    return load_refer(args.data_root, args.dataset or "refcoco", args.split, split_by=args.split_by, detections=args.detections)


def _load_models(args: argparse.Namespace) -> list:
    """Every ``--model``, each with its own preprocessing and settings and the command line's overrides."""
    names = args.model or ["ViT-B-16"]
    tags = args.pretrained or [None]
    if len(tags) == 1:
        tags = tags * len(names)
    if len(tags) != len(names):
        raise FalipError(f"give one --pretrained for all models or one per --model: got {len(names)} models and {len(tags)} tags")
    tags = [None if t in (None, "none", "") else t for t in tags]
    return [load_from_args(argparse.Namespace(**{**vars(args), "model": n, "pretrained": t})) for n, t in zip(names, tags)]


def cmd_rec(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    check_loader_flags(args)
    methods = parse_methods(args.method)
    data = _load_data(args)
    reads = [args.annotations, args.detections, *data.source.values(), *(args.model or []), *(args.pretrained or [])]
    predictions = args.predictions or predictions_path(args.output)
    check_apart({"--output": args.output, "--predictions": predictions}, [r for r in reads if r and Path(r).is_file()])
    captions = draw_captions(data.split_expressions(), args.captions, args.seed) if args.subtract else None
    models = _load_models(args)
    for model in models:
        print(f"{model.name}: {settings_line(model)}")
    scorer = RegionScorer(
        models,
        methods,
        mode=args.mode,
        aggregate=args.aggregate,
        template=args.template,
        captions=captions,
        n_captions=args.captions,
        edit_style=args.edit_style,
    )
    run_config = dict(data=data.source, precision=args.precision, seed=args.seed if args.subtract else None)
    result = evaluate(
        scorer,
        data,
        args.image_root,
        args.output,
        predictions=args.predictions,
        run_config=run_config,
        limit=args.limit,
        resume=not args.no_resume,
        progress=not args.quiet,
        no_proposals=args.no_proposals,
        batch_size=args.batch_size,
        workers=args.workers,
        allow_lost_inputs=args.allow_lost_inputs,
        pretrained=[m.pretrained for m in models] if any(m.pretrained for m in models) else None,
        device=args.device,
    )
    m = result["metrics"]
    acc = "n/a" if m["acc"] is None else f"{m['acc']:.2f}"
    speed = "" if m["expr_per_s"] is None else f", {m['expr_per_s']:.2f} expressions/s"
    print(
        f"{data.name} {data.split} [{result['method']}, {result['proposals']} proposals]: acc {acc} % on {m['n']} expressions, {m['skipped']} skipped{speed}"
    )
    if m["skipped"]:
        print(f"  skipped: {result['skipped']['by_reason']}")
    print(f"wrote {args.output} and {Path(args.output).parent / result['predictions']}")
    return 0


def register(sub) -> None:
    """Add ``falip rec`` to the CLI."""
    p = sub.add_parser("rec", help="referring expression comprehension on RefCOCO/+/g", conflict_handler="resolve")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=None,
        help=f"{', '.join(DATASETS)} (default refcoco) or another folder of --data-root; a label with --format reclip",
    )
    g.add_argument("--split", default=None, help="val, testA, testB (refcoco/+), val, test (refcocog umd)")
    g.add_argument("--format", default="refer", choices=["refer", "reclip"], help="refer layout (default) or ReCLIP JSONL")
    g.add_argument("--data-root", default=None, help="folder holding refcoco/, refcoco+/, refcocog/ (refer layout)")
    g.add_argument(
        "--split-by", default=None, help="refs file to read: unc, umd or google (default: unc for refcoco/+, umd for refcocog)"
    )
    g.add_argument("--annotations", default=None, help="ReCLIP JSONL file (with --format reclip)")
    g.add_argument("--image-root", required=True, help="folder of COCO train2014 images")
    g.add_argument("--detections", default=None, help="detector boxes {image_id: [[x, y, w, h], ...]}; default: gold boxes")
    g.add_argument(
        "--no-proposals",
        default="whole-image",
        choices=NO_PROPOSALS,
        help="an image without proposals: the whole image as its only proposal (default, as the reference code) or skip",
    )
    add_model_args(p)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name or checkpoint file; repeat for a model ensemble (logits summed)",
    )
    p.add_argument(
        "--pretrained",
        action="append",
        default=None,
        help="pretrained tag or weights file: once for all models, or once per --model ('none' for a checkpoint file)",
    )
    p.set_defaults(preprocess="squash")
    add_bias_args(p)
    g = p.add_argument_group("scoring")
    g.add_argument("--method", default="falip", help=f"{METHOD_HELP}; several separated by commas form an ensemble")
    g.add_argument("--aggregate", default="sum", choices=AGGREGATES, help="how a method ensemble combines logits (default sum)")
    g.add_argument(
        "--edit-style",
        default="reference",
        choices=STYLES,
        help="draw the edits as ReCLIP / the FALIP reference code (default) or clean (exact box, see docs/rec.md)",
    )
    g.add_argument(
        "--subtract",
        action="store_true",
        help="score subtraction P: minus the mean score of --captions other expressions of the split",
    )
    g.add_argument("--captions", type=int, default=N_CAPTIONS, help="captions for --subtract (default 500)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing the --subtract captions")
    g.add_argument("--template", default=PROMPT, help="text prompt; {} is the expression (default 'a photo of {}')")
    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, help="results JSON")
    g.add_argument(
        "--predictions", default=None, help="per-sample JSONL (default: <output>.predictions.jsonl); re-running with it resumes"
    )
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N expressions only")
    g.add_argument("--no-resume", action="store_true", help="overwrite existing predictions instead of continuing them")
    add_loader_args(g, "images (each with all its proposals, for all its sentences)")
    add_run_args(g)
    p.set_defaults(func=cmd_rec, distributed=True)
