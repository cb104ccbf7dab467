"""falip demo: the page and the PNG, on a random-weight checkpoint (the shipped model is tested in test_toy.py)."""

import re

import numpy as np
import torch
from PIL import Image

from conftest import random_image, tiny_clip, wrap
from falip.cli import main
from falip.demo import run_demo, write_demo


def test_demo_on_a_generated_scene_writes_html_and_png(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_clip(224, 32, layers=4).state_dict(), ckpt)
    assert main(["demo", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--methods", "none,crop,falip"]) == 0
    assert "index.html" in capsys.readouterr().out
    page = (tmp_path / "out/index.html").read_text()
    assert page.count("<table>") == 3 and "the right box is" in page
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
    assert page.count("<table>") == 2
