"""One pass of the ViT block by block, with each head's term in the [CLS] attention output.

In block ℓ the [CLS] token's attention output is a sum over heads plus the output bias::

    attn_ℓ(x)[CLS] = Σ_h  W_O[:, h] · (Σ_j P_ℓh[CLS, j] · v_ℓh[j])  +  b_O

Each summand is head h's *term* ``(D,)``. :func:`trace` records every block's terms (and attention
probabilities) for an image with or without a FALIP bias. Head analysis (:mod:`falip.heads`) and
unleashing an edit prompt (:func:`falip.methods.encode_unleashed`) read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .bias import FovealConfig, full_attention_mask
from .errors import UnsupportedModelError


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


def require_cls(model) -> None:
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
    require_cls(model)
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
