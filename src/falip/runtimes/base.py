"""The runtime protocol: everything falip needs from a CLIP implementation (the adapter boundary).

A runtime is one loaded model behind one adapter (open_clip's OpenAI-style ViT, open_clip's timm
towers, HF transformers CLIP/SigLIP …). It exposes the image tower as a stem and a pooling head
wrapped around a replaceable *trunk* (the block stack), the blocks themselves (callable with an
additive attention mask), the text tower with the model's own tokenizer, and the model's own score.
Every execution mode in :mod:`falip.encode` and everything above it is written against this
interface only: no module outside ``falip.runtimes`` imports open_clip / transformers / timm or
touches a runtime's model object.

Tokens: the trunk sees ``L = num_prefix + gh·gw`` tokens per image — ``num_prefix`` prefix tokens
(the class token first when there is one, then register tokens), then the patch tokens row-major.
A bias vector ``(L,)`` covers all of them (prefix entries are 0 for FALIP's bump).

Masks: every ``attn_mask`` argument is an additive float mask in the layout ``(B·H, Q, L)`` (batch
major, then heads; ``Q`` queries, ``L`` keys), as ``nn.MultiheadAttention`` takes it; an adapter
converts it to whatever its model's attention wants.

Pooling: ``pool == "cls"`` — the embedding is read from token 0 (the class token; FALIP biases its
query row). ``pool == "attention_pool"`` — a learned probe (SigLIP's MAP head) attends over all the
trunk's output tokens; FALIP's bias then goes on the probe's attention logits (``pool_bias``).

Every adapter implements this protocol as a :class:`falip.runtimes.contract.BlockRuntime` over its model's own
primitives (the evaluations, the seam check, digests and the score are written there once). Adapters register
with :func:`falip.runtimes.register` (see ``runtimes/__init__.py``); :func:`falip.load` asks each registered
adapter, in order, whether it takes the name/path given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Protocol

import torch

Trunk = Callable[[torch.Tensor], torch.Tensor]
Pool = Literal["cls", "attention_pool"]
ScoreKind = Literal["softmax", "sigmoid"]

# Strings whose token ids identify a tokenizer (vocabulary, merges, casing, context length, padding) in digests.
TOKENIZER_PROBE = ["a photo of a dog.", "Zebra-crossing at 3:45pm, naïve café!", "the " * 100]


def hash_tensor(h, name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor to the hashlib object ``h``: its name, dtype and shape, then its raw bytes."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def protocol_info(runtime: VisionRuntime) -> dict:
    """The protocol's own description of a runtime (family, geometry, prefix tokens, pooling, widths, score);
    each adapter's :meth:`VisionRuntime.info` adds what is particular to it."""
    return dict(
        family=runtime.family,
        image_size=runtime.image_size,
        patch_size=runtime.patch_size,
        grid=list(runtime.grid),
        num_prefix=runtime.num_prefix,
        pool=runtime.pool,
        num_layers=runtime.num_layers,
        num_heads=runtime.num_heads,
        width=runtime.width,
        embed_dim=runtime.embed_dim,
        score_kind=runtime.score_kind,
    )


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
    """One loaded CLIP-style model (image and text towers) behind an adapter."""

    family: str  # adapter id, e.g. "open_clip", "open_clip-timm", "open_clip-eva", "hf-clip", "hf-siglip"
    image_size: int  # S: model input is S×S
    patch_size: int  # p
    grid: tuple[int, int]  # (gh, gw)
    num_prefix: int  # tokens before the patches: 1 ([CLS]) for CLIP; 1 + registers; 0 for SigLIP
    pool: Pool  # "cls" or "attention_pool" (see the module docstring)
    num_layers: int
    num_heads: int
    width: int  # D, the token width inside the blocks
    embed_dim: int  # E, the joint image-text embedding width
    mean: tuple[float, float, float]  # the model's own pixel normalisation
    std: tuple[float, float, float]
    dtype: torch.dtype
    device: torch.device
    score_kind: ScoreKind  # "softmax" (CLIP: logits compared across texts) or "sigmoid" (SigLIP: each pair alone)

    # -- image tower ----------------------------------------------------------------------------
    def run(self, pixels: torch.Tensor, trunk: Optional[Trunk] = None, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image embeddings ``(B', E)`` (not normalised) of ``pixels (B, 3, S, S)`` (normalised pixels).

        The model's own stem turns pixels into tokens ``(B, L, D)``; ``trunk`` (default: the
        plain block stack) maps them to tokens ``(B', L', D)``; the model's own head pools them
        (token 0 for ``pool == "cls"``, then ``L' ≥ 1``; the probe over all ``L' = L`` tokens for
        ``attention_pool``) and projects. ``pool_bias (B', L)``: additive bias on the probe's
        attention logits over the tokens, the same for every probe head (``attention_pool`` only;
        a ``cls`` runtime raises ValueError when given one).
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

    # -- text tower and score -------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(T, E)`` (not normalised) of ``texts``, tokenized with the model's own tokenizer
        (its own context length and padding). Raises :class:`falip.errors.TextUnavailableError` naming
        what is missing when the model was loaded without a tokenizer or without a text tower."""

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The model's own logits ``(N, T)`` (float32, CPU) of L2-normalised ``image (N, E)`` and ``text (T, E)``:
        ``logit_scale · cos`` for CLIP, ``logit_scale · cos + logit_bias`` for SigLIP (probabilities are
        then the sigmoid of each entry, see ``score_kind``).

        Computed as ``logit_scale · image @ text.T (+ logit_bias)`` on the rows as given: callers also pass
        rows that are not unit vectors or not E wide (REC's score subtraction ``t − n̄``; PointCLIP's
        concatenated weighted views against the repeated text), so an adapter neither normalises nor
        checks the width against E."""

    def digest(self, part: str = "all") -> str:
        """Hex sha256 digest (64 characters) of the model's tensors (name, dtype, shape, values): ``"all"`` of
        everything, ``"text"`` of what determines text embeddings (text tower, dtype, and its tokenizer's
        identity) — for run fingerprints (``FalipModel.weights_digest``) and the zero-shot cache key
        (``zeroshot.text_fingerprint``), which keep a prefix. ValueError for another ``part``."""

    def info(self) -> dict:
        """JSON-able description of the runtime (family, geometry, pooling, prefix tokens, score)."""
