"""Attention-head analysis: per-head decomposition of the [CLS] token, head response, unleashing.

In block ℓ the [CLS] token's attention output is a sum over heads plus the output bias::

    attn_ℓ(x)[CLS] = Σ_h  W_O[:, h] · (Σ_j P_ℓh[CLS, j] · v_ℓh[j])  +  b_O

Each summand is head h's *term* ``(D,)``. :func:`trace` records every block's terms (and attention
probabilities) for an image with or without a FALIP bias; :func:`prompt_response` compares the
terms of a prompted input (an image edit of :data:`falip.prompts.EDITS`, the FALIP bias, or both)
with those of the original image; :func:`head_response` averages that over a regions file.

Unleashing (the paper's Eq. 6) is a field of the bias config, :class:`falip.bias.Unleash`. In an
unleashed block the [CLS] attention output becomes ``Σ_h [G'_h + λ_h (G'_h − G_h)] + b_O`` with
``G'_h`` head h's term with the prompt and ``G_h`` without it. For the FALIP bias alone, ``G_h`` is
the term at the same block input without the bias — equal to amplifying the attention
probabilities, ``P + λ(P − P0)``, which every encoding path and :func:`trace` do. For prompts with
an image edit, :func:`encode_unleashed` takes ``G_h`` from the clean image's own pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .bias import FovealConfig, Unleash, full_attention_mask
from .errors import FalipError, ImageLoadError, UnsupportedModelError
from .geometry import validate_boxes, validate_masks
from .images import RotationNotice, load_image
from .methods import Method, mask_box, parse_method, validated_regions
from .prompts import apply_edit

STATISTICS = ("l2", "relative", "cosine")


@dataclass(frozen=True)
class Trace:
    """One pass of the ViT over B sequences (B = number of regions, or 1 without a bias), block by block.

    embedding: ``(B, E)`` image embeddings (not normalised) — equal to :meth:`FalipModel.encode_regions`'s.
    cls_terms: ``(B, layers, H, D)`` each head's term in the [CLS] attention output.
    out_bias: ``(layers, D)`` output-projection biases: ``cls_terms.sum(2) + out_bias`` is the [CLS] attention output.
    cls_probs: ``(B, layers, H, L)`` the [CLS] query's attention probabilities ([CLS] key first, then patches).
    probs: ``(B, layers, H, L, L)`` every query's probabilities, or None unless ``full_probs=True``.
    """

    embedding: torch.Tensor
    cls_terms: torch.Tensor
    out_bias: torch.Tensor
    cls_probs: torch.Tensor
    probs: Optional[torch.Tensor]


def _require_cls(model) -> None:
    """UnsupportedModelError unless ``model`` pools its [CLS] token: head analysis reads the [CLS] query's heads."""
    if model.runtime.pool != "cls":
        raise UnsupportedModelError(
            f"head analysis and unleashing read the [CLS] query's per-head terms; {model.name or 'this model'} pools with "
            f"an attention probe ({model.runtime.family}) and has no [CLS] query, so they are not available for it"
        )


@torch.no_grad()
def trace(
    model,
    pixels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    config: Optional[FovealConfig] = None,
    full_probs: bool = False,
) -> Trace:
    """Run ``pixels (1, 3, S, S)`` through the model head by head, under K biases ``(K, L)`` or none.

    The bias goes where ``config`` (default: the model's) puts it — layers, rows, head scales,
    unleashing — exactly as in :meth:`FalipModel.encode_regions`.
    """
    runtime = model.runtime
    _require_cls(model)
    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise ValueError(f"trace takes one image as pixels (1, 3, S, S), got shape {tuple(pixels.shape)}")
    plan = model.plan(config)
    K = 1 if bias is None else bias.shape[0]
    mask = None
    if bias is not None:
        mask = full_attention_mask(bias.to(runtime.device, torch.float32), plan.rows, runtime.num_heads, plan.head_scales)
    terms, out_bias, cls_probs, probs = [], [], [], []

    def trunk(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(K, -1, -1)
        for i in range(runtime.num_layers):
            m = mask if mask is not None and i in plan.layers else None
            gain = plan.unleash.get(i) if plan.unleash and m is not None else None
            r = runtime.block_heads(i, x, x, m, gain=gain, keep_terms=True)
            terms.append(r.terms[:, 0].float())
            out_bias.append(r.out_bias.float())
            cls_probs.append(r.probs[:, :, 0].float())
            if full_probs:
                probs.append(r.probs.float())
            x = r.out
        return x

    embedding = runtime.run(pixels, trunk).float()
    return Trace(
        embedding=embedding,
        cls_terms=torch.stack(terms, dim=1),
        out_bias=torch.stack(out_bias),
        cls_probs=torch.stack(cls_probs, dim=1),
        probs=torch.stack(probs, dim=1) if full_probs else None,
    )


def head_delta(prompted: torch.Tensor, plain: torch.Tensor, statistic: str = "l2") -> torch.Tensor:
    """Per-head change ``(..., layers, H)`` between terms ``(..., layers, H, D)``.

    ``l2``: ‖t_prompted − t_plain‖₂; ``relative``: that divided by ‖t_plain‖₂;
    ``cosine``: 1 − cos(t_prompted, t_plain).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(prompted, plain, dim=-1, eps=1e-12)
    diff = (prompted - plain).norm(dim=-1)
    if statistic == "relative":
        diff = diff / plain.norm(dim=-1).clamp_min(1e-12)
    return diff


def prompted_input(
    model, image: Image.Image, method: Method, box=None, mask: Optional[np.ndarray] = None, config=None, edit_style: str = "clean"
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


def prompt_response(
    model,
    image,
    method: Union[str, Method],
    box=None,
    mask: Optional[np.ndarray] = None,
    statistic: str = "l2",
    config: Optional[FovealConfig] = None,
    plain: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Δ ``(layers, H)``: how much each head's [CLS] term changes when ``image`` is prompted for one region.

    method: ``falip``, an edit (``circle``, ``blur``, ``crop`` …) or ``falip+<edit>``.
    plain: the unprompted image's terms ``(layers, H, D)`` if already computed (see :func:`trace`).
    """
    method = parse_method(method) if isinstance(method, str) else method
    if method.edit is None and not method.foveal:
        raise ValueError("method 'none' prompts nothing: use falip, an edit, or falip+<edit>")
    image = load_image(image)
    if plain is None:
        plain = trace(model, model.preprocess_image(image)[0]).cls_terms[0]
    pixels, bias = prompted_input(model, image, method, box, mask, config)
    prompted = trace(model, pixels, bias, config).cls_terms[0]
    return head_delta(prompted, plain, statistic)


def rank_heads(response: Union[np.ndarray, torch.Tensor], top: Optional[int] = None) -> list[dict]:
    """Heads sorted by response ``(layers, H)``, largest first: ``[{"layer", "head", "response"}, ...]``."""
    r = np.asarray(response, dtype=np.float64)
    order = np.argsort(-r, axis=None, kind="stable")[: top if top is not None else r.size]
    return [{"layer": int(i // r.shape[1]), "head": int(i % r.shape[1]), "response": float(r.flat[i])} for i in order]


@dataclass(frozen=True)
class HeadResponse:
    """Δ averaged over regions. response / std: ``(layers, H)``; n: regions used; skipped: ``(id, reason, detail)``."""

    response: np.ndarray
    std: np.ndarray
    n: int
    statistic: str
    prompt: str
    skipped: list


def head_response(
    model,
    samples: Sequence,
    prompt: str,
    statistic: str = "l2",
    config: Optional[FovealConfig] = None,
    recorder=None,
    progress: bool = True,
) -> HeadResponse:
    """Average :func:`prompt_response` over region samples (:class:`falip.datasets.generic.RegionSample`).

    Images that cannot be read are skipped with a warning (and recorded as skipped); bad regions
    raise :class:`InvalidRegionError` naming the sample. With a :class:`falip.results.RunRecorder`,
    each sample's Δ is written to its predictions file, and samples already there are not recomputed.
    """
    from tqdm import tqdm

    method = parse_method(prompt)
    if method.edit is None and not method.foveal:
        raise ValueError("prompt 'none' prompts nothing: use falip, an edit, or falip+<edit>")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if not samples:
        raise FalipError("no region samples to analyse")
    deltas: list[np.ndarray] = []
    skipped: list[tuple[str, str, str]] = []
    cache: tuple[Optional[Path], Optional[torch.Tensor]] = (None, None)
    rotated = RotationNotice()  # dataset images: stored orientation, as the annotations assume
    for sample in tqdm(samples, desc=f"heads ({prompt})", unit="region", disable=not progress):
        done = recorder.done.get(sample.id) if recorder is not None else None
        if done is not None:
            if "skipped" in done:
                skipped.append((sample.id, done["skipped"], done.get("detail", "")))
            else:
                deltas.append(np.asarray(done["delta"], dtype=np.float64))
            continue
        try:
            image = load_image(sample.image, exif=False, on_rotation=rotated)
        except ImageLoadError as exc:
            warnings.warn(f"sample {sample.id}: {exc}; skipped", stacklevel=2)
            skipped.append((sample.id, "unreadable image", str(exc)))
            if recorder is not None:
                recorder.skip(sample.id, "unreadable image", str(exc))
            continue
        try:
            mask = sample.load_mask() if sample.mask is not None else None
            if cache[0] != sample.image:
                cache = (sample.image, trace(model, model.preprocess_image(image)[0]).cls_terms[0])
            delta = prompt_response(model, image, method, sample.box, mask, statistic, config, plain=cache[1])
        except FalipError as exc:
            raise type(exc)(f"sample {sample.id} ({sample.image}): {exc}") from exc
        deltas.append(delta.numpy().astype(np.float64))
        if recorder is not None:
            recorder.add(sample.id, image=str(sample.image), delta=deltas[-1].tolist())
    if not deltas:
        raise FalipError(f"no region could be analysed ({len(skipped)} skipped, e.g. {skipped[0][2]})")
    stack = np.stack(deltas)
    return HeadResponse(
        response=stack.mean(axis=0),
        std=stack.std(axis=0),
        n=len(deltas),
        statistic=statistic,
        prompt=method.name,
        skipped=skipped,
    )


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
    method: Union[str, Method],
    boxes=None,
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
    _require_cls(model)
    config = config or model.config
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
        pixels, bias = prompted_input(model, pil, method, box, None if mask_list is None else mask_list[k], config, edit_style)
        mask = None
        if bias is not None:
            mask = full_attention_mask(bias.to(runtime.device, torch.float32), plan.rows, runtime.num_heads, plan.head_scales)

        trunk = _unleashed_trunk(runtime, mask, layers, gains, clean)
        out.append(runtime.run(pixels, trunk).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
