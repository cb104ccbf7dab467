"""Region-encoding methods shared by every task: FALIP, image edits, and their combinations.

A method name is one of

- ``falip``: the foveal bias on the unedited image;
- ``none``: the full, unedited image for every region (the no-prompt baseline);
- an edit of :data:`falip.prompts.EDITS` (``crop``, ``blur``, ``circle`` …): one edited image per region;
- ``falip+<edit>`` (or ``<edit>+falip``): the edited image *and* the bias on the region's place in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .bias import FovealConfig
from .geometry import validate_boxes, validate_masks
from .images import load_image
from .model import PreparedImage
from .prompts import EDITS, STYLES, apply_edit

METHOD_HELP = f"falip, none, one of {', '.join(EDITS)}, or falip+<edit>"


@dataclass(frozen=True)
class Method:
    name: str
    edit: Optional[str]  # an entry of EDITS, or None for the unedited image
    foveal: bool  # the FALIP bias is applied

    @property
    def text_suffix(self) -> str:
        return " is in red color." if self.edit == "shade" else ""


def parse_method(name: str) -> Method:
    """``"falip+blur"`` → Method(edit="blur", foveal=True); raises ValueError naming the choices."""
    parts = [p.strip() for p in name.lower().split("+") if p.strip()]
    foveal = "falip" in parts
    edits = [p for p in parts if p != "falip"]
    if not parts or parts.count("falip") > 1 or len(edits) > 1 or (edits and edits[0] not in EDITS + ("none",)):
        raise ValueError(f"unknown method {name!r}: use {METHOD_HELP}")
    edit = edits[0] if edits else None
    if edit == "none":
        if foveal:
            raise ValueError(f"unknown method {name!r}: use {METHOD_HELP}")
        edit = None
    return Method(name="+".join(parts), edit=edit, foveal=foveal)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def validated_regions(size: tuple[int, int], boxes=None, masks=None) -> tuple[np.ndarray, Optional[list[np.ndarray]]]:
    """``(boxes (K, 4) xyxy, masks or None)`` checked against an image of ``size = (W, H)``.

    Without boxes, each mask's bounding box stands in (edits draw on boxes); with both, their counts must agree.
    """
    if boxes is None and masks is None:
        raise ValueError("give boxes=..., masks=... or both")
    mask_list = validate_masks(masks, size) if masks is not None else None
    box_arr = validate_boxes(boxes, size) if boxes is not None else np.array([mask_box(m) for m in mask_list])
    if mask_list is not None and len(mask_list) != len(box_arr):
        raise ValueError(f"{len(box_arr)} boxes but {len(mask_list)} masks")
    return box_arr, mask_list


def encode_with_method(
    model,
    image,
    method,
    boxes=None,
    masks: Optional[Sequence[np.ndarray]] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
    batch_size: int = 32,
    edit_style: str = "clean",
) -> torch.Tensor:
    """L2-normalised embeddings ``(K, E)`` of K regions of one image under ``method``.

    Regions are ``boxes (K, 4)`` xyxy pixels, or ``masks`` (K of ``(H, W)``); with both, the
    boxes drive the edits and the masks the bias. An edit without boxes uses each mask's bounding box.
    ``edit_style``: how edits are drawn, ``clean`` or ``reference`` (see :mod:`falip.prompts`).
    With ``unleash`` in the config, ``falip`` amplifies the bias's change at the same input (any
    ``mode``), and a method with an edit goes through :func:`falip.heads.encode_unleashed` (G_h
    from the clean image; head by head, ``mode`` does not apply). ``none`` prompts nothing to unleash.
    """
    method = parse_method(method) if isinstance(method, str) else method
    if edit_style not in STYLES:
        raise ValueError(f"edit_style must be one of {STYLES}, got {edit_style!r}")
    if method.edit is None:
        return encode_with_method_batch(model, [image], method, [boxes], [masks], config=config, mode=mode)[0]
    pil = load_image(image)
    box_arr, mask_list = validated_regions(pil.size, boxes, masks)
    K = len(box_arr)

    if (config or model.config).unleash:  # Eq. 6 for an edit prompt: G_h from the clean image's pass
        from .heads import encode_unleashed

        return encode_unleashed(model, pil, method, boxes=box_arr, masks=mask_list, config=config, edit_style=edit_style)
    edited = [
        apply_edit(pil, method.edit, box_arr[k], None if mask_list is None else mask_list[k], style=edit_style) for k in range(K)
    ]
    if not method.foveal:
        return model.encode_image([e.image for e in edited], batch_size=batch_size)
    out = []
    for e in edited:
        if mask_list is not None and e.mask is not None and e.mask.any():
            out.append(model.encode_regions(e.image, masks=[e.mask], config=config, mode=mode))
        else:
            out.append(model.encode_regions(e.image, [e.box], config=config, mode=mode))
    return torch.cat(out)


def encode_with_method_batch(
    model,
    images: Sequence,
    method,
    boxes_per_image: Optional[Sequence] = None,
    masks_per_image: Optional[Sequence] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
    batch_size: int = 32,
    edit_style: str = "clean",
) -> list[torch.Tensor]:
    """:func:`encode_with_method` of N images: a list of N L2-normalised ``(K_i, E)`` tensors.

    images: paths, PIL images, arrays, or :class:`falip.model.PreparedImage` (for ``falip`` and ``none``:
    methods without an edit, which run as one batched call over all the images —
    :meth:`FalipModel.encode_regions_batch` or one plain pass). boxes_per_image / masks_per_image: one
    entry per image (``None`` entries allowed where the other list gives the image's regions).
    Methods with an edit encode image by image (each already batches its K edited images).
    """
    method = parse_method(method) if isinstance(method, str) else method
    n = len(images)
    boxes_per_image = list(boxes_per_image) if boxes_per_image is not None else [None] * n
    masks_per_image = list(masks_per_image) if masks_per_image is not None else [None] * n
    if len(boxes_per_image) != n or len(masks_per_image) != n:
        raise ValueError(f"{n} images but {len(boxes_per_image)} box lists and {len(masks_per_image)} mask lists")
    if n == 0:
        return []
    if method.edit is not None:
        return [
            encode_with_method(model, im, method, b, m, config=config, mode=mode, batch_size=batch_size, edit_style=edit_style)
            for im, b, m in zip(images, boxes_per_image, masks_per_image)
        ]
    images = [im if isinstance(im, PreparedImage) else load_image(im) for im in images]
    sizes = [im.transform.image_size if isinstance(im, PreparedImage) else im.size for im in images]
    regions = [validated_regions(size, b, m) for size, b, m in zip(sizes, boxes_per_image, masks_per_image)]
    if not method.foveal:
        plain = model.encode_image(images, batch_size=batch_size)  # (N, E)
        return [plain[i : i + 1].expand(len(r[0]), -1).clone() for i, r in enumerate(regions)]
    out: list[Optional[torch.Tensor]] = [None] * n
    for by_mask in (False, True):  # the images whose bias comes from boxes, then those with masks
        chosen = [i for i, (_, masks) in enumerate(regions) if (masks is not None) == by_mask]
        if not chosen:
            continue
        picked = [regions[i][1] if by_mask else regions[i][0] for i in chosen]
        kind = dict(masks_per_image=picked) if by_mask else dict(boxes_per_image=picked)
        encoded = model.encode_regions_batch([images[i] for i in chosen], config=config, mode=mode, **kind)
        for i, e in zip(chosen, encoded):
            out[i] = e
    return out  # type: ignore[return-value]


@torch.no_grad()
def score_with_method(
    model,
    image,
    texts: Sequence[str],
    method="falip",
    boxes=None,
    masks: Optional[Sequence[np.ndarray]] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
) -> torch.Tensor:
    """The model's own logits ``(K, T)`` (``runtime.logits``: ``logit_scale · cos`` for CLIP, plus ``logit_bias``
    for SigLIP) between K regions encoded with ``method`` and T texts.

    The texts are used as given (no prompt template); an edit with a text suffix (``shade``) appends it.
    For ``method="falip"`` this equals :meth:`FalipModel.score_regions`. ``falip score`` and the
    ``falip serve`` API both call it.
    """
    method = parse_method(method) if isinstance(method, str) else method
    texts = [texts] if isinstance(texts, str) else list(texts)
    text = model.encode_text([t + method.text_suffix for t in texts] if method.text_suffix else texts)
    regions = encode_with_method(model, image, method, boxes=boxes, masks=masks, config=config, mode=mode)
    return model.runtime.logits(regions, text)
