"""Print how closely the importable ``falip`` matches the fixtures written by the authors' code.

    PYTHONPATH=src python tools/parity_report.py            # this checkout
    PYTHONPATH=/path/to/older/src python tools/parity_report.py   # an older falip, for before/after figures

Reads ``tests/data/`` (written by ``tools/make_reference_fixtures.py``) and prints, per fixture:
boxes whose bias selects other tokens than the reference and the largest |Δ bias|; the largest
|Δ| of text embeddings, region embeddings and logits of the tiny checkpoint, and on how many
sentences the same box wins; how many of the reference baselines' images falip draws pixel for
pixel. Works with falip versions from before ``FovealConfig.numerics`` and ``apply_edit(style=)``
existed (then it uses what they offer).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import falip
from falip import FovealConfig, region_bias
from falip.prompts import apply_edit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EDIT_NAMES = {"blur": "blur", "crop": "crop", "circle": "blur_circle", "shade": "shade"}


def official(numpy_version: str) -> FovealConfig:
    """``FovealConfig.official()`` matching the NumPy that ran the reference (when falip knows numerics)."""
    if "numerics" in inspect.signature(FovealConfig.official).parameters:
        major = int(numpy_version.split(".")[0])
        return FovealConfig.official("reference-numpy1" if major < 2 else "reference-numpy2")
    return FovealConfig.official()


def xyxy(b):
    x, y, w, h = b
    return (x, y, x + w, y + h)


def bias_report() -> None:
    for path in sorted(DATA.glob("reference_bias_numpy*.npz")):
        fx = np.load(path)
        config = official(str(fx["numpy_version"]))
        other, worst = 0, 0.0
        for box, (W, H), row in zip(fx["boxes_xywh"], fx["image_sizes"], fx["rows"]):
            ours = region_bias(xyxy(box), (int(W), int(H)), (14, 14), config, preprocess="squash").numpy()
            other += not np.array_equal(ours != 0, row != 0)
            worst = max(worst, float(np.abs(ours - row).max()))
        print(
            f"{path.name} (NumPy {fx['numpy_version']}): {other}/{len(fx['rows'])} boxes select other tokens, max|Δ bias| {worst:.3g}"
        )


def model_report() -> None:
    spec = importlib.util.spec_from_file_location("make_reference_fixtures", ROOT / "tools" / "make_reference_fixtures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fx = np.load(DATA / "reference_model.npz")
    state = tool.tiny_openai_state(int(fx["seed"]))
    if tool.state_digest(state) != str(fx["state_sha256"]):
        raise SystemExit("the tiny checkpoint generated from the seed differs from the fixtures' one")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny-openai.pt"
        torch.save(state, ckpt)
        model = falip.load(str(ckpt), preprocess="squash", config=official(str(fx["numpy_version"])))
    text = model.encode_text([f"a photo of {c.lower()}" for c in fx["captions"]])
    rows = emb = logit = 0.0
    same = total = 0
    for key in ("a", "b", "c"):
        image = Image.open(DATA / f"reference_image_{key}.png").convert("RGB")
        boxes = np.array([xyxy(b) for b in fx[f"{key}/boxes_xywh"]])
        _, transform = model.preprocess_image(image)
        rows = max(rows, float(np.abs(model.region_biases(transform, boxes=boxes).numpy() - fx[f"{key}/mask_rows"]).max()))
        regions = model.encode_regions(image, boxes)
        logits = (model.runtime.logit_scale.detach() * regions @ text.T).numpy()
        emb = max(emb, float(np.abs(regions.numpy() - fx[f"{key}/region_embeddings"]).max()))
        logit = max(logit, float(np.abs(logits - fx[f"{key}/logits"]).max()))
        same += int((logits.argmax(0) == fx[f"{key}/logits"].argmax(0)).sum())
        total += logits.shape[1]
    n = sum(len(fx[f"{k}/boxes_xywh"]) for k in "abc")
    print(
        f"reference_model.npz ({n} boxes, 3 images, {len(fx['captions'])} sentences, NumPy {fx['numpy_version']}): "
        f"max|Δ text emb| {np.abs(text.numpy() - fx['text_embeddings']).max():.2e}, max|Δ mask row| {rows:.2e}, "
        f"max|Δ region emb| {emb:.2e}, max|Δ logit| {logit:.2e}, same box {same}/{total}"
    )


def edits_report() -> None:
    fx = np.load(DATA / "reference_edits.npz")
    styled = "style" in inspect.signature(apply_edit).parameters
    equal, total, differing = 0, 0, {}
    for key in ("a", "b", "c"):
        image = Image.open(DATA / f"reference_image_{key}.png").convert("RGB")
        for k, box in enumerate(fx[f"{key}/boxes_xywh"]):
            for theirs, ours in EDIT_NAMES.items():
                kwargs = {"style": "reference"} if styled else {}
                pixels = np.ascontiguousarray(np.asarray(apply_edit(image, ours, xyxy(box), **kwargs).image))
                name = f"{key}/{theirs}/{k}"
                same = tuple(pixels.shape) == tuple(fx[f"{name}/shape"]) and (
                    hashlib.sha256(pixels.tobytes()).hexdigest() == str(fx[f"{name}/sha256"])
                )
                equal += same
                total += 1
                if not same:
                    differing[theirs] = differing.get(theirs, 0) + 1
    print(f"reference_edits.npz: {equal}/{total} edited images pixel-equal (differing by method: {differing})")


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"falip {falip.__file__}")
    bias_report()
    model_report()
    edits_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
