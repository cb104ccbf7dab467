"""Loading: OpenAI-layout files in every format, names, tags, and clear failures."""

import os
import re
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


# -- building on the meta device, and one check of the weights against the model ------------------


def _save_named(clip, path, edit=None):
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vit_s32(tmp_path_factory):
    """open_clip's ViT-S-32 with random weights and its file (a named architecture: built on the meta device)."""
    torch.manual_seed(11)
    clip = open_clip.create_model("ViT-S-32").eval()
    return clip, _save_named(clip, tmp_path_factory.mktemp("s32") / "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_named_model_built_on_meta_equals_open_clips_own_load(vit_s32, precision):
    """Every parameter and buffer (the text causal mask too) equals open_clip's create_model(pretrained=FILE), dtypes
    included, and nothing is left on the meta device."""
    _, path = vit_s32
    model = falip.load("ViT-S-32", pretrained=str(path), precision=precision)
    theirs = open_clip.create_model("ViT-S-32", pretrained=str(path), precision=precision)
    ours = model.runtime.clip
    for (name, a), (_, b) in zip(
        list(ours.named_parameters()) + list(ours.named_buffers()), list(theirs.named_parameters()) + list(theirs.named_buffers())
    ):
        assert not a.is_meta, name
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()] == ["attn_mask"]


def test_architecture_left_on_the_meta_device_is_built_on_the_cpu(monkeypatch, vit_s32, image):
    """When a non-persistent buffer cannot be rebuilt after a meta build, the model is built on the CPU instead."""
    from falip.runtimes import open_clip_loading

    clip, path = vit_s32
    monkeypatch.setattr(open_clip_loading, "_rebuild_causal_masks", lambda model: None)
    model = falip.load("ViT-S-32", pretrained=str(path))
    assert not model.runtime.clip.attn_mask.is_meta
    torch.testing.assert_close(model.runtime.clip.attn_mask, clip.attn_mask, atol=0, rtol=0)
    torch.testing.assert_close(
        model.encode_text(["a dog"]), F.normalize(clip.encode_text(open_clip.get_tokenizer("ViT-S-32")(["a dog"])), dim=-1)
    )


def _int8(state, key="visual.transformer.resblocks.0.mlp.c_fc.weight"):
    state[key] = (state[key] * 100).to(torch.int8)


def _drop(state, key="visual.transformer.resblocks.0.ln_1.bias"):
    del state[key]


def _extra(state):
    state["visual.spare.weight"] = torch.ones(3)


def _reshape(state, key="visual.proj"):
    state[key] = state[key][:, :-1].contiguous()


@pytest.mark.parametrize(
    "edit, says",
    [
        (_int8, r"visual.transformer.resblocks.0.mlp.c_fc.weight is int8 where the model needs a float tensor"),
        (_drop, r"1 tensors missing \(visual.transformer.resblocks.0.ln_1.bias\)"),
        (_extra, r"1 unexpected tensors \(visual.spare.weight\)"),
        (_reshape, r"visual.proj has shape \(\d+, \d+\) where the model needs \(\d+, \d+\)"),
    ],
    ids=["int8", "missing", "unexpected", "shape"],
)
@pytest.mark.parametrize("named", [True, False], ids=["named+file", "openai-file"])
def test_weights_that_disagree_with_the_model_are_refused_in_one_line(tmp_path, vit_s32, source, edit, says, named):
    clip = vit_s32[0] if named else source
    path = _save_named(clip, tmp_path / ("weights.bin" if named else "ViT-x.pt"), edit)
    with pytest.raises(ModelLoadError) as info:
        falip.load("ViT-S-32", pretrained=str(path)) if named else falip.load(str(path))
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1
    assert re.search(says, message), message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_float_checkpoints_of_any_precision_load_cast_to_the_model(tmp_path, vit_s32, image, dtype):
    """fp16 and fp64 tensors are the same kind as the model's float parameters: cast, not refused."""
    clip, _ = vit_s32
    path = _save_named(clip, tmp_path / "w.bin", lambda s: s.update({k: v.to(dtype) for k, v in s.items()}))
    model = falip.load("ViT-S-32", pretrained=str(path))
    assert model.runtime.clip.visual.proj.dtype == torch.float32
    expected = F.normalize(clip.encode_image(model.preprocess_image(image)[0]), dim=-1)
    torch.testing.assert_close(model.encode_image(image), expected, atol=2e-3 if dtype == torch.float16 else 1e-6, rtol=0)


def test_nan_and_overflowing_logit_scale_are_refused_at_load(tmp_path, source):
    nan = _save_named(
        source,
        tmp_path / "nan.pt",
        lambda s: s["visual.transformer.resblocks.3.attn.out_proj.weight"].view(-1)[5].fill_(float("nan")),
    )
    with pytest.raises(
        ModelLoadError, match=r"nan.pt holds NaN or infinite values \(in visual.transformer.resblocks.3.attn.out_proj.weight\)"
    ):
        falip.load(str(nan))
    big = _save_named(source, tmp_path / "scale.pt", lambda s: s["logit_scale"].fill_(100.0))
    with pytest.raises(ModelLoadError, match=r"scale.pt has logit_scale 100: exp\(logit_scale\) overflows float32"):
        falip.load(str(big))
