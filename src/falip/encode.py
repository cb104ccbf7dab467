"""Execution strategies: the same biased ViT, computed three ways (docs/method.md §9).

- ``naive``: one full forward pass per region, batch size 1, full ``L×L`` masks — the reference
  code's execution pattern, kept as the baseline that the other modes are tested against.
- ``exact``: blocks before the first biased block run once per image; in the first biased block
  the patch tokens do not depend on the bias (rows=cls), so they are computed once per image and
  an image's [CLS] rows are evaluated as queries of that image's one sequence; the remaining
  blocks run batched over regions (of any images), in chunks of ``chunk_size``. With rows=cls no
  ``(k·H, L, L)`` mask is built: the later biased blocks take the [CLS] bias row alone
  (:meth:`block_cls_biased`, memory O(K·H·L)), unleashed ones run [CLS] through ``block_heads``
  and the unmasked patch queries through ``block_query``. The last block runs at the [CLS] query
  only, the one token pooled. Equal to ``naive`` up to float rounding.
- ``approx``: only [CLS] goes through the biased blocks, attending to the *unbiased* patch tokens
  of one plain pass. From the first biased block on, each image's sequence carries its tokens
  followed by one [CLS] copy per region (:func:`falip.bias.approx_sequence_mask`): the image
  tokens never see the copies, so they are the plain pass, and each copy sees its own key and the
  image's tokens after [CLS], so the copies stay independent. The plain pass and all its regions'
  [CLS] rows share every matrix product. Cost ≈ one image pass for any number of regions. Not
  FALIP exactly: its deviation is measured in ``benchmarks/`` and reported in the README.

Every mode takes N images and K regions with a region→image index (:func:`encode_biased`): the
shared prefix runs batched over the images, the biased suffix over the regions of all of them.

Every mode honours ``BiasPlan.unleash``: biased blocks named there run through the runtime's
``block_heads`` with per-head gains (the prompt-induced attention change amplified); the others
run exactly as without it.

Tokens: for a ``cls``-pooled runtime token 0 is [CLS]; every other prefix token (registers) rides
with the patch tokens — "patch tokens" below means all tokens after [CLS]. Nothing here assumes a
number of prefix tokens.

Attention-pooled runtimes (``pool == "attention_pool"``, SigLIP's MAP probe) have no [CLS] query:
the bias goes on the probe's attention logits (``BiasPlan.probe``, our extension of FALIP), and on
the blocks in ``layers`` with rows ``all``/``diagonal`` if any. With the probe alone biased the
blocks do not depend on the region, so ``exact`` (and ``approx``, which is then the same
computation) runs the image through the blocks once and evaluates the probe K times — the fast
path; ``naive`` runs one full pass per region. With blocks biased too, ``exact`` runs the blocks
before the first biased one once and the rest batched over regions (every token is pooled, so
there is no query-only shortcut), and ``approx`` is not defined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from .bias import approx_sequence_mask, full_attention_mask, query_rows_mask
from .runtimes.base import VisionRuntime

MODES = ("naive", "exact", "approx")


@dataclass(frozen=True)
class BiasPlan:
    """Where the bias goes: sorted block indices, which rows, per-head scales ``(H,)`` or None,
    the unleashed blocks ``{block: per-head gain λ (H,)}`` or None, and ``probe``: the bias also goes
    on the attention probe's logits (attention-pooled runtimes only)."""

    layers: tuple[int, ...]
    rows: str
    head_scales: Optional[torch.Tensor] = None
    unleash: Optional[Mapping[int, torch.Tensor]] = None
    probe: bool = False


def encode_biased(
    runtime: VisionRuntime,
    pixels: torch.Tensor,
    bias: torch.Tensor,
    plan: BiasPlan,
    mode: str = "exact",
    chunk_size: Optional[int] = None,
    image_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Embeddings ``(K, E)`` (not normalised) of K regions of N images ``pixels (N, 3, S, S)``.

    ``bias (K, L)``: region k's bias vector, ``L = runtime.num_prefix + gh·gw`` (:func:`falip.bias.region_biases`); ``image_index (K,)``: the image region k belongs to
    (default: all regions of a single image, N = 1). The unbiased prefix blocks run once per image,
    batched over the N images; the biased suffix runs batched over regions of any images, in
    chunks of ``chunk_size`` regions (default: :func:`default_chunk_size`; ``approx`` on a [CLS]
    model: as many regions as keep one pass's mask within budget, see :func:`_approx_chunks`). Each
    region's embedding equals the one-image call up to float rounding.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    N, K = pixels.shape[0], bias.shape[0]
    if image_index is None:
        if N != 1:
            raise ValueError(f"encode_biased got {N} images: pass image_index (K,) saying which image each region belongs to")
        image_index = torch.zeros(K, dtype=torch.long)
    image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
    if image_index.shape != (K,) or (K and (int(image_index.min()) < 0 or int(image_index.max()) >= N)):
        raise ValueError(
            f"image_index must be ({K},) indices of the {N} images, got {tuple(image_index.shape)} {image_index.tolist()}"
        )
    if K == 0:
        raise ValueError("encode_biased needs at least one region")
    pooled = runtime.pool == "attention_pool"
    if plan.probe and not pooled:
        raise ValueError(f"BiasPlan.probe is for attention-pooled models; this {runtime.family} model pools {runtime.pool!r}")
    if chunk_size is None and not (mode == "approx" and not pooled):
        lean = (not plan.layers) if pooled else plan.rows == "cls"
        chunk_size = default_chunk_size(runtime, lean=mode == "exact" and lean)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    L = runtime.num_prefix + runtime.grid[0] * runtime.grid[1]
    if bias.ndim != 2 or bias.shape[1] != L:
        raise ValueError(
            f"biases must be (K, num_prefix + gh·gw) = (K, {L}) for this model, got {tuple(bias.shape)} "
            "(build them with the model's region_biases)"
        )
    bias = bias.to(runtime.device, torch.float32)
    if not plan.layers and not plan.probe:
        return runtime.run(pixels)[image_index.to(runtime.device)]
    if pooled:
        return _encode_attention_pooled(runtime, pixels, bias, image_index, plan, mode, chunk_size)
    if mode == "naive":
        return torch.cat(
            [
                runtime.run(pixels[n : n + 1], _naive_trunk(runtime, bias[k : k + 1], plan))
                for k, n in enumerate(image_index.tolist())
            ]
        )
    if mode == "approx":
        if plan.rows != "cls":
            raise ValueError(
                f"mode='approx' only exists for rows='cls' (the [CLS] query alone is biased), got rows={plan.rows!r}"
            )
        return runtime.run(pixels, _approx_trunk(runtime, bias, image_index, plan, chunk_size))
    return runtime.run(pixels, _exact_trunk(runtime, bias, image_index, plan, chunk_size))


MASK_BUDGET_BYTES = 256 * 2**20
LEAN_CHUNK_SIZE = 8


def default_chunk_size(runtime: VisionRuntime, lean: bool = False) -> int:
    """Regions per chunk.

    ``lean`` (exact mode, rows=cls, nothing unleashed: no full masks): 8 — activations are then the
    whole peak memory, and on CPU (ViT-B/16, K = 50) 8 regions per pass run as fast as 32 at under a
    third of the peak memory (98 vs 347 MB). Otherwise: at most 32, and few enough that one chunk's
    ``(k·H, L, L)`` fp32 mask stays under 256 MiB (32 for ViT-B/16; 12 for ViT-L/14@336, whose mask
    is 21 MB per region).
    """
    if lean:
        return LEAN_CHUNK_SIZE
    L = runtime.num_prefix + runtime.grid[0] * runtime.grid[1]
    return max(1, min(32, MASK_BUDGET_BYTES // (4 * runtime.num_heads * L * L)))


def _block(
    runtime: VisionRuntime,
    plan: BiasPlan,
    i: int,
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    base_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block ``i`` on tokens ``(B, L, D)``; a biased block named in ``plan.unleash`` is unleashed against
    ``base_mask`` (the same tokens without the bias; None = unmasked)."""
    gain = plan.unleash.get(i) if plan.unleash and i in plan.layers and mask is not None else None
    if gain is None:
        return runtime.block(i, x, mask)
    return runtime.block_heads(i, x, x, mask, base_mask=base_mask, gain=gain).out


def _block_query(
    runtime: VisionRuntime,
    plan: BiasPlan,
    i: int,
    query: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor,
    base_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:meth:`block_query`, unleashed against ``base_mask`` (the same queries without the bias) when planned."""
    gain = plan.unleash.get(i) if plan.unleash and i in plan.layers else None
    if gain is None:
        return runtime.block_query(i, query, context, mask)
    return runtime.block_heads(i, query, context, mask, base_mask=base_mask, gain=gain).out


def _naive_trunk(runtime: VisionRuntime, bias: torch.Tensor, plan: BiasPlan):
    mask = full_attention_mask(bias, plan.rows, runtime.num_heads, plan.head_scales)

    def trunk(x: torch.Tensor) -> torch.Tensor:
        for i in range(runtime.num_layers):
            x = _block(runtime, plan, i, x, mask if i in plan.layers else None)
        return x

    return trunk


def _chunks(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _by_image(image_index: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Regions of a chunk as query slots of their images: ``(images (m,), row (k,), slot (k,))``.

    ``images`` are the distinct images in order of appearance, region k is query ``slot[k]`` of
    image ``images[row[k]]``.
    """
    images: list[int] = []
    row: list[int] = []
    slot: list[int] = []
    count: dict[int, int] = {}
    for n in image_index.tolist():
        if n not in count:
            count[n] = 0
            images.append(n)
        row.append(images.index(n))
        slot.append(count[n])
        count[n] += 1
    return images, row, slot


def _per_image_rows(bias: torch.Tensor, row: list[int], slot: list[int], m: int) -> torch.Tensor:
    """Biases ``(k, L)`` laid out as ``(m, Q, L)``: image j's query q (zeros where an image has fewer regions)."""
    out = bias.new_zeros(m, max(slot) + 1, bias.shape[1])
    out[row, slot] = bias
    return out


def _cls_row_mask(bias: torch.Tensor, num_heads: int, head_scales: Optional[torch.Tensor]) -> torch.Tensor:
    """The [CLS] query's additive mask ``(K, H or 1, 1, L)`` from biases ``(K, L)`` (rows=cls)."""
    mask = bias[:, None, None, :]
    if head_scales is not None:
        mask = mask * head_scales.to(mask)[None, :, None, None]
    return mask


def _exact_trunk(runtime: VisionRuntime, bias: torch.Tensor, image_index: torch.Tensor, plan: BiasPlan, chunk_size: int):
    first, last, H = plan.layers[0], runtime.num_layers - 1, runtime.num_heads
    lean = plan.rows == "cls"

    def trunk(x: torch.Tensor) -> torch.Tensor:  # x: (N, L, D), one sequence per image
        for i in range(first):
            x = runtime.block(i, x)
        # With rows=cls the first biased block changes only [CLS]'s row: its patch tokens are
        # computed once per image (and not at all when it is the last block), and an image's
        # [CLS] rows as queries of that image's one sequence.
        shared_first = runtime.block(first, x) if lean and first < last else None
        outs = []
        for sl in _chunks(bias.shape[0], chunk_size):
            b, idx = bias[sl], image_index[sl].to(x.device)
            k = b.shape[0]
            full = None  # the (k·H, L, L) mask, built only for rows≠cls
            if lean:
                cls_rows = _cls_row_mask(b, H, plan.head_scales)
                row0 = cls_rows.expand(k, H, 1, -1).reshape(k * H, 1, -1)
                images, row, slot = _by_image(image_index[sl])
                per_image = _per_image_rows(b, row, slot, len(images))  # (m, Q, L)
                queries = x[images, :1].expand(-1, per_image.shape[1], -1)  # (m, Q, D)
                mask = torch.cat([query_rows_mask(r, H, plan.head_scales) for r in per_image])  # (m·H, Q, L)
                cls = _block_query(runtime, plan, first, queries, x[images], mask)[row, slot][:, None]  # (k, 1, D)
                if first == last:
                    outs.append(cls)
                    continue
                y = torch.cat([cls, shared_first[idx, 1:]], dim=1)
                start = first + 1
            else:
                y, start = x[idx], first
                full = full_attention_mask(b, plan.rows, H, plan.head_scales)
                row0 = full[:, :1]
            for i in range(start, last):
                if i not in plan.layers:
                    y = runtime.block(i, y)
                elif not lean:
                    y = _block(runtime, plan, i, y, full)
                elif plan.unleash and i in plan.unleash:
                    # The patch queries attend unmasked, so unleashing changes the [CLS] query alone.
                    cls = runtime.block_heads(i, y[:, :1], y, row0, gain=plan.unleash[i]).out
                    y = torch.cat([cls, runtime.block_query(i, y[:, 1:], y)], dim=1)
                else:
                    # [CLS] with its bias row, the patch queries unmasked (they still see the biased [CLS]).
                    y = runtime.block_cls_biased(i, y, cls_rows)
            # Only [CLS] leaves the ViT (the runtime pools token 0), so the last block runs at that query alone.
            outs.append(_block_query(runtime, plan, last, y[:, :1], y, row0 if last in plan.layers else None))
        return torch.cat(outs)

    return trunk


def _approx_chunks(image_index: torch.Tensor, L: int, num_heads: int, chunk_size: Optional[int]) -> list[torch.Tensor]:
    """Region positions ``(k,)`` of each ``approx`` pass, grouped by image (regions of one image together).

    ``chunk_size`` regions per pass, or by default as many as keep the pass's fp32 mask
    ``(m·H, L + Q, L + Q)`` (m images, Q = the most regions of one of them) within half of
    ``MASK_BUDGET_BYTES`` — all regions of a batch in one pass, unless there are thousands.
    """
    order = torch.argsort(image_index, stable=True)
    if chunk_size is not None:
        return [order[sl] for sl in _chunks(len(order), chunk_size)]
    chunks, start, counts, most = [], 0, {}, 0
    for pos, n in enumerate(image_index[order].tolist()):
        counts[n] = counts.get(n, 0) + 1
        most = max(most, counts[n])
        if pos > start and len(counts) * num_heads * (L + most) ** 2 * 4 > MASK_BUDGET_BYTES // 2:
            chunks.append(order[start:pos])
            start, counts, most = pos, {n: 1}, 1
    chunks.append(order[start:])
    return chunks


def _approx_trunk(
    runtime: VisionRuntime, bias: torch.Tensor, image_index: torch.Tensor, plan: BiasPlan, chunk_size: Optional[int]
):
    first, last, H = plan.layers[0], runtime.num_layers - 1, runtime.num_heads

    def trunk(x: torch.Tensor) -> torch.Tensor:  # x: (N, L, D), one sequence per image
        for i in range(first):
            x = runtime.block(i, x)
        L = x.shape[1]
        out = x.new_empty(bias.shape[0], 1, x.shape[2])
        for regions in _approx_chunks(image_index, L, H, chunk_size):
            images, row, slot = _by_image(image_index[regions])
            rows = _per_image_rows(bias[regions.to(bias.device)], row, slot, len(images))  # (m, Q, L)
            m, Q = rows.shape[:2]
            biased = approx_sequence_mask(rows, H, plan.head_scales)  # (m·H, L+Q, L+Q)
            plain = approx_sequence_mask(torch.zeros_like(rows), H, None)
            # Each image's tokens, then a [CLS] copy per region: the tokens run the plain pass, the copies the biased rows.
            seq = torch.cat([x[images], x[images, :1].expand(-1, Q, -1)], dim=1)
            for i in range(first, last):
                seq = _block(runtime, plan, i, seq, biased if i in plan.layers else plain, plain)
            # Only [CLS] leaves the ViT, so the last block runs at the copies alone (their mask rows (m·H, Q, L+Q)).
            plain_rows, biased_rows = (
                mask.view(m, H, L + Q, L + Q)[:, :, L:].reshape(m * H, Q, L + Q) for mask in (plain, biased)
            )
            last_mask = biased_rows if last in plan.layers else plain_rows
            cls = _block_query(runtime, plan, last, seq[:, L:], seq, last_mask, plain_rows)
            out[regions.to(out.device)] = cls[row, slot][:, None]
        return out

    return trunk


def _encode_attention_pooled(
    runtime: VisionRuntime,
    pixels: torch.Tensor,
    bias: torch.Tensor,
    image_index: torch.Tensor,
    plan: BiasPlan,
    mode: str,
    chunk_size: int,
) -> torch.Tensor:
    """:func:`encode_biased` for a runtime that pools with an attention probe (see the module docstring)."""
    if plan.layers and plan.rows == "cls":
        raise ValueError(
            "rows='cls' biases the class token's query, but this model pools with an attention probe (what is pooled "
            "is the probe's query, biased already); with layers use rows='all' or rows='diagonal'"
        )
    if plan.layers and mode == "approx":
        raise ValueError(
            "mode='approx' is defined for an attention-pooled model only when the probe alone is biased "
            f"(then it equals exact); this plan also biases blocks {list(plan.layers)}: use exact or naive"
        )

    def probe(b: torch.Tensor) -> Optional[torch.Tensor]:
        return b if plan.probe else None

    if mode == "naive":
        return torch.cat(
            [
                runtime.run(
                    pixels[n : n + 1],
                    _naive_trunk(runtime, bias[k : k + 1], plan) if plan.layers else None,
                    probe(bias[k : k + 1]),
                )
                for k, n in enumerate(image_index.tolist())
            ]
        )
    # Each image's tokens after the unbiased prefix (every block when only the probe is biased, else those before
    # the first biased block), computed once and reused by every chunk of its regions; a chunk's run() recomputes
    # only the cheap stem of the images it touches.
    stop = plan.layers[0] if plan.layers else runtime.num_layers
    prefix: dict[int, torch.Tensor] = {}  # image → (L, D)

    def chunk_trunk(b: torch.Tensor, regions: list[int], images: list[int]):
        def trunk(x: torch.Tensor) -> torch.Tensor:  # x: (len(images), L, D), the stems of this chunk's images
            todo = [j for j, n in enumerate(images) if n not in prefix]
            if todo:
                y = x[todo]
                for i in range(stop):
                    y = runtime.block(i, y)
                prefix.update({images[j]: y[t] for t, j in enumerate(todo)})
            y = torch.stack([prefix[n] for n in regions])
            mask = full_attention_mask(b, plan.rows, runtime.num_heads, plan.head_scales) if plan.layers else None
            for i in range(stop, runtime.num_layers):
                y = _block(runtime, plan, i, y, mask if i in plan.layers else None)
            return y

        return trunk

    out = []
    for sl in _chunks(bias.shape[0], chunk_size):
        regions = image_index[sl].tolist()
        images = sorted(set(regions))
        out.append(runtime.run(pixels[images], chunk_trunk(bias[sl], regions, images), probe(bias[sl])))
    return torch.cat(out)
