"""What the web server does with a request, without the web framework: check inputs, run the model.

:class:`ScoringService` owns one model and a lock. The runtime is re-entrant (``tests/test_reliability.py``
hammers one model from a thread pool), so the lock is not there for correctness: it runs one model call at
a time, because each call already uses every core torch is given and overlapping calls would only multiply
peak memory. Every model call here runs under the lock.
The server calls these methods from worker threads, so its event loop stays free while one runs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..bias import FovealConfig
from ..datasets.generic import read_mask
from ..encode import MODES
from ..errors import FalipError, ImageLoadError
from ..images import ImageTooLargeError, load_image
from ..methods import METHOD_HELP, parse_method, score_with_method
from ..prompts import EDITS
from ..ranking import score_name, score_table
from ..synthetic import make_scene

# The methods the page offers (any name parse_method accepts is valid in the API).
PAGE_METHODS = ("falip", "none", "crop", "blur", "circle", "falip+circle", "falip+blur") + tuple(
    e for e in EDITS if e not in ("crop", "blur", "circle")
)


class InputError(FalipError, ValueError):
    """A request's input is malformed or over a limit; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may send. Larger inputs are refused with a 4xx naming the limit."""

    max_upload_bytes: int = 20 * 1024 * 1024  # the whole request body
    max_pixels: int = 16_000_000  # width × height of the decoded image, and of what preprocessing resizes it to
    max_boxes: int = 32  # regions per request: boxes and masks together
    max_texts: int = 16
    max_text_chars: int = 300
    read_timeout_s: float = 30.0  # a request's headers, and then its whole body, must arrive within this time
    max_connections: int = 64  # open connections; more are closed at once (stalled clients cannot exhaust descriptors)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (value > 0 if name == "read_timeout_s" else value >= 1):
                raise ValueError(f"limit {name} must be {'> 0' if name == 'read_timeout_s' else 'at least 1'}, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """A bundled example: a generated scene with its object boxes and one expression per object."""

    name: str
    image: Image.Image
    boxes: list[list[float]]
    texts: list[str]


def make_examples(seeds: Sequence[int] = (3, 7, 11)) -> dict[str, Example]:
    """Generated 3-object scenes (``falip.synthetic``), 256×256, one per seed; nothing is read from disk."""
    out = {}
    for seed in seeds:
        scene = make_scene(np.random.default_rng(seed), 3, 256)
        name = f"shapes-{seed}"
        boxes = [[round(v, 1) for v in o.box] for o in scene.objects]
        out[name] = Example(name, scene.image, boxes, [f"the {o.name}" for o in scene.objects])
    return out


def decode_image(data: bytes, limits: Limits, name: str = "the uploaded image") -> Image.Image:
    """An 8-bit RGB image as displayed from uploaded bytes, decoded exactly as ``falip score`` decodes a file
    (:func:`falip.images.load_image`: the pixel limit checked on the header before decoding, a damaged or
    truncated file refused, EXIF orientation applied, 16-bit and float images scaled by their range)."""
    if not data:
        raise InputError("image: the uploaded file is empty")
    try:
        return load_image(data, name=name, max_pixels=limits.max_pixels)
    except ImageTooLargeError as exc:
        raise InputError(f"image: {exc}", status=413) from None
    except ImageLoadError as exc:
        raise InputError(f"image: {exc}", status=415 if "not an image file" in str(exc) else 400) from None


def decode_masks(uploads: Sequence[tuple[str, bytes]], image_size: tuple[int, int]) -> list[np.ndarray]:
    """Boolean ``(H, W)`` masks from uploaded files ``(file name, bytes)``, read exactly as ``falip score --mask``
    reads a file (:func:`falip.datasets.generic.read_mask`, its rules and its empty-mask error); each must have
    the image's size, checked on the header before decoding."""
    W, H = image_size
    out = []
    for i, (name, data) in enumerate(uploads):
        label = f"masks: mask {i} ({name})"
        if not data:
            raise InputError(f"{label}: the uploaded file is empty")
        try:
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
        except UnidentifiedImageError:
            raise InputError(f"{label}: not an image file (PIL cannot identify its format)", status=415) from None
        except OSError as exc:
            raise InputError(f"{label}: cannot decode the uploaded file ({exc})") from None
        if size != (W, H):
            raise InputError(f"{label} is {size[0]}x{size[1]} but the image is {W}x{H}; a mask has the image's size")
        buf = io.BytesIO(data)
        buf.name = name
        try:
            out.append(read_mask(buf))
        except FalipError as exc:
            raise InputError(f"{label}: {exc}") from None
    return out


def check_preprocessed_size(model, image_size: tuple[int, int], limits: Limits, boxes=(), crops: bool = False) -> None:
    """Refuse (413) an image whose preprocessing would resize it past the pixel limit (a 200000×1 image under
    ``crop`` preprocessing becomes 44800000×224), and with ``crops`` (a crop edit) each box's crop likewise."""
    sizes = [("image", image_size)]
    if crops:
        W, H = image_size
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            w = max(1, math.ceil(min(x1, W)) - math.floor(max(x0, 0.0)))
            h = max(1, math.ceil(min(y1, H)) - math.floor(max(y0, 0.0)))
            sizes.append((f"box {k}'s crop", (w, h)))
    for what, size in sizes:
        rw, rh = model.transform_for(size).resized
        if rw * rh > limits.max_pixels:
            raise InputError(
                f"image: {what} of {size[0]}x{size[1]} is resized to {rw}x{rh} = {rw * rh} pixels by the model's "
                f"{model.preprocess} preprocessing, over the limit of {limits.max_pixels} pixels; crop it closer to square",
                status=413,
            )


def _json_field(name: str, text: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{name}: JSON nested too deeply; got {text[:80]!r}") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, and integers over Python's digit limit
        raise InputError(f"{name}: not valid JSON ({exc}); got {text[:80]!r}") from None


def _finite_float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        return math.inf


def parse_boxes(text: Optional[str], image_size: tuple[int, int], limits: Limits, required: bool = True) -> list[list[float]]:
    """``'[[x0, y0, x1, y1], ...]'`` (pixels of the image as displayed) → checked boxes; None or ``''`` with
    ``required=False`` → ``[]`` (the regions are masks).

    A box may stick out of the image (it is clamped, as the library does); an empty box, one
    entirely outside the image, NaN/inf, a number too large for a float or a wrong shape is refused.
    """
    if not required and (text is None or not text.strip()):
        return []
    if text is None:
        raise InputError("boxes: Field required: give a JSON list of [x0, y0, x1, y1] pixel boxes, or upload masks")
    value = _json_field("boxes", text)
    if not isinstance(value, list) or (required and not value):
        raise InputError("boxes: give a non-empty JSON list of [x0, y0, x1, y1] pixel boxes")
    if len(value) > limits.max_boxes:
        raise InputError(f"boxes: {len(value)} boxes is over the limit of {limits.max_boxes}")
    W, H = image_size
    out = []
    for i, box in enumerate(value):
        if not (
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            raise InputError(f"boxes: box {i} must be [x0, y0, x1, y1] (four numbers), got {json.dumps(box)[:80]}")
        x0, y0, x1, y1 = (_finite_float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise InputError(
                f"boxes: box {i} {json.dumps(box)[:80]} has a NaN or infinite coordinate (or one too large for a float)"
            )
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"boxes: box {i} {json.dumps(box)[:80]} is empty: need x1 > x0 and y1 > y0")
        if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
            raise InputError(f"boxes: box {i} {json.dumps(box)[:80]} lies entirely outside the {W}x{H} image")
        out.append([x0, y0, x1, y1])
    return out


def parse_texts(text: str, limits: Limits) -> list[str]:
    """``'["the dog", ...]'`` → a non-empty list of non-blank strings within the limits."""
    value = _json_field("texts", text)
    if not isinstance(value, list) or not value:
        raise InputError('texts: give a non-empty JSON list of strings, e.g. ["the dog on the left"]')
    if len(value) > limits.max_texts:
        raise InputError(f"texts: {len(value)} texts is over the limit of {limits.max_texts}")
    for i, t in enumerate(value):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"texts: text {i} must be a non-blank string, got {json.dumps(t)[:80]}")
        if len(t) > limits.max_text_chars:
            raise InputError(f"texts: text {i} has {len(t)} characters, over the limit of {limits.max_text_chars}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"texts: text {i} is not valid Unicode (a lone surrogate), got {json.dumps(t)[:80]}") from None
    return value


def parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``'[2, 3, 4, 5]'`` → (2, 3, 4, 5); None or ``''`` → None (the model's own layers)."""
    if text is None or not text.strip():
        return None
    value = _json_field("layers", text)
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"layers: give a non-empty JSON list of block indices like [2, 3, 4, 5], got {text[:80]!r}")
    return tuple(value)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"mode: unknown mode {mode[:80]!r}; use one of {', '.join(MODES)}")
    return mode


def check_method(method: str) -> str:
    """The canonical method name (``"blur+falip"`` → ``"falip+blur"``)."""
    try:
        return parse_method(method).name
    except ValueError:
        raise InputError(f"method: unknown method {method[:80]!r}; use {METHOD_HELP}") from None


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def public_name(name: Optional[str]) -> Optional[str]:
    """``name`` as the server may show it: a local path (a checkpoint, weights, a model folder) by its last part."""
    if name is None or not (os.path.isabs(name) or os.path.exists(name)):
        return name
    return Path(name).name


class ScoringService:
    """One model behind a lock; every method that touches the model holds it for the whole call."""

    def __init__(self, model, limits: Limits = Limits()):
        self.model = model
        self.limits = limits
        self.lock = threading.Lock()
        self.examples = make_examples()

    def info(self) -> dict:
        """What ``GET /api/health`` answers: the model, its default FALIP settings, the choices and limits.

        A model or weights given as a local path is named by its file name: the server's file system is not
        the client's business."""
        m = self.model
        return dict(
            status="ok",
            model=public_name(m.name),
            pretrained=public_name(m.pretrained),
            preprocess=m.preprocess,
            num_layers=m.num_layers,
            score=dict(kind=m.runtime.score_kind, name=score_name(m.runtime.score_kind)),
            config=m.config.to_dict(),
            bias_layers=list(m.bias_layers()),
            methods=list(PAGE_METHODS),
            modes=list(MODES),
            limits=self.limits.to_dict(),
            examples=[dict(name=e.name, boxes=e.boxes, texts=e.texts) for e in self.examples.values()],
        )

    def config(self, alpha: Optional[float] = None, sigma: Optional[float] = None, layers: Optional[str] = None) -> FovealConfig:
        """The model's own FALIP settings with the request's overrides; ValueError names a bad value."""
        changes = {}
        if alpha is not None:
            changes["alpha"] = alpha
        if sigma is not None:
            changes["sigma"] = sigma
        parsed = parse_layers(layers)
        if parsed is not None:
            changes["layers"] = parsed
        try:
            config = replace(self.model.config, **changes)
            self.model.plan(config)  # layers, unleashing and rows the model cannot honour
        except ValueError as exc:
            raise InputError(f"FALIP options: {exc}") from None
        return config

    def score(
        self, image: Image.Image, boxes, masks, mask_names, texts: list[str], method: str, config: FovealConfig, mode: str
    ) -> dict:
        """Scores ``(K, T)`` of K = the boxes then the masks, as ``POST /api/score`` answers: the shape of
        :func:`falip.ranking.score_table` (the one of ``falip score --json``) and the settings used.

        Boxes and masks are scored by separate calls (a region's scores do not depend on the other regions),
        so each row is what ``falip score --box`` or ``--mask`` gives for that region."""
        parts, run = [], dict(method=method, config=config, mode=mode)
        with self.lock:
            if boxes:
                parts.append(score_with_method(self.model, image, boxes, texts, **run))
            if masks:
                parts.append(score_with_method(self.model, image, None, texts, masks=masks, **run))
        scores = torch.cat(parts)
        names = [",".join(f"{v:g}" for v in b) for b in boxes] + list(mask_names)
        return dict(
            **score_table(scores, texts, self.model.runtime.score_kind),
            regions=names,
            boxes=boxes,
            masks=list(mask_names),
            method=method,
            mode=mode,
            config=config.to_dict(),
            bias_layers=list(self.model.bias_layers(config)),
            model=public_name(self.model.name),
            image_size=list(image.size),
        )

    def attention(self, image: Image.Image, boxes, box: int, config: FovealConfig) -> dict:
        """[CLS] attention maps without and with FALIP on ``boxes[box]`` (``falip.viz``), as a PNG data URI."""
        from ..viz import attention_maps, draw_attention

        if not 0 <= box < len(boxes):
            raise InputError(f"box: index {box} is out of range for {len(boxes)} boxes (0-based)")
        with self.lock:
            maps = attention_maps(self.model, image, [boxes[box]], config=config)
        mass = maps.box_mass[0]
        return dict(
            box=box,
            layers=list(maps.layers),
            box_mass=dict(without=float(mass[0]), with_falip=float(mass[1])),
            png=png_data_uri(draw_attention(maps, box_numbers=[box + 1])),
        )
