"""Tiny random models behind every adapter, for the conformance suite (tests/test_conformance.py) and the adapters'
own tests. Adding an adapter = adding one :class:`Case` to :data:`CASES`.

timm towers: timm model names registered here (open_clip passes only a timm *name* to ``timm.create_model``),
built into open_clip ``CustomTextCLIP`` models from config dicts; HF models: transformers configs built in memory.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer

from conftest import tiny_clip
from falip.runtimes import OpenClipRuntime
from falip.runtimes.open_clip_eva import timm_runtime

GRID = 4  # 32×32 inputs, 8-pixel patches
VIT_TOWERS = {  # timm name → (VisionTransformer arguments, open_clip timm_pool)
    "falip_test_vit_map": (dict(class_token=False, global_pool="map", qk_norm=True, init_values=0.5), "map"),
    "falip_test_vit_map_prefix": (dict(class_token=True, reg_tokens=1, global_pool="map"), "map"),
    "falip_test_vit_reg": (dict(class_token=True, reg_tokens=2, global_pool="token", no_embed_class=True), "token"),
    "falip_test_vit_avg": (dict(class_token=False, global_pool="avg"), "avg"),
}
EVA_TOWERS = {  # timm name → (Eva arguments, open_clip timm_pool): tiny EVA02-CLIP, PE-Core and EVA01 towers
    "falip_test_eva02": (
        dict(
            qkv_fused=False,
            mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(GRID, GRID),
            global_pool="token",
        ),
        "token",
    ),  # fmt: skip
    "falip_test_pe": (
        dict(
            global_pool="map",
            attn_type="rope",
            use_pre_transformer_norm=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(GRID, GRID),
            rope_grid_offset=1.0,
            rope_grid_indexing="xy",
            attn_pool_num_heads=8,
            attn_pool_mlp_ratio=4.0,
        ),
        "map",
    ),  # fmt: skip
    "falip_test_eva01": (dict(global_pool="token"), "token"),
    "falip_test_eva_postnorm": (
        dict(use_post_norm=True, use_rot_pos_emb=True, ref_feat_shape=(GRID, GRID), global_pool="token"),
        "token",
    ),
    "falip_test_eva_avg": (dict(use_rot_pos_emb=True, global_pool="avg"), "avg"),
}
TOWERS = {**VIT_TOWERS, **EVA_TOWERS}


def _register(name: str, args: dict, create) -> None:
    def entrypoint(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        base = dict(img_size=8 * GRID, patch_size=8, embed_dim=32, depth=3, num_heads=4)
        return create(name, pretrained=pretrained, **dict(base, **args, **kwargs))

    entrypoint.__name__ = name
    register_model(entrypoint)


for _name, (_args, _) in VIT_TOWERS.items():
    _register(_name, _args, _create_vision_transformer)
for _name, (_args, _) in EVA_TOWERS.items():
    _register(_name, _args, _create_eva)


def clip_config(name: str, pool: str) -> dict:
    """An open_clip model config (SigLIP-like: logit bias; CLIP's BPE tokenizer) with the timm tower ``name``."""
    return dict(
        embed_dim=24,
        init_logit_bias=-10,
        vision_cfg=dict(image_size=8 * GRID, timm_model_name=name, timm_pool=pool, timm_proj="linear"),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1),
    )


def timm_clip(name: str, pool: Optional[str] = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random open_clip model whose image tower is the timm model ``name``."""
    torch.manual_seed(seed)
    clip = open_clip.CustomTextCLIP(**clip_config(name, pool or TOWERS[name][1])).eval()
    with torch.no_grad():  # sharper attention than the default init, so that a small bias visibly matters
        trunk = clip.visual.trunk
        for blk in trunk.blocks:
            for proj in ("qkv", "q_proj", "k_proj"):
                if getattr(blk.attn, proj, None) is not None:
                    getattr(blk.attn, proj).weight.mul_(3.0)
        if trunk.attn_pool is not None:
            trunk.attn_pool.q.weight.mul_(3.0)
            trunk.attn_pool.latent.mul_(3.0)
        for name_, p in trunk.named_parameters():  # timm inits some biases/gains at zero/one: random, so each is seen
            if name_.endswith(("q_bias", "v_bias", "gamma_1", "gamma_2")) or (".norm" in name_ and name_.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    return clip


def timm_tokenizer():
    return open_clip.SimpleTokenizer(context_length=16)


# -- HF transformers --------------------------------------------------------------------------

HF_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, patch_size=8)
HF_TEXT = dict(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16
)

_TOOL = Path(__file__).parents[1] / "tools" / "openai_to_hf.py"
_spec = importlib.util.spec_from_file_location("openai_to_hf", _TOOL)
openai_to_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(openai_to_hf)


def tiny_siglip(kind: str, seed: int = 0, attn: str = "eager"):
    import transformers

    torch.manual_seed(seed)
    if kind == "siglip":
        config = transformers.SiglipConfig(vision_config=dict(HF_VISION, image_size=32), text_config=HF_TEXT)
        model = transformers.SiglipModel(config)
    else:
        config = transformers.Siglip2Config(vision_config=dict(HF_VISION, num_patches=16), text_config=HF_TEXT)
        model = transformers.Siglip2Model(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_hf_clip(seed: int = 7):
    """The HF ``CLIPModel`` of a tiny OpenAI-layout CLIP (tools/openai_to_hf.py's conversion), eager attention."""
    import transformers

    from falip.runtimes.open_clip_loading import infer_openai_config

    state = {k: v for k, v in tiny_clip(64, 16, layers=3, seed=seed).state_dict().items() if k != "attn_mask"}
    model = transformers.CLIPModel(openai_to_hf.hf_clip_config(infer_openai_config(state)))
    model.load_state_dict(openai_to_hf.convert_state_dict(state), strict=True)
    model.set_attn_implementation("eager")
    return model.eval()


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One adapter fixture. model(): a fresh tiny model; runtime(model, tokenizer=True): the adapter on it (with the
    model's tokenizer, or with text_missing); own(model, pixels): the library's own image features ``(B, E)``;
    image_tensor / text_tensor: a parameter of the image / text tower (name in the model's state dict)."""

    name: str
    model: Callable[[], torch.nn.Module]
    runtime: Callable[..., object]
    own: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    image_tensor: str
    text_tensor: str


def _open_clip_runtime(cls):
    def build(model, tokenizer=True, text_missing="no tokenizer in this test"):
        tok = (
            (open_clip.SimpleTokenizer(context_length=model.context_length) if cls is OpenClipRuntime else timm_tokenizer())
            if tokenizer
            else None
        )
        return cls(model, tokenizer=tok, text_missing=None if tokenizer else text_missing)

    return build


def _hf_runtime(tokenizer_of):
    def build(model, tokenizer=True, text_missing="no tokenizer in this test"):
        from falip.runtimes.hf import HFRuntime

        tok = tokenizer_of(model) if tokenizer else None
        return HFRuntime(model, tok, None if tok is not None else text_missing)

    return build


def _hf_own(model, pixels):
    from falip.runtimes.hf import HFRuntime

    if type(model).__name__ == "Siglip2Model":  # its own input: patches; HFRuntime._patchify is checked against its processor
        patches, spatial = HFRuntime._patchify(_Grid(model), pixels)
        mask = torch.ones(patches.shape[:2], dtype=torch.long)
        return model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial).pooler_output
    return model.get_image_features(pixel_values=pixels).pooler_output


class _Grid:
    """What HFRuntime._patchify reads of a runtime, from a Siglip2 model's config."""

    def __init__(self, model):
        self.patch_size = model.config.vision_config.patch_size
        self.grid = (int(model.config.vision_config.num_patches**0.5),) * 2


def _open_clip_own(model, pixels):
    return model.encode_image(pixels)


def _timm_case(name: str, label: str) -> Case:
    return Case(
        label,
        functools.partial(timm_clip, name),
        timm_runtime_builder,
        _open_clip_own,
        "visual.trunk.patch_embed.proj.weight",
        "text.token_embedding.weight",
    )


def timm_runtime_builder(model, tokenizer=True, text_missing="no tokenizer in this test"):
    return timm_runtime(
        model, tokenizer=timm_tokenizer() if tokenizer else None, text_missing=None if tokenizer else text_missing
    )


CASES = {
    c.name: c
    for c in (
        Case("open_clip-vit", lambda: tiny_clip(64, 16, layers=3, seed=7), _open_clip_runtime(OpenClipRuntime), _open_clip_own,
             "visual.conv1.weight", "token_embedding.weight"),
        _timm_case("falip_test_vit_map", "timm-map-probe"),
        _timm_case("falip_test_vit_reg", "timm-cls-registers"),
        _timm_case("falip_test_eva02", "eva02"),
        _timm_case("falip_test_pe", "pe-core"),
        _timm_case("falip_test_eva01", "eva01"),
        _timm_case("falip_test_eva_postnorm", "eva02-e-postnorm"),
        Case("hf-clip", tiny_hf_clip, _hf_runtime(lambda m: openai_to_hf.clip_tokenizer(m.config.text_config.max_position_embeddings)),
             _hf_own, "vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        Case("hf-siglip", lambda: tiny_siglip("siglip"), _hf_runtime(lambda m: None), _hf_own,
             "vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        Case("hf-siglip2", lambda: tiny_siglip("siglip2"), _hf_runtime(lambda m: None), _hf_own,
             "vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    )
}  # fmt: skip
