"""Execution strategies: the same biased ViT, computed three ways (SPEC §2).

- ``naive``: one full forward pass per region, batch size 1, full ``L×L`` masks — the reference
  code's execution pattern, kept as the baseline that the other modes are tested against.
- ``exact``: blocks before the first biased block run once per image; in the first biased block
  the patch tokens do not depend on the bias (rows=cls), so they are computed once and the K
  [CLS] rows are evaluated as K queries of that one sequence; the remaining blocks run batched
  over regions, in chunks of ``chunk_size``. With rows=cls no ``(k·H, L, L)`` mask is built: the
  later biased blocks take the [CLS] bias row alone (:meth:`block_cls_biased`, memory O(K·H·L)).
  The last block runs at the [CLS] query only, the one token pooled. Equal to ``naive`` up to
  float rounding.
- ``approx``: only [CLS] goes through the biased blocks, attending to the *unbiased* patch tokens
  of one plain pass; the K [CLS] tokens share one sequence and are kept independent by ``-inf``
  on each other's keys. Cost ≈ one image pass for any number of regions. Not FALIP exactly: its
  deviation is measured in ``benchmarks/`` and reported in the README.

Every mode honours ``BiasPlan.unleash``: biased blocks named there run through the runtime's
``block_heads`` with per-head gains (the prompt-induced attention change amplified); the others
run exactly as without it.

Tokens: for a ``cls``-pooled runtime token 0 is [CLS]; every other prefix token (registers) rides
with the patch tokens — "patch tokens" below means all tokens after [CLS]. Nothing here assumes a
number of prefix tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from .bias import full_attention_mask, private_cls_mask, query_rows_mask
from .runtimes.base import VisionRuntime

MODES = ("naive", "exact", "approx")


@dataclass(frozen=True)
class BiasPlan:
    """Where the bias goes: sorted block indices, which rows, per-head scales ``(H,)`` or None,
    and the unleashed blocks ``{block: per-head gain λ (H,)}`` or None."""

    layers: tuple[int, ...]
    rows: str
    head_scales: Optional[torch.Tensor] = None
    unleash: Optional[Mapping[int, torch.Tensor]] = None


def encode_biased(
    runtime: VisionRuntime,
    pixels: torch.Tensor,
    bias: torch.Tensor,
    plan: BiasPlan,
    mode: str = "exact",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Embeddings ``(K, E)`` (not normalised) of one image ``pixels (1, 3, S, S)`` under K biases ``(K, L)``,
    ``L = runtime.num_prefix + gh·gw`` (see :func:`falip.bias.region_biases`).

    ``chunk_size``: regions per batched pass (default: :func:`default_chunk_size`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pixels.shape[0] != 1:
        raise ValueError(f"encode_biased takes one image, got a batch of {pixels.shape[0]}")
    if chunk_size is None:
        chunk_size = default_chunk_size(runtime, lean=mode == "exact" and plan.rows == "cls" and not plan.unleash)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    L = runtime.num_prefix + runtime.grid[0] * runtime.grid[1]
    if bias.ndim != 2 or bias.shape[1] != L:
        raise ValueError(
            f"biases must be (K, num_prefix + gh·gw) = (K, {L}) for this model, got {tuple(bias.shape)} "
            "(build them with the model's region_biases)"
        )
    bias = bias.to(runtime.device, torch.float32)
    if not plan.layers:
        return runtime.run(pixels).expand(bias.shape[0], -1)
    if mode == "naive":
        return torch.cat([runtime.run(pixels, _naive_trunk(runtime, bias[k : k + 1], plan)) for k in range(bias.shape[0])])
    if mode == "approx":
        if plan.rows != "cls":
            raise ValueError(
                f"mode='approx' only exists for rows='cls' (the [CLS] query alone is biased), got rows={plan.rows!r}"
            )
        return runtime.run(pixels, _approx_trunk(runtime, bias, plan, chunk_size))
    return runtime.run(pixels, _exact_trunk(runtime, bias, plan, chunk_size))


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


def _block(runtime: VisionRuntime, plan: BiasPlan, i: int, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Block ``i`` on tokens ``(B, L, D)``; unleashed against the unmasked attention when the plan says so."""
    gain = plan.unleash.get(i) if plan.unleash and mask is not None else None
    if gain is None:
        return runtime.block(i, x, mask)
    return runtime.block_heads(i, x, x, mask, gain=gain).out


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


def _cls_row_mask(bias: torch.Tensor, num_heads: int, head_scales: Optional[torch.Tensor]) -> torch.Tensor:
    """The [CLS] query's additive mask ``(K, H or 1, 1, L)`` from biases ``(K, L)`` (rows=cls)."""
    mask = bias[:, None, None, :]
    if head_scales is not None:
        mask = mask * head_scales.to(mask)[None, :, None, None]
    return mask


def _exact_trunk(runtime: VisionRuntime, bias: torch.Tensor, plan: BiasPlan, chunk_size: int):
    first, last, H = plan.layers[0], runtime.num_layers - 1, runtime.num_heads
    lean = plan.rows == "cls"
    unleashed = set(plan.unleash or ())

    def trunk(x: torch.Tensor) -> torch.Tensor:  # x: (1, L, D), shared by every region
        for i in range(first):
            x = runtime.block(i, x)
        # With rows=cls the first biased block changes only [CLS]'s row: its patch tokens are
        # computed once (and not at all when it is the last block), and the K [CLS] rows as K
        # queries of the one shared sequence.
        shared_first = runtime.block(first, x) if lean and first < last else None
        outs = []
        for sl in _chunks(bias.shape[0], chunk_size):
            b = bias[sl]
            k = b.shape[0]
            full = None  # the (k·H, L, L) mask, built only for a block that needs it (rows≠cls, unleashed)
            if lean:
                cls_rows = _cls_row_mask(b, H, plan.head_scales)
                queries = x[:, :1].expand(1, k, -1)
                cls = _block_query(runtime, plan, first, queries, x, query_rows_mask(b, H, plan.head_scales))
                if first == last:
                    outs.append(cls.transpose(0, 1))
                    continue
                y = torch.cat([cls.transpose(0, 1), shared_first[:, 1:].expand(k, -1, -1)], dim=1)
                start = first + 1
            else:
                y, start = x.expand(k, -1, -1), first
            for i in range(start, last):
                if i not in plan.layers:
                    y = runtime.block(i, y)
                elif lean and i not in unleashed:
                    # [CLS] with its bias row, the patch queries unmasked (they still see the biased [CLS]).
                    y = runtime.block_cls_biased(i, y, cls_rows)
                else:
                    full = full_attention_mask(b, plan.rows, H, plan.head_scales) if full is None else full
                    y = _block(runtime, plan, i, y, full)
            # Only [CLS] leaves the ViT (the runtime pools token 0), so the last block runs at that query alone.
            row0 = None
            if last in plan.layers:
                if lean:
                    row0 = cls_rows.expand(k, H, 1, -1).reshape(k * H, 1, -1)
                else:
                    row0 = (full_attention_mask(b, plan.rows, H, plan.head_scales) if full is None else full)[:, :1]
            outs.append(_block_query(runtime, plan, last, y[:, :1], y, row0))
        return torch.cat(outs)

    return trunk


def _approx_trunk(runtime: VisionRuntime, bias: torch.Tensor, plan: BiasPlan, chunk_size: int):
    first, depth, H = plan.layers[0], runtime.num_layers, runtime.num_heads

    def trunk(x: torch.Tensor) -> torch.Tensor:  # x: (1, L, D)
        for i in range(first):
            x = runtime.block(i, x)
        cls_in = x[:, :1]  # [CLS] entering the first biased block, before any bias
        patches = []  # unbiased patch tokens entering blocks first..depth-1
        for i in range(first, depth):
            patches.append(x[:, 1:])
            if i < depth - 1:
                x = runtime.block(i, x)
        outs = []
        for sl in _chunks(bias.shape[0], chunk_size):
            b = bias[sl]
            k = b.shape[0]
            # All K [CLS] tokens ride in one sequence; each sees only its own [CLS] key.
            biased = private_cls_mask(b, H, plan.head_scales)
            plain = private_cls_mask(torch.zeros_like(b), H, None)
            cls = cls_in.expand(1, k, -1)
            for j, i in enumerate(range(first, depth)):
                context = torch.cat([cls, patches[j]], dim=1)
                cls = _block_query(runtime, plan, i, cls, context, biased if i in plan.layers else plain, plain)
            outs.append(cls.transpose(0, 1))
        return torch.cat(outs)

    return trunk
