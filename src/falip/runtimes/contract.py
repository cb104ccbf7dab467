"""The adapter contract: an adapter gives the model's own primitives, :class:`BlockRuntime` evaluates FALIP over them.

An adapter subclasses :class:`BlockRuntime`, sets the geometry attributes of
:class:`~falip.runtimes.base.VisionRuntime` and gives these primitives (``B`` images, ``L`` tokens, ``D`` width,
``H`` heads of width ``dh``):

- image tower: ``_stem(pixels (B, 3, S, S)) → (B, L, D)``; ``_head(tokens (B, L', D), pool_bias (B, L) | None) → (B, E)``
  (the final norm, pooling — the probe with ``pool_bias`` on its logits — and projection);
  ``_own_features(pixels) → (B, E)``, the model's own image forward; ``_model_blocks()``, the block modules that
  forward calls in order;
- per block ``i``: ``_own_block(i, x, attn_mask)``, the library's own block call with falip's mask ``(B·H, L, L)``
  or None; ``_qkv(i, query, context, query_at)`` → ``q (B, H, Q, dh)``, ``k, v (B, H, Lk, dh)`` of block inputs,
  with everything the model applies to them (input norm, projections, q/k norms, rotary terms; ``context`` None:
  the queries are the whole sequence); ``_scale(i)``; ``_attn_out(i, heads (B, H, Q, dh)) → (B, Q, D)``, the
  attention output (inner norm, gate, output projection); ``_out_linear(i)`` → the output projection's
  ``(weight (D, H·dh), bias (D,))`` and ``_inner_norm(i)`` (a LayerNorm over the heads before it, or None), for the
  per-head terms; ``_tail(i, query, attended) → (B, Q, D)``, the residual and MLP;
- text and score: ``_tokenize(texts) → {"input_ids": (T, C), …}``, ``_encode_tokens(tokens) → (T, E)``,
  ``_logit_scale()``, ``_logit_bias()`` (None without one), ``_state()`` (the state dict) and
  ``_is_text_tensor(name)``; ``_subject()`` / ``_tested()`` name the library in a seam-check error.

The evaluations FALIP needs — a block with a mask, at some queries, with a bias on the class token's row only,
head by head (unleashed, per-head terms), the residual tail, the run over a trunk — are written here once, as is
the seam check every adapter passes when it is built (:meth:`BlockRuntime._check_seams`), the digests, the score
and the no-tokenizer contract.

Query positions (they matter to rotary models only): a query that is a slice of ``context`` along its tokens (a
view, e.g. ``context[:, 1:]``) is at those tokens' positions; any other query tensor holds class-token rows (copies
of prefix tokens, as the exact and approx modes pass them). Context tokens past ``L`` are class-token copies too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TextUnavailableError, UnsupportedModelError
from .attention import check_close, cls_biased_heads, head_terms, heads_mask, unleashed_heads
from .base import TOKENIZER_PROBE, BlockHeads, Pool, ScoreKind, Trunk, hash_tensor, protocol_info

SEAM_SEED = 2


def query_offset(query: torch.Tensor, context: torch.Tensor) -> Optional[int]:
    """Position in ``context (B, Lk, D)`` of the first token of ``query (B, Q, D)`` when ``query`` is a slice of it along
    the tokens (a view into the same storage), else None."""
    if query is context:
        return 0
    same = query.dim() == 3 and query.stride() == context.stride() and query.shape[0] == context.shape[0]
    if not same or query.untyped_storage().data_ptr() != context.untyped_storage().data_ptr():
        return None
    delta, step = query.storage_offset() - context.storage_offset(), context.stride(1)
    if delta < 0 or delta % step or delta // step + query.shape[1] > context.shape[1]:
        return None
    return delta // step


class BlockRuntime:
    """A :class:`~falip.runtimes.base.VisionRuntime` written over an adapter's primitives (see the module docstring).

    A subclass sets ``family``, ``image_size``, ``patch_size``, ``grid``, ``num_prefix``, ``pool``, ``num_layers``,
    ``num_heads``, ``width``, ``mean``/``std`` and ``mean_std_source``, calls :meth:`_init_text`, then
    :meth:`_check_seams` (which sets ``embed_dim``). ``positional``: True when block outputs depend on token
    positions (rotary terms), so blocks only run on the model's own ``L`` tokens.
    """

    family: str
    pool: Pool
    num_prefix: int
    positional = False
    tokenizer = None
    text_missing: Optional[str] = None

    # -- text, score, digests -------------------------------------------------------------------
    def _init_text(self, tokenizer, text_missing: Optional[str]) -> None:
        """The one no-tokenizer contract: a tokenizer, or ``text_missing`` saying why there is none."""
        if tokenizer is None and not text_missing:
            raise ValueError("give the model's tokenizer, or text_missing saying why there is none")
        self.tokenizer = tokenizer
        self.text_missing = None if tokenizer is not None else text_missing

    @property
    def score_kind(self) -> ScoreKind:
        """``"sigmoid"`` when the model has a logit bias (trained with the sigmoid loss: SigLIP), else ``"softmax"``."""
        return "softmax" if self._logit_bias() is None else "sigmoid"

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(T, E)`` (not normalised), tokenized with the model's own tokenizer."""
        if self.tokenizer is None:
            raise TextUnavailableError(f"this {self.family} model has no tokenizer: {self.text_missing}")
        tokens = {k: v.to(self.device) for k, v in self._tokenize(list(texts)).items()}
        return self._encode_tokens(tokens)

    @torch.no_grad()
    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``logit_scale · image @ text.T`` (``+ logit_bias`` when the model has one) ``(N, T)``, float32 on CPU."""
        scale = self._logit_scale().detach().float().exp().cpu()
        out = scale * (image.detach().float().cpu() @ text.detach().float().cpu().T)
        bias = self._logit_bias()
        return out if bias is None else out + bias.detach().float().cpu()

    def digest(self, part: str = "all") -> str:
        """Hex sha256 of the model's tensors (each one's name, dtype, shape and values). ``"all"``: every state-dict
        entry. ``"text"``: the tensors that determine text embeddings, the model's dtype and the tokenizer (its class
        and the token ids of fixed probe strings)."""
        if part not in ("all", "text"):
            raise ValueError(f"digest part must be 'all' or 'text', got {part!r}")
        h = hashlib.sha256()
        for name, tensor in self._state().items():
            if part == "all" or self._is_text_tensor(name):
                hash_tensor(h, name, tensor)
        if part == "text":
            tokenizer = self.tokenizer
            h.update(f"{self.dtype}|{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
            if tokenizer is not None:
                hash_tensor(h, "tokenizer", torch.as_tensor(self._tokenize(TOKENIZER_PROBE)["input_ids"]).to(torch.int64))
        return h.hexdigest()

    def info(self) -> dict:
        """JSON-able description: the protocol's fields, normalisation and its source, what the bias acts on, text."""
        return dict(
            **protocol_info(self),
            mean=list(self.mean),
            std=list(self.std),
            mean_std_source=self.mean_std_source,
            bias_acts_on=self.bias_acts_on(),
            logit_bias=self._logit_bias() is not None,
            text=self.tokenizer is not None,
            **({} if self.tokenizer is not None else {"text_missing": self.text_missing}),
            **self._info_extra(),
        )

    def bias_acts_on(self) -> str:
        """What FALIP's bias is added to, in words (for ``info`` and settings lines)."""
        where = (
            "the attention probe's logits over the tokens (and, with layers, the biased blocks' attention logits)"
            if self.pool == "attention_pool"
            else "the class token's attention logits over the patches in the biased blocks"
        )
        return where + ("; rotary terms on q/k (prefix tokens unrotated)" if self.positional else "")

    def _info_extra(self) -> dict:
        return {}

    # -- image tower ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, pixels: torch.Tensor, trunk: Optional[Trunk] = None, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image embeddings ``(B', E)`` of normalised ``pixels (B, 3, S, S)`` through ``trunk`` (default: the blocks)."""
        if pool_bias is not None and self.pool != "attention_pool":
            raise ValueError(f"pool_bias is for attention-pooled models; this {self.family} model pools its class token")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if trunk is None and pool_bias is None:
            return self._own_features(pixels)
        tokens = self._stem(pixels)
        return self._head(self._blocks(tokens) if trunk is None else trunk(tokens), pool_bias)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = self.block(i, x)
        return x

    @property
    def _tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    def _mask(self, mask: Optional[torch.Tensor], B: int, Q: int, Lk: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return heads_mask(mask, B, self.num_heads, Q, Lk, dtype, self.device)

    # -- blocks ---------------------------------------------------------------------------------
    def block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block ``index`` on tokens ``(B, L, D)`` with an additive mask ``(B·H, L, L)`` or None: the library's own call,
        or (a positional model on a sequence that is not its own L tokens) the block from its primitives."""
        if self.positional and x.shape[1] != self._tokens:
            return self._composed_block(index, x, attn_mask)
        return self._own_block(index, x, attn_mask)

    def _composed_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._qkv(index, x, None, 0)
        mask = self._mask(attn_mask, x.shape[0], x.shape[1], x.shape[1], q.dtype)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scale(index))
        return self._tail(index, x, self._attn_out(index, heads))

    def block_query(
        self, index: int, query: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Block ``index`` at ``query (B, Q, D)`` attending over ``context (B, L, D)``; ``attn_mask (B·H, Q, L)``."""
        q, k, v = self._qkv(index, query, context, query_offset(query, context))
        mask = self._mask(attn_mask, query.shape[0], query.shape[1], context.shape[1], q.dtype)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scale(index))
        return self._tail(index, query, self._attn_out(index, heads))

    def block_cls_biased(self, index: int, x: torch.Tensor, cls_mask: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``x (B, L, D)`` with ``cls_mask (B, H or 1, 1, L)`` on query 0 only."""
        if self.num_prefix == 0:
            raise ValueError(f"this {self.family} model has no class token: there is no [CLS] row to bias")
        q, k, v = self._qkv(index, x, None, 0)
        return self._tail(index, x, self._attn_out(index, cls_biased_heads(q, k, v, cls_mask, scale=self._scale(index))))

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
        """Block ``index`` at ``query (B, Q, D)`` over ``context (B, Lk, D)`` head by head (see VisionRuntime)."""
        q, k, v = self._qkv(index, query, None if query is context else context, query_offset(query, context))
        heads, probs = unleashed_heads(q, k, v, self._scale(index), attn_mask, base_mask, gain)  # (B, H, Q, dh), (B, H, Q, Lk)
        terms, out_bias = self._head_terms(index, heads) if keep_terms else (None, self._head_terms_bias(index))
        return BlockHeads(out=self._tail(index, query, self._attn_out(index, heads)), probs=probs, terms=terms, out_bias=out_bias)

    def block_tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of block ``index`` after attention: ``(B, Q, D)`` from ``query`` and the attention output ``attended``."""
        return self._tail(index, query, attended)

    def _head_terms_bias(self, index: int) -> torch.Tensor:
        """``(D,)``: what the attention output adds to the per-head terms (the projection's bias, through the inner norm's)."""
        weight, bias = self._out_linear(index)
        out = bias if bias is not None else weight.new_zeros(weight.shape[0])
        norm = self._inner_norm(index)
        if norm is not None and norm.bias is not None:
            out = out + weight @ norm.bias
        return out

    def _head_terms(self, index: int, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's share ``(B, Q, H, D)`` of the attention output of ``heads (B, H, Q, dh)``, and the shared bias ``(D,)``.

        An inner LayerNorm over the heads (EVA02) is split with each token's own statistics:
        ``Σ_h W_h·(g_h ⊙ (x_h − μ)/σ) + (W·b + bias)`` is the attention output exactly."""
        weight, _ = self._out_linear(index)
        norm = self._inner_norm(index)
        if norm is not None:
            B, H, Q, dh = heads.shape
            flat = heads.transpose(1, 2).reshape(B, Q, H * dh)
            var, mean = torch.var_mean(flat, dim=-1, unbiased=False, keepdim=True)
            flat = (flat - mean) * torch.rsqrt(var + norm.eps)
            if norm.weight is not None:
                flat = flat * norm.weight
            heads = flat.view(B, Q, H, dh).transpose(1, 2)
        return head_terms(heads, weight), self._head_terms_bias(index)

    def _inner_norm(self, index: int) -> Optional[nn.LayerNorm]:
        return None

    # -- the seam check -------------------------------------------------------------------------
    @torch.no_grad()
    def _check_seams(self) -> None:
        """Check, once when the adapter is built, that each primitive composition equals the model's own forward, on
        the smallest inputs that show it; sets ``embed_dim``. UnsupportedModelError naming what disagrees.

        1. One pass of the model's own image forward on one random image, with hooks on its blocks: the stem gives
           the tokens block 0 received, each block received what the one before returned, and the head (with a zero
           ``pool_bias`` on a probe) maps the last block's output to the model's own features; our own-block call
           reproduces block 0 on those tokens.
        2. Block 0 on random tokens (2 images; a few tokens, or the model's own L for a positional model) with a
           random mask: the block from its primitives, at some queries (a slice of the context, class-token rows),
           head by head, its per-head terms through the tail, and with a bias on the class token's row alone, each
           against the library's own block.
        """
        gen = torch.Generator().manual_seed(SEAM_SEED)
        pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=gen).to(self.device, self.dtype)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        blocks = list(self._model_blocks())
        if len(blocks) != self.num_layers:
            raise UnsupportedModelError(f"{self._subject()} has {len(blocks)} blocks, but falip counted {self.num_layers}")

        def record(module, args, kwargs, output):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            y = output[0] if isinstance(output, (tuple, list)) else output
            seen.append((self._from_model_layout(x), self._from_model_layout(y)))

        hooks = [blk.register_forward_hook(record, with_kwargs=True) for blk in blocks]
        try:
            theirs = self._own_features(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        if len(seen) != self.num_layers:
            raise UnsupportedModelError(f"{self._subject()}'s forward ran {len(seen)} block calls for {self.num_layers} blocks")
        self._close("stem (the tokens entering block 0)", self._stem(pixels), seen[0][0])
        for i in range(1, self.num_layers):
            self._close(f"block stack (block {i} receives block {i - 1}'s output)", seen[i][0], seen[i - 1][1])
        self._close("block call (block 0 on the model's own tokens)", self.block(0, seen[0][0]), seen[0][1])
        last = seen[-1][1]
        self._close("final norm / pooling / projection", self._head(last), theirs)
        if self.pool == "attention_pool":
            self._close("attention probe with a zero pool_bias", self._head(last, torch.zeros(1, last.shape[1])), theirs)
        self.embed_dim = int(theirs.shape[-1])
        self._check_block_algebra(gen)

    @torch.no_grad()
    def _check_block_algebra(self, gen: torch.Generator) -> None:
        L, H, P = self._tokens, self.num_heads, self.num_prefix
        n = L if self.positional else min(L, P + 3)
        x = torch.randn(2, n, self.width, generator=gen).to(self.device, self.dtype)
        mask = (0.5 * torch.randn(2 * H, n, n, generator=gen)).to(self.device, self.dtype)
        full = self._own_block(0, x, mask)
        self._close("block from its primitives", self._composed_block(0, x, mask), full)
        Q = min(n, P + 1)
        self._close("query evaluation (first tokens)", self.block_query(0, x[:, :Q], x, mask[:, :Q]), full[:, :Q])
        self._close("query evaluation (last tokens)", self.block_query(0, x[:, 1:], x, mask[:, 1:]), full[:, 1:])
        heads = self.block_heads(0, x, x, mask, keep_terms=True)
        self._close("per-head evaluation (block output)", heads.out, full)
        self._close("per-head terms through the tail", self.block_tail(0, x, heads.terms.sum(2) + heads.out_bias), full)
        if P:
            rows = torch.zeros_like(mask).view(2, H, n, n)
            rows[:, :, :1] = mask.view(2, H, n, n)[:, :, :1]
            own = self._own_block(0, x, rows.view(-1, n, n))
            self._close("class-token-row evaluation", self.block_cls_biased(0, x, rows[:, :, :1]), own)
            copies = x[:, :1].repeat(1, 2, 1)  # class-token rows that are not a slice of the context
            row_mask = rows[:, :, :1].expand(2, H, 2, n).reshape(-1, 2, n)
            self._close("class-token copies as queries", self.block_query(0, copies, x, row_mask), own[:, :1].expand(2, 2, -1))

    def _close(self, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        check_close(what, ours, theirs, self.dtype, self._subject(), self._tested())

    def _from_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Block inputs/outputs as the model's forward passes them, in falip's ``(B, L, D)`` layout."""
        return x
