"""The FastAPI application behind ``falip serve``: one offline HTML page and a JSON API.

Routes: ``GET /`` (the page), ``GET /api/health``, ``POST /api/score``, ``POST /api/attention``,
``GET /api/examples/{name}.png``. Every error is JSON ``{"error": "..."}`` with a 4xx status that
names the input; an unexpected failure is a 500 without a traceback (it is logged on the server).
Model calls run in worker threads under the service's lock (see :mod:`falip.app.service`).

Bounds before the application sees a request (:class:`Guard`, :func:`bounded_protocol`): the ``Host`` header
must name where the server is bound (DNS rebinding), a POST from a page of another origin is refused (cross-site
requests), a request's headers and then its body must arrive within ``Limits.read_timeout_s`` and its body
within ``Limits.max_upload_bytes``, and at most ``Limits.max_connections`` connections are open at once.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import socket
from collections.abc import Iterable
from importlib import resources
from typing import Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FalipError
from ..methods import parse_method
from .service import (
    InputError,
    Limits,
    ScoringService,
    check_method,
    check_mode,
    check_preprocessed_size,
    decode_image,
    decode_masks,
    parse_boxes,
    parse_texts,
)

log = logging.getLogger("falip.serve")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or URL netloc, lower-case: ``"[::1]:7860"`` → ``"::1"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return (value.rsplit(":", 1)[0] if value.count(":") == 1 else value).rstrip(".")


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> Optional[frozenset[str]]:
    """The ``Host`` names a server bound to ``bind_host`` answers to: the loopback names, the bound address unless
    it is a wildcard (0.0.0.0, ::), and ``extra`` (``--allow-host``); None (any name) when ``extra`` holds ``*``."""
    extra = [host_name(h) for h in extra]
    if "*" in extra:
        return None
    names = set(LOOPBACK_NAMES) | set(extra)
    try:
        if not ipaddress.ip_address(bind_host).is_unspecified:
            names.add(host_name(bind_host))
    except ValueError:  # a name such as localhost or a machine name
        names.add(host_name(bind_host))
    return frozenset(names)


class Guard:
    """ASGI middleware in front of the app, for HTTP requests:

    - 400 when the ``Host`` header names a host outside ``hosts`` (None = any), and 403 for a POST whose
      ``Origin`` is not the server's own (``http(s)://`` + its ``Host``): a page elsewhere cannot reach the API;
    - 413 when the body is larger than ``limits.max_upload_bytes`` (at most that + 1 bytes are kept), declared
      or not; 408 and the connection closed when the body has not arrived ``limits.read_timeout_s`` after the
      request began (a stalled or trickling upload).
    The body is read before the application sees it.
    """

    def __init__(self, app, limits: Limits, hosts: Optional[frozenset[str]]):
        self.app = app
        self.limits = limits
        self.hosts = hosts

    def refusal(self, scope) -> Optional[JSONResponse]:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host and host_name(host) not in self.hosts:
            names = ", ".join(sorted(self.hosts))
            return _error(
                400,
                f"Host {host!r} is not a name this server answers to ({names}); open it by one of those, or start "
                f"falip serve with --allow-host {host_name(host)} if that name is yours",
            )
        origin = headers.get(b"origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            parts = urlsplit(origin.decode("latin-1"))
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return _error(403, f"cross-origin request refused: Origin {origin.decode('latin-1')!r} is not this server")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            return await refused(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit, timeout = self.limits.max_upload_bytes, self.limits.read_timeout_s
        too_large = _error(413, f"request body is over the upload limit of {limit} bytes", close=True)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                slow = f"request body not received within {timeout:g} s (--read-timeout); the connection is closed"
                return await _error(408, slow, close=True)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(model, limits: Limits = Limits(), hosts: Optional[frozenset[str]] = LOOPBACK_NAMES) -> Guard:
    """The web application for ``model`` (a :class:`falip.FalipModel`) behind its :class:`Guard`;
    ``hosts``: the ``Host`` names it answers to (:func:`allowed_hosts`; None = any)."""
    service = ScoringService(model, limits)
    # No /docs: Swagger UI loads its scripts from a CDN and the app must work offline; /openapi.json stays.
    app = FastAPI(title="falip serve", docs_url=None, redoc_url=None)
    app.state.service = service
    page = resources.files("falip.app").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(FalipError)
    async def _falip_error(request: Request, exc: FalipError):
        return _error(exc.status if isinstance(exc, InputError) else 400, str(exc))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            field = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            problems.append(f"{field or 'request'}: {e.get('msg', 'invalid')}")
        return _error(400, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    async def _read_inputs(image: UploadFile, boxes: Optional[str], masks: list[UploadFile], crops: bool):
        """The decoded image, its boxes and masks (``(names, arrays)``), checked against the limits."""
        data = await image.read()
        pil = await run_in_threadpool(decode_image, data, limits, image.filename or "the uploaded image")
        box_list = parse_boxes(boxes, pil.size, limits, required=not masks)
        if len(box_list) + len(masks) > limits.max_boxes:
            raise InputError(f"regions: {len(box_list)} boxes and {len(masks)} masks is over the limit of {limits.max_boxes}")
        uploads = [(m.filename or f"mask {i}", await m.read()) for i, m in enumerate(masks)]
        mask_list = await run_in_threadpool(decode_masks, uploads, pil.size)
        check_preprocessed_size(model, pil.size, limits, box_list, crops=crops)
        return pil, box_list, ([name for name, _ in uploads], mask_list)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/api/health")
    async def health():
        return service.info()

    @app.get("/api/examples/{name}.png")
    async def example_image(name: str):
        example = service.examples.get(name)
        if example is None:
            return _error(404, f"no example named {name!r}; choose from {', '.join(service.examples)}")
        buf = io.BytesIO()
        example.image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.post("/api/score")
    async def score(
        image: UploadFile = File(..., description="the image (any format PIL reads)"),
        boxes: Optional[str] = Form(None, description="JSON list of [x0, y0, x1, y1] pixel boxes (optional with masks)"),
        masks: list[UploadFile] = File([], description="region masks: PNGs of the image's size, as falip score --mask"),
        texts: str = Form(..., description="JSON list of strings"),
        method: str = Form("falip", description="falip, none, an edit (crop, blur, circle, ...) or falip+<edit>"),
        mode: str = Form("exact", description="exact, naive or approx"),
        alpha: Optional[float] = Form(None, description="peak bias (default: the model's)"),
        sigma: Optional[float] = Form(None, description="Gaussian width in tokens (default: the model's)"),
        layers: Optional[str] = Form(None, description="JSON list of biased blocks (default: the model's)"),
    ):
        text_list = parse_texts(texts, limits)
        method_name, mode_name = check_method(method), check_mode(mode)
        config = service.config(alpha, sigma, layers)
        crops = parse_method(method_name).edit == "crop"
        pil, box_list, (mask_names, mask_list) = await _read_inputs(image, boxes, masks, crops)
        return await run_in_threadpool(
            service.score, pil, box_list, mask_list, mask_names, text_list, method_name, config, mode_name
        )

    @app.post("/api/attention")
    async def attention(
        image: UploadFile = File(...),
        boxes: str = Form(...),
        box: int = Form(0, description="0-based index of the box to show"),
        alpha: Optional[float] = Form(None),
        sigma: Optional[float] = Form(None),
        layers: Optional[str] = Form(None),
    ):
        config = service.config(alpha, sigma, layers)
        pil, box_list, _ = await _read_inputs(image, boxes, [], crops=False)
        return await run_in_threadpool(service.attention, pil, box_list, box, config)

    return Guard(app, limits, hosts)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0 = a free port)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise FalipError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def bounded_protocol(limits: Limits):
    """uvicorn's HTTP/1.1 protocol with two bounds: a connection beyond ``limits.max_connections`` is closed at
    once, and one that has no request in progress ``limits.read_timeout_s`` after it opened or after its last
    answer (headers that never complete, trickled or not) is closed. The body's time bound is :class:`Guard`'s."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                log.warning("%d connections open (--max-connections): closing a new one", len(self.connections) - 1)
                transport.close()
                return
            self._close_later()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._close_later()

        def _close_later(self) -> None:
            self.loop.call_later(limits.read_timeout_s, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete  # no request begun since the last answer
            if idle and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11


def make_server(
    model, host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits(), log_level: str = "info", allow_hosts=()
):
    """``(uvicorn server, its bound socket)`` of ``falip serve``; run it with ``server.run(sockets=[sock])``.

    allow_hosts: more ``Host`` names to answer to than loopback and the bound address (``*``: any)."""
    import uvicorn

    hosts = allowed_hosts(host, allow_hosts)
    app = create_app(model, limits, hosts)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, http=bounded_protocol(limits), timeout_keep_alive=5)
    return uvicorn.Server(config), sock


def serve(model, host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits(), log_level: str = "info", allow_hosts=()):
    """Run :func:`make_server` until interrupted; prints the URL once the socket is bound."""
    server, sock = make_server(model, host, port, limits, log_level, allow_hosts)
    print(f"falip serve: model {model.name}; open {url_of(sock)} (Ctrl+C stops)", flush=True)
    hosts = server.config.app.hosts
    if hosts is not None and not LOOPBACK_NAMES >= hosts:
        print(f"falip serve: answers to Host {', '.join(sorted(hosts))}", flush=True)
    server.run(sockets=[sock])
