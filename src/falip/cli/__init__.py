"""Command line: ``falip <command>``; each command lives in a module of this package.

Thin: parse, call the library, print. Errors from bad input end with exit code 2 and one line.
The library (``falip.*`` outside this package) never imports from here.

Under ``torchrun`` the commands that set ``distributed=True`` (rec, classify, pointcloud) run in
a process group (:func:`falip.distributed.session`), ``--device cuda`` meaning ``cuda:<LOCAL_RANK>``;
only rank 0 prints to stdout; an error line names its rank. Other commands refuse to run there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from tqdm import tqdm

from .. import distributed
from ..errors import FalipError
from ..notices import cli_warning_line
from ..version import __version__

# Modules that add their own subcommands through ``register(subparsers)``, in help order.
COMMAND_MODULES = (
    "falip.cli.score",
    "falip.cli.aggregate",
    "falip.cli.synth",
    "falip.cli.demo",
    "falip.cli.rec",
    "falip.cli.pointcloud",
    "falip.cli.classify",
    "falip.cli.heads",
    "falip.cli.serve",
    "falip.cli.models",
)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: --mode would silently mean --model where a command has no --mode.
    parser = argparse.ArgumentParser(prog="falip", description="FALIP: foveal attention for CLIP ViTs", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"falip {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    )
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# A comma list of numbers that starts with a minus sign (``--box -50,-50,100,100``), which argparse takes for an option.
_NEGATIVE_LIST = re.compile(r"-\d[\d.eE+-]*(?:,\s*[-+]?[\d.eE+-]+)+")


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--box", "-50,-50,100,100"]`` → ``["--box=-50,-50,100,100"]``: an option's value that is a list of
    numbers starting with ``-`` stays that option's value."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Each warning as one ``falip: warning: …`` line (no file path, no source line), above any progress bar."""
    tqdm.write(cli_warning_line(message), file=sys.stderr if file is None else file)


# What a user's input or environment can raise, each answered by one line (exit 2); anything else is a bug in falip
# and keeps its traceback:
# - FalipError and its kinds (InvalidRegionError, ImageLoadError, ModelLoadError, UnsupportedModelError, ...): falip's own checks;
# - ValueError (also json.JSONDecodeError, UnicodeDecodeError): a value falip or a library refused;
# - OverflowError: a number too large for the float or integer it must become;
# - RecursionError: a file nested too deeply to read (JSON);
# - OSError (also PIL's UnidentifiedImageError): files and folders missing, unreadable, read-only, a full disk;
#   BrokenPipeError: the reader of the output went away (``| head``), which ends quietly;
# - MemoryError and torch's OutOfMemoryError: the input does not fit in (GPU) memory;
# - KeyboardInterrupt: Ctrl-C (exit 130).
OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def _main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (FalipError, ValueError) as exc:
        return _fail(str(exc))
    except OverflowError as exc:
        return _fail(f"a number is too large: {exc}")
    except RecursionError:
        return _fail("an input file is nested too deeply to read")
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):  # no "Exception ignored ... BrokenPipeError" at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # files and folders: missing, unreadable, read-only, full disk
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror}:{where}" if exc.strerror else str(exc) or type(exc).__name__)
    except OUT_OF_MEMORY:
        return _fail("out of memory; use a smaller model, --batch-size or fewer regions per image")
    except KeyboardInterrupt:
        print("falip: interrupted (a run with --output resumes where it stopped)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    """The command, in the process group of a torchrun launch where there is one."""
    if distributed.from_env() is None:
        return args.func(args)
    if not getattr(args, "distributed", False):
        raise FalipError(f"falip {args.command} runs in one process; start it without torchrun")
    with distributed.session(args.device) as args.device:
        if distributed.is_main():
            return args.func(args)
        with contextlib.redirect_stdout(io.StringIO()):  # rank 0 prints for all
            return args.func(args)


def _fail(message: str) -> int:
    try:
        rank = distributed.from_env()
    except FalipError:
        rank = None
    print(f"falip: error: {f'[{rank}] ' if rank else ''}{message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
