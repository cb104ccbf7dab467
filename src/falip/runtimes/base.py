"""What an execution strategy needs from a CLIP implementation (the adapter boundary).

A runtime exposes the ViT as: a stem+head wrapped around a replaceable *trunk* (the block stack),
and the blocks themselves, callable with an additive attention mask. Every execution mode in
:mod:`falip.encode` is written against this interface only, so adapters for HF transformers,
OpenAI ``clip`` or timm only have to implement these few methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

Trunk = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockHeads:
    """One block evaluated head by head (see :meth:`VisionRuntime.block_heads`).

    out: ``(B, Q, D)`` the block's output tokens at the queries.
    probs: ``(B, H, Q, Lk)`` attention probabilities each head used (rows sum to 1; when unleashed,
        entries may be negative).
    terms: ``(B, Q, H, D)`` each head's contribution to the attention output (its attention-weighted
        values through its slice of the output projection), or None when not requested.
    out_bias: ``(D,)`` the output projection's bias: ``terms.sum(2) + out_bias`` is the attention output.
    """

    out: torch.Tensor
    probs: torch.Tensor
    terms: Optional[torch.Tensor]
    out_bias: torch.Tensor


class VisionRuntime(Protocol):
    image_size: int  # S: model input is S×S
    patch_size: int  # p
    grid: tuple[int, int]  # (gh, gw)
    num_layers: int
    num_heads: int
    dtype: torch.dtype
    device: torch.device

    def run(self, pixels: torch.Tensor, trunk: Optional[Trunk] = None) -> torch.Tensor:
        """Image embeddings ``(B', E)`` (not normalised) of ``pixels (B, 3, S, S)``.

        The model's own stem turns pixels into tokens ``(B, L, D)``; ``trunk`` (default: the
        plain block stack) maps them to tokens ``(B', L' ≥ 1, D)`` whose first token is pooled;
        the model's own head (norm, projection) makes the embeddings.
        """

    def block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block ``index`` on tokens ``(B, L, D)`` with an additive mask ``(B·H, L, L)`` or None."""

    def block_query(
        self, index: int, query: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Block ``index`` evaluated only at ``query (B, Q, D)`` tokens attending over ``context (B, L, D)``.

        Equal to ``block(context)[:, :Q]`` when ``query`` is the first ``Q`` tokens of ``context``
        (queries do not interact), at a fraction of the cost. ``attn_mask``: ``(B·H, Q, L)``.
        """

    def block_cls_biased(self, index: int, x: torch.Tensor, cls_mask: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on tokens ``(B, L, D)`` with an additive mask on the [CLS] query only.

        ``cls_mask``: ``(B, H or 1, 1, L)``, the bias row of query 0; the patch queries attend unmasked.
        Equal to ``block(x, m)`` with ``m (B·H, L, L)`` zero except row 0, without building ``m``
        (memory O(B·H·L), not O(B·H·L²)).
        """

    def block_heads(
        self,
        index: int,
        query: torch.Tensor,
        context: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        *,
        base_mask: Optional[torch.Tensor] = None,
        gain: Optional[torch.Tensor] = None,
        keep_terms: bool = False,
    ) -> BlockHeads:
        """Block ``index`` at ``query (B, Q, D)`` over ``context (B, Lk, D)``, computed head by head.

        Equal to :meth:`block_query` (and to ``block`` when query is context). With ``gain (H,)``,
        head h uses the probabilities ``P_h + gain[h]·(P_h − P0_h)``: ``P`` under ``attn_mask``,
        ``P0`` under ``base_mask`` (None = no mask) — the prompt-induced change amplified ("unleashed").
        Masks: ``(B·H, Q, Lk)``, ``(H, Q, Lk)`` when B = 1, or ``(Q, Lk)``.
        """

    def block_tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of block ``index`` after attention: output tokens ``(B, Q, D)`` from the block's input
        ``query (B, Q, D)`` and an attention output ``attended (B, Q, D)`` (e.g. ``terms.sum(2) + out_bias``)."""
