"""Command line: ``falip info``, ``falip score``, ``falip bias``, plus the commands of COMMAND_MODULES.

Thin: parse, call the library, print. Errors from bad input end with exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np

from .bias import ROWS, SHAPES, FovealConfig, Unleash
from .encode import MODES
from .errors import FalipError
from .geometry import PREPROCESS_MODES


def parse_index_list(text: str) -> tuple[int, ...]:
    """``"8-11"`` → (8, 9, 10, 11); ``"0,3,-1"`` → (0, 3, -1); ``"all"`` is handled by the caller."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        span = re.fullmatch(r"(\d+)-(\d+)", item)
        if span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty range {item!r}")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", item):
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"expected indices like '8-11' or '0,3,-1', got {text!r}")
    return tuple(out)


def parse_head_spec(text: str):
    """``"0,3"`` → (0, 3) (selected heads); ``"0:2,3:0.5"`` → {0: 2.0, 3: 0.5} (per-head bias scales)."""
    if ":" not in text:
        return parse_index_list(text)
    scales: dict[int, float] = {}
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", item)
        if not m:
            raise argparse.ArgumentTypeError(f"expected heads like '0,3' or per-head scales like '0:2,3:0.5', got {text!r}")
        scales[int(m.group(1))] = float(m.group(2))
    return scales


def parse_unleash(text: str) -> Unleash:
    """``"8-11:all"`` → all heads of blocks 8–11 at λ = 1; ``"10:3,5:2.0"`` → heads 3 and 5 of block 10 at λ = 2."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--unleash is LAYERS:HEADS[:λ] (e.g. 8-11:all or 10:3,5:1.0), got {text!r}")
    layers = parse_index_list(parts[0])
    heads = None if parts[1].strip().lower() == "all" else parse_index_list(parts[1])
    try:
        lam = float(parts[2]) if len(parts) == 3 else 1.0
        return Unleash(layers=layers, heads=heads, lam=lam)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --unleash {text!r}: {exc}") from None


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}")
    return values  # type: ignore[return-value]


def parse_pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 640,480, got {text!r}") from None
    return a, b


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", default="ViT-B-16", help="open_clip name, OpenAI name (ViT-B/16) or checkpoint file (default: ViT-B-16)"
    )
    g.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or weights file; omit for a checkpoint file"
    )
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--preprocess", default="crop", choices=PREPROCESS_MODES, help="crop (CLIP default), squash (FALIP reference) or pad"
    )


def add_bias_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("foveal bias")
    g.add_argument("--alpha", type=float, default=0.2, help="peak bias (default 0.2)")
    g.add_argument("--sigma", type=float, default=100.0, help="Gaussian width in tokens (default 100)")
    g.add_argument("--shape", default="gaussian", choices=SHAPES)
    g.add_argument("--rows", default="cls", choices=ROWS, help="queries that get the bias (default: cls)")
    g.add_argument("--layers", type=parse_index_list, default=None, help="biased blocks, e.g. 8-11 (default: last third)")
    g.add_argument(
        "--heads", type=parse_head_spec, default=None, help="biased heads, e.g. 0,3, or per-head scales 0:2,3:0.5 (default: all)"
    )
    g.add_argument(
        "--unleash",
        type=parse_unleash,
        action="append",
        default=None,
        metavar="LAYERS:HEADS[:λ]",
        help="amplify the bias's effect on heads of biased blocks, e.g. 8-11:all (λ=1 doubles it) or 10:3,5:2 (repeat)",
    )
    g.add_argument("--mode", default="exact", choices=MODES, help="execution: exact (default), naive, approx")


def config_from_args(args: argparse.Namespace) -> FovealConfig:
    unleash = getattr(args, "unleash", None)
    return FovealConfig(
        alpha=args.alpha,
        sigma=args.sigma,
        shape=args.shape,
        rows=args.rows,
        layers=args.layers,
        heads=args.heads,
        unleash=tuple(unleash) if unleash else None,
    )


def load_from_args(args: argparse.Namespace, config: Optional[FovealConfig] = None):
    from .model import load

    return load(
        args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        preprocess=args.preprocess,
        config=config,
    )


def read_mask(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L")) > 127
    except (FileNotFoundError, OSError) as exc:
        raise FalipError(f"cannot read mask {path}: {exc}") from exc


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
    config = config_from_args(args)
    model = load_from_args(args, config)
    regions = dict(boxes=args.box) if args.box else dict(masks=[read_mask(p) for p in args.mask])
    scores = model.score_regions(args.image, texts=args.text, mode=args.mode, **regions)
    names = [",".join(f"{v:g}" for v in b) for b in args.box] if args.box else list(args.mask)
    result = {
        "image": str(args.image),
        "regions": names,
        "texts": args.text,
        "scores": scores.tolist(),
        "best": {t: names[int(scores[:, j].argmax())] for j, t in enumerate(args.text)},
        "model": model.info(),
        "mode": args.mode,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(len(n) for n in names)
    for j, text in enumerate(args.text):
        print(f"{text!r}")
        best = int(scores[:, j].argmax())
        for k, name in enumerate(names):
            print(f"  {name:<{width}}  {scores[k, j].item():8.3f}{'  <- best' if k == best else ''}")
    return 0


def cmd_bias(args: argparse.Namespace) -> int:
    from .bias import region_bias

    config = config_from_args(args)
    S = args.grid * args.patch
    vec = region_bias(
        args.box, tuple(args.image_size), (args.grid, args.grid), config, preprocess=args.preprocess, patch_size=args.patch
    )
    grid = vec[1:].view(args.grid, args.grid).numpy()
    print(f"bias over the {args.grid}x{args.grid} patch grid ({S}px input, {args.preprocess}); [CLS] column = {vec[0].item():g}")
    for row in grid:
        print(" ".join(f"{v:6.3f}" if v else "     ." for v in row))
    return 0


# Modules that add their own subcommands through ``register(subparsers)``.
COMMAND_MODULES = (
    "falip.results",
    "falip.synthetic",
    "falip.demo",
    "falip.tasks.rec",
    "falip.tasks.pointcloud",
    "falip.tasks.classify",
    "falip.tasks.heads",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falip", description="FALIP: foveal attention for CLIP ViTs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model and print its geometry and default FALIP settings")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("score", help="score regions of an image against texts")
    p.add_argument("image", help="image file")
    p.add_argument("--box", action="append", type=parse_box, default=[], help="x0,y0,x1,y1 in pixels (repeat)")
    p.add_argument("--mask", action="append", default=[], help="binary mask PNG of the image's size (repeat)")
    p.add_argument("--text", action="append", required=True, help="a text to score (repeat)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    add_bias_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bias", help="print the bias a box gets on the patch grid (no model needed)")
    p.add_argument("--image-size", type=parse_pair, required=True, help="W,H of the original image")
    p.add_argument("--box", type=parse_box, required=True, help="x0,y0,x1,y1 in pixels")
    p.add_argument("--grid", type=int, default=14, help="patches per side (default 14)")
    p.add_argument("--patch", type=int, default=16, help="patch size in pixels (default 16)")
    p.add_argument("--preprocess", default="squash", choices=PREPROCESS_MODES)
    add_bias_args(p)
    p.set_defaults(func=cmd_bias)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FalipError, ValueError) as exc:
        print(f"falip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
