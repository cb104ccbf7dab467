"""``falip info``, ``falip score`` and ``falip bias``."""

from __future__ import annotations

import argparse
import json

import torch

from ..errors import FalipError
from ..geometry import PREPROCESS_MODES, validate_boxes, validate_masks
from ..images import load_image
from ..inputs import check_count
from ..methods import METHOD_HELP, parse_method, score_with_method
from ..ranking import score_table
from .common import (
    add_bias_args,
    add_model_args,
    config_from_args,
    load_from_args,
    parse_box,
    parse_pair,
    read_mask,
    settings_line,
)


def cmd_info(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if not args.box and not args.mask:
        raise FalipError("give at least one region with --box x0,y0,x1,y1 or --mask FILE.png")
    if args.box and args.mask:
        raise FalipError("give either --box or --mask regions, not both")
    image = load_image(args.image)  # the image and its regions are checked before the model is loaded
    if args.box:
        boxes, masks, names = validate_boxes(args.box, image.size), None, [",".join(f"{v:g}" for v in b) for b in args.box]
    else:
        boxes, masks, names = None, validate_masks([read_mask(p) for p in args.mask], image.size), list(args.mask)
    method = parse_method(args.method)
    model = load_from_args(args)
    scores = score_with_method(model, image, boxes, args.text, method=method, masks=masks, config=model.config, mode=args.mode)
    if not bool(torch.isfinite(scores).all()):
        raise FalipError(
            f"model {model.name or args.model} gave NaN or infinite scores (its logit scale or bias overflows "
            f"{str(model.runtime.dtype).replace('torch.', '')}): no region can be called best; check the weights"
        )
    table = score_table(scores, args.text, model.runtime.score_kind)
    if args.json:
        result = dict(image=str(args.image), regions=names, **table, method=method.name, mode=args.mode, model=model.info())
        print(json.dumps(result, indent=2, allow_nan=False))
        return 0
    print(settings_line(model))
    print(f"scores: {table['score']['name']}")
    width = max(len(n) for n in names)
    for j, text in enumerate(args.text):
        print(f"{text!r}")
        for k, name in enumerate(names):
            print(f"  {name:<{width}}  {scores[k, j].item():8.3f}{_best_mark(k, table['best'][j], table['tied'][j])}")
    return 0


def _best_mark(k: int, best: int, tied: list[int]) -> str:
    """``  <- best`` beside the winning region, or ``  <- best (tie: 1, 2, 3)`` (1-based region numbers) on a tie."""
    if k != best:
        return ""
    return "  <- best" if len(tied) == 1 else f"  <- best (tie: {', '.join(str(t + 1) for t in tied)})"


DEFAULT_GRID, DEFAULT_PATCH = 14, 16  # falip bias without --model: ViT-B/16 at 224 px


def cmd_bias(args: argparse.Namespace) -> int:
    """With ``--model``: that model's grid, patch size, preprocessing and settings (options override them);
    without: a 14×14 grid of 16 px patches, squash and ``FovealConfig()`` (the library defaults)."""
    from ..bias import region_bias
    from ..model import DEFAULT_PREPROCESS

    if args.model is not None:
        if args.grid is not None or args.patch is not None:
            raise FalipError("--grid and --patch come from --model; give either --model or --grid/--patch")
        model = load_from_args(args)
        grid, patch, preprocess, config = model.grid[0], model.patch_size, model.preprocess, model.config
    else:
        grid = check_count(DEFAULT_GRID if args.grid is None else args.grid, "--grid (patches per side)", 1, 1024)
        patch = check_count(DEFAULT_PATCH if args.patch is None else args.patch, "--patch (pixels)", 1, 1024)
        preprocess, config = args.preprocess or DEFAULT_PREPROCESS, config_from_args(args)
    vec = region_bias(args.box, tuple(args.image_size), (grid, grid), config, preprocess=preprocess, patch_size=patch)
    print(f"settings: preprocess {preprocess}, bias {json.dumps(config.to_dict())}")
    print(f"bias over the {grid}x{grid} patch grid ({grid * patch}px input, {preprocess}); [CLS] column = {vec[0].item():g}")
    grid_values = vec[1:].view(grid, grid).numpy()
    for row in grid_values:
        print(" ".join(f"{v:6.3f}" if v else "     ." for v in row))
    return 0


def register(sub) -> None:
    """Add ``falip info``, ``falip score`` and ``falip bias``."""
    p = sub.add_parser("info", help="load a model and print its geometry and default FALIP settings")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("score", help="score regions of an image against texts")
    p.add_argument("image", help="image file")
    p.add_argument("--box", action="append", type=parse_box, default=[], help="x0,y0,x1,y1 in pixels (repeat)")
    p.add_argument("--mask", action="append", default=[], help="binary mask PNG of the image's size (repeat)")
    p.add_argument("--text", action="append", required=True, help="a text to score (repeat)")
    p.add_argument("--method", default="falip", help=f"how regions are encoded: {METHOD_HELP} (default: falip)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    add_bias_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bias", help="print the bias a box gets on the patch grid (no model needed)")
    p.add_argument("--image-size", type=parse_pair, required=True, help="W,H of the original image")
    p.add_argument("--box", type=parse_box, required=True, help="x0,y0,x1,y1 in pixels")
    p.add_argument("--model", default=None, help="take grid, patch size, preprocessing and bias settings from this model")
    p.add_argument("--pretrained", default=None, help="with --model: its pretrained tag or weights file")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--grid", type=int, default=None, help=f"patches per side, without --model (default {DEFAULT_GRID})")
    p.add_argument("--patch", type=int, default=None, help=f"patch size in pixels, without --model (default {DEFAULT_PATCH})")
    p.add_argument(
        "--preprocess", default=None, choices=PREPROCESS_MODES, help="default: the model's own; squash without --model"
    )
    add_bias_args(p)
    p.set_defaults(func=cmd_bias)
