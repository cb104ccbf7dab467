"""The bias itself: hand-computed official cases, variants, layers and heads."""

import numpy as np
import pytest
import torch

from falip import FovealConfig, InvalidRegionError, RegionClampWarning, bump, region_bias
from falip.bias import NUMERICS, approx_sequence_mask, bias_from_weights, full_attention_mask, query_rows_mask
from reference import spec_bias_row, spec_bump

A = 0.2
EPS = 1e-6
G = 14  # ViT-B/16 at 224


def tokens(vec):
    """{(row, col): value} of the non-zero patch entries of a bias vector."""
    v = vec.numpy()
    assert v[0] == 0.0
    return {(int(i) // G, int(i) % G): float(v[1 + i]) for i in np.flatnonzero(v[1:])}


def official(box, W, H):
    return region_bias(box, (W, H), (G, G), FovealConfig.official(), preprocess="squash")


def test_bump_small_regions_are_flat_alpha():
    for h, w in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        np.testing.assert_allclose(bump(h, w, A, 100.0), A, rtol=1e-9)
        # the reference's float32 steps under its pinned NumPy 1.x: α to float32 precision
        np.testing.assert_allclose(bump(h, w, A, 100.0, numerics="reference-numpy1"), A, rtol=1e-6)


def test_reference_bump_under_numpy2_inflates_tiny_regions():
    # float32: 1 + 1e-6 rounds to 1 + 8·2⁻²³, so a 1×1 peak is α · 1e-6 / (8·2⁻²³) = 1.048576 α.
    np.testing.assert_allclose(
        bump(1, 1, A, 100.0, numerics="reference-numpy2"), np.float32(1e-6) / np.float32(8 * 2.0**-23) * A, rtol=1e-6
    )
    assert bump(1, 1, A, 100.0, numerics="reference-numpy2")[0, 0] == pytest.approx(0.2097152, abs=1e-7)
    # 1×2 and 2×2: G = exp(-1.25e-5) (or exp(-2.5e-5)) < 1, where 1e-6 is 17 float32 ulps, not 8
    for h, w in [(1, 2), (2, 1), (2, 2)]:
        np.testing.assert_allclose(bump(h, w, A, 100.0, numerics="reference-numpy2"), 0.19737902, atol=1e-7)


def test_bump_numerics_equal_the_spec_transcription():
    for numerics in NUMERICS:
        for h, w in [(1, 1), (1, 2), (2, 2), (3, 3), (2, 5), (7, 4), (14, 14)]:
            np.testing.assert_array_equal(
                bump(h, w, A, 100.0, numerics=numerics).astype(np.float32),
                spec_bump(h, w, A, 100.0, numerics=numerics).astype(np.float32),
            )
    with pytest.raises(ValueError, match="numerics"):
        FovealConfig(numerics="float16")
    assert FovealConfig.official().numerics == "reference-numpy1"
    assert "numerics" not in FovealConfig().to_dict() and FovealConfig.official().to_dict()["numerics"] == "reference-numpy1"


def test_bump_peaks_at_centre_and_falls_to_eps_at_corners():
    R = bump(5, 7, A, 100.0)
    assert R[2, 3] == pytest.approx(A)
    g = np.exp(-((np.arange(5)[:, None] - 2) ** 2 + (np.arange(7)[None] - 3) ** 2) / 2e4)
    assert R[0, 0] == pytest.approx(A * EPS / (g.max() - g.min() + EPS))
    assert R[0, 0] < 0.01 * A


def test_official_vector_layout():
    v = official((10, 10, 100, 100), 640, 480)
    assert v.dtype == torch.float32 and v.shape == (1 + G * G,)


def test_border_quirk_selects_the_patch_before():
    # 32 * 224 / 448 = 16.0 exactly: the left/top edge on a border also takes patch 0.
    assert set(tokens(official((32, 32, 64, 64), 448, 448))) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # Just past the border: only patch (1, 1).
    assert tokens(official((33, 33, 64, 64), 448, 448)) == {(1, 1): pytest.approx(A)}
    # 50 * 224 / 700 = 16.0 exactly on the x axis of a non-square image.
    assert {c for _, c in tokens(official((50, 300, 100, 310), 700, 500))} == {0, 1}


def test_one_token_box_gets_alpha():
    # X: 200*224/640 = 70 -> col 4; Y: 200*224/480 = 93.33, 201*224/480 = 93.8 -> row 5.
    assert tokens(official((200, 200, 201, 201), 640, 480)) == {(5, 4): pytest.approx(A)}


def test_full_image_box_covers_all_tokens():
    t = tokens(official((0, 0, 640, 480), 640, 480))
    assert len(t) == G * G
    for rc in [(6, 6), (6, 7), (7, 6), (7, 7)]:
        assert t[rc] == pytest.approx(A, rel=1e-6)
    # the centre tokens sit 0.5 from the centre (6.5, 6.5) on each axis; the corner 6.5 away
    g_max, g_min = np.exp(-0.5 / 2e4), np.exp(-2 * 6.5**2 / 2e4)
    assert t[(0, 0)] == pytest.approx(A * EPS / (g_max - g_min + EPS), rel=1e-4)


def test_box_partly_outside_is_clamped_with_a_warning():
    with pytest.warns(RegionClampWarning):
        v = official((-50, -50, 100, 60), 640, 480)
    # clamped to (0, 0, 100, 60): X1 = 35 -> cols 0..2, Y1 = 28 -> rows 0..1
    t = tokens(v)
    assert set(t) == {(r, c) for r in range(2) for c in range(3)}
    R = bump(2, 3, A, 100.0, numerics="reference-numpy1").astype(np.float32)
    assert t[(0, 0)] == R[0, 0] and t[(1, 1)] == R[1, 1]


def test_official_matches_spec_transcription_on_random_and_border_boxes(rng):
    import warnings

    warnings.simplefilter("ignore", RegionClampWarning)
    for _ in range(300):
        W, H = (int(v) for v in rng.integers(20, 1500, size=2))
        x0, x1 = np.sort(rng.uniform(-0.2 * W, 1.2 * W, 2))
        y0, y1 = np.sort(rng.uniform(-0.2 * H, 1.2 * H, 2))
        if rng.random() < 0.4:  # snap edges to patch borders in input space
            x0 = W * 16 * rng.integers(0, 14) / 224
            y0 = H * 16 * rng.integers(0, 14) / 224
            x1 = x0 + W * 16 * rng.integers(1, 4) / 224
            y1 = y0 + H * 16 * rng.integers(1, 4) / 224
        if x1 <= max(x0, 0) or y1 <= max(y0, 0) or x0 >= W or y0 >= H or x1 <= 0 or y1 <= 0:
            continue
        box = (float(x0), float(y0), float(x1), float(y1))
        for numerics in NUMERICS:
            cfg = FovealConfig(layers=(8, 9, 10, 11), numerics=numerics)
            ours = region_bias(box, (W, H), (G, G), cfg, preprocess="squash").numpy()
            np.testing.assert_array_equal(ours, spec_bias_row(box, W, H, numerics=numerics))


def test_region_is_not_transposed():
    # A wide, short box in the top-left: more columns than rows, all in the top-left quadrant.
    t = tokens(official((10, 10, 300, 60), 640, 480))
    rows = {r for r, _ in t}
    cols = {c for _, c in t}
    assert max(rows) < G // 2 and len(cols) > len(rows)


def test_mirrored_box_gives_mirrored_bias():
    v = official((50.5, 70.5, 300.2, 200.7), 640, 480).numpy()[1:].reshape(G, G)
    m = official((640 - 300.2, 70.5, 640 - 50.5, 200.7), 640, 480).numpy()[1:].reshape(G, G)
    np.testing.assert_allclose(m, v[:, ::-1], atol=1e-7)


def test_uniform_and_hard_shapes():
    w = np.zeros((G, G))
    w[3:6, 4:9] = 1.0
    uni = bias_from_weights(w, FovealConfig(shape="uniform")).numpy()
    assert uni[0] == 0 and np.all(uni[1:].reshape(G, G)[3:6, 4:9] == np.float32(A))
    assert np.count_nonzero(uni) == 15
    hard = bias_from_weights(w, FovealConfig(shape="hard")).numpy()
    grid = hard[1:].reshape(G, G)
    assert hard[0] == 0 and np.all(grid[3:6, 4:9] == 0) and np.count_nonzero(grid == -100.0) == G * G - 15


def test_rows_variants_build_the_masks_they_name():
    v = torch.arange(1, 6, dtype=torch.float32)[None]  # (1, L=5)
    cls = full_attention_mask(v, "cls", 2, None)
    assert cls.shape == (2, 5, 5)
    assert torch.equal(cls[0, 0], v[0]) and cls[:, 1:].abs().sum() == 0
    allr = full_attention_mask(v, "all", 2, None)
    assert torch.equal(allr[1], v.expand(5, 5))
    diag = full_attention_mask(v, "diagonal", 2, None)
    assert torch.equal(diag[0], torch.diag(v[0]))
    q = query_rows_mask(v, 2, torch.tensor([1.0, 0.5]))
    assert q.shape == (2, 1, 5) and torch.equal(q[1, 0], 0.5 * v[0])


def test_approx_sequence_mask_keeps_the_image_tokens_plain_and_the_copies_apart():
    b = torch.tensor([[[0.0, 1.0, 2.0], [0.5, 3.0, 4.0]]])  # one image, Q=2 copies, L=3 tokens
    m = approx_sequence_mask(b, 2, torch.tensor([0.0, 2.0]))
    assert m.shape == (2, 5, 5)  # keys: cls, patch_1, patch_2, copy_1, copy_2
    inf = float("-inf")
    assert m[1].tolist() == [
        [0.0, 0.0, 0.0, inf, inf],  # the image tokens never see the copies: the plain pass
        [0.0, 0.0, 0.0, inf, inf],
        [0.0, 0.0, 0.0, inf, inf],
        [inf, 2.0, 4.0, 0.0, inf],  # copy 1: the patches with its bias, its own key, nothing else
        [inf, 6.0, 8.0, inf, 1.0],
    ]
    assert m[0, 3:].tolist() == [[inf, 0.0, 0.0, 0.0, inf], [inf, 0.0, 0.0, inf, 0.0]]  # head scale 0: no NaN


def test_layers_default_to_the_last_third_and_accept_negative_indices():
    assert FovealConfig().resolve_layers(12) == (8, 9, 10, 11)
    assert FovealConfig.official().resolve_layers(12) == (8, 9, 10, 11)
    assert FovealConfig().resolve_layers(24) == tuple(range(16, 24))
    assert FovealConfig(layers=(-1, 0, 0)).resolve_layers(12) == (0, 11)
    with pytest.raises(ValueError, match="layer 12 is out of range"):
        FovealConfig(layers=(12,)).resolve_layers(12)


def test_head_selection_and_scaling():
    assert FovealConfig().head_scales(4) is None
    assert FovealConfig(heads=(1, 3)).head_scales(4).tolist() == [0, 1, 0, 1]
    assert FovealConfig(heads={0: 2.0}).head_scales(3).tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match="head 5 is out of range"):
        FovealConfig(heads=(5,)).head_scales(4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape="box"), "shape"),
        (dict(rows="first"), "rows"),
        (dict(sigma=0.0), "sigma"),
        (dict(alpha=float("nan")), "alpha"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FovealConfig(**kwargs)


@pytest.mark.parametrize(
    "box, message",
    [
        ((float("nan"), 0, 10, 10), "NaN"),
        ((0, 0, float("inf"), 10), "NaN or infinite"),
        ((10, 0, 10, 10), "empty"),
        ((0, 20, 10, 10), "empty"),
        ((700, 10, 800, 20), "entirely outside"),
        ((-30, -30, -1, -1), "entirely outside"),
        ((0, 0, 10), r"shape \(K, 4\)"),
        ([], r"shape \(K, 4\)|empty"),
        ("abcd", "numbers"),
    ],
)
def test_bad_boxes_raise_naming_the_box(box, message):
    with pytest.raises(InvalidRegionError, match=message):
        official(box, 640, 480)
