"""open_clip adapter (tested with open_clip_torch 3.x).

It relies only on these seams of open_clip's ``VisionTransformer``:

- ``visual.forward`` = ``visual._embeds`` (stem) → ``visual.transformer(tokens)`` → ``visual._pool``
  (final norm, [CLS] pooling) → ``@ visual.proj``. A biased call runs the stem, our trunk and the pool
  through these seams, so the shared model is never modified: one model serves any number of threads
  (checked numerically against ``visual.forward`` when the adapter is built);
- ``visual.transformer.resblocks[i](x, attn_mask=...)``, whose float mask reaches
  ``nn.MultiheadAttention`` as an additive bias;
- ``ResidualAttentionBlock.attention(q_x, k_x, v_x, attn_mask)`` plus its ``ln_1``, ``ls_1``,
  ``ln_2``, ``mlp``, ``ls_2`` for evaluating a block at the [CLS] query only.

The last seam is checked numerically when the adapter is built, so an open_clip release that
changes the block layout fails loudly instead of giving wrong embeddings.

:meth:`OpenClipRuntime.block_heads` (per-head terms, attention probabilities, unleashing) and
:meth:`OpenClipRuntime.block_cls_biased` (the lean [CLS]-row bias, two ``scaled_dot_product_attention``
calls) also read the attention's ``in_proj_weight``/``in_proj_bias``/``out_proj``; they are checked
against the block's own forward the first time either is used.

:class:`OpenClipModelParts` holds what every open_clip adapter shares whatever its image tower is
(the text tower with the model's tokenizer, the score, the digests, ``info``); the adapter for
open_clip's timm towers builds on it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TextUnavailableError, UnsupportedModelError
from .attention import check_close, cls_biased_heads, head_terms, unleashed_heads
from .base import TOKENIZER_PROBE, BlockHeads, Trunk, hash_tensor, protocol_info

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _residual_tail(blk: nn.Module, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-norm block after attention: ``x = q + ls_1(attn); x + ls_2(mlp(ln_2(x)))``."""
    x = query + blk.ls_1(attended)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class OpenClipModelParts:
    """The parts of an open_clip adapter that do not depend on its image tower: the text tower with the
    model's own tokenizer, the model's score, digests and ``info``.

    A subclass sets ``clip`` (the open_clip ``CLIP``/``CustomTextCLIP``), ``tokenizer`` (token ids
    ``(T, context_length)`` from a list of strings, or None), ``text_missing`` (why there is no
    tokenizer, or None) and the geometry attributes of :class:`falip.runtimes.base.VisionRuntime`.
    """

    family: str
    clip: nn.Module
    tokenizer: Optional[Callable[[list[str]], torch.Tensor]]
    text_missing: Optional[str]
    score_kind = "softmax"

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(T, E)`` (not normalised) of ``texts``, tokenized with the model's own tokenizer."""
        if self.tokenizer is None:
            raise TextUnavailableError(f"this {self.family} model has no tokenizer: {self.text_missing}")
        return self.clip.encode_text(self.tokenizer(list(texts)).to(self.device))

    @torch.no_grad()
    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``logit_scale · image @ text.T`` (``+ logit_bias`` when the model has one) ``(N, T)``, float32 on CPU;
        with L2-normalised rows that is the model's own ``logit_scale · cos (+ logit_bias)``."""
        scale = self.clip.logit_scale.detach().exp().float().cpu()
        out = scale * image.detach().float().cpu() @ text.detach().float().cpu().T
        bias = getattr(self.clip, "logit_bias", None)
        return out if bias is None else out + bias.detach().float().cpu()

    def digest(self, part: str = "all") -> str:
        """Hex sha256 of the model's tensors. ``"all"``: every state-dict entry (name and raw bytes).
        ``"text"``: every text-tower tensor (name, dtype, shape, values; not the image tower nor the
        logit scale/bias), the model's dtype and the tokenizer (its class and the ids of fixed probe strings)."""
        h = hashlib.sha256()
        if part == "all":
            for name, tensor in self.clip.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return h.hexdigest()
        if part != "text":
            raise ValueError(f"digest part must be 'all' or 'text', got {part!r}")
        tensors = list(self.clip.named_parameters()) + list(self.clip.named_buffers())
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
            if name.startswith("visual.") or name.startswith("logit_"):
                continue  # the image tower and the logit scale/bias do not change text embeddings
            hash_tensor(h, name, tensor)
        h.update(str(self.dtype).encode())
        tokenizer = self.tokenizer
        h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
        if tokenizer is not None:
            h.update(torch.as_tensor(tokenizer(TOKENIZER_PROBE)).to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def info(self) -> dict:
        """JSON-able description: family, geometry, prefix tokens, pooling, widths, score, whether text works."""
        return dict(
            **protocol_info(self),
            logit_bias=getattr(self.clip, "logit_bias", None) is not None,
            text=self.tokenizer is not None,
        )


class OpenClipRuntime(OpenClipModelParts):
    """An open_clip ``CLIP`` model whose image tower is open_clip's own ``VisionTransformer`` ([CLS] pooled).

    tokenizer: the model's tokenizer (list of strings → token ids ``(T, context_length)``), or None with
    ``text_missing`` saying why (text calls then raise :class:`TextUnavailableError`; images still work).
    """

    family = "open_clip"
    num_prefix = 1
    pool = "cls"

    def __init__(
        self,
        clip: nn.Module,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        text_missing: Optional[str] = None,
    ):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(clip, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"FALIP needs a CLIP vision transformer; this model's image tower is "
                f"{type(visual).__name__}, which OpenClipRuntime does not run (ResNet towers have no attention "
                "to bias; see the README's 'Supported models')"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UnsupportedModelError(
                f"FALIP steers the [CLS] token, but this ViT pools with "
                f"{'an attentional pooler' if visual.attn_pool is not None else repr(visual.pool_type)}"
            )
        blocks = visual.transformer.resblocks
        for i, blk in enumerate(blocks):
            if type(blk) is not ResidualAttentionBlock:
                raise UnsupportedModelError(
                    f"block {i} is a {type(blk).__name__}; only open_clip's ResidualAttentionBlock is supported"
                )
        clip.eval()
        self.clip = clip
        self.visual = visual
        self.blocks = blocks
        h, w = visual.image_size
        ph, pw = visual.patch_size
        if h != w or ph != pw:
            raise UnsupportedModelError(
                f"only square inputs and patches are supported, got {visual.image_size}/{visual.patch_size}"
            )
        self.image_size = int(h)
        self.patch_size = int(ph)
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.num_layers = len(blocks)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.width = int(visual.transformer.width)
        self.batch_first = bool(blocks[0].attn.batch_first)
        self.mean = tuple(mean or getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(std or getattr(visual, "image_std", None) or OPENAI_STD)
        if tokenizer is None and text_missing is None:
            raise ValueError("give the model's tokenizer, or text_missing saying why there is none")
        self.tokenizer = tokenizer
        self.text_missing = text_missing
        self.embed_dim = self._check_stem_head_seam()
        self._check_query_seam()
        self._heads_checked = False

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, trunk: Optional[Trunk] = None, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pool_bias is not None:
            raise ValueError("pool_bias is for attention-pooled models; this open_clip ViT pools its [CLS] token")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if trunk is None:
            return self.visual(pixels)
        return self._head(trunk(self.visual._embeds(pixels)))

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, E)`` of trunk outputs ``(B, L, D)``: open_clip's own pooling, then the projection.

        Reads the model only, so concurrent calls on one model cannot interfere."""
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.batch_first:
            return self.blocks[index](x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return self.blocks[index](x, attn_mask=attn_mask)

    def block_query(
        self, index: int, query: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        blk = self.blocks[index]
        q, kv = blk.ln_1(query), blk.ln_1(context)
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        attn = blk.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=attn_mask)
        if not self.batch_first:
            attn = attn.transpose(0, 1)
        return _residual_tail(blk, query, attn)

    def block_cls_biased(self, index: int, x: torch.Tensor, cls_mask: torch.Tensor) -> torch.Tensor:
        if not self._heads_checked:
            self._check_heads_seam()
            self._heads_checked = True
        return self._block_cls_biased(index, x, cls_mask)

    def _block_cls_biased(self, index: int, x: torch.Tensor, cls_mask: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]
        attn = blk.attn
        B, L, D = x.shape
        H = self.num_heads
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, dh)
        heads = cls_biased_heads(q, k, v, cls_mask).transpose(1, 2).reshape(B, L, D)
        attended = F.linear(heads, attn.out_proj.weight, attn.out_proj.bias)
        return _residual_tail(blk, x, attended)

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
        if not self._heads_checked:
            self._check_heads_seam()
            self._heads_checked = True
        return self._block_heads(index, query, context, attn_mask, base_mask, gain, keep_terms)

    def _block_heads(self, index, query, context, attn_mask, base_mask, gain, keep_terms) -> BlockHeads:
        blk = self.blocks[index]
        attn = blk.attn
        B, Q, D = query.shape
        Lk, H = context.shape[1], self.num_heads
        dh = D // H
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q_x, kv_x = blk.ln_1(query), blk.ln_1(context)
        q = F.linear(q_x, w[:D], b[:D]).view(B, Q, H, dh).transpose(1, 2)  # (B, H, Q, dh)
        k = F.linear(kv_x, w[D : 2 * D], b[D : 2 * D]).view(B, Lk, H, dh).transpose(1, 2)
        v = F.linear(kv_x, w[2 * D :], b[2 * D :]).view(B, Lk, H, dh).transpose(1, 2)
        heads, probs = unleashed_heads(q, k, v, dh**-0.5, attn_mask, base_mask, gain)  # (B, H, Q, dh), (B, H, Q, Lk)
        out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
        if out_b is None:
            out_b = out_w.new_zeros(D)
        attended = F.linear(heads.transpose(1, 2).reshape(B, Q, D), out_w, out_b)
        terms = head_terms(heads, out_w) if keep_terms else None
        return BlockHeads(out=_residual_tail(blk, query, attended), probs=probs, terms=terms, out_bias=out_b)

    def block_tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s residual and MLP tail on an attention output ``attended (B, Q, D)`` at ``query (B, Q, D)``."""
        return _residual_tail(self.blocks[index], query, attended)

    @torch.no_grad()
    def _check_stem_head_seam(self) -> int:
        """Verify stem → block stack → :meth:`_head` == ``visual.forward`` (guards open_clip layout changes);
        returns the embedding width E."""
        gen = torch.Generator().manual_seed(2)
        pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=gen).to(self.device, self.dtype)
        theirs = self.visual(pixels)
        ours = self._head(self.visual.transformer(self.visual._embeds(pixels)))
        self._check_close("stem/pool/projection seams", ours, theirs)
        return int(theirs.shape[-1])

    @torch.no_grad()
    def _check_query_seam(self) -> None:
        """Verify block_query == block()[:, :1] on random tokens (guards open_clip layout changes)."""
        L = self.num_prefix + self.grid[0] * self.grid[1]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, L, self.width, generator=gen).to(self.device, self.dtype)
        mask = (0.5 * torch.randn(2 * self.num_heads, L, L, generator=gen)).to(self.device, self.dtype)
        full = self.block(0, x, mask)[:, :1]
        query = self.block_query(0, x[:, :1], x, mask[:, :1])
        self._check_close("[CLS]-query evaluation", query, full)

    @torch.no_grad()
    def _check_heads_seam(self) -> None:
        """Verify block_heads == block(), its per-head terms sum to the block's own attention output, and
        block_cls_biased == block() with a mask on row 0 only (all three read the packed in_proj weights)."""
        attn = self.blocks[0].attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError(
                "this open_clip version's attention has no packed in_proj_weight (or has bias_k/zero-attention); "
                "per-head analysis needs nn.MultiheadAttention's standard layout"
            )
        L = self.num_prefix + self.grid[0] * self.grid[1]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, L, self.width, generator=gen).to(self.device, self.dtype)
        mask = (0.5 * torch.randn(2 * self.num_heads, L, L, generator=gen)).to(self.device, self.dtype)
        full = self.block(0, x, mask)
        heads = self._block_heads(0, x, x, mask, None, None, True)
        blk = self.blocks[0]
        q = blk.ln_1(x) if self.batch_first else blk.ln_1(x).transpose(0, 1)
        attended = blk.attention(q_x=q, attn_mask=mask)
        if not self.batch_first:
            attended = attended.transpose(0, 1)
        self._check_close("per-head evaluation (block output)", heads.out, full)
        self._check_close("per-head evaluation (attention output)", heads.terms.sum(2) + heads.out_bias, attended)
        cls_mask = mask.view(2, self.num_heads, L, L)[:, :, :1]
        row0 = torch.zeros_like(mask).view(2, self.num_heads, L, L)
        row0[:, :, :1] = cls_mask
        self._check_close(
            "[CLS]-biased evaluation", self._block_cls_biased(0, x, cls_mask), self.block(0, x, row0.view(-1, L, L))
        )

    def _check_close(self, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        """Raise UnsupportedModelError when falip's evaluation ``what`` disagrees with the block's own."""
        check_close(what, ours, theirs, self.dtype, "this open_clip version's ResidualAttentionBlock", "open_clip_torch 3.x")
