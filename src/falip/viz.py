"""Pictures: [CLS] attention maps with and without FALIP, attention rollout, head-response heatmaps.

Everything is drawn with PIL. Attention maps are shown on the model's own ``S×S`` input (after the
crop/squash/pad preprocessing), one patch per heat cell, so what you see is what the ViT sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .bias import FovealConfig
from .errors import RegionClampWarning
from .geometry import box_token_weights, validate_boxes
from .heads import rank_heads, trace
from .images import load_image

# Anchor colours of a perceptually ordered dark-blue → green → yellow scale, and a blue-white-red one.
SEQUENTIAL = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
DIVERGING = np.array([(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)], dtype=np.float64)
BOX_COLOUR = (255, 64, 255)
LABEL_W, HEADER_H, FOOTER_H, GAP, PAD = 120, 28, 36, 4, 6  # attention figure layout, pixels
CELL, AXIS_W, TITLE_H, SCALE_H, MIN_W = 28, 40, 46, 40, 360  # head heatmap layout, pixels


def colourise(values: np.ndarray, vmin: float, vmax: float, anchors: np.ndarray = SEQUENTIAL) -> np.ndarray:
    """``(h, w)`` values → ``(h, w, 3)`` uint8 colours, linear between the anchors over [vmin, vmax]."""
    t = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    pos = t * (len(anchors) - 1)
    lo = np.minimum(pos.astype(int), len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return np.round(anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class AttentionMaps:
    """[CLS] attention of one image, without a bias (row 0) and with FALIP for each of K boxes (rows 1..K).

    layers: the drawn blocks. maps: ``(1+K, len(layers), gh, gw)`` [CLS]→patch attention averaged over
    heads. mean: ``(1+K, gh, gw)`` their mean over ``layers``. rollout: ``(1+K, gh, gw)`` attention
    rollout over all blocks (Abnar & Zuidema 2020, residual weight 0.5). cls_probs: ``(1+K, blocks, H, L)``
    full [CLS] rows (each sums to 1). input_image: the ``S×S`` model input. boxes: ``(K, 4)`` in input
    pixels (for drawing); image_boxes: ``(K, 4)`` as given, in original pixels. box_mass: ``(K, 2)`` the
    share of the mean map's patch attention on box k's tokens, without and with FALIP on box k.
    """

    layers: tuple[int, ...]
    maps: torch.Tensor
    mean: torch.Tensor
    rollout: torch.Tensor
    cls_probs: torch.Tensor
    input_image: Image.Image
    boxes: np.ndarray
    image_boxes: np.ndarray
    box_mass: np.ndarray


def rollout(probs: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """[CLS] row of attention rollout ``(B, L)`` from probabilities ``(B, blocks, H, L, L)``.

    Per block: ``Â = residual·I + (1 − residual)·mean_h P``; the product over blocks (last on the
    left) is taken and its [CLS] row returned; it sums to 1.
    """
    B, depth, _, L, _ = probs.shape
    eye = torch.eye(L, dtype=probs.dtype, device=probs.device)
    out = eye.expand(B, L, L)
    for i in range(depth):
        a = residual * eye + (1 - residual) * probs[:, i].mean(dim=1)
        out = a @ out
    return out[:, 0]


def resolve_layers(layers: Optional[Sequence[int]], depth: int, default: Sequence[int]) -> tuple[int, ...]:
    """0-based block indices (negative counts from the end); ValueError names an index out of range."""
    if layers is None:
        return tuple(default)
    out = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer {i} is out of range for a ViT with {depth} blocks")
        if j not in out:
            out.append(j)
    if not out:
        raise ValueError("give at least one layer to draw")
    return tuple(out)


def attention_maps(
    model, image, boxes, layers: Optional[Sequence[int]] = None, config: Optional[FovealConfig] = None
) -> AttentionMaps:
    """[CLS] attention maps of ``image`` without a bias and with FALIP on each of ``boxes (K, 4)`` (xyxy pixels).

    layers: blocks to draw (default: the biased blocks of ``config``, default the model's).
    """
    config = config or model.config
    pil = load_image(image)
    boxes = validate_boxes(boxes, pil.size)
    drawn = resolve_layers(layers, model.num_layers, model.bias_layers(config))
    pixels, transform = model.preprocess_image(pil)
    bias = model.region_biases(transform, boxes=boxes, config=config)
    plain = trace(model, pixels, full_probs=True)
    prompted = trace(model, pixels, bias, config, full_probs=True)
    cls = torch.cat([plain.cls_probs, prompted.cls_probs])  # (1+K, blocks, H, L)
    gh, gw = model.grid
    n = model.runtime.num_prefix  # [CLS] and any register tokens come before the patches
    patch = cls[:, :, :, n:].mean(dim=2).reshape(cls.shape[0], -1, gh, gw)  # (1+K, blocks, gh, gw)
    maps = patch[:, list(drawn)]
    rolled = rollout(torch.cat([plain.probs, prompted.probs]))[:, n:].reshape(-1, gh, gw)
    fill = tuple(int(round(255 * m)) for m in model.runtime.mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegionClampWarning)  # already reported by region_biases
        mapped = np.array([transform.map_box(b, i) for i, b in enumerate(boxes)])
    S, p = model.image_size, model.patch_size
    mean = maps.mean(dim=1).numpy()  # (1+K, gh, gw)
    mass = []
    for k, b in enumerate(mapped):
        inside = box_token_weights(b, S, p, model.grid) > 0
        mass.append([mean[m][inside].sum() / mean[m].sum() for m in (0, k + 1)])
    return AttentionMaps(
        layers=drawn,
        maps=maps,
        mean=maps.mean(dim=1),
        rollout=rolled,
        cls_probs=cls,
        input_image=transform.apply(pil, fill=fill),
        boxes=mapped,
        image_boxes=boxes,
        box_mass=np.array(mass, dtype=np.float64),
    )


def attention_figure_size(num_boxes: int, num_layers: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` of :func:`draw_attention` for K boxes and the number of drawn layers."""
    cols = num_layers + 4  # input, layers…, mean, rollout, Δ mean
    rows = num_boxes + 1
    return LABEL_W + cols * tile + (cols - 1) * GAP + PAD, HEADER_H + rows * tile + (rows - 1) * GAP + FOOTER_H


def draw_attention(
    maps: AttentionMaps, tile: int = 160, alpha: float = 0.6, box_numbers: Optional[Sequence[int]] = None
) -> Image.Image:
    """One picture: rows = no bias, then FALIP on each box; columns = the input, each drawn layer's map,
    their mean, rollout, and the mean's change with FALIP (red = more attention, blue = less).

    Maps of one column share one colour scale, so rows compare directly; boxes are outlined in magenta.
    box_numbers: the label of each box row (default 1..K), e.g. ``[3]`` for maps of a caller's third box.
    """
    K = maps.maps.shape[0] - 1
    S = maps.input_image.size[0]
    width, height = attention_figure_size(K, len(maps.layers), tile)
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font, small = _font(13), _font(11)
    base = maps.input_image.resize((tile, tile), Image.BICUBIC)
    gray = base.convert("L").convert("RGB")
    scale = tile / S

    columns = [(f"block {i}", maps.maps[:, j]) for j, i in enumerate(maps.layers)]
    columns.append((f"mean of {len(maps.layers)}", maps.mean))
    columns.append(("rollout", maps.rollout))
    delta = (maps.mean[1:] - maps.mean[:1]).numpy()
    dmax = float(np.abs(delta).max()) if K else 0.0

    def x_of(col: int) -> int:
        return LABEL_W + col * (tile + GAP)

    def y_of(row: int) -> int:
        return HEADER_H + row * (tile + GAP)

    def outline(x: int, y: int, boxes) -> None:
        for b in boxes:
            x0, y0, x1, y1 = (float(v) * scale for v in b)
            draw.rectangle((x + x0, y + y0, x + x1 - 1, y + y1 - 1), outline=BOX_COLOUR, width=2)

    def overlay(values: np.ndarray, vmin: float, vmax: float, anchors: np.ndarray) -> Image.Image:
        heat = Image.fromarray(colourise(values, vmin, vmax, anchors)).resize((tile, tile), Image.NEAREST)
        return Image.blend(gray, heat, alpha)

    titles = ["input"] + [t for t, _ in columns] + ["change: FALIP - none"]
    for c, title in enumerate(titles):
        draw.text((x_of(c) + 2, 8), title, fill=(0, 0, 0), font=font)
    for r in range(K + 1):
        y = y_of(r)
        number = r if box_numbers is None else box_numbers[r - 1]
        label = "no bias" if r == 0 else f"FALIP box {number}\n" + ",".join(f"{v:g}" for v in maps.image_boxes[r - 1])
        draw.multiline_text((6, y + 6), label, fill=(0, 0, 0), font=font if r == 0 else small, spacing=4)
        row_boxes = maps.boxes if r == 0 else maps.boxes[r - 1 : r]
        fig.paste(base, (x_of(0), y))
        outline(x_of(0), y, row_boxes)
        for c, (_, values) in enumerate(columns, start=1):
            col = values.numpy()
            fig.paste(overlay(col[r], float(col.min()), float(col.max()), SEQUENTIAL), (x_of(c), y))
            outline(x_of(c), y, row_boxes)
        c = len(columns) + 1
        if r == 0:
            draw.rectangle((x_of(c), y, x_of(c) + tile - 1, y + tile - 1), outline=(200, 200, 200))
            draw.text((x_of(c) + 8, y + tile // 2 - 8), "(reference row)", fill=(120, 120, 120), font=small)
        else:
            fig.paste(overlay(delta[r - 1], -dmax, dmax, DIVERGING), (x_of(c), y))
            outline(x_of(c), y, row_boxes)
    note = (
        "[CLS]->patch attention, mean over heads; one colour scale per column (dark = low, yellow = high)\n"
        f"change: red = more, blue = less attention with FALIP than without (largest change {dmax:.2g})"
    )
    draw.multiline_text((6, height - FOOTER_H + 4), note, fill=(60, 60, 60), font=small, spacing=3)
    return fig


def heatmap_size(num_layers: int, num_heads: int) -> tuple[int, int]:
    """``(width, height)`` of :func:`draw_head_heatmap` for a ``layers × heads`` response."""
    return max(AXIS_W + num_heads * CELL + PAD, MIN_W), TITLE_H + num_layers * CELL + SCALE_H


def draw_head_heatmap(response: np.ndarray, title: str = "", top: int = 5) -> Image.Image:
    """A ``layers × heads`` response heatmap (rows = blocks, top row = block 0), the ``top`` heads outlined."""
    r = np.asarray(response, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"response must be a (layers, heads) matrix, got shape {r.shape}")
    layers, heads = r.shape
    width, height = heatmap_size(layers, heads)
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font, small = _font(13), _font(10)
    vmin, vmax = float(r.min()), float(r.max())
    colours = colourise(r, vmin, vmax)
    draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    draw.text((6, TITLE_H - 16), "head", fill=(0, 0, 0), font=small)
    for h in range(heads):
        draw.text((AXIS_W + h * CELL + 6, TITLE_H - 16), str(h), fill=(0, 0, 0), font=small)
    for i in range(layers):
        y = TITLE_H + i * CELL
        draw.text((6, y + 8), f"L{i}", fill=(0, 0, 0), font=small)
        for h in range(heads):
            x = AXIS_W + h * CELL
            draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=tuple(int(v) for v in colours[i, h]))
    for entry in rank_heads(r, top):
        x, y = AXIS_W + entry["head"] * CELL, TITLE_H + entry["layer"] * CELL
        draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), outline=(255, 0, 0), width=2)
    bar_y = TITLE_H + layers * CELL + 8
    bar_w = max(heads * CELL - 2, 2)
    bar = colourise(np.linspace(vmin, vmax, bar_w)[None, :].repeat(10, axis=0), vmin, vmax)
    fig.paste(Image.fromarray(bar), (AXIS_W, bar_y))
    draw.text((AXIS_W, bar_y + 12), f"{vmin:.3g}", fill=(0, 0, 0), font=small)
    hi = f"{vmax:.3g}"
    draw.text((AXIS_W + bar_w - int(draw.textlength(hi, font=small)), bar_y + 12), hi, fill=(0, 0, 0), font=small)
    return fig
