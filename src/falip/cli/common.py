"""What every command shares: model and foveal-bias options, their parsers, and building a model from them."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from typing import Optional

from ..bias import NUMERICS, ROWS, SHAPES, FovealConfig, Unleash
from ..datasets.generic import read_mask  # noqa: F401  (the CLI's mask files: falip score --mask)
from ..encode import MODES
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


MAX_IMAGE_SIDE = 1 << 20  # pixels: a stated image size beyond this is a typo, not an image


def parse_pair(text: str) -> tuple[int, int]:
    """``"640,480"`` → (640, 480): an image size W,H, each from 1 to :data:`MAX_IMAGE_SIDE` pixels."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers W,H like 640,480, got {text!r}") from None
    if not (1 <= a <= MAX_IMAGE_SIDE and 1 <= b <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"an image size W,H needs 1 to {MAX_IMAGE_SIDE} pixels per side, got {text!r}")
    return a, b


MODEL_DEFAULTS = "default: the model's own (its card's settings, e.g. falip-toy's; else the library default)"


def add_loader_args(group, what: str = "images", default_batch: int = 16) -> None:
    """``--batch-size`` and ``--workers`` (DataLoader-fed tasks); predictions do not depend on them."""
    group.add_argument(
        "--batch-size", type=int, default=default_batch, help=f"{what} encoded together in one batch (default {default_batch})"
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes reading and preprocessing the data (default: min(4, CPUs - 1); 0: in the main process)",
    )


def add_run_args(group) -> None:
    """``--allow-lost-inputs``, ``--quiet``: the options every evaluation run shares besides ``--output`` and the loader's."""
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument(
        "--allow-lost-inputs",
        action="store_true",
        help="write results even when more than half of the items were skipped or scored without their region",
    )


def check_loader_flags(args: argparse.Namespace) -> None:
    """FalipError naming --batch-size / --workers when out of range (before the model is loaded)."""
    from ..tasks.loader import check_loader_args

    check_loader_args(args.batch_size, 0 if args.workers is None else args.workers)


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "ViT-B-16") -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=default_model,
        help=f"open_clip name, OpenAI name (ViT-B/16) or checkpoint file (default: {default_model})",
    )
    g.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or weights file; omit for a checkpoint file"
    )
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--preprocess",
        default=None,
        choices=PREPROCESS_MODES,
        help=f"squash (FALIP reference), crop (CLIP) or pad ({MODEL_DEFAULTS}: squash)",
    )


# The FovealConfig fields the bias options set; an option left out keeps the model's own value.
BIAS_FIELDS = ("alpha", "sigma", "shape", "rows", "layers", "heads", "unleash", "numerics")


def add_bias_args(parser: argparse.ArgumentParser, modes: bool = True) -> None:
    """The bias options; ``modes=False`` for commands that run every block head by head (no ``--mode``)."""
    g = parser.add_argument_group(f"foveal bias (each option overrides one field of the model's own settings; {MODEL_DEFAULTS})")
    g.add_argument("--alpha", type=float, default=None, help="peak bias (library default 0.2)")
    g.add_argument("--sigma", type=float, default=None, help="Gaussian width in tokens (library default 100)")
    g.add_argument("--shape", default=None, choices=SHAPES, help="library default gaussian")
    g.add_argument("--rows", default=None, choices=ROWS, help="queries that get the bias (library default cls)")
    g.add_argument("--layers", type=parse_index_list, default=None, help="biased blocks, e.g. 8-11 (library default: last third)")
    g.add_argument(
        "--heads",
        type=parse_head_spec,
        default=None,
        help="biased heads, e.g. 0,3, or per-head scales 0:2,3:0.5 (library default: all)",
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
        default=None,
        choices=NUMERICS,
        help="bump arithmetic: float64 (library default), or the reference code's float32 steps as NumPy 1.x (its pinned "
        "environment) or NumPy >= 2 runs them",
    )
    if modes:
        g.add_argument("--mode", default="exact", choices=MODES, help="execution: exact (default), naive, approx")


def bias_overrides(args: argparse.Namespace) -> dict:
    """The FovealConfig fields given on the command line: ``{field: value}`` (options left out are absent)."""
    out = {name: getattr(args, name, None) for name in BIAS_FIELDS}
    if out["unleash"] is not None:
        out["unleash"] = tuple(out["unleash"])
    return {k: v for k, v in out.items() if v is not None}


def config_from_args(args: argparse.Namespace, base: Optional[FovealConfig] = None) -> FovealConfig:
    """``base`` (default ``FovealConfig()``) with the bias options given on the command line applied."""
    return replace(base if base is not None else FovealConfig(), **bias_overrides(args))


def load_from_args(args: argparse.Namespace):
    """The model of ``--model``/``--pretrained``, with its own preprocessing and settings unless overridden.

    ``--preprocess`` replaces the model's preprocessing; each bias option replaces one field of
    the model's own :class:`FovealConfig` (``model.config`` is the config that runs).
    """
    from ..model import load

    model = load(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, preprocess=args.preprocess)
    model.config = config_from_args(args, model.config)
    return model


def settings_line(model) -> str:
    """``settings: preprocess squash, bias {...}`` and, on a second line, what the bias acts on in this model and
    in which blocks — what a command runs with, printed before its output."""
    layers = ", ".join(str(i) for i in model.bias_layers()) or "none"
    return (
        f"settings: preprocess {model.preprocess}, bias {json.dumps(model.config.to_dict())}\n"
        f"bias acts on: {model.runtime.info()['bias_acts_on']}; biased blocks: {layers}"
    )
