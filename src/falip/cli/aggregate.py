"""``falip aggregate``: tabulate results JSON files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..results import aggregate, check_output_path


def cmd_aggregate(args: argparse.Namespace) -> int:
    if args.output:
        check_output_path(args.output, "--output")
    text = aggregate(args.results, args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def register(sub) -> None:
    """Add ``falip aggregate``."""
    p = sub.add_parser("aggregate", help="tabulate results JSON files (markdown or CSV)")
    p.add_argument("results", nargs="+", help="results .json files written by falip runs")
    p.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    p.add_argument("--output", default=None, help="write the table to a file")
    p.set_defaults(func=cmd_aggregate)
