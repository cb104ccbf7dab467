"""open_clip models whose image tower is a timm ``Eva``: EVA01/EVA02-CLIP (class token; EVA02 with rotary terms,
SwiGLU and an inner norm on the attention output) and PE-Core (class token, rotary terms, an attention probe).

Primitives beyond :class:`~falip.runtimes.open_clip_timm.TimmTower`'s (checked against the model's own forward
when the adapter is built, see :mod:`falip.runtimes.contract`): the trunk's ``_pos_embed``, which returns the
tokens and the rotary embedding ``rope (L − num_prefix, R)``; ``blocks[i](x, rope=rope, attn_mask=...)``; the
block's ``norm1``, ``attn.qkv`` with ``q_bias``/``k_bias``/``v_bias`` or ``attn.q_proj``/``k_proj``/``v_proj``,
``attn.q_norm``/``k_norm``, timm's ``apply_rot_embed_cat`` on the patch tokens' q/k (the prefix tokens are not
rotated), ``attn.norm``, ``attn.proj``, ``gamma_1``, ``norm2``, ``mlp``, ``gamma_2`` (``EvaBlockPostNorm``:
``norm1``/``norm2`` on the branch outputs instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .open_clip_loading import register_visual_runtime
from .open_clip_timm import OpenClipTimmRuntime, TimmTower, timm_layout


class OpenClipEvaRuntime(TimmTower):
    """An open_clip model whose image tower is a ``TimmModel`` wrapping a timm ``Eva``."""

    family = "open_clip-eva"

    def __init__(
        self,
        clip: nn.Module,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        text_missing: Optional[str] = None,
    ):
        import timm.layers
        from timm.models import eva

        trunk = clip.visual.trunk
        attn_types = tuple(t for t in (eva.EvaAttention, getattr(timm.layers, "AttentionRope", None)) if t is not None)
        blocks = tuple(t for t in (eva.EvaBlock, getattr(eva, "EvaBlockPostNorm", None)) if t is not None)
        if getattr(trunk, "dynamic_img_size", False):
            raise UnsupportedModelError(
                "this Eva tower resizes its position embeddings per input (dynamic_img_size); falip runs it at its own size"
            )
        for i, blk in enumerate(trunk.blocks):
            attn = getattr(blk, "attn", None)
            if getattr(attn, "num_kv_groups", 1) != 1:
                raise UnsupportedModelError(f"timm block {i} uses grouped-query attention; falip does not support it")
            if getattr(attn, "qkv", None) is None:
                timm_layout(attn, ("q_proj", "k_proj", "v_proj"), f"block {i}'s {type(attn).__name__}")
        super().__init__(clip, mean, std, tokenizer, text_missing, blocks, attn_types)
        self.post_norm = type(self.blocks[0]).__name__ == "EvaBlockPostNorm"
        with torch.no_grad():
            _, rope = trunk._pos_embed(
                trunk.patch_embed(torch.zeros(1, 3, self.image_size, self.image_size).to(self.device, self.dtype))
            )
        patches = self.grid[0] * self.grid[1]
        if rope is not None and (rope.dim() != 2 or rope.shape[0] != patches):
            raise UnsupportedModelError(
                f"this Eva tower's rotary embedding has shape {tuple(rope.shape)}; falip runs one embedding of "
                f"({patches}, R) shared by every block (rope_type 'cat')"
            )
        self.rope = rope
        self.positional = rope is not None
        self.rotate_half = bool(getattr(self.blocks[0].attn, "rotate_half", False))
        self._check_seams()

    def _info_extra(self) -> dict:
        return dict(rotary=self.positional, block=type(self.blocks[0]).__name__, attention=type(self.blocks[0].attn).__name__)

    def _stem(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return t.norm_pre(t._pos_embed(t.patch_embed(pixels))[0])

    def _own_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, _ = x.shape
        return self.blocks[index](x, rope=self.rope, attn_mask=self._mask(attn_mask, B, L, L, x.dtype))

    def _project(self, attn: nn.Module, x: torch.Tensor, parts: str) -> list[torch.Tensor]:
        """The heads ``(B, H, N, dh)`` of ``x (B, N, D)`` for each of ``parts`` (a string of ``q``, ``k``, ``v``)."""
        B, N, _ = x.shape
        H = attn.num_heads
        if attn.qkv is None:
            return [getattr(attn, f"{p}_proj")(x).view(B, N, H, -1).transpose(1, 2) for p in parts]
        rows = attn.qkv.weight.shape[0] // 3
        biases = (attn.q_bias, attn.k_bias, attn.v_bias) if getattr(attn, "q_bias", None) is not None else None
        if biases is None and attn.qkv.bias is not None:
            biases = attn.qkv.bias.split(rows)
        index = ["qkv".index(p) for p in parts]
        weight = torch.cat([attn.qkv.weight[j * rows : (j + 1) * rows] for j in index])
        bias = None if biases is None else torch.cat([biases[j] for j in index])
        out = F.linear(x, weight, bias).view(B, N, len(parts), H, -1).permute(2, 0, 3, 1, 4)
        return list(out.unbind(0))

    def _rotate(self, t: torch.Tensor, start: Optional[int]) -> torch.Tensor:
        """``t (B, H, N, dh)`` of tokens at positions ``start …`` with the rotary term on the patch positions among
        them (positions ``num_prefix … L − 1``); ``start`` None: class-token rows, not rotated."""
        if self.rope is None or start is None:
            return t
        from timm.layers import apply_rot_embed_cat

        P, L, N = self.num_prefix, self._tokens, t.shape[2]
        lo, hi = max(start, P), min(start + N, L)
        if lo >= hi:
            return t
        a, b = lo - start, hi - start
        kwargs = {"half": True} if self.rotate_half else {}
        rotated = apply_rot_embed_cat(t[:, :, a:b], self.rope[lo - P : hi - P], **kwargs)
        return torch.cat([t[:, :, :a], rotated, t[:, :, b:]], dim=2).type_as(t)

    def _qkv(self, index: int, query: torch.Tensor, context: Optional[torch.Tensor], query_at: Optional[int]):
        blk = self.blocks[index]
        attn = blk.attn
        norm = (lambda x: x) if self.post_norm else blk.norm1
        if context is None:
            q, k, v = self._project(attn, norm(query), "qkv")
        else:
            (q,) = self._project(attn, norm(query), "q")
            k, v = self._project(attn, norm(context), "kv")
        return self._rotate(attn.q_norm(q), query_at), self._rotate(attn.k_norm(k), 0), v

    def _tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]  # drop-path is the identity in eval
        if self.post_norm:
            x = query + blk.norm1(attended)
            return x + blk.norm2(blk.mlp(x))
        x = query + (attended if blk.gamma_1 is None else blk.gamma_1 * attended)
        y = blk.mlp(blk.norm2(x))
        return x + (y if blk.gamma_2 is None else blk.gamma_2 * y)


# open_clip's timm towers (``TimmModel``), both kinds: this module sits above open_clip_timm, so it registers them.
def timm_runtime(clip: nn.Module, **kwargs):
    """The runtime of an open_clip ``TimmModel`` tower: by its trunk's type (``Eva`` or ``VisionTransformer``)."""
    from timm.models.eva import Eva

    if isinstance(getattr(clip.visual, "trunk", None), Eva):
        return OpenClipEvaRuntime(clip, **kwargs)
    return OpenClipTimmRuntime(clip, **kwargs)


register_visual_runtime("TimmModel", timm_runtime)
