"""``falip demo``: one self-contained HTML page (and a PNG) showing FALIP steer a CLIP model.

Offline by default: the shipped ``falip-toy`` model on a generated scene, one expression per
object. With ``--model/--pretrained --image --box --text`` the same page is made for real CLIP
weights and a user's photo. For each expression the page shows every method's score for every
box, the box each method picks and, for generated scenes, which box is right; below, for a
[CLS]-pooled model, the [CLS] attention maps without and with FALIP on each box (``falip.viz``).
A model pooled by an attention probe (SigLIP) has no [CLS] query to draw: the page says so.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .bias import FovealConfig
from .images import load_image
from .methods import encode_with_method, parse_method

DEFAULT_METHODS = ("none", "crop", "blur", "circle", "falip")
BOX_COLOURS = ((255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 200, 120), (200, 90, 255), (255, 140, 0))


@dataclass
class DemoResult:
    image: Image.Image
    boxes: list[tuple[float, float, float, float]]
    texts: list[str]
    targets: list[Optional[int]]  # the right box per text, when known
    methods: list[str]
    scores: dict[str, torch.Tensor]  # method -> (K, T) logits


def run_demo(
    model, image, boxes, texts: Sequence[str], methods: Sequence[str] = DEFAULT_METHODS, targets=None, config=None
) -> DemoResult:
    """Score every box against every text with every method (REC prompt "a photo of {text}")."""
    pil = load_image(image)
    text_emb = model.encode_text([f"a photo of {t.lower()}" for t in texts])
    scores = {}
    for name in methods:
        method = parse_method(name)
        emb = encode_with_method(model, pil, boxes, method=method, config=config)
        suffixed = (
            model.encode_text([f"a photo of {t.lower()}{method.text_suffix}" for t in texts]) if method.text_suffix else text_emb
        )
        scores[method.name] = model.runtime.logits(emb, suffixed)
    return DemoResult(
        pil, [tuple(map(float, b)) for b in boxes], list(texts), list(targets or [None] * len(texts)), list(scores), scores
    )


def draw_boxes(image: Image.Image, boxes, highlight: Optional[int] = None) -> Image.Image:
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, int(max(out.size) / 150))
    for k, box in enumerate(boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=width * (2 if k == highlight else 1))
        draw.text((box[0] + width + 1, box[1] + width), str(k + 1), fill=colour)
    return out


def _png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _upscaled(image: Image.Image, min_side: int = 320) -> Image.Image:
    factor = max(1, int(np.ceil(min_side / min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def render_html(
    result: DemoResult,
    title: str,
    extra_figures: Sequence[tuple[str, Image.Image]] = (),
    steered: str = "the [CLS] attention",
    note: Optional[str] = None,
) -> str:
    """The page: the image with numbered boxes, then per expression a methods × boxes score table, then
    ``extra_figures`` (caption, image) and ``note``. ``steered``: what falip biases, for the intro."""
    scale = 320 / min(result.image.size) if min(result.image.size) < 320 else 1.0
    boxes_scaled = [tuple(v * max(1, int(np.ceil(scale))) for v in b) for b in result.boxes]
    picture = draw_boxes(_upscaled(result.image), boxes_scaled)
    rows = []
    for j, text in enumerate(result.texts):
        target = result.targets[j]
        head = "".join(f"<th>box {k + 1}</th>" for k in range(len(result.boxes)))
        body = []
        for name in result.methods:
            s = result.scores[name][:, j]
            best = int(s.argmax())
            cells = "".join(f'<td class="{"best" if k == best else ""}">{s[k].item():.2f}</td>' for k in range(len(result.boxes)))
            verdict = "" if target is None else (" ✓" if best == target else " ✗")
            body.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>box {best + 1}{verdict}</td></tr>")
        truth = "" if target is None else f" — the right box is {target + 1}"
        rows.append(
            f"<h3>“{html.escape(text)}”{truth}</h3><table><tr><th>method</th>{head}<th>picks</th></tr>{''.join(body)}</table>"
        )
    figures = "".join(
        f'<figure><img src="{_png_data_uri(img)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for caption, img in extra_figures
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td.best {{ background: #c8f0c8; font-weight: bold; }} figure {{ display: inline-block; margin: 0.5em; }}
img {{ image-rendering: pixelated; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Scores are the model's logits (logit_scale · cosine for CLIP) between the region's embedding and "a photo of &lt;expression&gt;".
<b>none</b> encodes the whole image (every box ties); <b>crop</b>, <b>blur</b>, <b>circle</b> edit the image per box;
<b>falip</b> leaves the image alone and biases {html.escape(steered)} towards the box.</p>
<img src="{_png_data_uri(picture)}">
{"".join(rows)}
{figures}
{"" if note is None else f"<p>{html.escape(note)}</p>"}
</body></html>
"""


def summary_png(result: DemoResult) -> Image.Image:
    """A compact PNG: the image with boxes, then one line per expression with each method's pick."""
    picture = draw_boxes(
        _upscaled(result.image, 256),
        [tuple(v * max(1, int(np.ceil(256 / min(result.image.size)))) for v in b) for b in result.boxes],
    )
    line_h = 14
    lines = []
    for j, text in enumerate(result.texts):
        picks = ", ".join(f"{m}: {int(result.scores[m][:, j].argmax()) + 1}" for m in result.methods)
        truth = "" if result.targets[j] is None else f" (right: {result.targets[j] + 1})"
        lines.append(f"'{text}'{truth} -> {picks}")
    width = max(picture.width, 7 * max(len(line) for line in lines) + 10)
    canvas = Image.new("RGB", (width, picture.height + line_h * len(lines) + 10), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(lines):
        draw.text((5, picture.height + 5 + j * line_h), line, fill=(0, 0, 0))
    return canvas


def demo_scene(seed: int = 0):
    """The offline demo's input: a generated 256 px scene of 3 objects → ``(image, boxes, texts, targets)``."""
    from .synthetic import make_scene

    scene = make_scene(np.random.default_rng(seed), 3, 256)
    boxes = [tuple(round(v, 1) for v in o.box) for o in scene.objects]
    texts = [exprs[1] for exprs in scene.expressions]
    return scene.image, boxes, texts, list(range(len(boxes)))


def write_demo(
    model,
    output,
    image,
    boxes,
    texts: Sequence[str],
    methods: Sequence[str] = DEFAULT_METHODS,
    targets=None,
    config: Optional[FovealConfig] = None,
) -> dict[str, Path]:
    """Write ``index.html``, ``demo.png`` and, for a [CLS]-pooled model, ``attention.png`` into the folder
    ``output``; returns their paths (keys ``html``, ``summary``, ``attention`` when written)."""
    from .viz import attention_maps, draw_attention

    result = run_demo(model, image, boxes, texts, methods, targets, config=config)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"FALIP demo — {model.name}" + (f" ({model.pretrained})" if model.pretrained else "")
    paths = dict(html=out / "index.html", summary=out / "demo.png")
    if model.runtime.pool == "cls":
        maps = draw_attention(attention_maps(model, image, boxes, config=config))
        caption = "[CLS]→patch attention in the biased blocks, without the bias (top row) and with FALIP on each box"
        page = render_html(result, title, [(caption, maps)])
        paths["attention"] = out / "attention.png"
        maps.save(paths["attention"])
    else:
        note = (
            "No attention maps: this model pools its tokens with an attention probe, so it has no [CLS] query "
            "to draw; falip biases the probe's attention (see docs/probe-bias.md)."
        )
        page = render_html(result, title, steered="its attention probe", note=note)
    paths["html"].write_text(page, encoding="utf-8")
    summary_png(result).save(paths["summary"])
    return paths
