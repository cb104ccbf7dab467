"""The command line, end to end on a random-weight checkpoint file."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, tiny_clip
from falip.cli import main
from falip.cli.common import parse_index_list


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.save(tiny_clip(224, 32, layers=6).state_dict(), root / "tiny.pt")
    Image.fromarray(random_image(np.random.default_rng(0), 320, 240)).save(root / "photo.png")
    mask = np.zeros((240, 320), np.uint8)
    mask[40:120, 50:200] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


def test_score_prints_a_table_with_the_best_box(files, capsys):
    code = main(
        [
            "score",
            str(files / "photo.png"),
            "--box",
            "0,0,160,120",
            "--box",
            "160,120,320,240",
            "--text",
            "a dog",
            "--model",
            str(files / "tiny.pt"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "'a dog'" in out and out.count("<- best") == 1
    # the settings, then what the bias acts on in this model and where (tiny.pt: 6 blocks, the last third biased)
    assert out.splitlines()[1] == (
        "bias acts on: the class token's attention logits over the patches in the biased blocks; biased blocks: 4, 5"
    )


def test_score_json_with_masks_and_bias_options(files, capsys):
    code = main(
        [
            "score",
            str(files / "photo.png"),
            "--mask",
            str(files / "mask.png"),
            "--text",
            "a",
            "--text",
            "b",
            "--model",
            str(files / "tiny.pt"),
            "--alpha",
            "0.5",
            "--layers",
            "3-5",
            "--mode",
            "naive",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and np.array(result["scores"]).shape == (1, 2)
    assert result["model"]["config"]["layers"] == [3, 4, 5] and result["mode"] == "naive"


def test_score_reports_bad_input_as_an_error(files, capsys):
    code = main(["score", str(files / "photo.png"), "--box", "10,10,5,20", "--text", "a", "--model", str(files / "tiny.pt")])
    assert code == 2 and "box 0" in capsys.readouterr().err
    code = main(["score", str(files / "missing.png"), "--box", "1,1,5,5", "--text", "a", "--model", str(files / "tiny.pt")])
    assert code == 2 and "image file not found" in capsys.readouterr().err
    code = main(["score", str(files / "photo.png"), "--text", "a", "--model", str(files / "tiny.pt")])
    assert code == 2 and "--box" in capsys.readouterr().err


def test_info_and_bias(files, capsys):
    assert main(["info", "--model", str(files / "tiny.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == [7, 7] and info["bias_layers"] == [4, 5]
    assert main(["bias", "--image-size", "448,448", "--box", "33,33,64,64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings: preprocess squash, bias {")
    assert lines[3].split()[1] == "0.200"  # row 1, col 1 only
    assert sum(line.count("0.200") for line in lines[2:]) == 1


def test_index_lists():
    assert parse_index_list("8-11") == (8, 9, 10, 11)
    assert parse_index_list("0,3,-1") == (0, 3, -1)
    with pytest.raises(argparse.ArgumentTypeError, match="expected indices"):
        parse_index_list("a-b")


def test_score_method_option_uses_the_shared_method_layer(files, capsys):
    from falip.methods import score_with_method
    from falip.model import load

    photo, model_path = str(files / "photo.png"), str(files / "tiny.pt")
    argv = f"score {photo} --box 0,0,160,120 --box 100,60,320,240 --text a --text b --model {model_path}".split()
    assert main([*argv, "--method", "crop", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = score_with_method(load(model_path), photo, [(0, 0, 160, 120), (100, 60, 320, 240)], ["a", "b"], method="crop")
    assert result["method"] == "crop"
    np.testing.assert_allclose(result["scores"], expected.numpy(), rtol=1e-6, atol=1e-6)
    model, boxes = load(model_path), [(0, 0, 160, 120), (100, 60, 320, 240)]
    falip_scores = score_with_method(model, photo, boxes, ["a", "b"], method="falip")
    torch.testing.assert_close(falip_scores, model.score_regions(photo, boxes, ["a", "b"]), rtol=0, atol=1e-6)
    assert main([*argv, "--method", "sharpen"]) == 2 and "unknown method 'sharpen'" in capsys.readouterr().err
