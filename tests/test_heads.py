"""Per-head decomposition, unleashing, head response and attention maps (docs/method.md §7)."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, tiny_clip, wrap
from falip import FovealConfig, InvalidRegionError, UnsupportedModelError
from falip.bias import Unleash
from falip.cli import build_parser, main
from falip.cli.common import config_from_args, parse_head_spec, parse_unleash
from falip.heads import head_delta, prompt_response, rank_heads, trace
from falip.methods import encode_unleashed, encode_with_method
from falip.prompts import apply_edit
from falip.viz import attention_figure_size, attention_maps, draw_attention, draw_head_heatmap, heatmap_size, rollout

BOXES = [(20, 30, 150, 140), (170, 90, 310, 230)]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(224, 32, layers=6, width=256)  # 7×7 grid, 6 blocks, 4 heads


@pytest.fixture(scope="module")
def model(clip):
    return wrap(clip, preprocess="squash")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(random_image(np.random.default_rng(5), 320, 240))


def tokens_and_mask(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L, H = 1 + 7 * 7, model.num_heads
    x = torch.randn(2, L, model.runtime.width, generator=gen)
    mask = 0.7 * torch.randn(2 * H, L, L, generator=gen)
    return x, mask


# -- the adapter's head-by-head block --------------------------------------------------------------


@torch.no_grad()
def test_block_heads_equals_the_blocks_own_forward(model):
    rt = model.runtime
    x, mask = tokens_and_mask(model)
    for i in (0, 3, 5):
        r = rt.block_heads(i, x, x, mask)
        torch.testing.assert_close(r.out, rt.block(i, x, mask), atol=1e-5, rtol=0)
        q = rt.block_heads(i, x[:, :3], x, mask[:, :3])
        torch.testing.assert_close(q.out, rt.block_query(i, x[:, :3], x, mask[:, :3]), atol=1e-5, rtol=0)
    assert r.terms is None and r.probs.shape == (2, 4, 50, 50)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(2, 4, 50), atol=1e-5, rtol=0)


@torch.no_grad()
def test_per_head_terms_sum_to_the_blocks_attention_output(model):
    rt = model.runtime
    x, mask = tokens_and_mask(model, seed=1)
    for i in range(model.num_layers):
        blk = rt.blocks[i]
        r = rt.block_heads(i, x, x, mask, keep_terms=True)
        assert r.terms.shape == (2, 50, 4, 256)
        own = blk.attention(q_x=blk.ln_1(x), attn_mask=mask)  # open_clip's own attention output
        torch.testing.assert_close(r.terms.sum(2) + r.out_bias, own, atol=1e-5, rtol=0)
    # each head's term is its attention-weighted values through its slice of the output projection
    attn, dh = rt.blocks[2].attn, 64
    r = rt.block_heads(2, x, x, mask, keep_terms=True)
    v = torch.nn.functional.linear(rt.blocks[2].ln_1(x), attn.in_proj_weight[512:], attn.in_proj_bias[512:])
    h = 3
    head_out = r.probs[:, h] @ v[..., h * dh : (h + 1) * dh]
    torch.testing.assert_close(r.terms[:, :, h], head_out @ attn.out_proj.weight[:, h * dh : (h + 1) * dh].T, atol=1e-5, rtol=0)


@torch.no_grad()
def test_unleashing_a_block_touches_only_the_chosen_heads(model):
    rt = model.runtime
    x, mask = tokens_and_mask(model, seed=2)
    prompted = rt.block_heads(4, x, x, mask, keep_terms=True)
    plain = rt.block_heads(4, x, x, None, keep_terms=True)
    zero = rt.block_heads(4, x, x, mask, gain=torch.zeros(4), keep_terms=True)
    torch.testing.assert_close(zero.out, prompted.out, atol=1e-6, rtol=0)
    gain = torch.tensor([0.0, 1.0, 0.0, 2.5])
    u = rt.block_heads(4, x, x, mask, gain=gain, keep_terms=True)
    for h in (0, 2):
        torch.testing.assert_close(u.terms[:, :, h], prompted.terms[:, :, h], atol=1e-6, rtol=0)
    for h in (1, 3):
        change = prompted.terms[:, :, h] - plain.terms[:, :, h]
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(u.terms[:, :, h] - plain.terms[:, :, h], (1 + gain[h]) * change, atol=1e-5, rtol=0)
    torch.testing.assert_close(u.probs.sum(-1), torch.ones(2, 4, 50), atol=1e-5, rtol=0)


def test_a_block_layout_falip_does_not_reproduce_is_refused_when_the_runtime_is_built():
    clip = tiny_clip(224, 32, layers=2)
    blk = clip.visual.transformer.resblocks[0]
    own = blk.attention
    blk.attention = lambda **kw: 2 * own(**kw)  # a block whose forward no longer matches its weights
    with pytest.raises(UnsupportedModelError, match="block from its primitives"):
        wrap(clip)
    blk.attention = own
    blk.attn.add_zero_attn = True
    with pytest.raises(UnsupportedModelError, match="standard layout"):
        wrap(clip)


# -- trace: the whole model head by head --------------------------------------------------------------


def test_trace_reproduces_the_encoders(model, image):
    pixels, transform = model.preprocess_image(image)
    bias = model.region_biases(transform, boxes=BOXES)
    t = trace(model, pixels, bias)
    assert t.cls_terms.shape == (2, 6, 4, 256) and t.cls_probs.shape == (2, 6, 4, 50) and t.probs is None
    emb = torch.nn.functional.normalize(t.embedding, dim=-1)
    torch.testing.assert_close(emb, model.encode_regions(image, BOXES, mode="naive"), atol=1e-5, rtol=0)
    plain = trace(model, pixels, full_probs=True)
    torch.testing.assert_close(
        torch.nn.functional.normalize(plain.embedding, dim=-1), model.encode_image(image), atol=1e-5, rtol=0
    )
    assert plain.probs.shape == (1, 6, 4, 50, 50)
    torch.testing.assert_close(plain.probs[:, :, :, 0], plain.cls_probs, atol=0, rtol=0)
    # unbiased blocks 0..3 are the same with and without the bias; biased blocks 4, 5 differ
    torch.testing.assert_close(t.cls_terms[:, :4], plain.cls_terms.expand(2, -1, -1, -1)[:, :4], atol=1e-5, rtol=0)
    assert (t.cls_terms[:, 4:] - plain.cls_terms[:, 4:]).abs().max() > 1e-4


# -- unleashing through the config and every encoding mode ---------------------------------------------


def unleashed(lam, layers=(4, 5), heads=None, **kw):
    return FovealConfig(alpha=1.0, unleash=(Unleash(layers, heads, lam),), **kw)


@pytest.mark.parametrize("mode", ["naive", "exact", "approx"])
def test_lambda_zero_is_the_prompted_model(model, image, mode):
    ref = model.encode_regions(image, BOXES, config=FovealConfig(alpha=1.0), mode=mode)
    torch.testing.assert_close(model.encode_regions(image, BOXES, config=unleashed(0.0), mode=mode), ref, atol=1e-6, rtol=0)
    assert (model.encode_regions(image, BOXES, config=unleashed(1.0), mode=mode) - ref).abs().max() > 1e-4


def test_unleashed_modes_agree(model, image):
    for cfg in (unleashed(1.0), unleashed(2.0, layers=(5,), heads=(1, 3)), unleashed(1.0, rows="all")):
        naive = model.encode_regions(image, BOXES, config=cfg, mode="naive")
        torch.testing.assert_close(model.encode_regions(image, BOXES, config=cfg, mode="exact"), naive, atol=1e-5, rtol=0)
    last = FovealConfig(alpha=1.0, layers=(5,), unleash=(Unleash((5,), (0, 2), 1.5),))  # approx is exact here
    torch.testing.assert_close(
        model.encode_regions(image, BOXES, config=last, mode="approx"),
        model.encode_regions(image, BOXES, config=last, mode="exact"),
        atol=1e-5,
        rtol=0,
    )


def test_unleashing_changes_only_the_chosen_heads_of_the_model(model, image):
    pixels, transform = model.preprocess_image(image)
    bias = model.region_biases(transform, boxes=BOXES[:1])
    prompted = trace(model, pixels, bias, FovealConfig(alpha=1.0))
    u = trace(model, pixels, bias, unleashed(1.0, layers=(4,), heads=(2,)))
    torch.testing.assert_close(u.cls_terms[:, :4], prompted.cls_terms[:, :4], atol=1e-6, rtol=0)  # earlier blocks
    for h in (0, 1, 3):  # block 4, other heads: same input, same bias → same terms
        torch.testing.assert_close(u.cls_terms[:, 4, h], prompted.cls_terms[:, 4, h], atol=1e-5, rtol=0)
    assert (u.cls_terms[:, 4, 2] - prompted.cls_terms[:, 4, 2]).abs().max() > 1e-4
    # λ = 1 doubles the change in a block whose input the bias has not touched yet
    plain = trace(model, pixels)
    first = FovealConfig(alpha=1.0, layers=(4, 5), unleash=(Unleash((4,), None, 1.0),))
    u4 = trace(model, pixels, bias, first).cls_terms[:, 4]
    p4 = trace(model, pixels, bias, FovealConfig(alpha=1.0, layers=(4, 5))).cls_terms[:, 4]
    torch.testing.assert_close(u4 - plain.cls_terms[:, 4], 2 * (p4 - plain.cls_terms[:, 4]), atol=1e-5, rtol=0)


def test_method_layer_honours_unleashing(model, image):
    cfg = unleashed(1.0)
    emb = encode_with_method(model, image, BOXES, method="falip", config=cfg)
    torch.testing.assert_close(emb, model.encode_regions(image, BOXES, config=cfg), atol=1e-6, rtol=0)
    assert (emb - encode_with_method(model, image, BOXES, method="falip", config=FovealConfig(alpha=1.0))).abs().max() > 1e-4


# -- Eq. 6: Σ_h [G'_h + λ(G'_h − G_h)] on the [CLS] attention output ----------------------------------


def test_eq6_with_the_bias_equals_attention_space_unleashing(model, image):
    # G_h at the same block input without the bias: the head-term form equals P + λ(P − P0), in every block
    for cfg in (unleashed(1.0), unleashed(2.0, layers=(5,), heads=(1, 3)), unleashed(-0.5, layers=(4,), heads=(0,))):
        general = encode_unleashed(model, image, BOXES, method="falip", config=cfg, reference="same-input")
        torch.testing.assert_close(general, model.encode_regions(image, BOXES, config=cfg, mode="naive"), atol=1e-5, rtol=0)
    # G_h from the clean image's own pass: the same in the first biased block (its input is still the clean one) ...
    first = FovealConfig(alpha=1.0, layers=(4, 5), unleash=(Unleash((4,)),))
    clean = encode_unleashed(model, image, BOXES, method="falip", config=first)
    torch.testing.assert_close(clean, model.encode_regions(image, BOXES, config=first), atol=1e-5, rtol=0)
    # ... but not in block 5, whose input the bias of block 4 has already changed
    both = unleashed(1.0)
    assert (
        encode_unleashed(model, image, BOXES, method="falip", config=both) - model.encode_regions(image, BOXES, config=both)
    ).abs().max() > 1e-5


def test_eq6_for_an_image_edit_takes_g_from_the_clean_image(model, image):
    runtime = model.runtime
    lam = torch.tensor([1.0, 0.0, 2.0, 0.0])  # heads 0 and 2 of the last block
    cfg = FovealConfig(unleash=(Unleash((5,), (0,), 1.0), Unleash((5,), (2,), 2.0)))
    circle = encode_with_method(model, image, BOXES, method="circle", config=cfg)
    clean = trace(model, model.preprocess_image(image)[0]).cls_terms[0, 5]  # (H, D): G_h, the clean image's block-5 terms
    for k, box in enumerate(BOXES):
        pixels = model.preprocess_image(apply_edit(image, "circle", box, None).image)[0]

        def trunk(x):
            for i in range(5):
                x = runtime.block(i, x)
            r = runtime.block_heads(5, x, x, keep_terms=True)
            attended = r.terms.sum(2) + r.out_bias
            attended[:, 0] += (lam[:, None] * (r.terms[0, 0] - clean)).sum(0)  # Σ_h λ_h (G'_h − G_h)
            return runtime.block_tail(5, x, attended)

        expected = torch.nn.functional.normalize(runtime.run(pixels, trunk), dim=-1)[0]
        torch.testing.assert_close(circle[k], expected, atol=1e-5, rtol=0)
    plain = encode_with_method(model, image, BOXES, method="circle")
    assert (circle - plain).abs().max() > 1e-4
    zero = FovealConfig(unleash=(Unleash((5,), None, 0.0),))  # λ = 0: the edited image unchanged
    one = BOXES[:1]
    torch.testing.assert_close(encode_with_method(model, image, one, method="circle", config=zero), plain[:1], atol=1e-5, rtol=0)
    early = FovealConfig(unleash=(Unleash((0,)),))  # an edit changes every block, so any block can be unleashed
    assert (encode_with_method(model, image, one, method="circle", config=early) - plain[:1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="same-input"):
        encode_unleashed(model, image, BOXES, method="circle", config=cfg, reference="same-input")
    with pytest.raises(ValueError, match="nothing to unleash"):
        encode_unleashed(model, image, BOXES, method="circle", config=FovealConfig())


def test_unleash_parsing_config_and_errors(clip):
    assert parse_unleash("8-11:all") == Unleash((8, 9, 10, 11), None, 1.0)
    assert parse_unleash("10:3,5:2.5") == Unleash((10,), (3, 5), 2.5)
    assert parse_unleash("-1:0") == Unleash((-1,), (0,), 1.0)
    assert parse_head_spec("0,3") == (0, 3) and parse_head_spec("0:2,3:0.5") == {0: 2.0, 3: 0.5}
    args = build_parser().parse_args(["score", "x.png", "--text", "a", "--unleash", "4-5:all", "--unleash", "5:1:3"])
    cfg = config_from_args(args)
    assert cfg.unleash == (Unleash((4, 5), None, 1.0), Unleash((5,), (1,), 3.0))
    recorded = json.loads(json.dumps(cfg.to_dict()))["unleash"]
    assert recorded == [{"layers": [4, 5], "heads": None, "lam": 1.0}, {"layers": [5], "heads": [1], "lam": 3.0}]
    assert FovealConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg  # a recorded config rebuilds the same config
    gains = cfg.unleash_gains(6, 4)
    assert sorted(gains) == [4, 5] and gains[5].tolist() == [1.0, 3.0, 1.0, 1.0]  # the later entry wins for head 1
    assert "unleash" not in FovealConfig().to_dict()  # unchanged serialisation without the option
    assert config_from_args(build_parser().parse_args(["score", "x.png", "--text", "a"])).unleash is None
    for bad in ("8-11", "x:all", "8:all:nan", "8:all:abc"):
        with pytest.raises(argparse.ArgumentTypeError, match="unleash|indices"):
            parse_unleash(bad)
    with pytest.raises(ValueError, match="unleash layer 7 is out of range"):
        FovealConfig(unleash=[Unleash((7,))]).unleash_gains(6, 4)
    with pytest.raises(ValueError, match="unleash head 4 is out of range"):
        FovealConfig(unleash=[Unleash((5,), (4,))]).unleash_gains(6, 4)
    unbiased = wrap(clip, config=FovealConfig(unleash=[Unleash((1,))]))  # fine for image-edit prompts ...
    with pytest.raises(ValueError, match="unleash layer 1 carries no bias"):
        unbiased.plan()  # ... but the bias has no change to amplify in block 1
    with pytest.raises(ValueError, match="unleash layer 6 is out of range"):
        wrap(clip, config=FovealConfig(unleash=[Unleash((6,))]))
    with pytest.raises(ValueError, match="empty"):
        Unleash(())


# -- head response --------------------------------------------------------------------------------------


def test_head_delta_statistics():
    a = torch.randn(3, 4, 8)
    assert head_delta(a, a).abs().max() == 0 and head_delta(a, a, "cosine").abs().max() < 1e-6
    b = a + 1.0
    torch.testing.assert_close(head_delta(b, a, "relative"), head_delta(b, a) / a.norm(dim=-1))
    torch.testing.assert_close(head_delta(2 * a, a, "cosine"), torch.zeros(3, 4), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="statistic"):
        head_delta(a, a, "kl")
    ranking = rank_heads(np.array([[0.1, 0.5], [0.9, 0.2]]))
    assert [(r["layer"], r["head"]) for r in ranking] == [(1, 0), (0, 1), (1, 1), (0, 0)]


def test_prompt_response_per_prompt(model, image):
    falip = prompt_response(model, image, BOXES[0], method="falip", config=FovealConfig(alpha=1.0))
    assert falip.shape == (6, 4)
    assert falip[:4].abs().max() < 1e-4 and falip[4:].min() > 0  # only biased blocks respond
    circle = prompt_response(model, image, BOXES[0], method="circle")
    assert circle[0].min() > 0  # an edited image changes every block
    square = random_image(np.random.default_rng(7), 224, 224)  # squash keeps it: patches are 32 px
    mask = np.zeros((224, 224), bool)
    mask[32:96, 64:160] = True  # patch rows 1-2, columns 2-4, fully covered
    by_mask = prompt_response(model, square, mask=mask, method="falip", config=FovealConfig(alpha=1.0))
    by_box = prompt_response(model, square, (65, 33, 160, 96), method="falip", config=FovealConfig(alpha=1.0))
    torch.testing.assert_close(by_mask, by_box, atol=1e-5, rtol=0)
    with pytest.raises(InvalidRegionError, match="box 0"):
        prompt_response(model, image, (400, 300, 500, 400), method="circle")
    with pytest.raises(ValueError, match="prompts nothing"):
        prompt_response(model, image, BOXES[0], method="none")


# -- attention maps --------------------------------------------------------------------------------------


def test_attention_maps_grid_sums_and_steering(model, image):
    strong = FovealConfig(alpha=4.0, shape="uniform")
    maps = attention_maps(model, image, BOXES, layers=[3, -1], config=strong)
    assert maps.layers == (3, 5)
    assert maps.maps.shape == (3, 2, 7, 7) and maps.mean.shape == (3, 7, 7) and maps.rollout.shape == (3, 7, 7)
    assert maps.cls_probs.shape == (3, 6, 4, 50)
    torch.testing.assert_close(maps.cls_probs.sum(-1), torch.ones(3, 6, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(maps.maps[1:, 0], maps.maps[:1, 0].expand(2, -1, -1), atol=1e-6, rtol=0)  # block 3 unbiased
    assert maps.input_image.size == (224, 224)
    assert np.all(maps.box_mass[:, 1] > maps.box_mass[:, 0] + 0.05)  # FALIP pulls attention into each box
    assert attention_maps(model, image, BOXES[:1]).layers == (4, 5)  # default: the biased blocks


def test_rollout_rows_sum_to_one():
    probs = torch.softmax(torch.randn(2, 3, 4, 10, 10), dim=-1)
    out = rollout(probs)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out.sum(-1), torch.ones(2))
    eye = torch.eye(10).expand(2, 3, 4, 10, 10)
    torch.testing.assert_close(rollout(eye), torch.eye(10)[0].expand(2, 10))  # self-attention only: stays on [CLS]


def test_pictures_have_the_expected_sizes(model, image):
    maps = attention_maps(model, image, BOXES, layers=[4, 5])
    fig = draw_attention(maps, tile=96)
    assert fig.size == attention_figure_size(2, 2, 96) == (120 + 6 * 96 + 5 * 4 + 6, 28 + 3 * 96 + 2 * 4 + 36)
    heat = draw_head_heatmap(np.random.default_rng(0).random((12, 12)), "title")
    assert heat.size == heatmap_size(12, 12) == (40 + 12 * 28 + 6, 46 + 12 * 28 + 40)
    with pytest.raises(ValueError, match="layers, heads"):
        draw_head_heatmap(np.zeros(5))


def test_attention_maps_bad_input(model, image):
    with pytest.raises(InvalidRegionError, match="box 1"):
        attention_maps(model, image, [BOXES[0], (400, 300, 500, 400)])
    with pytest.raises(ValueError, match="layer 6 is out of range"):
        attention_maps(model, image, BOXES, layers=[6])
    with pytest.raises(ValueError, match="layer -7 is out of range"):
        attention_maps(model, image, BOXES, layers=[-7])


# -- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip, image):
    root = tmp_path_factory.mktemp("heads")
    torch.save(clip.state_dict(), root / "tiny.pt")
    (root / "img").mkdir()
    image.save(root / "img" / "a.png")
    Image.fromarray(random_image(np.random.default_rng(6), 200, 160)).save(root / "img" / "b.png")
    mask = np.zeros((160, 200), np.uint8)
    mask[20:100, 40:160] = 255
    Image.fromarray(mask).save(root / "img" / "b_mask.png")
    lines = [
        {"image": "a.png", "label": "x", "box": list(BOXES[0])},
        {"image": "a.png", "label": "y", "box": list(BOXES[1])},
        {"image": "b.png", "label": "x", "mask": "b_mask.png"},
        {"image": "missing.png", "label": "x", "box": [0, 0, 10, 10]},
    ]
    (root / "regions.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "outside.jsonl").write_text(json.dumps({"image": "a.png", "box": [400, 300, 500, 400]}) + "\n")
    return root


def test_cli_attention_writes_the_picture(files, capsys):
    out = files / "maps.png"
    code = main(
        [
            "attention",
            str(files / "img" / "a.png"),
            "--box",
            "20,30,150,140",
            "--box",
            "170,90,310,230",
            "--model",
            str(files / "tiny.pt"),
            "--layers",
            "3-5",
            "--alpha",
            "2",
            "--tile",
            "64",
            "--output",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "box 1 20,30,150,140: no bias" in text and "-> FALIP" in text
    with Image.open(out) as img:
        assert img.size == attention_figure_size(2, 3, 64)

    def attention_argv(box, *options):
        return [
            "attention",
            str(files / "img" / "a.png"),
            "--box",
            box,
            "--model",
            str(files / "tiny.pt"),
            *options,
            "--output",
            str(out),
        ]

    code = main(attention_argv("400,300,500,400"))
    assert code == 2 and "box 0" in capsys.readouterr().err
    code = main(attention_argv("1,1,50,50", "--show-layers", "9"))
    assert code == 2 and "layer 9 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not offered: attention and heads run every block head by head
        main(attention_argv("1,1,50,50", "--mode", "approx"))
    assert "unrecognized arguments: --mode" in capsys.readouterr().err


def test_cli_heads_writes_response_ranking_and_heatmap(files, capsys):
    out = files / "run"
    args = [
        "heads",
        "--annotations",
        str(files / "regions.jsonl"),
        "--image-root",
        str(files / "img"),
        "--prompt",
        "circle",
        "--model",
        str(files / "tiny.pt"),
        "--output",
        str(out),
        "--top",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "top 3 heads" in printed.out
    warned = [line for line in printed.err.splitlines() if "missing.png" in line]
    assert len(warned) == 1 and warned[0].startswith("falip: warning: sample ")
    result = json.loads((out / "heads.json").read_text())
    assert result["task"] == "heads" and result["prompt"] == "circle" and result["statistic"] == "l2"
    assert np.array(result["response"]).shape == (6, 4) and result["metrics"]["n"] == 3
    assert result["skipped"]["count"] == 1 and result["model"]["num_heads"] == 4
    assert len(result["ranking"]) == 24 and result["ranking"][0]["response"] == pytest.approx(
        np.max(result["response"]), rel=1e-5
    )
    with Image.open(out / "heads.png") as img:
        assert img.size == heatmap_size(6, 4)
    assert main(args) == 0  # resumed: nothing recomputed, same numbers
    again = json.loads((out / "heads.json").read_text())
    assert again["response"] == result["response"] and again["metrics"]["n"] == 3
    capsys.readouterr()
    code = main(
        [
            "heads",
            "--annotations",
            str(files / "regions.jsonl"),
            "--image-root",
            str(files / "img"),
            "--prompt",
            "falip",
            "--model",
            str(files / "tiny.pt"),
            "--output",
            str(files / "run_falip"),
            "--limit",
            "2",
            "--unleash",
            "5:all",
        ]
    )
    result = json.loads((files / "run_falip" / "heads.json").read_text())
    assert code == 0 and result["metrics"]["n"] == 2 and result["config"]["falip"]["unleash"][0]["layers"] == [5]
    assert np.abs(np.array(result["response"])[:4]).max() < 1e-4  # blocks 0-3 carry no bias


def test_cli_heads_bad_input(files, capsys):
    common = ["--image-root", str(files / "img"), "--model", str(files / "tiny.pt"), "--output", str(files / "bad")]
    assert main(["heads", "--annotations", str(files / "empty.jsonl"), "--prompt", "circle", *common]) == 2
    assert "no samples" in capsys.readouterr().err
    assert main(["heads", "--annotations", str(files / "outside.jsonl"), "--prompt", "falip", "--no-resume", *common]) == 2
    assert "sample 1" in capsys.readouterr().err
    assert main(["heads", "--annotations", str(files / "regions.jsonl"), "--prompt", "sparkles", *common]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["heads", "--annotations", str(files / "regions.jsonl"), "--prompt", "falip", "--unleash", "1:all", *common]) == 2
    assert "carries no bias" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["heads", "--annotations", "x", "--image-root", "y", "--prompt", "falip", "--output", "z", "--unleash", "5"])


def test_cli_score_records_unleashing(files, capsys):
    base = [
        "score",
        str(files / "img" / "a.png"),
        "--box",
        "20,30,150,140",
        "--box",
        "170,90,310,230",
        "--text",
        "a",
        "--model",
        str(files / "tiny.pt"),
        "--alpha",
        "1",
        "--json",
    ]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "unleash" not in plain["model"]["config"]
    assert main(base + ["--unleash", "4-5:all:0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero["model"]["config"]["unleash"] == [{"layers": [4, 5], "heads": None, "lam": 0.0}]
    np.testing.assert_allclose(zero["scores"], plain["scores"], atol=1e-4)
    assert main(base + ["--unleash", "4-5:all:1"]) == 0
    assert np.abs(np.array(json.loads(capsys.readouterr().out)["scores"]) - plain["scores"]).max() > 1e-3
