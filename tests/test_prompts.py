"""Visual-prompt edits and the shared method layer."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, tiny_clip, wrap
from falip import FovealConfig, InvalidRegionError
from falip.methods import encode_with_method, parse_method
from falip.prompts import EDITS, apply_edit

BOX = (40, 30, 120, 90)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(random_image(np.random.default_rng(2), 200, 150))


def arr(img):
    return np.asarray(img).astype(int)


def test_every_edit_keeps_the_size_except_crop(image):
    for method in EDITS:
        e = apply_edit(image, method, BOX)
        if method == "crop":
            assert e.image.size == (80, 60) and e.box == (0.0, 0.0, 80.0, 60.0)
        else:
            assert e.image.size == image.size and e.box == BOX
        assert e.text_suffix == (" is in red color." if method == "shade" else "")


def test_blur_and_grayscale_change_only_the_outside(image):
    for method in ("blur", "grayscale"):
        e = arr(apply_edit(image, method, BOX).image)
        a = arr(image)
        assert np.array_equal(e[30:90, 40:120], a[30:90, 40:120])
        assert np.abs(e[:25] - a[:25]).mean() > 5
    g = arr(apply_edit(image, "grayscale", BOX).image)
    assert np.all(g[:25, :, 0] == g[:25, :, 1])


def test_circle_box_and_shade_mark_the_region(image):
    a = arr(image)
    circle = arr(apply_edit(image, "circle", BOX).image)
    changed = np.argwhere(np.any(circle != a, axis=-1))
    assert changed[:, 0].min() >= 30 and changed[:, 0].max() <= 90 and changed[:, 1].min() >= 40
    assert tuple(circle[30, 80]) == (255, 0, 0)  # top of the ellipse
    assert np.array_equal(circle[60, 80], a[60, 80])  # its inside is untouched
    box = arr(apply_edit(image, "box", BOX).image)
    assert tuple(box[30, 40]) == (255, 0, 0) and tuple(box[60, 40]) == (255, 0, 0)
    shade = arr(apply_edit(image, "shade", BOX).image)
    assert np.array_equal(shade[:25], a[:25]) and shade[60, 80, 0] > (a[60, 80, 0] + 240) // 2 - 2


def test_blur_circle_and_reverse_blur_follow_the_region_shape(image):
    a = arr(image)
    bc = arr(apply_edit(image, "blur_circle", BOX).image)
    assert np.array_equal(bc[60, 80], a[60, 80]) and not np.array_equal(bc[31:34, 41:44], a[31:34, 41:44])
    mask = np.zeros((150, 200), bool)
    mask[50:70, 60:100] = True
    rb = apply_edit(image, "reverse_blur", BOX, mask)
    r = arr(rb.image)
    assert np.array_equal(r[50:70, 60:100], a[50:70, 60:100]) and np.abs(r[35:45, 45:55] - a[35:45, 45:55]).mean() > 1
    crop = apply_edit(image, "crop", BOX, mask)
    assert crop.mask.shape == (60, 80) and crop.mask.sum() == mask.sum()


def test_bad_edit_input(image):
    with pytest.raises(ValueError, match="unknown visual prompt"):
        apply_edit(image, "sparkles", BOX)
    with pytest.raises(InvalidRegionError, match="no area"):
        apply_edit(image, "crop", (300, 300, 400, 400))


@pytest.mark.parametrize(
    "name, edit, foveal",
    [
        ("falip", None, True),
        ("none", None, False),
        ("crop", "crop", False),
        ("falip+blur", "blur", True),
        ("Circle+FALIP", "circle", True),
    ],
)
def test_parse_method(name, edit, foveal):
    m = parse_method(name)
    assert (m.edit, m.foveal) == (edit, foveal)


@pytest.mark.parametrize("name", ["", "falip+falip", "crop+blur", "sparkles", "falip+none"])
def test_parse_method_rejects(name):
    with pytest.raises(ValueError, match="unknown method"):
        parse_method(name)


def test_methods_encode_what_they_name(image):
    model = wrap(tiny_clip(224, 32, layers=4), config=FovealConfig(alpha=1.0))
    boxes = [BOX, (100, 20, 190, 140)]

    def close(a, b):
        return torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    close(encode_with_method(model, image, boxes, method="none"), model.encode_image(image).expand(2, -1))
    close(encode_with_method(model, image, boxes, method="falip"), model.encode_regions(image, boxes))
    crops = [apply_edit(image, "crop", b).image for b in boxes]
    close(encode_with_method(model, image, boxes, method="crop"), model.encode_image(crops))
    both = encode_with_method(model, image, boxes, method="falip+crop")
    close(both[1], model.encode_regions(crops[1], [(0, 0, 90, 120)])[0])
    mask = np.zeros((150, 200), bool)
    mask[30:90, 40:120] = True
    close(encode_with_method(model, image, masks=[mask], method="falip"), model.encode_regions(image, masks=[mask]))
    close(
        encode_with_method(model, image, masks=[mask], method="blur"),
        encode_with_method(model, image, [(40, 30, 120, 90)], method="blur"),
    )
