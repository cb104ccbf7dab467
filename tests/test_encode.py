"""Equivalence tests: every execution path computes the same FALIP embeddings.

Tolerances: fp32 paths agree to atol 1e-5 on L2-normalised embeddings (float rounding of batched
vs. per-sample kernels); the float64 reference agrees to atol 1e-5.
"""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import random_boxes, random_image, tiny_clip, wrap
from falip import FovealConfig, InvalidRegionError, Unleash, encode_biased
from falip.encode import BiasPlan
from reference import spec_bias_row, squash_pixels, vit_encode

ATOL = 1e-5

GRIDS = {  # (image_size, patch_size): B/32-, B/16- and L/14-shaped grids
    "B32": (224, 32),
    "B16": (224, 16),
    "L14": (224, 14),
    "L14-336": (336, 14),
}


@pytest.fixture(scope="module", params=list(GRIDS))
def grid_model(request):
    S, p = GRIDS[request.param]
    return tiny_clip(S, p, layers=6)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def test_zero_bias_equals_open_clip_encode_image(rng, grid_model):
    model = wrap(grid_model, preprocess="crop", config=FovealConfig(alpha=0.0, layers=(2, 3, 4, 5)))
    img = Image.fromarray(random_image(rng, 300, 200))
    pixels, _ = model.preprocess_image(img)
    expected = F.normalize(grid_model.encode_image(pixels), dim=-1)
    close(model.encode_image(img), expected)
    boxes = random_boxes(rng, 300, 200, 3)
    for mode in ("naive", "exact", "approx"):
        close(model.encode_regions(img, boxes, mode=mode), expected.expand(3, -1))


def test_crop_preprocessing_equals_open_clips_transform(rng):
    model = wrap(tiny_clip(224, 32, layers=2))
    transform = open_clip.image_transform(224, is_train=False)
    for w, h in [(300, 200), (200, 300), (225, 224), (640, 427), (100, 100)]:
        img = Image.fromarray(random_image(rng, w, h))
        pixels, _ = model.preprocess_image(img)
        torch.testing.assert_close(pixels[0], transform(img), atol=0, rtol=0)


def test_squash_preprocessing_equals_torchvision_resize(rng):
    from torchvision import transforms as T

    model = wrap(tiny_clip(224, 32, layers=2), preprocess="squash")
    tv = T.Compose(
        [
            T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(model.runtime.mean, model.runtime.std),
        ]
    )
    img = Image.fromarray(random_image(rng, 333, 222))
    torch.testing.assert_close(model.preprocess_image(img)[0][0], tv(img), atol=0, rtol=0)


def test_pad_preprocessing_letterboxes(rng):
    model = wrap(tiny_clip(224, 32, layers=2), preprocess="pad")
    img = Image.fromarray(random_image(rng, 448, 224))
    pixels, transform = model.preprocess_image(img)
    assert transform.resized == (224, 112) and transform.offset == (0, 56)
    assert pixels[0, :, :56].abs().max() < 0.02  # mean colour normalises to ~0
    assert pixels[0, :, 56:168].abs().max() > 0.1


@pytest.mark.parametrize("preprocess", ["squash", "crop", "pad"])
def test_exact_equals_naive_for_every_grid_and_preprocess(rng, grid_model, preprocess):
    model = wrap(grid_model, preprocess=preprocess, config=FovealConfig(alpha=1.0))
    img = random_image(rng, 320, 240)
    boxes = random_boxes(rng, 320, 240, 5)
    boxes[0] = (60, 20, 260, 220)  # inside the crop for every mode
    naive = model.encode_regions(img, boxes, mode="naive")
    close(model.encode_regions(img, boxes, mode="exact"), naive)
    close(model.encode_regions(img, boxes, mode="exact", chunk_size=2), naive)
    # the bias really changes the embedding (the test would be vacuous otherwise)
    assert (naive - model.encode_image(img)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "config",
    [
        FovealConfig(alpha=1.0, rows="all"),
        FovealConfig(alpha=1.0, rows="diagonal"),
        FovealConfig(alpha=1.0, shape="uniform", layers=(1, 3)),
        FovealConfig(shape="hard"),
        FovealConfig(alpha=1.0, heads=(0,)),
        FovealConfig(alpha=1.0, heads={1: 3.0}, layers=(0, 5)),
    ],
    ids=["rows-all", "rows-diag", "uniform-layers-1-3", "hard", "head-0", "head-1x3"],
)
def test_exact_equals_naive_for_every_variant(rng, config):
    model = wrap(tiny_clip(224, 32, layers=6, width=128), config=config)
    img = random_image(rng, 256, 256)
    boxes = random_boxes(rng, 256, 256, 4)
    close(model.encode_regions(img, boxes, mode="exact"), model.encode_regions(img, boxes, mode="naive"))


def test_batched_equals_one_by_one(rng, b16_tiny):
    model = wrap(b16_tiny, config=FovealConfig(alpha=1.0))
    img = random_image(rng, 300, 300)
    boxes = random_boxes(rng, 300, 300, 6)
    batched = model.encode_regions(img, boxes)
    single = torch.cat([model.encode_regions(img, b[None]) for b in boxes])
    close(batched, single)


def test_masks_equal_boxes_on_patch_aligned_regions(rng, b16_tiny):
    model = wrap(b16_tiny, preprocess="squash", config=FovealConfig(alpha=1.0))
    img = random_image(rng, 224, 224)
    mask = np.zeros((224, 224), bool)
    mask[48:112, 32:96] = True  # rows 3..6, cols 2..5
    box = (33, 49, 96, 112)  # the same tokens under the reference rule (no border quirk)
    close(model.encode_regions(img, masks=[mask]), model.encode_regions(img, [box]))


def test_mask_weights_follow_patch_coverage(b16_tiny):
    model = wrap(b16_tiny, preprocess="squash", config=FovealConfig(shape="uniform", alpha=1.0))
    mask = np.zeros((224, 224), bool)
    mask[0:16, 0:8] = True  # half of patch (0, 0)
    mask[16:32, 16:32] = True  # all of patch (1, 1)
    bias = model.region_biases(model.transform_for((224, 224)), masks=[mask])[0]
    grid = bias[1:].view(14, 14)
    assert grid[0, 0] == pytest.approx(0.5) and grid[1, 1] == pytest.approx(1.0)
    assert torch.count_nonzero(grid) == 2


def test_approx_equals_exact_when_only_the_last_block_is_biased(rng, grid_model):
    model = wrap(grid_model, config=FovealConfig(alpha=1.0, layers=(-1,)))
    img = random_image(rng, 300, 260)
    boxes = random_boxes(rng, 300, 260, 4)
    close(model.encode_regions(img, boxes, mode="approx"), model.encode_regions(img, boxes, mode="exact"))


def test_approx_is_close_but_not_identical(rng, b16_tiny):
    model = wrap(b16_tiny)
    img = random_image(rng, 300, 260)
    boxes = random_boxes(rng, 300, 260, 4)
    exact = model.encode_regions(img, boxes, mode="exact")
    approx = model.encode_regions(img, boxes, mode="approx", chunk_size=3)
    deviation = (exact - approx).abs().max().item()
    assert 1e-5 < deviation < 0.05  # an approximation (4 biased blocks), not the exact computation under another name


def approx_by_definition(runtime, pixels, bias, plan):
    """``approx`` one region at a time, as the README defines it: [CLS] alone goes through the biased
    blocks, over its own key and the tokens after [CLS] of the plain pass; ``(K, E)``."""
    H, L = runtime.num_heads, bias.shape[1]
    scales = torch.ones(H) if plan.head_scales is None else plan.head_scales
    out = []
    for b in bias:

        def trunk(x, b=b):
            for i in range(plan.layers[0]):
                x = runtime.block(i, x)
            cls = x[:, :1]
            for i in range(plan.layers[0], runtime.num_layers):
                context = torch.cat([cls, x[:, 1:]], dim=1)
                mask = (scales[:, None, None] * b).view(H, 1, L) if i in plan.layers else torch.zeros(H, 1, L)
                gain = (plan.unleash or {}).get(i) if i in plan.layers else None
                if gain is None:
                    cls = runtime.block_query(i, cls, context, mask)
                else:
                    cls = runtime.block_heads(i, cls, context, mask, gain=gain).out
                x = runtime.block(i, x)
            return cls

        out.append(runtime.run(pixels, trunk))
    return torch.cat(out)


APPROX_CONFIGS = {
    "four-blocks": FovealConfig(alpha=2.0, layers=(2, 3, 4, 5)),
    "gap-and-heads": FovealConfig(alpha=2.0, layers=(2, 4, 5), heads={0: 1.0, 1: 0.5}),
    "unleashed": FovealConfig(alpha=1.0, layers=(3, 4, 5), unleash=(Unleash((3, 5), (0, 1), 2.0),)),
}


@pytest.mark.parametrize("name", list(APPROX_CONFIGS))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_approx_equals_its_definition_region_by_region(rng, batch_model, name, chunk_size):
    model = wrap(batch_model, config=APPROX_CONFIGS[name])
    sizes = [(256, 200), (180, 300), (300, 300)]
    images = [random_image(rng, w, h) for w, h in sizes]
    boxes = [random_boxes(rng, w, h, k) for (w, h), k in zip(sizes, (3, 1, 4))]
    batched = model.encode_regions_batch(images, boxes, mode="approx", chunk_size=chunk_size)
    plan = model.plan()
    for image, box, got in zip(images, boxes, batched):
        pixels, transform = model.preprocess_image(image)
        bias = model.region_biases(transform, boxes=box)
        close(got, F.normalize(approx_by_definition(model.runtime, pixels, bias, plan), dim=-1))
    if name == "four-blocks":  # the patch tokens of exact see the biased [CLS]; approx's do not
        assert (batched[0] - model.encode_regions(images[0], boxes[0], mode="exact")).abs().max() > 1e-4


def test_approx_packs_regions_by_image_within_the_mask_budget():
    from falip.encode import MASK_BUDGET_BYTES, _approx_chunks

    index = torch.tensor([1, 0, 1, 0, 2])
    assert [c.tolist() for c in _approx_chunks(index, 197, 12, None)] == [[1, 3, 0, 2, 4]]  # one pass, by image
    assert [c.tolist() for c in _approx_chunks(index, 197, 12, 2)] == [[1, 3], [0, 2], [4]]
    # one image with more regions than one pass's mask allows: split, each pass within budget
    per_pass = [len(c) for c in _approx_chunks(torch.zeros(3000, dtype=torch.long), 577, 16, None)]
    assert sum(per_pass) == 3000 and len(per_pass) > 1
    assert all(16 * (577 + q) ** 2 * 4 <= MASK_BUDGET_BYTES // 2 for q in per_pass)


def test_approx_rejects_rows_other_than_cls(rng, b16_tiny):
    model = wrap(b16_tiny, config=FovealConfig(rows="all"))
    with pytest.raises(ValueError, match="approx"):
        model.encode_regions(random_image(rng, 64, 64), [(0, 0, 10, 10)], mode="approx")


def test_layer_selection_biases_only_the_chosen_blocks(rng):
    clip = tiny_clip(224, 32, layers=4)
    model = wrap(clip, preprocess="squash", config=FovealConfig(alpha=1.0, layers=(1,)))
    img = random_image(rng, 224, 224)
    box = (40, 40, 150, 120)
    pixels, transform = model.preprocess_image(img)
    bias = model.region_biases(transform, boxes=[box])
    mask = torch.zeros(model.num_heads, 50, 50)
    mask[:, 0] = bias[0]

    blocks = list(clip.visual.transformer.resblocks)

    def trunk(x):
        for i, blk in enumerate(blocks):
            x = blk(x, attn_mask=mask if i == 1 else None)
        return x

    expected = F.normalize(model.runtime.run(pixels, trunk), dim=-1)
    close(model.encode_regions(img, [box], mode="exact"), expected)
    close(model.encode_regions(img, [box], mode="naive"), expected)


def test_head_selection_biases_only_the_chosen_heads(rng):
    model_all = wrap(tiny_clip(224, 32, layers=4, width=192), config=FovealConfig(alpha=1.0, heads=(0, 1, 2)))
    clip = model_all.runtime.clip
    img = random_image(rng, 224, 224)
    box = [(30, 30, 120, 200)]
    plain = wrap(clip, config=FovealConfig(alpha=1.0))
    close(model_all.encode_regions(img, box), plain.encode_regions(img, box))
    none = wrap(clip, config=FovealConfig(alpha=1.0, heads=()))
    close(none.encode_regions(img, box), plain.encode_image(img))
    doubled = wrap(clip, config=FovealConfig(alpha=1.0, heads={0: 2.0, 1: 2.0, 2: 2.0}))
    close(doubled.encode_regions(img, box), wrap(clip, config=FovealConfig(alpha=2.0)).encode_regions(img, box))
    one = wrap(clip, config=FovealConfig(alpha=1.0, heads=(1,))).encode_regions(img, box)
    assert (one - plain.encode_regions(img, box)).abs().max() > 1e-4


def test_official_compatibility_equals_the_float64_reference(rng, b16_tiny, official):
    """falip in squash mode with the official config == docs/method.md §2–§4 + OpenAI ViT equations, float64."""
    model = wrap(b16_tiny, preprocess="squash", config=official)
    state = b16_tiny.state_dict()
    W, H = 500, 375
    img = Image.fromarray(random_image(rng, W, H))
    boxes = [(0, 0, W, H), (125, 93.75, 250, 187.5), (300.3, 10.1, 301.2, 12.7), (-20, 100, 120, 400)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {m: model.encode_regions(img, boxes, mode=m) for m in ("naive", "exact")}
    pixels = squash_pixels(img)
    for k, box in enumerate(boxes):
        ref = vit_encode(state, pixels, spec_bias_row(box, W, H, numerics=official.numerics), layers=(8, 9, 10, 11))
        close(got["naive"][k], ref.float())
        close(got["exact"][k], ref.float())


def test_vit_b16_sized_exact_equals_naive(rng):
    clip = open_clip.create_model("ViT-B-16").eval()
    model = wrap(clip, preprocess="squash")
    img = random_image(rng, 400, 300)
    boxes = [(10, 10, 200, 150), (150, 100, 390, 290), (0, 0, 400, 300)]
    naive = model.encode_regions(img, boxes, mode="naive")
    close(model.encode_regions(img, boxes, mode="exact"), naive)
    pixels, _ = model.preprocess_image(img)
    zero = wrap(clip, preprocess="squash", config=FovealConfig(alpha=0.0))
    close(zero.encode_regions(img, boxes[:1], mode="exact")[0], F.normalize(clip.encode_image(pixels), dim=-1)[0])


def test_score_regions_is_logit_scale_times_cosine(rng, b16_tiny):
    model = wrap(b16_tiny)
    img = random_image(rng, 200, 200)
    boxes = [(0, 0, 100, 100), (100, 100, 200, 200)]
    texts = ["a red circle", "a blue square", "a dog"]
    scores = model.score_regions(img, boxes, texts)
    assert scores.shape == (2, 3)
    expected = b16_tiny.logit_scale.exp() * model.encode_regions(img, boxes) @ model.encode_text(texts).T
    close(scores, expected, atol=1e-4)


def test_encode_biased_without_layers_returns_the_plain_embedding(rng, b16_tiny):
    model = wrap(b16_tiny)
    pixels, _ = model.preprocess_image(random_image(rng, 64, 64))
    out = encode_biased(model.runtime, pixels, torch.ones(2, 197), BiasPlan(layers=(), rows="cls"))
    close(out, model.runtime.run(pixels).expand(2, -1))


def test_box_entirely_outside_the_centre_crop_raises(rng, b16_tiny):
    model = wrap(b16_tiny, preprocess="crop")
    img = random_image(rng, 400, 200)  # crop keeps x in [100, 300)
    with pytest.raises(InvalidRegionError, match="box 1 .* outside the centre crop"):
        model.encode_regions(img, [(150, 50, 250, 150), (10, 10, 90, 190)])
    with pytest.raises(InvalidRegionError, match="mask 0 lies entirely outside the centre crop"):
        mask = np.zeros((200, 400), bool)
        mask[:, :50] = True
        model.encode_regions(img, masks=[mask])


def test_default_chunk_size_bounds_the_mask_memory():
    from types import SimpleNamespace

    from falip.encode import default_chunk_size

    assert default_chunk_size(SimpleNamespace(num_prefix=1, grid=(14, 14), num_heads=12)) == 32  # ViT-B/16
    assert default_chunk_size(SimpleNamespace(num_prefix=1, grid=(24, 24), num_heads=16)) == 12  # ViT-L/14@336
    assert default_chunk_size(SimpleNamespace(num_prefix=1, grid=(64, 64), num_heads=16)) == 1
    assert default_chunk_size(SimpleNamespace(num_prefix=1, grid=(24, 24), num_heads=16), lean=True) == 8  # no masks to bound


@pytest.mark.parametrize("heads", [None, (1.0, 0.0, 2.5, 0.5)], ids=["shared", "per-head"])
def test_block_cls_biased_equals_the_block_with_a_row_0_mask(heads):
    runtime = wrap(tiny_clip(224, 32, layers=2, width=256)).runtime
    H, L = runtime.num_heads, 50
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, L, 256, generator=gen)
    bias = torch.randn(3, L, generator=gen)
    bias[1, 5:20] = -100.0  # hard-shape values outside a region
    scales = None if heads is None else torch.tensor(heads)
    full = torch.zeros(3, H, L, L)
    full[:, :, 0] = bias[:, None] * (1.0 if scales is None else scales[:, None])
    expected = runtime.block(1, x, full.view(3 * H, L, L))
    cls_rows = bias[:, None, None] if scales is None else bias[:, None, None] * scales[None, :, None, None]
    close(runtime.block_cls_biased(1, x, cls_rows), expected)
    assert (expected - runtime.block(1, x)).abs().max() > 1e-3  # the mask matters


LEAN_CONFIGS = {
    "default": FovealConfig(alpha=1.0),
    "official": FovealConfig.official(),
    "uniform-layers-1-3": FovealConfig(alpha=1.0, shape="uniform", layers=(1, 3)),
    "hard": FovealConfig(shape="hard"),
    "head-0": FovealConfig(alpha=1.0, heads=(0,)),
    "head-1x3": FovealConfig(alpha=1.0, heads={1: 3.0}, layers=(0, 5)),
    "last-block-only": FovealConfig(alpha=1.0, layers=(-1,)),
    "unleashed": FovealConfig(alpha=1.0, layers=(2, 3, 4, 5), unleash=(Unleash(layers=(3, 5), heads=(1,), lam=1.5),)),
    "unleashed-first-block": FovealConfig(alpha=1.0, layers=(2, 3, 4), unleash=(Unleash(layers=(2, 3)),)),
}


@pytest.mark.parametrize("name", list(LEAN_CONFIGS))
def test_exact_with_rows_cls_builds_no_full_mask_and_equals_the_full_mask_naive_path(rng, monkeypatch, name):
    """Lean exact (no (k·H, L, L) mask; last block at [CLS] only) ≡ naive, which runs every block on full masks."""
    import falip.encode

    config = LEAN_CONFIGS[name]
    layers = 12 if name == "official" else 6
    model = wrap(tiny_clip(224, 32, layers=layers, width=128), config=config)
    img = random_image(rng, 256, 256)
    boxes = random_boxes(rng, 256, 256, 5)
    naive = model.encode_regions(img, boxes, mode="naive")
    assert (naive - model.encode_image(img)).abs().max() > 1e-4  # the bias really acts

    def no_full_mask(*args, **kwargs):
        raise AssertionError("exact mode built a full (k·H, L, L) mask for rows=cls")

    monkeypatch.setattr(falip.encode, "full_attention_mask", no_full_mask)
    close(model.encode_regions(img, boxes, mode="exact"), naive)
    close(model.encode_regions(img, boxes, mode="exact", chunk_size=2), naive)


@pytest.mark.parametrize("rows", ["cls", "all"])
def test_exact_runs_the_last_block_at_the_cls_query_only(rng, monkeypatch, rows):
    model = wrap(tiny_clip(224, 32, layers=4), config=FovealConfig(alpha=1.0, rows=rows, layers=(1, 2, 3)))
    runtime = model.runtime
    seen = []
    for name in ("block", "block_cls_biased", "block_query"):
        method = getattr(runtime, name)

        def record(index, x, *args, _method=method, _name=name, **kwargs):
            seen.append((_name, index, x.shape[1]))
            return _method(index, x, *args, **kwargs)

        monkeypatch.setattr(runtime, name, record)
    model.encode_regions(random_image(rng, 200, 200), random_boxes(rng, 200, 200, 3), mode="exact")
    assert [s for s in seen if s[1] == 3] == [("block_query", 3, 1)]  # one [CLS] query, no full last block


BATCH_CONFIGS = {
    "cls": FovealConfig(alpha=1.0),
    "all": FovealConfig(alpha=1.0, rows="all"),
    "diagonal": FovealConfig(alpha=1.0, rows="diagonal", layers=(1, 4)),
    "heads-scaled": FovealConfig(alpha=1.0, heads={0: 2.0}, layers=(0, 5)),
    "unleashed": FovealConfig(alpha=1.0, layers=(2, 3, 4, 5), unleash=(Unleash(layers=(2, 4), lam=1.0),)),
    "unleashed-all": FovealConfig(alpha=1.0, rows="all", layers=(3, 4, 5), unleash=(Unleash(layers=(4,)),)),
    "no-layers": FovealConfig(alpha=1.0, layers=()),
}


@pytest.fixture(scope="module")
def batch_model():
    return tiny_clip(224, 32, layers=6, width=128)


@pytest.mark.parametrize(
    "name,mode",
    [(n, m) for n, c in BATCH_CONFIGS.items() for m in ("naive", "exact", "approx") if m != "approx" or c.rows == "cls"],
)
def test_encode_regions_batch_equals_encode_regions_per_image(rng, batch_model, name, mode):
    config = BATCH_CONFIGS[name]
    model = wrap(batch_model, config=config)
    sizes = [(256, 200), (180, 300), (300, 300)]
    images = [random_image(rng, w, h) for w, h in sizes]
    boxes = [random_boxes(rng, w, h, k) for (w, h), k in zip(sizes, (3, 1, 5))]
    batched = model.encode_regions_batch(images, boxes, mode=mode, chunk_size=4)  # chunks mix the images' regions
    assert [tuple(b.shape) for b in batched] == [(3, 64), (1, 64), (5, 64)]
    for image, box, got in zip(images, boxes, batched):
        close(got, model.encode_regions(image, box, mode=mode))
    if config.layers != ():
        assert (batched[0] - model.encode_image(images[0])).abs().max() > 1e-4  # the bias really acts


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_encode_regions_batch_with_masks_and_empty_images(rng, batch_model, mode):
    model = wrap(batch_model, config=FovealConfig(alpha=1.0))
    images = [random_image(rng, 200, 160), random_image(rng, 120, 120), random_image(rng, 240, 200)]
    masks = []
    for w, h in [(200, 160), (240, 200)]:
        m1, m2 = np.zeros((h, w), bool), np.zeros((h, w), bool)
        m1[10:80, 20:90] = True
        m2[h // 2 :, w // 3 :] = True
        masks.append([m1, m2])
    out = model.encode_regions_batch(images, masks_per_image=[masks[0], [], masks[1]], mode=mode)
    assert tuple(out[1].shape) == (0, 64)
    close(out[0], model.encode_regions(images[0], masks=masks[0], mode=mode))
    close(out[2], model.encode_regions(images[2], masks=masks[1], mode=mode))
    assert [tuple(o.shape) for o in model.encode_regions_batch(images[:2], [None, []])] == [(0, 64), (0, 64)]


def test_encode_regions_batch_takes_prepared_images(rng, batch_model):
    model = wrap(batch_model, config=FovealConfig(alpha=1.0))
    image = random_image(rng, 200, 160)
    boxes = random_boxes(rng, 200, 160, 3)
    prepared = model.preprocessor()(Image.fromarray(image))
    close(model.encode_regions_batch([prepared], [boxes])[0], model.encode_regions(image, boxes))
    with pytest.raises(ValueError, match="PreparedImage made with preprocess='crop'"):
        model.encode_regions_batch([prepared], [boxes], preprocess="squash")


def test_score_regions_batch_equals_score_regions(rng, batch_model):
    model = wrap(batch_model, config=FovealConfig(alpha=1.0))
    images = [random_image(rng, 200, 160), random_image(rng, 160, 200)]
    boxes = [random_boxes(rng, 200, 160, 2), random_boxes(rng, 160, 200, 4)]
    texts = ["a red circle", "a blue square", "a dog"]
    for got, image, box in zip(model.score_regions_batch(images, boxes, texts), images, boxes):
        close(got, model.score_regions(image, box, texts), atol=1e-3)  # logits: logit_scale (100) × cosine


def test_encode_regions_batch_rejects_mismatched_inputs(rng, batch_model):
    model = wrap(batch_model)
    image = random_image(rng, 100, 100)
    with pytest.raises(ValueError, match="2 images but 1 region lists"):
        model.encode_regions_batch([image, image], [[(0, 0, 50, 50)]])
    with pytest.raises(ValueError, match="exactly one of boxes_per_image"):
        model.encode_regions_batch([image], [[(0, 0, 50, 50)]], masks_per_image=[[np.ones((100, 100), bool)]])
    with pytest.raises(ValueError, match="image_index"):
        encode_biased(model.runtime, torch.zeros(2, 3, 224, 224), torch.zeros(1, 50), model.plan())
