"""``falip aggregate``: tabulate results JSON files, a column for each setting that differs between them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..experiments import FORMATS, aggregate, format_for
from ..results import check_output_path


def cmd_aggregate(args: argparse.Namespace) -> int:
    fmt = format_for(args.output, args.format)
    if args.output:
        check_output_path(args.output, "--output")
        inputs = {Path(p).resolve() for p in args.results}
        if Path(args.output).resolve() in inputs:
            raise ValueError(f"--output {args.output} is one of the results files given: name another file")
    text = aggregate(args.results, fmt, notice=lambda line: print(f"falip: {line}", file=sys.stderr))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({fmt})")
    else:
        print(text, end="")
    return 0


def register(sub) -> None:
    """Add ``falip aggregate``."""
    p = sub.add_parser(
        "aggregate", help="tabulate results JSON files: what identifies each run, the settings that differ, metrics"
    )
    p.add_argument(
        "results", nargs="+", help="results .json files written by falip runs (other files are skipped, with a notice)"
    )
    p.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="table format (default: from --output's extension .md/.csv/.json; markdown)",
    )
    p.add_argument("--output", default=None, help="write the table to a file (.md, .csv or .json)")
    p.set_defaults(func=cmd_aggregate)
