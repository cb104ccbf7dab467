"""``falip attention`` (attention maps with and without FALIP) and ``falip heads`` (head response)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from ..errors import FalipError
from ..heads import STATISTICS
from ..inputs import check_count
from ..methods import PROMPT_HELP, parse_method
from ..results import check_apart, writing
from ..viz import attention_figure_size, attention_maps, draw_attention
from .common import add_bias_args, add_model_args, add_run_args, load_from_args, parse_box, parse_index_list, settings_line

MAX_TILE = 1024  # pixels per map of falip attention


def cmd_attention(args: argparse.Namespace) -> int:
    if not args.box:
        raise FalipError("give at least one region with --box x0,y0,x1,y1")
    check_count(args.tile, "--tile (pixels per map)", 16, MAX_TILE)
    model = load_from_args(args)
    print(settings_line(model))
    maps = attention_maps(model, args.image, args.box, layers=args.show_layers, config=model.config)
    W, H = attention_figure_size(len(args.box), len(maps.layers), args.tile)
    if W * H > Image.MAX_IMAGE_PIXELS:
        raise FalipError(
            f"the figure would be {W}x{H} = {W * H} pixels (over {Image.MAX_IMAGE_PIXELS}): use a smaller --tile, "
            "fewer --box or fewer --show-layers"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with writing(output):
        draw_attention(maps, tile=args.tile).save(output)
    blocks = ",".join(str(i) for i in maps.layers)
    print(f"share of [CLS]->patch attention inside each box (mean over blocks {blocks}):")
    for k, (box, (plain, falip)) in enumerate(zip(args.box, maps.box_mass), start=1):
        print(f"  box {k} {','.join(f'{v:g}' for v in box)}: no bias {plain:.3f} -> FALIP {falip:.3f}")
    print(f"wrote {output}")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from ..datasets.generic import read_regions_jsonl
    from ..tasks.heads import evaluate

    method = parse_method(args.prompt)
    if args.top < 1:
        raise FalipError(f"--top must be at least 1, got {args.top}")
    out = Path(args.output)
    reads = [r for r in (args.annotations, args.model, args.pretrained) if r and Path(r).is_file()]
    for name in ("heads.json", "heads.predictions.jsonl", "heads.png"):
        check_apart({"--output": out / name}, reads)
    samples = read_regions_jsonl(args.annotations, args.image_root)
    if args.limit is not None:
        if args.limit < 1:
            raise FalipError(f"--limit must be at least 1, got {args.limit}")
        samples = samples[: args.limit]
    model = load_from_args(args)
    if method.foveal:
        model.plan()  # fail before any output is written: e.g. --unleash on a block without the bias
    print(settings_line(model))
    run_config = dict(
        model=args.model,
        pretrained=args.pretrained,
        annotations=str(args.annotations),
        image_root=str(args.image_root),
        limit=args.limit,
    )
    result = evaluate(
        model,
        samples,
        method.name,
        out,
        statistic=args.statistic,
        config=model.config,
        run_config=run_config,
        files={"annotations": args.annotations},
        image_root=args.image_root,
        top=args.top,
        resume=not args.no_resume,
        allow_lost_inputs=args.allow_lost_inputs,
        progress=not args.quiet,
    )
    n, skipped = result["metrics"]["n"], result["skipped"]["count"]
    print(f"{n} regions ({skipped} skipped); top {args.top} heads by {args.statistic} response to {method.name}:")
    for entry in result["ranking"][: args.top]:
        print(f"  block {entry['layer']:>2}  head {entry['head']:>2}  {entry['response']:.4g}")
    print(f"wrote {out / 'heads.json'} and {out / result['heatmap']}")
    return 0


def register(sub) -> None:
    """Add ``falip attention`` and ``falip heads`` to the CLI."""
    p = sub.add_parser("attention", help="draw [CLS] attention maps without and with FALIP for each box")
    p.add_argument("image", help="image file")
    p.add_argument("--box", action="append", type=parse_box, default=[], help="x0,y0,x1,y1 in pixels (repeat)")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument(
        "--show-layers",
        type=parse_index_list,
        default=None,
        help="blocks whose maps are drawn, e.g. 6-11 (default: the biased blocks, see --layers)",
    )
    p.add_argument("--tile", type=int, default=160, help=f"size of one map in pixels, 16 to {MAX_TILE} (default 160)")
    add_model_args(p)
    add_bias_args(p, modes=False)  # head by head, every block (numerically mode naive)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("heads", help="which attention heads respond to a visual prompt: response matrix, ranking, heatmap")
    p.add_argument(
        "--annotations", required=True, help='regions JSONL: {"image": ..., "box": [x0,y0,x1,y1]} or {"mask": ...} per line'
    )
    p.add_argument("--image-root", required=True, help="folder that image (and mask) paths are relative to")
    p.add_argument("--prompt", required=True, help=f"the visual prompt: {PROMPT_HELP}")
    p.add_argument("--output", required=True, help="folder for heads.json, heads.predictions.jsonl and heads.png")
    p.add_argument("--statistic", default="l2", choices=STATISTICS, help="per-head change measure (default l2)")
    p.add_argument("--top", type=int, default=10, help="heads printed and outlined in the heatmap (default 10)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N regions")
    p.add_argument("--no-resume", action="store_true", help="recompute regions already in OUTPUT/heads.predictions.jsonl")
    add_run_args(p)
    add_model_args(p)
    add_bias_args(p, modes=False)
    p.set_defaults(func=cmd_heads)
