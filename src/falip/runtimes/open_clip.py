"""open_clip adapter (tested with open_clip_torch 3.x): open_clip's own ``VisionTransformer`` ([CLS] pooled).

Its primitives (see :mod:`falip.runtimes.contract`, which checks each against the model's own forward when
the adapter is built, so an open_clip release that changes them fails loudly instead of giving wrong embeddings):

- ``visual.forward`` = ``visual._embeds`` (stem) → ``visual.transformer.resblocks`` → ``visual._pool`` (final norm,
  [CLS] pooling) → ``@ visual.proj``;
- ``resblocks[i](x, attn_mask=...)``, whose float mask reaches ``nn.MultiheadAttention`` as an additive bias;
- the block's ``ln_1``, ``attn.in_proj_weight``/``in_proj_bias`` (rows: q, k, v), ``attn.out_proj``, ``ls_1``,
  ``ln_2``, ``mlp``, ``ls_2``.

:class:`OpenClipModelParts` holds what every open_clip adapter shares whatever its image tower is (the text
tower with the model's tokenizer, the score, the digests' text tensors); the adapters for open_clip's timm
towers build on it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .contract import BlockRuntime

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipModelParts(BlockRuntime):
    """The primitives of an open_clip model that do not depend on its image tower: the text tower with the model's
    own tokenizer (token ids ``(T, context_length)`` from a list of strings), the logit scale/bias, the state dict.

    A subclass sets ``clip`` (the open_clip ``CLIP``/``CustomTextCLIP``) and calls :meth:`_init_text`.
    """

    clip: nn.Module

    def _tokenize(self, texts: Sequence[str]) -> dict:
        return {"input_ids": self.tokenizer(list(texts))}

    def _encode_tokens(self, tokens: dict) -> torch.Tensor:
        return self.clip.encode_text(tokens["input_ids"])

    def _logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def _logit_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.clip, "logit_bias", None)

    def _state(self) -> dict:
        return self.clip.state_dict()

    def _is_text_tensor(self, name: str) -> bool:
        return not name.startswith(("visual.", "logit_"))  # the image tower and the logit scale/bias do not change text

    def _normalisation(self, mean, std, own: Optional[dict], own_name: str) -> None:
        """mean/std: the pretrained tag's when given, else the tower's own (``own``), else OpenAI's; and which."""
        if mean is not None and std is not None:
            self.mean, self.std, self.mean_std_source = tuple(mean), tuple(std), "the pretrained tag's"
        elif own and own.get("mean") and own.get("std"):
            self.mean, self.std, self.mean_std_source = tuple(own["mean"]), tuple(own["std"]), own_name
        else:
            self.mean, self.std, self.mean_std_source = OPENAI_MEAN, OPENAI_STD, "OpenAI's defaults"

    def _subject(self) -> str:
        return f"this open_clip version's {type(self.clip.visual).__name__} tower"

    def _tested(self) -> str:
        return "open_clip_torch 3.x and timm 1.0.x"


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
                "to bias; see docs/models.md)"
            )
        if getattr(visual, "output_tokens", False):
            raise UnsupportedModelError(
                "this ViT is a CoCa image tower (it returns its tokens for the captioning decoder too); falip runs CLIP ViTs"
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
            attn = blk.attn
            if getattr(attn, "in_proj_weight", None) is None or attn.bias_k is not None or attn.add_zero_attn:
                raise UnsupportedModelError(
                    f"block {i}'s attention has no packed in_proj_weight (or has bias_k/zero-attention): falip runs "
                    "nn.MultiheadAttention's standard layout, as in open_clip_torch 3.x"
                )
        h, w = visual.image_size
        ph, pw = visual.patch_size
        if h != w or ph != pw:
            raise UnsupportedModelError(
                f"only square inputs and patches are supported, got {visual.image_size}/{visual.patch_size}"
            )
        clip.eval()
        self.clip, self.visual, self.blocks = clip, visual, blocks
        self.image_size, self.patch_size = int(h), int(ph)
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.num_layers = len(blocks)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.width = int(visual.transformer.width)
        self.batch_first = bool(blocks[0].attn.batch_first)
        own = {"mean": getattr(visual, "image_mean", None), "std": getattr(visual, "image_std", None)}
        self._normalisation(mean, std, own, "the model's preprocess config")
        self._init_text(tokenizer, text_missing)
        self._check_seams()

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    # -- primitives -----------------------------------------------------------------------------
    def _own_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def _stem(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(pixels)

    def _head(self, tokens: torch.Tensor, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def _model_blocks(self):
        return self.blocks

    def _from_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    def _own_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.batch_first:
            return self.blocks[index](x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return self.blocks[index](x, attn_mask=attn_mask)

    def _qkv(self, index: int, query: torch.Tensor, context: Optional[torch.Tensor], query_at: Optional[int]):
        blk = self.blocks[index]
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        B, Q, D = query.shape
        H = self.num_heads
        if context is None:  # one packed projection, as nn.MultiheadAttention's self-attention
            return F.linear(blk.ln_1(query), w, b).view(B, Q, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        Lk = context.shape[1]
        q = F.linear(blk.ln_1(query), w[:D], None if b is None else b[:D]).view(B, Q, H, -1).transpose(1, 2)
        kv = F.linear(blk.ln_1(context), w[D:], None if b is None else b[D:]).view(B, Lk, 2, H, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _scale(self, index: int) -> float:
        return (self.width // self.num_heads) ** -0.5

    def _out_linear(self, index: int):
        out = self.blocks[index].attn.out_proj
        return out.weight, out.bias

    def _attn_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        B, H, Q, dh = heads.shape
        return F.linear(heads.transpose(1, 2).reshape(B, Q, H * dh), *self._out_linear(index))

    def _tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]
        x = query + blk.ls_1(attended)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def catalog() -> list[tuple[str, str]]:
    """``(name, "runs" | "refused: why")`` for every model the open_clip adapter knows (falip's shipped models and
    every open_clip config), classified from the config dicts: nothing is built (except a timm tower whose pooling is its
    own default, built to read it: one small config today)."""
    import open_clip
    import timm
    from timm.models import is_model_in_modules

    from ..loading import SHIPPED_MODELS

    out = [(name, "runs") for name in SHIPPED_MODELS]
    for name in open_clip.list_models():
        v = open_clip.get_model_config(name)["vision_cfg"]
        tower = v.get("timm_model_name")
        if tower is None:
            out.append((name, _native_status(v)))
        elif not timm.is_model(tower):
            out.append((name, f"refused: timm {timm.__version__} has no {tower} (a newer timm has it)"))
        elif not is_model_in_modules(tower, ["vision_transformer", "vision_transformer_hybrid", "eva"]):
            out.append((name, f"refused: its image tower is timm's {tower}, not a ViT or Eva (no [CLS] query or probe to bias)"))
        else:
            out.append((name, _timm_status(tower, v.get("timm_pool", "avg"), v.get("timm_proj", "linear"))))
    return out


def library_versions() -> str:
    """``open_clip_torch X, timm Y``: what :func:`catalog`'s answer depends on."""
    import open_clip
    import timm

    return f"open_clip_torch {open_clip.__version__}, timm {timm.__version__}"


def _native_status(v: dict) -> str:
    if isinstance(v.get("layers"), (list, tuple)):
        return "refused: a ResNet image tower has no attention over patches to bias"
    if v.get("attentional_pool"):
        return "refused: pools with an attentional pooler (CoCa), not its [CLS] token"
    if v.get("output_tokens"):
        return "refused: a CoCa image tower (it returns its tokens for the captioning decoder too)"
    if v.get("pool_type", "tok") != "tok" or v.get("global_average_pool"):
        return "refused: pools by averaging its tokens: no [CLS] query to bias"
    return "runs"


def _timm_status(tower: str, pool: str, proj: Optional[str]) -> str:
    if pool in ("abs_attn", "rot_attn"):
        return f"refused: open_clip's {pool} head pools CNN features"
    if not pool and proj in ("linear", "mlp"):  # the timm model's own default pooling (one small config): build it to read it
        import timm

        pool = timm.create_model(tower).global_pool
    if pool in ("map", "token"):
        return "runs"
    return f"refused: its timm tower pools with global_pool={pool!r}: an average/max pool has no query to bias"
