"""What every command shares: model and foveal-bias options, their parsers, and building a model from them."""

from __future__ import annotations

import argparse
import re
from typing import Optional

import numpy as np

from ..bias import NUMERICS, ROWS, SHAPES, FovealConfig, Unleash
from ..encode import MODES
from ..errors import FalipError
from ..geometry import PREPROCESS_MODES


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
    g.add_argument(
        "--numerics",
        default="float64",
        choices=NUMERICS,
        help="bump arithmetic: float64 (default), or the reference code's float32 steps as NumPy 1.x (its pinned "
        "environment) or NumPy >= 2 runs them",
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
        numerics=args.numerics,
    )


def load_from_args(args: argparse.Namespace, config: Optional[FovealConfig] = None):
    from ..model import load

    return load(
        args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        preprocess=args.preprocess,
        config=config,
    )


def read_mask(path: str) -> np.ndarray:
    """A region mask file as boolean ``(H, W)`` (:func:`falip.datasets.generic.read_mask`); an empty one is an error."""
    from ..datasets.generic import read_mask as read_mask_file

    mask = read_mask_file(path)
    if not mask.any():
        raise FalipError(f"mask {path} is empty: no pixel inside (alpha or gray > 127, or 1 in a 0/1 mask)")
    return mask
