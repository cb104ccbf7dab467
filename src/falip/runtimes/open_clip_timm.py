"""open_clip models whose image tower is a timm model (open_clip's ``TimmModel``): ``VisionTransformer`` and ``Eva``.

- timm ``VisionTransformer`` (:class:`OpenClipTimmRuntime`): SigLIP and SigLIP2 (``ViT-B-16-SigLIP``,
  ``ViT-SO400M-14-SigLIP2`` …, a MAP attention probe, no class token) and [CLS]-pooled timm ViTs (e.g.
  MobileCLIP2-L-14's ``vit_large_patch14_clip_224``, also with register tokens);
- timm ``Eva`` (:class:`falip.runtimes.open_clip_eva.OpenClipEvaRuntime`): EVA01/EVA02-CLIP and PE-Core.

Primitives (each checked against the model's own forward when the adapter is built, see
:mod:`falip.runtimes.contract`): ``TimmModel.forward`` = the trunk's stem (``patch_embed`` → ``_pos_embed`` →
``norm_pre``) → ``blocks`` → ``norm`` → ``forward_head`` (pool → ``fc_norm`` → ``head``) → ``TimmModel.head``
(open_clip's projection); ``blocks[i](x, attn_mask=...)``, whose mask timm's attention adds to its logits; the
block's ``norm1``, ``attn.qkv`` (rows: q, k, v), ``attn.q_norm``/``k_norm``, ``attn.norm``, ``attn.proj``,
``ls1``, ``norm2``, ``mlp``, ``ls2``; the probe ``trunk.attn_pool(x, attn_mask=...)`` (``AttentionPoolLatent``),
which adds the mask to its attention logits: that is where ``pool_bias`` goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .open_clip import OpenClipModelParts

TIMM_RANGE = "timm 1.0.17 to 1.0.31"  # the range falip is tested with; pyproject.toml declares it


def timm_layout(obj: object, names: Sequence[str], what: str) -> None:
    """UnsupportedModelError naming the timm range unless ``obj`` has every attribute in ``names``."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        import timm

        raise UnsupportedModelError(
            f"{what} of timm {timm.__version__} has no {', '.join(missing)}: an attention layout falip does not know; "
            f"falip runs {TIMM_RANGE}"
        )


class TimmTower(OpenClipModelParts):
    """What every timm tower shares: geometry, normalisation, the trunk's stem, final norm, pooling and the probe.

    ``pool`` is ``"attention_pool"`` for a MAP probe and ``"cls"`` for class-token pooling; other poolings (average,
    max, none) are refused: FALIP needs a query that pools to bias. ``num_prefix`` = class token + register tokens.
    tokenizer / text_missing: as :class:`~falip.runtimes.open_clip.OpenClipRuntime`.
    """

    def __init__(self, clip: nn.Module, mean, std, tokenizer, text_missing, block_types: tuple, attn_types: tuple):
        from timm.layers import AttentionPoolLatent

        visual = clip.visual
        trunk = visual.trunk
        for i, blk in enumerate(trunk.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk) not in block_types or type(attn) not in attn_types:
                raise UnsupportedModelError(
                    f"timm block {i} is a {type(blk).__name__} with {type(attn).__name__}; falip runs "
                    f"{' / '.join(t.__name__ for t in block_types)} with {' / '.join(t.__name__ for t in attn_types)}"
                )
            timm_layout(attn, ("num_heads", "proj", "q_norm", "k_norm"), f"block {i}'s {type(attn).__name__}")
            if getattr(attn, "gate", None) is not None:
                raise UnsupportedModelError(f"timm block {i}'s attention has a gate on its output; falip does not support it")
            norm = getattr(attn, "norm", None)
            if norm is not None and not isinstance(norm, (nn.Identity, nn.LayerNorm)):
                raise UnsupportedModelError(f"timm block {i}'s attention output is normalised by {type(norm).__name__}")
        if "pool" in dict(visual.head.named_children()):
            raise UnsupportedModelError("open_clip's abs_attn/rot_attn pooling heads are for CNN features, not supported")
        if getattr(trunk, "attn_pool", None) is not None:
            if type(trunk.attn_pool) is not AttentionPoolLatent:
                raise UnsupportedModelError(
                    f"this timm tower pools with {type(trunk.attn_pool).__name__}; of the attention pools falip biases "
                    "only the latent-query MAP probe (AttentionPoolLatent)"
                )
            self.pool = "attention_pool"
        elif trunk.global_pool == "token":
            self.pool = "cls"
        else:
            raise UnsupportedModelError(
                f"this timm tower pools its tokens with global_pool={trunk.global_pool!r}; FALIP biases the query that "
                "pools (a class token or an attention probe), and an average/max pool has none"
            )
        clip.eval()
        self.clip, self.visual, self.trunk, self.blocks = clip, visual, trunk, trunk.blocks
        embed = trunk.patch_embed  # timm's PatchEmbed, or a convolutional stem (HybridEmbed: MobileCLIP's MCi)
        (h, w), (gh, gw) = tuple(embed.img_size), tuple(embed.grid_size)
        if h != w or gh != gw or h % gh:
            raise UnsupportedModelError(f"only square inputs on a square token grid are supported, got {(h, w)} on {(gh, gw)}")
        self.image_size, self.patch_size = int(h), int(h) // int(gh)  # pixels per token, whatever the stem
        self.grid = (int(gh), int(gw))
        self.num_prefix = int(trunk.num_prefix_tokens)
        self.num_layers = len(self.blocks)
        self.num_heads = int(self.blocks[0].attn.num_heads)
        self.width = int(trunk.embed_dim)
        # The probe pools every token unless the trunk says it skips the prefix (timm ViT's pool_include_prefix).
        self.probe_skips_prefix = self.pool == "attention_pool" and not getattr(trunk, "pool_include_prefix", True)
        self._normalisation(mean, std, getattr(trunk, "pretrained_cfg", None), "the timm tower's own (pretrained_cfg)")
        self._init_text(tokenizer, text_missing)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.trunk.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def _own_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def _model_blocks(self):
        return self.blocks

    def _head(self, tokens: torch.Tensor, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(B, E)`` of trunk outputs ``(B, L', D)``: timm's final norm and pooling (the probe with
        ``pool_bias (B, L)`` on its attention logits), timm's head, then open_clip's projection."""
        t = self.trunk
        x = t.norm(tokens)
        if pool_bias is None:
            return self.visual.head(t.forward_head(x))
        mask = self._probe_mask(pool_bias, x.shape[0], x.shape[1]).to(device=x.device, dtype=x.dtype)
        pooled = t.attn_pool(x[:, self.num_prefix :] if self.probe_skips_prefix else x, attn_mask=mask)
        return self.visual.head(t.head(t.head_drop(t.fc_norm(pooled))))

    def _probe_mask(self, pool_bias: torch.Tensor, B: int, L: int) -> torch.Tensor:
        """The probe's additive mask ``(B, 1, 1, L or L − num_prefix)`` (every probe head and latent) from ``(B, L)``."""
        if pool_bias.dim() != 2 or tuple(pool_bias.shape) != (B, L):
            raise ValueError(f"pool_bias must be (B, L) = ({B}, {L}) for these tokens, got {tuple(pool_bias.shape)}")
        if self.probe_skips_prefix and self.num_prefix:
            if bool(pool_bias[:, : self.num_prefix].ne(0).any()):
                raise ValueError(
                    f"pool_bias puts a bias on the {self.num_prefix} prefix token(s), which this model's probe does not attend to"
                )
            pool_bias = pool_bias[:, self.num_prefix :]
        return pool_bias[:, None, None, :]

    def _inner_norm(self, index: int) -> Optional[nn.LayerNorm]:
        norm = self.blocks[index].attn.norm
        return None if isinstance(norm, nn.Identity) else norm

    def _out_linear(self, index: int):
        proj = self.blocks[index].attn.proj
        return proj.weight, proj.bias

    def _attn_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        B, H, Q, dh = heads.shape
        attn = self.blocks[index].attn
        return attn.proj(attn.norm(heads.transpose(1, 2).reshape(B, Q, H * dh)))

    def _tested(self) -> str:
        return f"open_clip_torch 3.x and {TIMM_RANGE}"

    def _scale(self, index: int) -> float:
        attn = self.blocks[index].attn
        return float(getattr(attn, "scale", None) or attn.head_dim**-0.5)


class OpenClipTimmRuntime(TimmTower):
    """An open_clip model whose image tower is a ``TimmModel`` wrapping a timm ``VisionTransformer``."""

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
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        visual = getattr(clip, "visual", None)
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(f"OpenClipTimmRuntime runs open_clip TimmModel towers, got {type(visual).__name__}")
        if type(visual.trunk) is not VisionTransformer:
            raise UnsupportedModelError(
                f"this open_clip model's timm tower is {type(visual.trunk).__name__}; OpenClipTimmRuntime runs timm "
                "VisionTransformer towers (Eva towers: OpenClipEvaRuntime; rel-pos ViTs add relative-position terms inside "
                "attention that falip does not evaluate; see docs/models.md)"
            )
        for i, blk in enumerate(visual.trunk.blocks):
            timm_layout(getattr(blk, "attn", None), ("qkv",), f"block {i}'s attention")
        super().__init__(clip, mean, std, tokenizer, text_missing, (Block,), (Attention,))
        self._check_seams()

    def _stem(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixels))))

    def _own_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, _ = x.shape
        return self.blocks[index](x, attn_mask=self._mask(attn_mask, B, L, L, x.dtype))

    def _qkv(self, index: int, query: torch.Tensor, context: Optional[torch.Tensor], query_at: Optional[int]):
        blk = self.blocks[index]
        attn = blk.attn
        H, dh = attn.num_heads, attn.head_dim
        B, Q, _ = query.shape
        if context is None:  # one packed projection, as timm's own Attention
            q, k, v = attn.qkv(blk.norm1(query)).view(B, Q, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            A, w, b = H * dh, attn.qkv.weight, attn.qkv.bias
            Lk = context.shape[1]
            kv = F.linear(blk.norm1(context), w[A:], None if b is None else b[A:]).view(B, Lk, 2, H, dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            q = F.linear(blk.norm1(query), w[:A], None if b is None else b[:A]).view(B, Q, H, dh).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k), v

    def _tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]  # drop-path is the identity in eval
        x = query + blk.ls1(attended)
        return x + blk.ls2(blk.mlp(blk.norm2(x)))
