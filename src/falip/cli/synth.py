"""``falip synth``: write the synthetic shapes data set."""

from __future__ import annotations

import argparse

from ..synthetic import write_all


def _objects_range(spec: str) -> tuple[int, int]:
    """``(lo, hi)`` objects per image from ``--objects`` (``3`` or ``2-4``)."""
    parts = spec.split("-")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--objects must be a count or a range such as 2-4, got {spec!r}")
    return int(parts[0]), int(parts[-1])  # checked by synthetic.generate, with the other sizes


def cmd_synth(args: argparse.Namespace) -> int:
    lo, hi = _objects_range(args.objects)
    paths = write_all(args.output, args.seed, args.images, (lo, hi), args.size)
    for key, path in paths.items():
        print(f"{key:>11}: {path}")
    return 0


def register(sub) -> None:
    """Add ``falip synth``."""
    p = sub.add_parser("synth", help="generate a synthetic shapes data set in the REC and classification formats")
    p.add_argument(
        "--output", required=True, help="folder to write images/, refer/synthetic/, reclip_val.jsonl, regions.jsonl, ..."
    )
    p.add_argument("--images", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--objects", default="3", help="objects per image, e.g. 3 or 2-4 (default 3)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
