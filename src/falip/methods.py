"""Region-encoding methods shared by every task: FALIP, image edits, and their combinations.

A method name is one of

- ``falip``: the foveal bias on the unedited image;
- ``none``: the full, unedited image for every region (the no-prompt baseline);
- an edit of :data:`falip.prompts.EDITS` (``crop``, ``blur``, ``circle`` …): one edited image per region;
- ``falip+<edit>`` (or ``<edit>+falip``): the edited image *and* the bias on the region's place in it.

Unleashing (the paper's Eq. 6) is a field of the bias config, :class:`falip.bias.Unleash`. In an
unleashed block the [CLS] attention output becomes ``Σ_h [G'_h + λ_h (G'_h − G_h)] + b_O`` with
``G'_h`` head h's term with the prompt and ``G_h`` without it (:mod:`falip.trace`). For the FALIP bias
alone, ``G_h`` is the term at the same block input without the bias — equal to amplifying the attention
probabilities, ``P + λ(P − P0)``, which every encoding path and :func:`falip.trace.trace` do. For prompts
with an image edit, :func:`encode_unleashed` takes ``G_h`` from the clean image's own pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .bias import FovealConfig, Unleash, full_attention_mask
from .geometry import validate_boxes, validate_masks
from .images import load_image
from .model import PreparedImage
from .prompts import EDITS, STYLES, apply_edit
from .trace import require_cls, trace

METHOD_HELP = f"falip, none, one of {', '.join(EDITS)}, or falip+<edit>"
PROMPT_HELP = f"falip, one of {', '.join(EDITS)}, or falip+<edit>"  # what prompts a region: every method but none


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
    boxes=None,
    *,
    method: Union[str, Method] = "falip",
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
    ``mode``), and a method with an edit goes through :func:`encode_unleashed` (G_h
    from the clean image; head by head, ``mode`` does not apply). ``none`` prompts nothing to unleash.
    """
    method = parse_method(method) if isinstance(method, str) else method
    if edit_style not in STYLES:
        raise ValueError(f"edit_style must be one of {STYLES}, got {edit_style!r}")
    if method.edit is None:
        return encode_with_method_batch(
            model, [image], [boxes], method=method, masks_per_image=[masks], config=config, mode=mode
        )[0]
    pil = load_image(image)
    box_arr, mask_list = validated_regions(pil.size, boxes, masks)
    K = len(box_arr)

    if model.resolve_config(config).unleash:  # Eq. 6 for an edit prompt: G_h from the clean image's pass
        return encode_unleashed(model, pil, box_arr, method=method, masks=mask_list, config=config, edit_style=edit_style)
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
    boxes_per_image: Optional[Sequence] = None,
    *,
    method: Union[str, Method] = "falip",
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
            encode_with_method(
                model, im, b, method=method, masks=m, config=config, mode=mode, batch_size=batch_size, edit_style=edit_style
            )
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


def prompted_input(
    model,
    image: Image.Image,
    box=None,
    *,
    method: Method,
    mask: Optional[np.ndarray] = None,
    config=None,
    edit_style: str = "clean",
):
    """``(pixels (1, 3, S, S), bias (1, L) or None)`` of ``image`` prompted by ``method`` for one region.

    The region is a ``box`` (xyxy pixels) or a boolean ``mask (H, W)`` (edits use its bounding box).
    """
    if box is None and mask is None:
        raise ValueError("give the region as box=... or mask=...")
    masks = validate_masks([mask], image.size) if mask is not None else None
    if box is not None:
        box = tuple(validate_boxes(box, image.size)[0])
    else:
        box = mask_box(masks[0])
    region_mask = None if masks is None else masks[0]
    if method.edit is not None:
        edited = apply_edit(image, method.edit, box, region_mask, style=edit_style)
        image, box, region_mask = edited.image, edited.box, edited.mask
    pixels, transform = model.preprocess_image(image)
    if not method.foveal:
        return pixels, None
    if region_mask is not None and region_mask.any():
        return pixels, model.region_biases(transform, masks=[region_mask], config=config)
    return pixels, model.region_biases(transform, boxes=[box], config=config)


REFERENCES = ("clean", "same-input")


def _unleashed_trunk(runtime, mask, layers, gains: dict, clean: Optional[torch.Tensor]):
    """The block stack of one prompted pass (bias ``mask`` in ``layers``), unleashed in the blocks of ``gains``.

    clean: the clean pass's [CLS] terms ``(layers, H, D)``, or None to take G_h at the same input without the bias.
    """

    def trunk(x: torch.Tensor) -> torch.Tensor:
        for i in range(runtime.num_layers):
            m = mask if mask is not None and i in layers else None
            if i not in gains:
                x = runtime.block_heads(i, x, x, m).out
                continue
            r = runtime.block_heads(i, x, x, m, keep_terms=True)
            prompted = r.terms[:, 0]  # (1, H, D): G'_h
            plain = clean[i][None] if clean is not None else runtime.block_heads(i, x, x, None, keep_terms=True).terms[:, 0]
            shift = (gains[i].to(prompted).view(1, -1, 1) * (prompted - plain.to(prompted))).sum(1)  # Σ_h λ_h (G'_h − G_h)
            attended = r.terms.sum(2) + r.out_bias  # (1, L, D)
            attended = torch.cat([attended[:, :1] + shift[:, None], attended[:, 1:]], dim=1)
            x = runtime.block_tail(i, x, attended)
        return x

    return trunk


@torch.no_grad()
def encode_unleashed(
    model,
    image,
    boxes=None,
    *,
    method: Union[str, Method],
    masks: Optional[Sequence[np.ndarray]] = None,
    config: Optional[FovealConfig] = None,
    unleash: Optional[Sequence[Unleash]] = None,
    reference: str = "clean",
    edit_style: str = "clean",
) -> torch.Tensor:
    """L2-normalised embeddings ``(K, E)`` of K regions under ``method``, unleashed as the paper's Eq. 6.

    In each unleashed block ℓ of the prompted pass, the [CLS] attention output is replaced by
    ``Σ_h [G'_h + λ_h (G'_h − G_h)] + b_O``: ``G'_h`` is head h's [CLS] term in the prompted pass
    (the edited image, with the bias for ``falip`` methods), ``G_h`` its term without the prompt —
    ``reference="clean"``: in the clean image's own pass (no edit, no bias; the only choice for an
    edit); ``"same-input"``: at the prompted pass's block input without the bias (bias-only
    methods; equal to the attention-space unleashing of :meth:`FalipModel.encode_regions`).
    Patch tokens are not changed; the change propagates to later blocks. Heads not named keep λ = 0.
    unleash: the entries (default: ``config.unleash``, default the model's); any block may be
    unleashed. Runs head by head (numerically the ``naive`` mode). ``edit_style``: as :func:`falip.prompts.apply_edit`'s ``style``.
    """
    method = parse_method(method) if isinstance(method, str) else method
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "same-input" and method.edit is not None:
        raise ValueError(f"reference 'same-input' needs a bias-only method; {method.name!r} edits the image: use 'clean'")
    require_cls(model)
    config = model.resolve_config(config)
    entries = unleash if unleash is not None else config.unleash
    if not entries:
        raise ValueError("nothing to unleash: give Unleash entries (or a config with unleash=...)")
    runtime = model.runtime
    gains = FovealConfig(unleash=tuple(entries)).unleash_gains(runtime.num_layers, runtime.num_heads, biased_only=False)
    pil = load_image(image)
    box_arr, mask_list = validated_regions(pil.size, boxes, masks)
    clean = trace(model, model.preprocess_image(pil)[0]).cls_terms[0] if reference == "clean" else None  # (layers, H, D)
    plan = model.plan(config) if method.foveal else None
    layers = plan.layers if plan is not None else ()
    out = []
    for k, box in enumerate(box_arr):
        region_mask = None if mask_list is None else mask_list[k]
        pixels, bias = prompted_input(model, pil, box, method=method, mask=region_mask, config=config, edit_style=edit_style)
        mask = None
        if bias is not None:
            mask = full_attention_mask(bias.to(runtime.device, torch.float32), plan.rows, runtime.num_heads, plan.head_scales)

        trunk = _unleashed_trunk(runtime, mask, layers, gains, clean)
        out.append(runtime.run(pixels, trunk).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def score_with_method(
    model,
    image,
    boxes,
    texts: Union[str, Sequence[str]],
    *,
    method: Union[str, Method] = "falip",
    masks: Optional[Sequence[np.ndarray]] = None,
    config: Optional[FovealConfig] = None,
    mode: str = "exact",
) -> torch.Tensor:
    """The model's own logits ``(K, T)`` (``runtime.logits``: ``logit_scale · cos`` for CLIP, plus ``logit_bias``
    for SigLIP) between K regions encoded with ``method`` and T texts.

    boxes: ``(K, 4)`` xyxy pixels, or None with ``masks`` (K of ``(H, W)``) as the regions.
    The texts are used as given (no prompt template); an edit with a text suffix (``shade``) appends it.
    For ``method="falip"`` this equals :meth:`FalipModel.score_regions`. ``falip score`` and the
    ``falip serve`` API both call it.
    """
    method = parse_method(method) if isinstance(method, str) else method
    texts = [texts] if isinstance(texts, str) else list(texts)
    text = model.encode_text([t + method.text_suffix for t in texts] if method.text_suffix else texts)
    regions = encode_with_method(model, image, boxes, method=method, masks=masks, config=config, mode=mode)
    return model.runtime.logits(regions, text)
