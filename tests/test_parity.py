"""falip's compatibility mode against fixtures written by the FALIP authors' own code.

The fixtures in ``tests/data/`` come from ``tools/make_reference_fixtures.py``, which imports
pumpkin805/FALIP's ``executor.py`` and ``clip`` package (see that script): FALIP mask rows for 541
boxes (under NumPy 1.x and ≥ 2, whose scalar promotion changes the reference's bump), region and
text embeddings and logits of a tiny random OpenAI-layout checkpoint, and the images the
reference's baselines draw.
"""

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import falip
from falip import FovealConfig, region_bias
from falip.geometry import make_transform
from falip.prompts import apply_edit
from reference import spec_bias_row

DATA = Path(__file__).parent / "data"
TOOL = Path(__file__).parents[1] / "tools" / "make_reference_fixtures.py"
G = 14
# The reference's representation names -> ours (its "circle" blurs outside the ellipse).
EDIT_NAMES = {"blur": "blur", "crop": "crop", "circle": "blur_circle", "shade": "shade"}


def numerics_of(fixture) -> str:
    """The bump arithmetic matching the NumPy that ran the reference when the fixture was written."""
    major = int(str(fixture["numpy_version"]).split(".")[0])
    return "reference-numpy1" if major < 2 else "reference-numpy2"


def xyxy(xywh):
    x, y, w, h = xywh
    return (x, y, x + w, y + h)  # as the reference's Box.right / Box.bottom


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_reference_fixtures", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("major", [1, 2])
def test_bias_rows_equal_the_reference_code_on_541_random_tiny_border_and_outside_boxes(major):
    fx = np.load(DATA / f"reference_bias_numpy{major}.npz")
    config = FovealConfig.official(numerics_of(fx))
    assert len(fx["rows"]) >= 500
    worst, other_tokens = 0.0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boxes partly outside warn
        for i, (box, (W, H), row) in enumerate(zip(fx["boxes_xywh"], fx["image_sizes"], fx["rows"])):
            ours = region_bias(xyxy(box), (int(W), int(H)), (G, G), config, preprocess="squash").numpy()
            if not np.array_equal(ours != 0, row != 0):
                other_tokens.append(i)
            worst = max(worst, float(np.abs(ours - row).max()))
    assert not other_tokens, f"{len(other_tokens)} boxes select other tokens than the reference, e.g. {other_tokens[:5]}"
    assert worst <= 1e-6


def test_spec_transcription_selects_the_reference_tokens_and_float64_stays_within_3e5():
    """Second, independent check (tests/reference.py, written from docs/method.md §3) and the clean default's deviation."""
    fx = np.load(DATA / "reference_bias_numpy1.npz")
    for box, (W, H), row in zip(fx["boxes_xywh"], fx["image_sizes"], fx["rows"]):
        spec = spec_bias_row(xyxy(box), int(W), int(H))  # float64 bump
        assert np.array_equal(spec != 0, row != 0)
        assert np.abs(spec - row).max() <= 3e-5
        np.testing.assert_array_equal(spec_bias_row(xyxy(box), int(W), int(H), numerics="reference-numpy1"), row)


@pytest.fixture(scope="module")
def parity_model(tool, tmp_path_factory):
    fx = np.load(DATA / "reference_model.npz")
    state = tool.tiny_openai_state(int(fx["seed"]))
    assert tool.state_digest(state) == str(fx["state_sha256"]), (
        "the tiny checkpoint generated from the seed differs from the one the fixtures were made with "
        "(torch's RNG changed?); rerun tools/make_reference_fixtures.py"
    )
    path = tmp_path_factory.mktemp("parity") / "tiny-openai.pt"
    torch.save(state, path)
    model = falip.load(str(path), preprocess="squash", config=FovealConfig.official(numerics_of(fx)))
    return model, fx


def test_text_embeddings_equal_the_reference_clip_package(parity_model):
    model, fx = parity_model
    texts = [f"a photo of {c.lower()}" for c in fx["captions"]]
    np.testing.assert_array_equal(model.runtime.tokenizer(texts).numpy(), fx["text_tokens"])
    ours = model.encode_text(texts).numpy()
    assert np.abs(ours - fx["text_embeddings"]).max() <= 2e-5


@pytest.mark.parametrize("key", ["a", "b", "c"])
def test_region_embeddings_and_logits_equal_the_reference_executor(parity_model, key):
    model, fx = parity_model
    image = Image.open(DATA / f"reference_image_{key}.png").convert("RGB")
    boxes = np.array([xyxy(b) for b in fx[f"{key}/boxes_xywh"]])
    pixels, transform = model.preprocess_image(image)
    assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == str(fx[f"{key}/pixels_digest"])  # same input tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = model.region_biases(transform, boxes=boxes)
        assert np.abs(masks.numpy() - fx[f"{key}/mask_rows"]).max() <= 1e-6
        text = model.encode_text([f"a photo of {c.lower()}" for c in fx["captions"]])
        for mode in ("exact", "naive") if key == "b" else ("exact",):  # naive ≡ exact is tested in test_encode
            regions = model.encode_regions(image, boxes, mode=mode)
            assert np.abs(regions.numpy() - fx[f"{key}/region_embeddings"]).max() <= 2e-5, mode
            logits = (model.runtime.clip.logit_scale.detach().exp() * regions @ text.T).numpy()
            assert np.abs(logits - fx[f"{key}/logits"]).max() <= 2e-4, mode
            assert np.array_equal(logits.argmax(0), fx[f"{key}/logits"].argmax(0)), mode  # same box per sentence


def test_baselines_draw_what_the_reference_draws():
    fx = np.load(DATA / "reference_edits.npz")
    checked, widened = 0, 0
    for key in "abc":
        image = Image.open(DATA / f"reference_image_{key}.png").convert("RGB")
        for k, box in enumerate(fx[f"{key}/boxes_xywh"]):
            for theirs, ours in EDIT_NAMES.items():
                name = f"{key}/{theirs}/{k}"
                edited = np.ascontiguousarray(np.asarray(apply_edit(image, ours, xyxy(box), style="reference").image))
                shape = tuple(int(v) for v in fx[f"{name}/shape"])
                if 0 in shape:  # the reference's crop rounds this box to nothing (and would fail); we keep 1 px
                    assert theirs == "crop" and edited.shape[:2] == tuple(max(v, 1) for v in shape[:2])
                    widened += 1
                    continue
                if f"{name}/pixels" in fx:
                    ref = fx[f"{name}/pixels"]
                    assert edited.shape == ref.shape, name
                    differ = int(np.any(edited != ref, axis=-1).sum())
                    assert differ == 0, f"{name}: {differ} pixels differ"
                assert edited.shape == shape and hashlib.sha256(edited.tobytes()).hexdigest() == str(fx[f"{name}/sha256"]), name
                checked += 1
    assert checked == 83 and widened == 1


def test_clean_style_differs_from_the_reference_where_documented():
    image = Image.open(DATA / "reference_image_b.png").convert("RGB")  # 375×250
    box = (37.5, 50.0, 225.0, 162.5)
    ref = np.asarray(apply_edit(image, "blur", box, style="reference").image)
    clean = np.asarray(apply_edit(image, "blur", box, style="clean").image)
    sharp = np.asarray(image)
    # reference: PIL's rectangle keeps columns int(37.5)=37 .. int(225)=225 inclusive; clean: round(37.5)=38 .. 224
    assert np.array_equal(ref[50:163, 37:226], sharp[50:163, 37:226])
    assert np.array_equal(clean[50:162, 38:225], sharp[50:162, 38:225]) and not np.array_equal(clean[:, 225], sharp[:, 225])
    # crop: PIL rounds half to even (37.5 -> 38, 162.5 -> 162); clean takes every touched pixel (37 .. 163)
    assert apply_edit(image, "crop", box, style="reference").image.size == (225 - 38, 162 - 50)
    assert apply_edit(image, "crop", box, style="clean").image.size == (225 - 37, 163 - 50)
    # outline width int(max(W, H) / 200): none under 200 px in the reference, at least 1 px clean
    small = image.resize((150, 100))
    ref_small = np.asarray(apply_edit(small, "blur_circle", (20, 20, 100, 80), style="reference").image).astype(int)
    clean_small = np.asarray(apply_edit(small, "blur_circle", (20, 20, 100, 80), style="clean").image).astype(int)
    red = (255, 0, 0)
    assert not any(tuple(p) == red for p in ref_small.reshape(-1, 3)) and any(tuple(p) == red for p in clean_small.reshape(-1, 3))
    with pytest.raises(ValueError, match="edit style"):
        apply_edit(image, "blur", box, style="fancy")


def test_squash_transform_maps_border_coordinates_as_the_reference():
    # x = 43 of an 86-px-wide image: 43 * (224 / 86) = 112.00000000000001 -> touches patch column 7
    t = make_transform("squash", (86, 64), 224)
    assert t.map_box((43, 0, 60, 10))[0] == 43 * (224 / 86) > 112


def test_cli_numerics_option_selects_the_bump_arithmetic(capsys):
    from falip.cli import main

    box = ["bias", "--image-size", "640,480", "--box", "200,200,201,201"]  # one token
    assert main(box) == 0 and " 0.200 " in capsys.readouterr().out
    assert main([*box, "--numerics", "reference-numpy2"]) == 0 and " 0.210 " in capsys.readouterr().out
