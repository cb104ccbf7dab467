"""Attention-head analysis: how much each head's [CLS] term changes under a prompt, and which heads respond.

:func:`prompt_response` compares the per-head terms (:func:`falip.trace.trace`) of a prompted input
(an image edit of :data:`falip.prompts.EDITS`, the FALIP bias, or both) with those of the original
image; :func:`head_response` averages that over a regions file; :func:`rank_heads` orders the heads.

Unleashing (the paper's Eq. 6) is a field of the bias config, :class:`falip.bias.Unleash`: every
encoding path applies it, and :func:`falip.methods.encode_unleashed` for prompts with an image edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .bias import FovealConfig
from .errors import FalipError, ImageLoadError
from .images import RotationNotice, load_image
from .methods import Method, parse_method, prompted_input
from .notices import warn
from .trace import trace

STATISTICS = ("l2", "relative", "cosine")


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


def prompt_response(
    model,
    image,
    box=None,
    *,
    method: Union[str, Method],
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
    pixels, bias = prompted_input(model, image, box, method=method, mask=mask, config=config)
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
            warn(f"sample {sample.id}: {exc}; skipped")
            skipped.append((sample.id, "unreadable image", str(exc)))
            if recorder is not None:
                recorder.skip(sample.id, "unreadable image", str(exc))
            continue
        try:
            mask = sample.load_mask() if sample.mask is not None else None
            if cache[0] != sample.image:
                cache = (sample.image, trace(model, model.preprocess_image(image)[0]).cls_terms[0])
            delta = prompt_response(
                model, image, sample.box, method=method, mask=mask, statistic=statistic, config=config, plain=cache[1]
            )
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
