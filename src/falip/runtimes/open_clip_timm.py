"""open_clip models whose image tower is a timm ``VisionTransformer`` (open_clip's ``TimmModel``).

SigLIP and SigLIP2 (``ViT-B-16-SigLIP``, ``ViT-SO400M-14-SigLIP2`` …, a MAP attention probe, no
class token) and [CLS]-pooled timm ViTs (e.g. MobileCLIP2-L-14's ``vit_large_patch14_clip_224``, also
with register tokens). Tested with timm 1.0.x and open_clip_torch 3.x. It relies only on these seams:

- ``TimmModel.forward`` = ``trunk.forward_features`` (``patch_embed`` → ``_pos_embed`` →
  ``patch_drop`` → ``norm_pre`` → ``blocks`` → ``norm``) → ``trunk.forward_head`` (``pool`` →
  ``fc_norm`` → ``head_drop`` → ``head``) → ``TimmModel.head`` (open_clip's projection). A biased call
  runs the stem, our trunk and the head through these seams; the model is never modified;
- ``trunk.blocks[i](x, attn_mask=...)``: timm's ``Block`` hands the mask to its ``Attention``, which adds
  it to the logits (``scaled_dot_product_attention`` layout ``(B, H, Q, L)``);
- the block's ``norm1``, ``attn.qkv`` (rows: q, k, v), ``attn.q_norm``/``k_norm``, ``attn.proj``, ``ls1``,
  ``norm2``, ``mlp``, ``ls2`` for evaluating a block at some queries only, head by head, or with a bias on
  query 0 alone;
- the probe ``trunk.attn_pool(x, attn_mask=...)`` (timm's ``AttentionPoolLatent``), which adds the mask
  to its attention logits: that is where ``pool_bias`` goes.

Every seam is checked numerically against the model's own forward when the adapter is built, so a
timm release that changes them fails loudly instead of giving wrong embeddings. timm's ``Eva`` towers
(EVA02, PE-Core) and rel-pos ViTs are refused: their attention adds rotary / relative-position terms
that these seams do not evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .attention import check_close, cls_biased_heads, head_terms, heads_mask, unleashed_heads
from .base import BlockHeads, Trunk
from .open_clip import OPENAI_MEAN, OPENAI_STD, OpenClipModelParts
from .open_clip_loading import register_visual_runtime


def _tail(blk: nn.Module, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a timm pre-norm ``Block`` after attention (drop-path is the identity in eval)."""
    x = query + blk.ls1(attended)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


class OpenClipTimmRuntime(OpenClipModelParts):
    """An open_clip model whose image tower is a ``TimmModel`` wrapping a timm ``VisionTransformer``.

    ``pool`` is ``"attention_pool"`` for a MAP probe (SigLIP) and ``"cls"`` for class-token pooling;
    other poolings (average, max, none) are refused: FALIP needs a query that pools to bias.
    ``num_prefix`` = class token + register tokens. tokenizer / text_missing: as :class:`OpenClipRuntime`.
    """

    family = "open_clip-timm"

    def __init__(
        self,
        clip: nn.Module,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        text_missing: Optional[str] = None,
    ):
        from open_clip.timm_model import TimmModel
        from timm.layers import Attention, AttentionPoolLatent
        from timm.models.vision_transformer import Block, VisionTransformer

        visual = getattr(clip, "visual", None)
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(f"OpenClipTimmRuntime runs open_clip TimmModel towers, got {type(visual).__name__}")
        trunk = visual.trunk
        if type(trunk) is not VisionTransformer:
            raise UnsupportedModelError(
                f"this open_clip model's timm tower is {type(trunk).__name__}; falip runs timm VisionTransformer towers "
                "only (EVA02 / PE-Core `Eva` towers and rel-pos ViTs add rotary or relative-position terms inside "
                "attention that falip does not evaluate; see the README's 'Supported models')"
            )
        for i, blk in enumerate(trunk.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise UnsupportedModelError(
                    f"timm block {i} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                    "only timm's pre-norm Block with its standard Attention is supported"
                )
            if not isinstance(blk.attn.norm, nn.Identity) or blk.attn.gate is not None:
                raise UnsupportedModelError(
                    f"timm block {i}'s attention has a scale-norm or a gate on its output; falip does not support them"
                )
        if "pool" in dict(visual.head.named_children()):
            raise UnsupportedModelError("open_clip's abs_attn/rot_attn pooling heads are for CNN features, not supported")
        if trunk.attn_pool is not None:
            if type(trunk.attn_pool) is not AttentionPoolLatent:
                raise UnsupportedModelError(
                    f"this timm ViT pools with {type(trunk.attn_pool).__name__}; of the attention pools falip biases "
                    "only the latent-query MAP probe (AttentionPoolLatent)"
                )
            self.pool = "attention_pool"
        elif trunk.global_pool == "token":
            self.pool = "cls"
        else:
            raise UnsupportedModelError(
                f"this timm ViT pools its tokens with global_pool={trunk.global_pool!r}; FALIP biases the query that "
                "pools (a class token or an attention probe), and an average/max pool has none"
            )
        clip.eval()
        self.clip = clip
        self.visual = visual
        self.trunk = trunk
        self.blocks = trunk.blocks
        embed = trunk.patch_embed
        (h, w), (ph, pw) = tuple(embed.img_size), tuple(embed.patch_size)
        if h != w or ph != pw:
            raise UnsupportedModelError(f"only square inputs and patches are supported, got {(h, w)}/{(ph, pw)}")
        self.image_size = int(h)
        self.patch_size = int(ph)
        self.grid = tuple(int(g) for g in embed.grid_size)
        self.num_prefix = int(trunk.num_prefix_tokens)
        self.num_layers = len(self.blocks)
        self.num_heads = int(self.blocks[0].attn.num_heads)
        self.width = int(trunk.embed_dim)
        # The weights' normalisation when open_clip knows it (a pretrained tag), else the timm tower's own.
        own = getattr(trunk, "pretrained_cfg", None) or {}
        self.mean = tuple(mean or own.get("mean") or OPENAI_MEAN)
        self.std = tuple(std or own.get("std") or OPENAI_STD)
        # open_clip gives a model a logit bias when it is trained with the sigmoid loss (SigLIP).
        self.score_kind = "sigmoid" if getattr(clip, "logit_bias", None) is not None else "softmax"
        if tokenizer is None and text_missing is None:
            raise ValueError("give the model's tokenizer, or text_missing saying why there is none")
        self.tokenizer = tokenizer
        self.text_missing = text_missing
        self.embed_dim = self._check_stem_head_seam()
        self._check_block_seams()

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.trunk.patch_embed.proj.weight.device

    # -- image tower ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, pixels: torch.Tensor, trunk: Optional[Trunk] = None, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pool_bias is not None and self.pool != "attention_pool":
            raise ValueError("pool_bias is for attention-pooled models; this timm ViT pools its class token")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if trunk is None and pool_bias is None:
            return self.visual(pixels)
        x = self._stem(pixels)
        return self._head(trunk(x) if trunk is not None else self.blocks(x), pool_bias)

    def _stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, L, D)`` entering the blocks: timm's patch embedding, prefix tokens and positions."""
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixels))))

    def _head(self, tokens: torch.Tensor, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(B, E)`` of trunk outputs ``(B, L', D)``: timm's final norm and pooling (the probe with
        ``pool_bias (B, L)`` on its attention logits), timm's head, then open_clip's projection."""
        t = self.trunk
        x = t.norm(tokens)
        if self.pool == "attention_pool":
            mask = None
            if pool_bias is not None:
                mask = self._probe_mask(pool_bias, x.shape[0], x.shape[1]).to(device=x.device, dtype=x.dtype)
            if not t.pool_include_prefix:
                x = x[:, self.num_prefix :]
            pooled = t.attn_pool(x, attn_mask=mask)
        else:
            pooled = t.pool(x)
        return self.visual.head(t.head(t.head_drop(t.fc_norm(pooled))))

    def _probe_mask(self, pool_bias: torch.Tensor, B: int, L: int) -> torch.Tensor:
        """The probe's additive mask ``(B, 1, 1, L or L − num_prefix)`` (every probe head and latent) from ``(B, L)``."""
        if pool_bias.dim() != 2 or tuple(pool_bias.shape) != (B, L):
            raise ValueError(f"pool_bias must be (B, L) = ({B}, {L}) for these tokens, got {tuple(pool_bias.shape)}")
        if not self.trunk.pool_include_prefix and self.num_prefix:
            if bool(pool_bias[:, : self.num_prefix].ne(0).any()):
                raise ValueError(
                    f"pool_bias puts a bias on the {self.num_prefix} prefix token(s), which this model's probe does not attend to"
                )
            pool_bias = pool_bias[:, self.num_prefix :]
        return pool_bias[:, None, None, :]

    # -- blocks ---------------------------------------------------------------------------------
    def _mask(self, mask: Optional[torch.Tensor], B: int, Q: int, Lk: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """falip's additive mask as timm's ``(B or 1, H or 1, Q, Lk)`` (see :func:`.attention.heads_mask`)."""
        return heads_mask(mask, B, self.num_heads, Q, Lk, dtype, self.device)

    def _qkv(self, blk: nn.Module, query: torch.Tensor, context: Optional[torch.Tensor]):
        """Heads ``q (B, H, Q, dh)``, ``k, v (B, H, Lk, dh)`` of block inputs (before ``norm1``); ``context`` None:
        the queries are the whole sequence (one packed projection, as timm's own ``Attention``)."""
        attn = blk.attn
        H, dh = attn.num_heads, attn.head_dim
        B, Q, _ = query.shape
        if context is None:
            q, k, v = attn.qkv(blk.norm1(query)).view(B, Q, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            A, w, b = H * dh, attn.qkv.weight, attn.qkv.bias
            Lk = context.shape[1]
            kv = F.linear(blk.norm1(context), w[A:], None if b is None else b[A:]).view(B, Lk, 2, H, dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            q = F.linear(blk.norm1(query), w[:A], None if b is None else b[:A]).view(B, Q, H, dh).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k), v

    def _merge(self, blk: nn.Module, query: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Block output ``(B, Q, D)`` from the heads' attention outputs ``(B, H, Q, dh)``."""
        B, _, Q, _ = heads.shape
        return _tail(blk, query, blk.attn.proj(heads.transpose(1, 2).reshape(B, Q, -1)))

    def block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, _ = x.shape
        return self.blocks[index](x, attn_mask=self._mask(attn_mask, B, L, L, x.dtype))

    def block_query(
        self, index: int, query: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        blk = self.blocks[index]
        q, k, v = self._qkv(blk, query, context)
        mask = self._mask(attn_mask, query.shape[0], query.shape[1], context.shape[1], q.dtype)
        return self._merge(blk, query, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=blk.attn.scale))

    def block_cls_biased(self, index: int, x: torch.Tensor, cls_mask: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]
        q, k, v = self._qkv(blk, x, None)
        return self._merge(blk, x, cls_biased_heads(q, k, v, cls_mask, scale=blk.attn.scale))

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
        blk = self.blocks[index]
        q, k, v = self._qkv(blk, query, context)
        heads, probs = unleashed_heads(q, k, v, blk.attn.scale, attn_mask, base_mask, gain)  # (B, H, Q, dh), (B, H, Q, Lk)
        proj = blk.attn.proj
        out_b = proj.bias if proj.bias is not None else proj.weight.new_zeros(query.shape[2])
        terms = head_terms(heads, proj.weight) if keep_terms else None
        return BlockHeads(out=self._merge(blk, query, heads), probs=probs, terms=terms, out_bias=out_b)

    def block_tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return _tail(self.blocks[index], query, attended)

    # -- seam checks ----------------------------------------------------------------------------
    @torch.no_grad()
    def _check_stem_head_seam(self) -> int:
        """Verify stem → blocks → :meth:`_head` (with a zero ``pool_bias`` on a probe) == ``visual.forward``;
        returns the embedding width E."""
        gen = torch.Generator().manual_seed(2)
        pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=gen).to(self.device, self.dtype)
        theirs = self.visual(pixels)
        tokens = self._stem(pixels)
        for i in range(self.num_layers):
            tokens = self.block(i, tokens)
        zero = torch.zeros(1, tokens.shape[1]) if self.pool == "attention_pool" else None
        self._check_close("stem/blocks/pool/projection seams", self._head(tokens, zero), theirs)
        return int(theirs.shape[-1])

    @torch.no_grad()
    def _check_block_seams(self) -> None:
        """Verify block_query, block_heads (and its per-head terms) and block_cls_biased against the block's own
        forward with a random additive mask (guards timm layout changes)."""
        L, H = self.num_prefix + self.grid[0] * self.grid[1], self.num_heads
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, L, self.width, generator=gen).to(self.device, self.dtype)
        mask = (0.5 * torch.randn(2 * H, L, L, generator=gen)).to(self.device, self.dtype)
        full = self.block(0, x, mask)
        self._check_close("query evaluation", self.block_query(0, x[:, :3], x, mask[:, :3]), full[:, :3])
        heads = self.block_heads(0, x, x, mask, keep_terms=True)
        self._check_close("per-head evaluation (block output)", heads.out, full)
        self._check_close("per-head terms", self.block_tail(0, x, heads.terms.sum(2) + heads.out_bias), full)
        row0 = torch.zeros_like(mask).view(2, H, L, L)
        row0[:, :, :1] = mask.view(2, H, L, L)[:, :, :1]
        self._check_close(
            "query-0-biased evaluation", self.block_cls_biased(0, x, row0[:, :, :1]), self.block(0, x, row0.view(-1, L, L))
        )

    def _check_close(self, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        """Raise UnsupportedModelError when falip's evaluation ``what`` disagrees with the model's own."""
        check_close(what, ours, theirs, self.dtype, "this timm/open_clip version's ViT", "timm 1.0.x and open_clip_torch 3.x")


register_visual_runtime("TimmModel", OpenClipTimmRuntime)
