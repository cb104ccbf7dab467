"""Attention math every runtime adapter shares, as plain functions on per-head tensors.

An adapter gets ``q (B, H, Q, dh)``, ``k, v (B, H, L, dh)`` from its own block (packed or separate
projections, its own norms), calls these, and applies its own out-projection and residual tail.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError


def heads_mask(
    mask: Optional[torch.Tensor], B: int, H: int, Q: int, L: int, dtype: torch.dtype, device: torch.device
) -> Optional[torch.Tensor]:
    """falip's additive mask ``(B·H, Q, L)`` (``(H, Q, L)`` for B = 1, or ``(Q, L)``) as ``(B or 1, H or 1, Q, L)``;
    None stays None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        raise ValueError("falip's attention masks are additive float masks, got a boolean mask")
    mask = mask.to(device=device, dtype=dtype)
    if mask.dim() == 2 and tuple(mask.shape) == (Q, L):
        return mask.view(1, 1, Q, L)
    if mask.dim() != 3 or mask.shape[0] not in (H, B * H) or tuple(mask.shape[1:]) != (Q, L):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit B={B}, H={H}, Q={Q}, L={L}")
    return mask.view(-1, H, Q, L)


def unleashed_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    attn_mask: Optional[torch.Tensor] = None,
    base_mask: Optional[torch.Tensor] = None,
    gain: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head attention evaluated explicitly: ``(heads (B, H, Q, dh), probs (B, H, Q, L))``.

    ``probs = softmax(scale·q·kᵀ + attn_mask)``; with ``gain (H,)`` unleashed as
    ``probs + gain·(probs − softmax(scale·q·kᵀ + base_mask))``; ``heads = probs @ v``. Masks as :func:`heads_mask`.
    """
    B, H, Q, _ = q.shape
    L = k.shape[2]
    logits = (q * scale) @ k.transpose(-1, -2)  # (B, H, Q, L)

    def probs_under(mask: Optional[torch.Tensor]) -> torch.Tensor:
        m = heads_mask(mask, B, H, Q, L, logits.dtype, logits.device)
        return torch.softmax(logits if m is None else logits + m, dim=-1)

    probs = probs_under(attn_mask)
    if gain is not None:
        probs = probs + gain.to(probs).view(1, H, 1, 1) * (probs - probs_under(base_mask))
    return probs @ v, probs


def head_terms(heads: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Each head's share ``(B, Q, H, E)`` of the out-projection ``out_weight (E, H·dh)`` of ``heads (B, H, Q, dh)``
    (the shares sum over H to the projection without its bias)."""
    return torch.einsum("bhqd,ehd->bqhe", heads, out_weight.view(out_weight.shape[0], heads.shape[1], -1))


def cls_biased_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cls_mask: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Attention outputs ``(B, H, L, dh)`` of all L queries with the additive ``cls_mask (B, H or 1, 1, L)`` on
    query 0 only. ``scale`` None: ``scaled_dot_product_attention``'s default ``1/√dh``."""
    B, H, L, _ = q.shape
    mask = cls_mask.to(device=q.device, dtype=q.dtype)
    if mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (1, L):
        raise ValueError(f"[CLS] mask of shape {tuple(mask.shape)} does not fit (B={B}, H={H} or 1, 1, L={L})")
    # Query 0 with its bias row, the other queries unmasked: two fused calls over the same keys and
    # values, so no (B·H, L, L) mask is ever built.
    first = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=mask, scale=scale)
    rest = F.scaled_dot_product_attention(q[:, :, 1:], k, v, scale=scale)
    return torch.cat([first, rest], dim=2)


def check_close(what: str, ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, subject: str, tested: str) -> None:
    """Raise UnsupportedModelError ``"{subject} does not match falip's {what} …; falip is tested with {tested}"`` when
    falip's evaluation ``ours`` differs from the model's own ``theirs`` beyond the tolerance of the model's ``dtype``."""
    ours, theirs = ours.float(), theirs.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (ours - theirs).abs().max().item()
    if not err <= tol * max(1.0, theirs.abs().max().item()):
        raise UnsupportedModelError(
            f"{subject} does not match falip's {what} (max |diff| {err:.3g}); falip is tested with {tested}"
        )
