"""What an execution strategy needs from a CLIP implementation (the adapter boundary).

A runtime exposes the ViT as: a stem+head wrapped around a replaceable *trunk* (the block stack),
and the blocks themselves, callable with an additive attention mask. Every execution mode in
:mod:`falip.encode` is written against this interface only, so adapters for HF transformers,
OpenAI ``clip`` or timm only have to implement these few methods.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

Trunk = Callable[[torch.Tensor], torch.Tensor]


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
