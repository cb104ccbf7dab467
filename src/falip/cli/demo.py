"""``falip demo``: an offline HTML page showing FALIP and the baselines on one image."""

from __future__ import annotations

import argparse
import warnings

from ..demo import DEFAULT_METHODS, demo_scene, write_demo
from ..geometry import PREPROCESS_MODES
from ..model import load
from .common import add_bias_args, config_from_args, parse_box, settings_line


def cmd_demo(args: argparse.Namespace) -> int:
    user_input = args.image is not None
    if user_input and (not args.box or not args.text):
        raise ValueError("with --image give the regions (--box, repeatable) and the expressions (--text, repeatable)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.model == "falip-toy" else "default")
        model = load(args.model, pretrained=args.pretrained, device=args.device, preprocess=args.preprocess)
    model.config = config_from_args(args, model.config)  # the model's own settings, with the options given
    print(settings_line(model))
    if user_input:
        image, boxes, texts, targets = args.image, args.box, args.text, None
    else:
        image, boxes, texts, targets = demo_scene(args.seed)
    paths = write_demo(model, args.output, image, boxes, texts, args.methods.split(","), targets)
    others = " and ".join(str(paths[key]) for key in ("summary", "attention") if key in paths)
    print(f"wrote {paths['html']} (open it in a browser), {others}")
    return 0


def register(sub) -> None:
    """Add ``falip demo``."""
    p = sub.add_parser("demo", help="write an HTML page showing FALIP and the baselines on one image (offline by default)")
    p.add_argument("--output", default="falip-demo", help="folder for index.html and demo.png (default: falip-demo)")
    p.add_argument("--model", default="falip-toy", help="default: the small CLIP shipped with falip (no network)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preprocess", default=None, choices=PREPROCESS_MODES, help="default: the model's own (falip-toy: squash)")
    p.add_argument("--image", default=None, help="your image (default: a generated scene)")
    p.add_argument("--box", action="append", type=parse_box, default=[], help="x0,y0,x1,y1 (repeat)")
    p.add_argument("--text", action="append", default=[], help="an expression (repeat)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated scene")
    add_bias_args(p)
    p.set_defaults(func=cmd_demo)
