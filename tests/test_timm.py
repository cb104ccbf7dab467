"""open_clip models with timm ViT towers: SigLIP-style MAP probes, class tokens with register tokens.

What is particular to these towers (the probe's bias, prefix tokens the probe skips, refusals, the FalipModel
settings of a probe model); the contract every adapter meets is tests/test_conformance.py. Tiny random towers from
tests/adapters.py. Tolerance: atol 1e-5 on embeddings (float rounding of batched vs. per-sample kernels).
"""

import json
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import falip
from adapters import GRID, TOWERS, clip_config, timm_clip
from conftest import random_boxes, random_image
from falip import FalipModel, FovealConfig, Unleash
from falip.encode import BiasPlan, encode_biased
from falip.errors import TextUnavailableError, UnsupportedModelError
from falip.heads import trace
from falip.runtimes.open_clip_timm import OpenClipTimmRuntime

ATOL = 1e-5
MATTERS = 1e-3  # a bias "changes" normalised embeddings by at least 100× the tolerance
MODES = ("naive", "exact", "approx")


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


def test_average_pooled_timm_tower_is_refused():
    with pytest.raises(UnsupportedModelError, match="global_pool='avg'.*average/max pool has none"):
        runtime("falip_test_vit_avg")


def test_eva_tower_is_not_run_by_the_vit_runtime():
    with pytest.raises(UnsupportedModelError, match="timm tower is Eva; OpenClipTimmRuntime runs .*OpenClipEvaRuntime"):
        OpenClipTimmRuntime(timm_clip("falip_test_eva02"), text_missing="no tokenizer in this test")


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


def test_the_declared_timm_range_is_the_one_errors_name():
    import re
    from pathlib import Path

    from falip.runtimes.open_clip_timm import TIMM_RANGE

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    low, high = re.search(r'"timm>=([\d.]+),<=([\d.]+)"', pyproject).groups()
    assert TIMM_RANGE == f"timm {low} to {high}"


def test_an_unknown_attention_layout_is_an_unsupported_model_error_naming_the_range(monkeypatch):
    clip = timm_clip("falip_test_vit_reg")
    del clip.visual.trunk.blocks[1].attn.qkv  # e.g. a timm release with separate projections
    with pytest.raises(
        UnsupportedModelError, match=r"block 1's attention of timm [\d.]+ has no qkv: .*falip runs timm 1.0.17 to"
    ):
        OpenClipTimmRuntime(clip, text_missing="no tokenizer in this test")
