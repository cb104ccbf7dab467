"""open_clip models with timm ViT towers: SigLIP-style MAP probes, class tokens with register tokens.

Tiny random towers: timm model names registered here (open_clip passes only a timm *name* to
``timm.create_model``), built into open_clip ``CustomTextCLIP`` models from config dicts. Tolerance:
atol 1e-5 on embeddings (float rounding of batched vs. per-sample kernels).
"""

import json
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer

import falip
from conftest import random_boxes, random_image
from falip import FalipModel, FovealConfig, Unleash
from falip.encode import BiasPlan, encode_biased
from falip.errors import TextUnavailableError, UnsupportedModelError
from falip.heads import trace
from falip.runtimes.open_clip_timm import OpenClipTimmRuntime

ATOL = 1e-5
MATTERS = 1e-3  # a bias "changes" normalised embeddings by at least 100× the tolerance
MODES = ("naive", "exact", "approx")
GRID = 4  # 32×32 inputs, 8-pixel patches
TOWERS = {  # timm name → (VisionTransformer arguments, open_clip timm_pool)
    "falip_test_vit_map": (dict(class_token=False, global_pool="map", qk_norm=True, init_values=0.5), "map"),
    "falip_test_vit_map_prefix": (dict(class_token=True, reg_tokens=1, global_pool="map"), "map"),
    "falip_test_vit_reg": (dict(class_token=True, reg_tokens=2, global_pool="token", no_embed_class=True), "token"),
    "falip_test_vit_avg": (dict(class_token=False, global_pool="avg"), "avg"),
}


def _register(name: str, args: dict) -> None:
    def entrypoint(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        base = dict(img_size=8 * GRID, patch_size=8, embed_dim=32, depth=3, num_heads=4)
        return _create_vision_transformer(name, pretrained=pretrained, **dict(base, **args, **kwargs))

    entrypoint.__name__ = name
    register_model(entrypoint)


for _name, (_args, _) in TOWERS.items():
    _register(_name, _args)


def _register_eva() -> None:
    def falip_test_eva(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, use_rot_pos_emb=True)
        return _create_eva("falip_test_eva", pretrained=pretrained, **dict(args, **kwargs))

    register_model(falip_test_eva)


_register_eva()


def clip_config(name: str, pool: str) -> dict:
    """An open_clip model config (SigLIP-like: logit bias; CLIP's BPE tokenizer) with the timm tower ``name``."""
    return dict(
        embed_dim=24,
        init_logit_bias=-10,
        vision_cfg=dict(image_size=8 * GRID, timm_model_name=name, timm_pool=pool, timm_proj="linear"),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1),
    )


def timm_clip(name: str, pool: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random open_clip model whose image tower is the timm model ``name``."""
    torch.manual_seed(seed)
    clip = open_clip.CustomTextCLIP(**clip_config(name, pool)).eval()
    with torch.no_grad():  # sharper attention than the default init, so that a small bias visibly matters
        trunk = clip.visual.trunk
        for blk in trunk.blocks:
            blk.attn.qkv.weight.mul_(3.0)
        if trunk.attn_pool is not None:
            trunk.attn_pool.q.weight.mul_(3.0)
            trunk.attn_pool.latent.mul_(3.0)
    return clip


def runtime(name: str) -> OpenClipTimmRuntime:
    return OpenClipTimmRuntime(timm_clip(name, TOWERS[name][1]), tokenizer=open_clip.SimpleTokenizer(context_length=16))


@pytest.fixture(scope="module")
def probe_rt():
    return runtime("falip_test_vit_map")


@pytest.fixture(scope="module")
def reg_rt():
    return runtime("falip_test_vit_reg")


def pixels(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8 * GRID, 8 * GRID, generator=torch.Generator().manual_seed(seed))


def biases(rt, k: int, seed: int = 1, alpha: float = 2.0) -> torch.Tensor:
    """``(k, num_prefix + patches)`` bump-like biases: 0 on prefix tokens, in [0, alpha] on patches."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.zeros(k, rt.num_prefix + GRID * GRID)
    b[:, rt.num_prefix :] = alpha * torch.rand(k, GRID * GRID, generator=gen)
    return b


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def moved(a, b) -> float:
    """Largest change between the L2-normalised embeddings ``a`` and ``b``."""
    return (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).abs().max().item()


PROBE_ONLY = BiasPlan(layers=(), rows="cls", probe=True)


def test_probe_runtime_geometry(probe_rt, reg_rt):
    assert (probe_rt.pool, probe_rt.num_prefix, probe_rt.grid, probe_rt.embed_dim) == ("attention_pool", 0, (GRID, GRID), 24)
    assert (reg_rt.pool, reg_rt.num_prefix, reg_rt.num_layers, reg_rt.num_heads) == ("cls", 3, 3, 4)


def test_zero_pool_bias_equals_open_clip_encode_image(probe_rt):
    px = pixels(batch=2)
    expected = probe_rt.clip.encode_image(px)
    close(probe_rt.run(px, pool_bias=torch.zeros(2, GRID * GRID)), expected)
    zero = torch.zeros(3, GRID * GRID)
    for mode in MODES:
        close(encode_biased(probe_rt, px[:1], zero, PROBE_ONLY, mode), expected[:1].expand(3, -1))
    with_blocks = BiasPlan(layers=(1, 2), rows="all", probe=True)
    for mode in ("naive", "exact"):
        close(encode_biased(probe_rt, px[:1], zero, with_blocks, mode), expected[:1].expand(3, -1))


def test_probe_bias_changes_embeddings_and_only_through_the_probe(probe_rt):
    px, b = pixels(), biases(probe_rt, 3)
    plain = probe_rt.clip.encode_image(px)
    out = encode_biased(probe_rt, px, b, PROBE_ONLY, "exact")
    assert moved(out, plain) > MATTERS
    # the same bias with probe=False and no blocks is no bias at all
    close(encode_biased(probe_rt, px, b, BiasPlan(layers=(), rows="cls"), "exact"), plain.expand(3, -1))


def test_probe_bias_matches_an_explicit_softmax_over_the_probe_logits(probe_rt):
    """The probe's own forward with our mask ≡ its attention computed by hand with the bias added to the logits."""
    pool = probe_rt.trunk.attn_pool
    x = torch.randn(2, GRID * GRID, 32, generator=torch.Generator().manual_seed(3))
    b = biases(probe_rt, 2)
    H, dh = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent).view(1, 1, H, dh).transpose(1, 2)
    k, v = pool.kv(x).view(2, -1, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax(q @ k.transpose(-1, -2) * dh**-0.5 + b[:, None, None, :], dim=-1)
    attended = pool.proj((probs @ v).transpose(1, 2).reshape(2, 1, -1))
    expected = (attended + pool.mlp(pool.norm(attended)))[:, 0]
    with torch.no_grad():
        close(pool(x, attn_mask=probe_rt._probe_mask(b, 2, GRID * GRID)), expected)


def test_probe_only_modes_agree_and_batched_equals_one_by_one(probe_rt):
    px, b = pixels(), biases(probe_rt, 5)
    naive = encode_biased(probe_rt, px, b, PROBE_ONLY, "naive")
    for mode in ("exact", "approx"):
        for chunk in (1, 2, 5):
            close(encode_biased(probe_rt, px, b, PROBE_ONLY, mode, chunk_size=chunk), naive)
    alone = torch.cat([encode_biased(probe_rt, px, b[k : k + 1], PROBE_ONLY, "exact") for k in range(5)])
    close(alone, naive)


@pytest.mark.parametrize("layers", [(), (1, 2)])
def test_probe_regions_of_several_images_equal_each_image_alone(probe_rt, layers):
    px, b = pixels(batch=3), biases(probe_rt, 6)
    index = torch.tensor([2, 0, 2, 1, 0, 2])
    plan = BiasPlan(layers=layers, rows="all", probe=True)
    alone = torch.cat([encode_biased(probe_rt, px[n : n + 1], b[k : k + 1], plan, "naive") for k, n in enumerate(index.tolist())])
    for mode, chunk in (("naive", None), ("exact", 4), ("exact", 1)):
        close(encode_biased(probe_rt, px, b, plan, mode, chunk_size=chunk, image_index=index), alone)


@pytest.mark.parametrize("rows", ["all", "diagonal"])
def test_probe_and_blocks_exact_equals_naive(probe_rt, rows):
    px, b = pixels(), biases(probe_rt, 4)
    plan = BiasPlan(layers=(1, 2), rows=rows, probe=True, head_scales=torch.tensor([1.0, 0.5, 0.0, 2.0]))
    naive = encode_biased(probe_rt, px, b, plan, "naive")
    assert moved(naive, encode_biased(probe_rt, px, b, PROBE_ONLY, "naive")) > MATTERS  # the blocks matter
    close(encode_biased(probe_rt, px, b, plan, "exact", chunk_size=3), naive)
    unleashed = BiasPlan(layers=(1, 2), rows=rows, probe=True, unleash={2: torch.tensor([1.0, 0.0, 2.0, 1.0])})
    close(encode_biased(probe_rt, px, b, unleashed, "exact", chunk_size=3), encode_biased(probe_rt, px, b, unleashed, "naive"))
    with pytest.raises(ValueError, match="approx.*only when the probe alone is biased"):
        encode_biased(probe_rt, px, b, plan, "approx")


def test_rows_cls_with_blocks_on_a_probe_model_is_an_error(probe_rt):
    with pytest.raises(ValueError, match="rows='cls'.*attention probe.*rows='all' or rows='diagonal'"):
        encode_biased(probe_rt, pixels(), biases(probe_rt, 2), BiasPlan(layers=(2,), rows="cls", probe=True), "exact")


def test_pool_bias_errors(probe_rt, reg_rt):
    with pytest.raises(ValueError, match=r"pool_bias must be \(B, L\) = \(1, 16\)"):
        probe_rt.run(pixels(), pool_bias=torch.zeros(1, 17))
    with pytest.raises(ValueError, match="pool_bias is for attention-pooled models"):
        reg_rt.run(pixels(), pool_bias=torch.zeros(1, 19))
    with pytest.raises(ValueError, match="BiasPlan.probe is for attention-pooled models"):
        encode_biased(reg_rt, pixels(), biases(reg_rt, 1), PROBE_ONLY, "exact")


def test_probe_that_skips_prefix_tokens():
    """A MAP probe over the patches of a model with a class and a register token: the prefix is not pooled."""
    rt = runtime("falip_test_vit_map_prefix")
    assert (rt.pool, rt.num_prefix) == ("attention_pool", 2)
    px, b = pixels(), biases(rt, 3)
    close(encode_biased(rt, px, torch.zeros_like(b), PROBE_ONLY, "exact"), rt.clip.encode_image(px).expand(3, -1))
    naive = encode_biased(rt, px, b, PROBE_ONLY, "naive")
    close(encode_biased(rt, px, b, PROBE_ONLY, "exact"), naive)
    b[0, 0] = 1.0
    with pytest.raises(ValueError, match="bias on the 2 prefix token"):
        encode_biased(rt, px, b, PROBE_ONLY, "exact")


def test_registers_zero_bias_equals_own_forward_in_every_mode(reg_rt):
    px = pixels()
    expected = reg_rt.clip.encode_image(px).expand(3, -1)
    zero = torch.zeros(3, reg_rt.num_prefix + GRID * GRID)
    for rows in ("cls", "all"):
        for mode in MODES if rows == "cls" else ("naive", "exact"):
            close(encode_biased(reg_rt, px, zero, BiasPlan(layers=(1, 2), rows=rows), mode), expected)


@pytest.mark.parametrize(
    "plan",
    [
        BiasPlan(layers=(1, 2), rows="cls"),
        BiasPlan(layers=(0, 2), rows="cls", head_scales=torch.tensor([1.0, 0.0, 2.0, 1.0])),
        BiasPlan(layers=(1, 2), rows="cls", unleash={1: torch.ones(4)}),
        BiasPlan(layers=(0, 1, 2), rows="all"),
        BiasPlan(layers=(1,), rows="diagonal"),
    ],
    ids=["cls", "cls-heads", "cls-unleash", "all", "diagonal"],
)
def test_registers_modes_agree(reg_rt, plan):
    px, b = pixels(), biases(reg_rt, 5)
    naive = encode_biased(reg_rt, px, b, plan, "naive")
    assert moved(naive, reg_rt.clip.encode_image(px)) > MATTERS
    exact = encode_biased(reg_rt, px, b, plan, "exact", chunk_size=2)
    close(exact, naive)
    close(torch.cat([encode_biased(reg_rt, px, b[k : k + 1], plan, "exact") for k in range(5)]), naive)
    if plan.rows == "cls" and plan.layers == (1, 2):  # [CLS] is pooled from the last two blocks only: approx is exact here
        close(encode_biased(reg_rt, px, b, plan, "approx"), naive)


def test_block_heads_terms_sum_to_the_attention_output(reg_rt):
    x = torch.randn(2, reg_rt.num_prefix + GRID * GRID, 32, generator=torch.Generator().manual_seed(4))
    heads = reg_rt.block_heads(1, x[:, :2], x, keep_terms=True)
    assert heads.probs.shape == (2, 4, 2, x.shape[1])
    close(heads.probs.sum(-1), torch.ones(2, 4, 2))
    close(reg_rt.block_tail(1, x[:, :2], heads.terms.sum(2) + heads.out_bias), reg_rt.block(1, x)[:, :2])


def test_average_pooled_timm_tower_is_refused():
    with pytest.raises(UnsupportedModelError, match="global_pool='avg'.*average/max pool has none"):
        runtime("falip_test_vit_avg")


def test_eva_tower_is_refused():
    with pytest.raises(UnsupportedModelError, match="timm tower is Eva; .*EVA02 / PE-Core"):
        OpenClipTimmRuntime(timm_clip("falip_test_eva", "token"), text_missing="no tokenizer in this test")


def test_openai_style_tower_is_refused():
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=64, patch_size=8, image_size=32),
        text_cfg=dict(context_length=16, width=32, heads=4, layers=1),
    )
    with pytest.raises(UnsupportedModelError, match="runs open_clip TimmModel towers, got VisionTransformer"):
        OpenClipTimmRuntime(clip, text_missing="no tokenizer in this test")


# -- through FalipModel ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_model(probe_rt):
    return FalipModel(probe_rt, preprocess="squash", config=FovealConfig(alpha=2.0))


def test_default_config_biases_only_the_probe(probe_model, rng):
    assert probe_model.bias_layers() == ()
    plan = probe_model.plan()
    assert (plan.layers, plan.probe) == ((), True)
    info = probe_model.info()
    assert (info["bias_layers"], info["bias_probe"], info["runtime"]["pool"]) == ([], True, "attention_pool")
    img = random_image(rng, 64, 48)
    boxes = random_boxes(rng, 64, 48, 4)
    plain = probe_model.encode_image(img)
    naive = probe_model.encode_regions(img, boxes, mode="naive")
    assert moved(naive, plain) > MATTERS
    for mode in ("exact", "approx"):
        close(probe_model.encode_regions(img, boxes, mode=mode), naive)
    zero = FovealConfig(alpha=0.0)
    for mode in MODES:
        close(probe_model.encode_regions(img, boxes, mode=mode, config=zero), plain.expand(4, -1))
    blocks = FovealConfig(alpha=2.0, layers=(-2, -1), rows="all")
    assert probe_model.bias_layers(blocks) == (1, 2)
    close(
        probe_model.encode_regions(img, boxes, config=blocks), probe_model.encode_regions(img, boxes, mode="naive", config=blocks)
    )
    mask = np.zeros((48, 64), bool)
    mask[10:30, 5:40] = True
    close(probe_model.encode_regions(img, masks=[mask]), probe_model.encode_regions(img, masks=[mask], mode="naive"))


def test_encode_regions_batch_on_a_probe_model_equals_each_image_alone(probe_model, rng):
    images = [random_image(rng, 64, 48), random_image(rng, 40, 56)]
    boxes = [random_boxes(rng, 64, 48, 3), random_boxes(rng, 40, 56, 2)]
    batched = probe_model.encode_regions_batch(images, boxes, chunk_size=2)
    for image, box, out in zip(images, boxes, batched):
        close(out, probe_model.encode_regions(image, box, mode="naive"))


def test_block_settings_without_blocks_or_with_rows_cls_are_errors_on_a_probe_model(probe_model):
    with pytest.raises(ValueError, match="no \\[CLS\\] query: rows='cls' with layers \\[-1\\].*rows='all'"):
        probe_model.config = FovealConfig(layers=(-1,))
    for bad, name in ((dict(rows="all"), "rows"), (dict(heads=(0,)), "heads"), (dict(unleash=Unleash(layers=(2,))), "unleash")):
        with pytest.raises(ValueError, match=f"FovealConfig {name} act on biased blocks.*only its probe"):
            probe_model.plan(FovealConfig(**bad))


def test_head_analysis_is_refused_on_a_probe_model(probe_model):
    with pytest.raises(UnsupportedModelError, match="head analysis.*attention probe.*no \\[CLS\\] query"):
        trace(probe_model, pixels())


def test_registers_model_through_falip_model(reg_rt, rng):
    model = FalipModel(reg_rt, preprocess="squash", config=FovealConfig(alpha=2.0))
    assert model.bias_layers() == (2,) and not model.plan().probe
    img = random_image(rng, 64, 48)
    boxes = random_boxes(rng, 64, 48, 3)
    bias = model.region_biases(model.transform_for((64, 48)), boxes=boxes)
    assert bias.shape == (3, 3 + GRID * GRID) and not bias[:, :3].any()  # class + 2 register tokens: no bias
    naive = model.encode_regions(img, boxes, mode="naive")
    for mode in ("exact", "approx"):
        close(model.encode_regions(img, boxes, mode=mode), naive)
    assert trace(model, model.preprocess_image(img)[0]).cls_terms.shape == (1, 3, 4, 32)


def test_sigmoid_score_is_the_models_own_logits(probe_model, rng):
    rt = probe_model.runtime
    assert rt.score_kind == "sigmoid"
    img = random_image(rng, 64, 48)
    boxes = random_boxes(rng, 64, 48, 2)
    texts = ["a red circle", "a dog"]
    scores = probe_model.score_regions(img, boxes, texts)
    regions, text = probe_model.encode_regions(img, boxes), probe_model.encode_text(texts)
    expected = rt.clip.logit_scale.exp() * regions @ text.T + rt.clip.logit_bias
    close(scores, expected.detach(), atol=1e-4)
    close(text, F.normalize(rt.clip.encode_text(open_clip.SimpleTokenizer(context_length=16)(texts)), dim=-1).detach())


def test_text_without_tokenizer_raises_a_clear_error():
    rt = OpenClipTimmRuntime(timm_clip("falip_test_vit_map", "map"), text_missing="its hub tokenizer is not cached (test)")
    with pytest.raises(TextUnavailableError, match="no tokenizer: its hub tokenizer is not cached"):
        FalipModel(rt).encode_text(["a dog"])


def test_falip_load_picks_the_timm_runtime_and_loads_offline_without_the_hub_tokenizer(tmp_path):
    """An open_clip config with a timm tower loads through falip.load; a hub tokenizer offline leaves text unavailable."""
    for name, tokenizer in (("falip-test-timm-map", None), ("falip-test-timm-map-hubtok", "timm/ViT-B-16-SigLIP")):
        cfg = clip_config("falip_test_vit_map", "map")
        if tokenizer:
            cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = falip.load("falip-test-timm-map")
        offline = falip.load("falip-test-timm-map-hubtok")
    assert isinstance(model.runtime, OpenClipTimmRuntime) and model.runtime.pool == "attention_pool"
    assert model.encode_text(["a dog"]).shape == (1, 24)
    img = np.zeros((40, 40, 3), np.uint8)
    assert offline.encode_regions(img, [(0, 0, 20, 20)]).shape == (1, 24)
    with pytest.raises(TextUnavailableError, match="tokenizer for falip-test-timm-map-hubtok could not be loaded"):
        offline.encode_text(["a dog"])
