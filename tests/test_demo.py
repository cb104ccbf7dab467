"""falip demo: the page and the PNG, on a random-weight checkpoint (the shipped model is tested in test_toy.py)."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, tiny_clip, wrap
from falip import load
from falip.cli import main
from falip.demo import demo_scene, draw_boxes, run_demo, tag_text_colour, write_demo


def test_demo_on_a_generated_scene_writes_html_and_png(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_clip(224, 32, layers=4).state_dict(), ckpt)
    assert main(["demo", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--methods", "none,crop,falip"]) == 0
    assert "index.html" in capsys.readouterr().out
    page = (tmp_path / "out/index.html").read_text()
    assert page.count("<table>") == 3 and "the right box is" in page and "tie (1, 2, 3)" in none_row(page)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2  # the scene and the attention maps, inline
    assert Image.open(tmp_path / "out/demo.png").size[0] >= 256
    assert Image.open(tmp_path / "out/attention.png").size[1] > 3 * 100  # no-bias row + one row per box


def test_demo_on_a_user_image(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_clip(224, 32, layers=4).state_dict(), ckpt)
    Image.fromarray(random_image(np.random.default_rng(0), 200, 120)).save(tmp_path / "me.png")
    args = [
        "demo",
        "--model",
        str(ckpt),
        "--image",
        str(tmp_path / "me.png"),
        "--box",
        "0,0,100,120",
        "--box",
        "100,0,200,120",
        "--text",
        "a cat",
        "--output",
        str(tmp_path / "o"),
        "--alpha",
        "1.0",
    ]
    assert main(args) == 0
    page = (tmp_path / "o/index.html").read_text()
    assert "a cat" in page and "the right box" not in page
    assert main(["demo", "--model", str(ckpt), "--image", str(tmp_path / "me.png"), "--output", str(tmp_path / "x")]) == 2


def test_run_demo_scores_match_the_method_layer():
    model = wrap(tiny_clip(224, 32, layers=4))
    img = random_image(np.random.default_rng(1), 160, 160)
    result = run_demo(model, img, [(0, 0, 80, 80), (80, 80, 160, 160)], ["x", "y"], ["none", "falip"])
    assert result.scores["none"].shape == (2, 2)
    assert torch.allclose(result.scores["none"][0], result.scores["none"][1])  # the whole image for every box


def test_demo_on_an_attention_pooled_model_says_why_there_are_no_maps(tmp_path):
    from falip import FalipModel
    from test_timm import runtime

    model = FalipModel(runtime("falip_test_vit_map"), preprocess="squash")
    img = random_image(np.random.default_rng(2), 160, 120)
    paths = write_demo(model, tmp_path, img, [(0, 0, 80, 120), (80, 0, 160, 120)], ["a", "b"], ["none", "falip"])
    assert set(paths) == {"html", "summary"} and not (tmp_path / "attention.png").exists()
    page = paths["html"].read_text()
    assert "biases its attention probe towards the box" in page and "No attention maps" in page
    assert "logit scale · cosine + logit bias (sigmoid logit)" in page  # a SigLIP-style score, by its name
    assert page.count("<table>") == 2


def none_row(page: str) -> str:
    return re.search(r"<tr><th>none</th>.*?</tr>", page).group(0)


def test_demo_page_says_ties_as_ties_and_ties_numbers_to_boxes(tmp_path):
    paths = write_demo(load("falip-toy"), tmp_path, *demo_scene(0)[:3], ["none", "falip"], demo_scene(0)[3])
    page = paths["html"].read_text()
    row = none_row(page)  # none encodes the whole image: all three boxes tie, none of them is "best" or right
    assert "tie (1, 2, 3)" in row and 'class="best"' not in row and "✓" not in row and "✗" not in row
    assert row.count('class="tied"') == 3
    assert page.count('<table class="legend">') == 1 and page.count('<tr><td><span class="tag"') == 3
    assert "logit scale · cosine" in page  # the model's score, by name
    assert all(re.search(r'alt="[^"]+"', img) for img in re.findall(r"<img [^>]*>", page))


def test_number_tags_contrast_with_their_colour():
    assert tag_text_colour((255, 64, 64)) == (0, 0, 0) and tag_text_colour((40, 40, 160)) == (255, 255, 255)
    red = Image.new("RGB", (200, 200), (255, 64, 64))  # a red object under the red box 1: its tag is still read
    tagged = np.asarray(draw_boxes(red, [(20, 40, 120, 160)]))
    assert ((tagged == 0).all(axis=2)).sum() > 50  # black number and rim on red


def test_browser_demo_page_fits_1024_to_1920_px(tmp_path):
    """The page in the system chromium: no sideways scrolling at 1024–1920 px; FALIP_DEMO_SCREENSHOT=docs/images/demo.png
    saves it at 1280 px."""
    from test_serve import CHROMIUM_FLAGS, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install -y chromium, or set FALIP_CHROMIUM=/path/to/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    assert main(["demo", "--output", str(tmp_path)]) == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--headless", *CHROMIUM_FLAGS])
        try:
            page = browser.new_page()
            page.goto((tmp_path / "index.html").as_uri())
            for width in (1024, 1280, 1440, 1920):
                page.set_viewport_size({"width": width, "height": 900})
                overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
                assert overflow <= 0, f"the page scrolls sideways by {overflow} px at {width} px"
                assert page.evaluate("[...document.images].every((i) => i.getBoundingClientRect().right <= innerWidth)")
            shot = os.environ.get("FALIP_DEMO_SCREENSHOT")
            if shot:
                page.set_viewport_size({"width": 1280, "height": 900})
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
