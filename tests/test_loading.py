"""Loading: OpenAI-layout files in every format, names, tags, and clear failures."""

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import falip
from conftest import random_image, tiny_clip
from falip import ImageLoadError, ModelLoadError, UnsupportedModelError, normalize_model_name


@pytest.fixture(scope="module")
def source():
    """A random 8-block OpenAI-layout ViT (patch 32 at 160 px, width 128) — not a stock shape."""
    return tiny_clip(image_size=160, patch_size=32, layers=8, width=128, seed=3)


@pytest.fixture(scope="module")
def image():
    return random_image(np.random.default_rng(1), 200, 150)


def reference_features(clip, model, image):
    pixels, _ = model.preprocess_image(image)
    return F.normalize(clip.encode_image(pixels), dim=-1)


def save_scripted(clip, path):
    torch.jit.save(torch.jit.script(clip), str(path))


def save_state_dict(clip, path):
    torch.save(clip.state_dict(), path)


def save_training_checkpoint(clip, path):
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)


def save_safetensors(clip, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))


@pytest.mark.parametrize(
    "writer, filename",
    [
        (save_state_dict, "ViT-tiny.pt"),
        (save_scripted, "ViT-tiny-jit.pt"),
        (save_training_checkpoint, "epoch_3.pt"),
        (save_safetensors, "ViT-tiny.safetensors"),
    ],
    ids=["state-dict", "torchscript", "training-checkpoint", "safetensors"],
)
def test_checkpoint_file_loads_with_inferred_architecture(tmp_path, source, image, writer, filename):
    path = tmp_path / filename
    writer(source, path)
    model = falip.load(str(path))
    assert (model.image_size, model.patch_size, model.num_layers, model.num_heads) == (160, 32, 8, 2)
    assert model.grid == (5, 5)
    assert model.runtime.clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    torch.testing.assert_close(model.encode_image(image), reference_features(source, model, image), atol=1e-6, rtol=0)
    # a region embedding runs end to end and differs from the plain one
    region = model.encode_regions(image, [(10, 10, 90, 90)], config=falip.FovealConfig(alpha=2.0))
    assert region.shape == (1, 64) and (region - model.encode_image(image)).abs().max() > 1e-4
    # the text tower came along too
    text = model.encode_text(["a photo of a dog", "x"])
    expected = F.normalize(source.encode_text(open_clip.SimpleTokenizer()(["a photo of a dog", "x"])), dim=-1)
    torch.testing.assert_close(text, expected, atol=1e-6, rtol=0)


def test_named_architecture_with_local_weights_file(tmp_path, image):
    clip = open_clip.create_model("ViT-S-32")  # a named architecture; the smallest ViT open_clip names
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    model = falip.load("ViT-S-32", pretrained=str(path))
    torch.testing.assert_close(model.encode_image(image), reference_features(clip, model, image), atol=1e-6, rtol=0)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random"):
        model = falip.load("ViT-S-32")
    assert model.info()["bias_layers"] == [8, 9, 10, 11]


@pytest.mark.parametrize(
    "name, expected",
    [("ViT-B/16", "ViT-B-16"), ("ViT-L/14@336px", "ViT-L-14-336"), ("ViT-B-32", "ViT-B-32"), (" ViT-L/14 ", "ViT-L-14")],
)
def test_openai_names_are_normalised(name, expected):
    assert normalize_model_name(name) == expected
    assert expected in open_clip.list_models()


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ModelLoadError, match=r"unknown model 'ViT-B-61'.*did you mean"):
        falip.load("ViT-B-61")


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(ModelLoadError, match=r"unknown pretrained tag 'opena1'.*did you mean \['openai'\]"):
        falip.load("ViT-B-16", pretrained="opena1")


def test_uncached_tag_fails_at_once_offline_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # empty ~/.cache/clip
    with pytest.raises(ModelLoadError) as info:
        falip.load("ViT-B-16", pretrained="openai")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "vit_base_patch16_clip_224.openai" in message
    assert "falip.load('/path/to/ViT-B-16.pt')" in message


def test_missing_checkpoint_file():
    with pytest.raises(ModelLoadError, match="checkpoint file not found: .*nope.pt"):
        falip.load("/tmp/does/not/exist/nope.pt")
    with pytest.raises(ModelLoadError, match="pretrained weights file not found"):
        falip.load("ViT-B-16", pretrained="./missing/weights.bin")


def test_checkpoint_that_is_not_a_clip_vit_names_the_missing_keys(tmp_path, source):
    path = tmp_path / "text_only.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("visual.")}, path)
    with pytest.raises(UnsupportedModelError, match=r"missing keys \['visual.conv1.weight'"):
        falip.load(str(path))
    resnet = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, resnet)
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        falip.load(str(resnet))


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint .*weights.pt"):
        falip.load(str(path))


def test_resnet_named_model_is_rejected():
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        falip.load("RN50")


def test_bad_precision_and_preprocess():
    with pytest.raises(ValueError, match="precision"):
        falip.load("ViT-B-32", precision="fp8")
    with pytest.raises(ValueError, match="preprocess"):
        falip.load("ViT-B-32", preprocess="stretch")


def test_bad_images_are_reported(tmp_path, source):
    path = tmp_path / "m.pt"
    save_state_dict(source, path)
    model = falip.load(str(path))
    with pytest.raises(ImageLoadError, match="image file not found: .*missing.jpg"):
        model.encode_regions(tmp_path / "missing.jpg", [(0, 0, 1, 1)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00\x01 not a jpeg")
    with pytest.raises(ImageLoadError, match="cannot read image .*broken.jpg"):
        model.encode_image(bad)
    with pytest.raises(ImageLoadError, match="shape"):
        model.encode_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        model.encode_image(np.full((4, 4, 3), 7.0))
    with pytest.raises(falip.InvalidRegionError, match="mask 0 has shape"):
        model.encode_regions(np.zeros((10, 20, 3), np.uint8), masks=[np.ones((20, 10), bool)])
    with pytest.raises(falip.InvalidRegionError, match="mask 0 is empty"):
        model.encode_regions(np.zeros((10, 20, 3), np.uint8), masks=[np.zeros((10, 20), bool)])
    with pytest.raises(ValueError, match="exactly one of boxes"):
        model.encode_regions(np.zeros((10, 20, 3), np.uint8))


def _cached_openai_b16():
    cache = Path(os.environ.get("FALIP_TEST_WEIGHTS", "~/.cache/clip/ViT-B-16.pt")).expanduser()
    return cache if cache.is_file() else None


@pytest.mark.skipif(_cached_openai_b16() is None, reason="real OpenAI ViT-B/16 weights not present (set FALIP_TEST_WEIGHTS)")
def test_real_openai_weights_prefer_the_right_box():
    """With real weights: a red square on grey is found by FALIP among 3 boxes."""
    from PIL import Image, ImageDraw

    model = falip.load(str(_cached_openai_b16()), preprocess="squash", config=falip.FovealConfig.official())
    img = Image.new("RGB", (448, 448), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 40, 140, 140), fill=(220, 20, 20))
    draw.ellipse((300, 300, 400, 400), fill=(20, 40, 220))
    scores = model.score_regions(img, [(40, 40, 140, 140), (300, 300, 400, 400), (300, 40, 400, 140)], ["a red square"])
    assert scores[:, 0].argmax().item() == 0
