"""``falip serve``: the web page and JSON API of :mod:`falip.app` (needs the ``app`` extra)."""

from __future__ import annotations

import argparse

from ..app.service import Limits
from ..errors import FalipError
from ..version import install_command
from .common import add_model_args, load_from_args


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..app.server import serve
    except ImportError as exc:
        raise FalipError(f"falip serve needs the app extra: {install_command('app')} (missing: {exc.name})") from None
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_boxes=args.max_boxes,
        max_texts=args.max_texts,
        read_timeout_s=args.read_timeout,
        max_connections=args.max_connections,
    )
    model = load_from_args(args)  # the model's own FALIP settings; each request may override α, σ and layers
    serve(model, host=args.host, port=args.port, limits=limits, allow_hosts=args.allow_host)
    return 0


def register(sub) -> None:
    """Add ``falip serve``."""
    p = sub.add_parser(
        "serve",
        help="web page and JSON API: draw boxes on your image, see which one a text means",
        description="Start the falip web app and JSON API. Without --model: the shipped falip-toy, fully offline.",
    )
    add_model_args(p, default_model="falip-toy")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeat; '*': any). Always: localhost, 127.0.0.1, ::1 "
        "and the --host address; other names are refused, so a web page cannot reach the server through DNS rebinding",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    limits = Limits()
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=limits.max_upload_bytes / 2**20,
        help="largest request body in MB (default %(default)g)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=limits.max_pixels,
        help="largest image, width x height, also as the model's preprocessing resizes it (default %(default)d)",
    )
    p.add_argument(
        "--max-boxes", type=int, default=limits.max_boxes, help="most regions (boxes and masks) per request (default %(default)d)"
    )
    p.add_argument("--max-texts", type=int, default=limits.max_texts, help="most texts per request (default %(default)d)")
    p.add_argument(
        "--read-timeout",
        type=float,
        default=limits.read_timeout_s,
        help="seconds a request's headers, and then its body, may take to arrive; slower ones are closed (default %(default)g)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help="open connections at once; more are closed at once (default %(default)d)",
    )
    p.set_defaults(func=cmd_serve)
