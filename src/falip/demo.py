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
from .ranking import score_name, winners

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


def tag_text_colour(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``colour`` (WCAG relative luminance): a tag's number."""
    lin = [(c / 255) / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return (0, 0, 0) if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else (255, 255, 255)


def draw_boxes(image: Image.Image, boxes, highlight: Optional[int] = None) -> Image.Image:
    """``image`` with box k outlined in its colour (a black rim keeps it visible on a same-coloured object) and
    numbered k + 1 in a filled tag with black or white text, legible on any colour."""
    from .viz import _font

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, int(max(out.size) / 150))
    font = _font(max(16, int(max(out.size) / 20)))
    for k, box in enumerate(boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        w = width * (2 if k == highlight else 1)
        x0, y0, x1, y1 = box
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(0, 0, 0), width=w + 2)
        draw.rectangle(box, outline=colour, width=w)
        label = str(k + 1)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 8, bottom - top + 6
        tx, ty = max(0, min(x0, out.width - tw)), y0 - th if y0 - th >= 0 else y0  # above the box, else inside
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour, outline=(0, 0, 0))
        draw.text((tx + 4 - left, ty + 3 - top), label, fill=tag_text_colour(colour), font=font)
    return out


def _png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _upscaled(image: Image.Image, min_side: int = 320) -> Image.Image:
    factor = max(1, int(np.ceil(min_side / min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _tag(k: int) -> str:
    colour = BOX_COLOURS[k % len(BOX_COLOURS)]
    return f'<span class="tag" style="background:rgb{colour};color:rgb{tag_text_colour(colour)}">{k + 1}</span>'


def pick_text(tied: Sequence[int]) -> str:
    """What a method picks for one text: ``"box 2"``, or ``"tie (1, 2, 3)"`` when several boxes score the same."""
    return f"box {tied[0] + 1}" if len(tied) == 1 else f"tie ({', '.join(str(k + 1) for k in tied)})"


def render_html(
    result: DemoResult,
    title: str,
    extra_figures: Sequence[tuple[str, Image.Image]] = (),
    steered: str = "the [CLS] attention",
    note: Optional[str] = None,
    score_kind: str = "softmax",
) -> str:
    """The page: the image with numbered boxes and a legend, then per expression a methods × boxes score table
    (ties said as ties: :func:`falip.ranking.winners`), then ``extra_figures`` (caption, image) and ``note``.
    ``steered``: what falip biases, for the intro; ``score_kind``: the model's (``runtime.score_kind``)."""
    factor = max(1, int(np.ceil(320 / min(result.image.size))))
    picture = draw_boxes(_upscaled(result.image), [tuple(v * factor for v in b) for b in result.boxes])
    meant = {k: text for text, k in zip(result.texts, result.targets) if k is not None}  # generated scenes: known
    legend = "".join(
        f"<tr><td>{_tag(k)}</td><td>{', '.join(f'{v:g}' for v in b)}</td>"
        + ("" if not meant else f"<td>{html.escape(meant.get(k, ''))}</td>")
        + "</tr>"
        for k, b in enumerate(result.boxes)
    )
    legend_head = "<tr><th>box</th><th>x0, y0, x1, y1 (pixels)</th>" + ("" if not meant else "<th>the right box for</th>")
    rows = []
    for j, text in enumerate(result.texts):
        target = result.targets[j]
        head = "".join(f"<th>{_tag(k)}</th>" for k in range(len(result.boxes)))
        body = []
        for name in result.methods:
            s = result.scores[name][:, j]
            tied = winners(result.scores[name][:, j : j + 1]).tied[0]
            clear = len(tied) == 1
            cells = "".join(
                f'<td class="{("best" if clear else "tied") if k in tied else ""}">{s[k].item():.2f}</td>'
                for k in range(len(result.boxes))
            )
            verdict = "" if target is None or not clear else (" ✓" if tied[0] == target else " ✗")
            body.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>{pick_text(tied)}{verdict}</td></tr>")
        truth = "" if target is None else f" — the right box is {_tag(target)}"
        rows.append(
            f'<h3>“{html.escape(text)}”{truth}</h3><div class="scroll"><table><tr><th>method</th>{head}<th>picks</th></tr>'
            f"{''.join(body)}</table></div>"
        )
    figures = "".join(
        f'<figure><img src="{_png_data_uri(img)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for caption, img in extra_figures
    )
    boxes_alt = "; ".join(f"box {k + 1} at {', '.join(f'{v:g}' for v in b)}" for k, b in enumerate(result.boxes))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td.best {{ background: #c8f0c8; font-weight: bold; }} td.tied {{ outline: 2px dashed #888; outline-offset: -3px; }}
.tag {{ display: inline-block; min-width: 1.5em; text-align: center; font-weight: bold; border: 1px solid #000;
        border-radius: 3px; padding: 0 3px; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
figure {{ margin: 1em 0; max-width: 100%; }} img {{ max-width: 100%; height: auto; }}
img.scene {{ image-rendering: pixelated; }}
.top {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Scores are the model's logits ({html.escape(score_name(score_kind))}) between the region's embedding and
"a photo of &lt;expression&gt;". <b>none</b> encodes the whole image, so every box scores the same: a tie, which
picks no box; <b>crop</b>, <b>blur</b>, <b>circle</b> edit the image per box;
<b>falip</b> leaves the image alone and biases {html.escape(steered)} towards the box.
Green: the best box of a method; dashed: boxes tied best.</p>
<div class="top"><img class="scene" src="{_png_data_uri(picture)}" alt="the image with its numbered boxes: {html.escape(boxes_alt)}">
<table class="legend">{legend_head}</tr>{legend}</table></div>
{"".join(rows)}
{figures}
{"" if note is None else f"<p>{html.escape(note)}</p>"}
</body></html>
"""


def summary_png(result: DemoResult) -> Image.Image:
    """A compact PNG: the image with boxes, then one line per expression with each method's pick (ties as ties)."""
    picture = draw_boxes(
        _upscaled(result.image, 256),
        [tuple(v * max(1, int(np.ceil(256 / min(result.image.size)))) for v in b) for b in result.boxes],
    )
    line_h = 14
    lines = []
    for j, text in enumerate(result.texts):
        picks = ", ".join(
            f"{m}: {pick_text(winners(result.scores[m][:, j : j + 1]).tied[0]).removeprefix('box ')}" for m in result.methods
        )
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
        page = render_html(result, title, [(caption, maps)], score_kind=model.runtime.score_kind)
        paths["attention"] = out / "attention.png"
        maps.save(paths["attention"])
    else:
        note = (
            "No attention maps: this model pools its tokens with an attention probe, so it has no [CLS] query "
            "to draw; falip biases the probe's attention (see docs/probe-bias.md)."
        )
        page = render_html(result, title, steered="its attention probe", note=note, score_kind=model.runtime.score_kind)
    paths["html"].write_text(page, encoding="utf-8")
    summary_png(result).save(paths["summary"])
    return paths
