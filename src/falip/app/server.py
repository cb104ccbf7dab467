"""The FastAPI application behind ``falip serve``: one offline HTML page and a JSON API.

Routes: ``GET /`` (the page), ``GET /api/health``, ``POST /api/score``, ``POST /api/attention``,
``GET /api/examples/{name}.png``. Every error is JSON ``{"error": "..."}`` with a 4xx status that
names the input; an unexpected failure is a 500 without a traceback (it is logged on the server).
Model calls run in worker threads under the service's lock (see :mod:`falip.app.service`).
"""

from __future__ import annotations

import io
import logging
import socket
from importlib import resources
from typing import Optional

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FalipError
from .service import InputError, Limits, ScoringService, check_method, check_mode, decode_image, parse_boxes, parse_texts

log = logging.getLogger("falip.serve")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: answer 413 when a request body is larger than ``max_bytes``.

    The body is read (at most ``max_bytes + 1`` bytes are kept) before the application sees it, so a
    too-large upload is refused whether or not it declares a Content-Length.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body is over the upload limit of {self.max_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
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


def create_app(model, limits: Limits = Limits()) -> FastAPI:
    """The web application for ``model`` (a :class:`falip.FalipModel`)."""
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

    async def _read_inputs(image: UploadFile, boxes: str):
        data = await image.read()
        pil = await run_in_threadpool(decode_image, data, limits)
        return pil, parse_boxes(boxes, pil.size, limits)

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
        boxes: str = Form(..., description="JSON list of [x0, y0, x1, y1] pixel boxes"),
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
        pil, box_list = await _read_inputs(image, boxes)
        return await run_in_threadpool(service.score, pil, box_list, text_list, method_name, config, mode_name)

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
        pil, box_list = await _read_inputs(image, boxes)
        return await run_in_threadpool(service.attention, pil, box_list, box, config)

    return BodyLimit(app, limits.max_upload_bytes)


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


def serve(model, host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits(), log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted; prints the URL once the socket is bound."""
    import uvicorn

    app = create_app(model, limits)
    sock = bind(host, port)
    print(f"falip serve: model {model.name}; open {url_of(sock)} (Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
