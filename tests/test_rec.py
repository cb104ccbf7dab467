"""Referring expression comprehension: loaders (refer pickles + instances.json, ReCLIP JSONL +
detections), the IoU rule, proposals, every method and combination, P, ensembles, resume,
aggregate, bad input — on tiny files written here and a random tiny CLIP."""

import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import falip.tasks.rec as rec_module
from conftest import tiny_clip, wrap
from falip import FalipError, FovealConfig
from falip.cli import main
from falip.datasets.refer import iou, load_detections, load_reclip, load_refer, segmentation_mask
from falip.methods import encode_with_method, parse_method
from falip.prompts import EDITS
from falip.results import ResumeMismatchError
from falip.tasks.rec import RegionScorer, draw_captions, evaluate, ground, method_label, parse_methods

# image id -> (W, H, {ann id: bbox xywh})
IMAGES = {
    1: (120, 90, {11: [5, 5, 40, 30], 12: [60, 40, 50, 40], 13: [30, 50, 20, 20]}),
    2: (100, 80, {21: [0, 0, 50, 40], 22: [50, 40, 50, 40]}),
    3: (80, 60, {31: [10, 10, 20, 20]}),  # its file is never written
    4: (80, 60, {41: [10, 10, 20, 20]}),  # its file is not an image
}
# ref id -> (image id, ann id, split, sentences)
REFS = {
    100: (1, 11, "testA", ["The red box", "left thing"]),
    101: (1, 12, "testA", ["blue circle"]),
    102: (2, 21, "testA", ["top left"]),
    103: (2, 99, "testA", ["ghost"]),  # annotation 99 does not exist
    104: (3, 31, "testA", ["missing one"]),
    105: (4, 41, "testA", ["broken image"]),
    106: (2, 22, "testB", ["bottom right"]),
    107: (1, 13, "val", ["small square"]),
}
POLYGON_11 = [[5, 5, 45, 5, 45, 35, 5, 35]]
DETECTIONS = {"1": [[4, 4, 42, 32], [60, 40, 50, 40], [-10, -10, 200, 200], [500, 500, 10, 10]], "2": []}


def file_name(image_id, ann_id=None):
    return f"COCO_train2014_{image_id:012d}" + (f"_{ann_id}" if ann_id is not None else "") + ".jpg"


def rle_of(mask):
    """Uncompressed COCO RLE (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1)
    counts, value, run = [], False, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def draw_image(image_id):
    W, H, anns = IMAGES[image_id]
    img = Image.new("RGB", (W, H), (90, 120, 150))
    draw = ImageDraw.Draw(img)
    for i, (x, y, w, h) in enumerate(anns.values()):
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=[(220, 30, 30), (30, 40, 220), (30, 200, 60)][i % 3])
    return img


def blob_mask():
    mask = np.zeros((90, 120), bool)
    mask[45:75, 70:100] = True
    return mask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Writes COCO images, the refer layout, ReCLIP JSONL and a detections file; returns their root."""
    root = tmp_path_factory.mktemp("rec")
    images = root / "train2014"
    images.mkdir()
    for image_id in (1, 2):
        draw_image(image_id).save(images / file_name(image_id))
    (images / file_name(4)).write_bytes(b"this is not a jpeg")
    annotations = []
    for image_id, (_W, _H, anns) in IMAGES.items():
        for ann_id, bbox in anns.items():
            seg = POLYGON_11 if ann_id == 11 else rle_of(blob_mask()) if ann_id == 12 else []
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": bbox, "segmentation": seg, "category_id": 1})
    instances = {
        "images": [{"id": i, "file_name": file_name(i), "width": W, "height": H} for i, (W, H, _) in IMAGES.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    refs, sent_id = [], 1000
    for ref_id, (image_id, ann_id, split, sentences) in REFS.items():
        sents = []
        for s in sentences:
            sents.append({"raw": s, "sent": s.lower(), "tokens": s.lower().split(), "sent_id": sent_id})
            sent_id += 1
        refs.append(
            dict(
                ref_id=ref_id,
                ann_id=ann_id,
                image_id=image_id,
                split=split,
                sentences=sents,
                file_name=file_name(image_id, ann_id),
                category_id=1,
            )
        )
    for name in ("refcoco", "refcocog"):
        (root / "refer" / name).mkdir(parents=True)
        (root / "refer" / name / "instances.json").write_text(json.dumps(instances))
    with open(root / "refer" / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(root / "refer" / "refcocog" / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f)
    for split in ("testA", "testB"):
        with open(root / f"refcoco_{split}.jsonl", "w") as f:
            for ref_id, (image_id, ann_id, s_split, sentences) in REFS.items():
                if s_split != split:
                    continue
                anns = [a for a in annotations if a["image_id"] == image_id]
                line = dict(
                    file_name=file_name(image_id, ann_id),
                    image_id=str(image_id),
                    anns=anns,
                    ann_id=str(ann_id) if ref_id == 101 else ann_id,
                    sentences=[{"raw": s} for s in sentences],
                )
                f.write(json.dumps(line) + "\n")
    (root / "dets.json").write_text(json.dumps(DETECTIONS))
    return root


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_clip(224, 32, layers=3), preprocess="squash", config=FovealConfig(alpha=1.0))


@pytest.fixture(scope="module")
def other_model():
    return wrap(tiny_clip(224, 32, layers=3, seed=7), preprocess="squash", config=FovealConfig(alpha=1.0))


def refer(data, split="testA", **kw):
    return load_refer(data / "refer", "refcoco", split, **kw)


def run(scorer, rec_data, data, out, **kw):
    return evaluate(scorer, rec_data, data / "train2014", out, progress=False, **kw)


def lines(path):
    """Records of a predictions JSONL (a line cut short by an interrupted run is ignored)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ------------------------------------------------------------------------------------------------
# Loaders


def test_refer_and_reclip_load_the_same_samples(data):
    a = refer(data)
    b = load_reclip(data / "refcoco_testA.jsonl", split="testA", name="refcoco")

    def key(d):
        return sorted((s.image_id, s.sentence, s.targets, s.problem is None) for s in d.samples)

    assert key(a) == key(b) and len(a.samples) == 7
    assert [s.id for s in a.samples][:3] == ["1000", "1001", "1002"] and b.samples[0].id == "1:0"
    for image_id in ("1", "2"):
        assert [(p.bbox, p.ann_id) for p in a.proposals(image_id)] == [(p.bbox, p.ann_id) for p in b.proposals(image_id)]
    assert a.images["1"] == [file_name(1)] and b.images["1"] == [file_name(1), file_name(1, 11)]
    assert a.proposal_source == "gold" and a.source["split_by"] == "unc"
    assert [s.problem[0] for s in a.samples if s.problem] == ["unknown annotation"]
    assert "annotation 99" in [s for s in a.samples if s.problem][0].problem[1]
    assert a.target_boxes(a.samples[0]) == [(5.0, 5.0, 40.0, 30.0)]
    assert [s.sentence for s in refer(data, "val").samples] == ["small square"]
    g = load_refer(data / "refer", "refcocog", "testB")  # refcocog reads refs(umd).p by default
    assert g.source["split_by"] == "umd" and [s.sentence for s in g.samples] == ["bottom right"]


def test_detections_replace_gold_proposals(data):
    d = refer(data, detections=data / "dets.json")
    assert d.proposal_source == "detector" and d.source["detections"].endswith("dets.json")
    assert [p.bbox for p in d.proposals("1")][0] == (4.0, 4.0, 42.0, 32.0) and d.proposals("2") == [] and d.proposals("3") == []
    assert d.target_boxes(d.samples[0]) == [(5.0, 5.0, 40.0, 30.0)]  # targets stay the gold boxes
    (data / "dets_obj.json").write_text(json.dumps({"1": [{"bbox": [1, 2, 3, 4]}]}))
    assert load_detections(data / "dets_obj.json") == {"1": [(1.0, 2.0, 3.0, 4.0)]}


def test_iou_and_segmentations():
    assert iou((0, 0, 20, 10), (0, 0, 10, 10)) == 0.5
    assert iou((0, 0, 20, 10), (0, 0, 10.5, 10)) == pytest.approx(0.525)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0 and iou((3, 4, 5, 6), (3, 4, 5, 6)) == 1.0
    poly = segmentation_mask(POLYGON_11, (120, 90))
    assert poly.shape == (90, 120) and poly[20, 25] and not poly[50, 25] and poly.sum() == pytest.approx(41 * 31, abs=45)
    assert np.array_equal(segmentation_mask(rle_of(blob_mask()), (120, 90)), blob_mask())
    assert segmentation_mask(rle_of(blob_mask()), (121, 90)) is None  # RLE of another size
    assert segmentation_mask({"counts": "compressed", "size": [90, 120]}, (120, 90)) is None
    assert segmentation_mask([], (120, 90)) is None


def test_malformed_files_are_named(data, tmp_path):
    with pytest.raises(FalipError, match="does not exist.*available splits: testA, testB, val"):
        refer(data, "test")
    with pytest.raises(FalipError, match=r"refs\(google\)\.p.*present: refs\(unc\)\.p"):
        refer(data, split_by="google")
    with pytest.raises(FalipError, match=r"dataset folder not found: .*refclef \(present: refcoco, refcocog\)"):
        load_refer(data / "refer", "refclef", "val")
    bad = tmp_path / "refcoco"
    bad.mkdir()
    (bad / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": OrderedDict()}]))
    with pytest.raises(FalipError, match=r"not a refs pickle.*collections\.OrderedDict"):
        load_refer(tmp_path, "refcoco", "val")
    (bad / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1}]))
    with pytest.raises(FalipError, match="instances file not found"):
        load_refer(tmp_path, "refcoco", "val")
    (bad / "instances.json").write_text("{not json")
    with pytest.raises(FalipError, match="instances.json is not valid JSON"):
        load_refer(tmp_path, "refcoco", "val")
    (bad / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(FalipError, match="ref 0 lacks ann_id, image_id, split, sentences"):
        load_refer(tmp_path, "refcoco", "val")
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(FalipError, match=r"x.jsonl:1 lacks image_id, anns, ann_id, sentences"):
        load_reclip(jl)
    jl.write_text('\n{"file_name": "a.jpg", \n')
    with pytest.raises(FalipError, match=r"x.jsonl:2 is not valid JSON"):
        load_reclip(jl)
    jl.write_text(
        json.dumps(dict(file_name="a.jpg", image_id=1, anns=[{"id": 1, "bbox": [1, 2]}], ann_id=1, sentences=[])) + "\n"
    )
    with pytest.raises(FalipError, match=r"'bbox' must be \[x, y, w, h\]"):
        load_reclip(jl)
    with pytest.raises(FalipError, match="annotations file not found"):
        load_reclip(tmp_path / "nope.jsonl")
    (tmp_path / "d.json").write_text(json.dumps([[1, 2, 3, 4]]))
    with pytest.raises(FalipError, match="must map image ids"):
        load_detections(tmp_path / "d.json")


# ------------------------------------------------------------------------------------------------
# Scoring: methods, combinations, P, ensembles, ground


def test_ground_scores_like_score_regions(model, data):
    image = data / "train2014" / file_name(1)
    boxes = [(5, 5, 45, 35), (60, 40, 110, 80), (30, 50, 50, 70)]
    g = ground(model, image, boxes, "the red box")
    expected = model.score_regions(image, boxes, ["a photo of the red box"])[:, 0]
    torch.testing.assert_close(g.scores, expected, atol=1e-4, rtol=0)
    assert g.index == int(expected.argmax()) and g.box == tuple(float(v) for v in boxes[g.index])
    with pytest.raises(ValueError, match="non-empty string"):
        ground(model, image, boxes, "")
    with pytest.raises(FalipError, match="box 0 .* is empty"):
        ground(model, image, [(10, 10, 5, 20)], "x")


def test_every_method_encodes_each_box_differently_and_only_reverse_blur_reads_masks(model, data):
    image = Image.open(data / "train2014" / file_name(1)).convert("RGB")
    boxes = np.array([(5, 5, 45, 35), (60, 40, 110, 80), (30, 50, 50, 70)], float)
    masks = [segmentation_mask(POLYGON_11, image.size), blob_mask(), np.zeros((90, 120), bool)]
    masks[2][50:70, 30:50] = True
    names = ["falip", "none", *EDITS, "falip+crop", "falip+circle", "falip+reverse_blur"]
    scorer = RegionScorer([model], names)
    feats = scorer.encode(image, boxes, masks)[0]
    by_name = dict(zip(names, feats))
    for name, f in by_name.items():
        assert f.shape == (3, 64) and torch.isfinite(f).all(), name
        spread = (f - f[0]).abs().max().item()
        assert (spread < 1e-6) if name == "none" else (spread > 1e-4), name  # one view per box, except none
    for a in names:  # every method encodes something different
        for b in names:
            if a < b:
                assert (by_name[a] - by_name[b]).abs().max() > 1e-4, (a, b)
    # reverse_blur follows the segmentation mask when the data has one; the other methods never see it
    box_only = scorer.encode(image, boxes, None)[0]
    assert (box_only[names.index("reverse_blur")][1] - by_name["reverse_blur"][1]).abs().max() > 1e-4
    torch.testing.assert_close(box_only[names.index("blur")], by_name["blur"])
    # a combination is the edit's image with the bias, through the shared method layer
    torch.testing.assert_close(by_name["falip+circle"], encode_with_method(model, image, boxes, method="falip+circle"))
    scores = scorer.score([feats], ["the red box"])
    assert scores.shape == (1, 3)


def test_shade_adds_its_text_suffix(model, data):
    scorer = RegionScorer([model], "shade,falip", template="a photo of {}")
    assert scorer.prompt("The Cat", parse_method("shade")) == "a photo of the cat is in red color."
    assert scorer.prompt("The Cat", parse_method("falip")) == "a photo of the cat"


def test_method_and_model_ensembles(model, other_model, data):
    image = Image.open(data / "train2014" / file_name(2)).convert("RGB")
    boxes = np.array([(0, 0, 50, 40), (50, 40, 100, 80)], float)
    texts = ["top left", "bottom right", "the blue thing"]

    def single(m, method):
        s = RegionScorer([m], method)
        return s.score(s.encode(image, boxes), texts)

    crop, blur = single(model, "crop"), single(model, "blur")
    both = RegionScorer([model], "crop,blur")
    torch.testing.assert_close(both.score(both.encode(image, boxes), texts), crop + blur)
    best = RegionScorer([model], ["crop", "blur"], aggregate="max")
    torch.testing.assert_close(best.score(best.encode(image, boxes), texts), torch.maximum(crop, blur))
    pair = RegionScorer([model, other_model], "falip")
    torch.testing.assert_close(
        pair.score(pair.encode(image, boxes), texts), single(model, "falip") + single(other_model, "falip")
    )
    g = ground([model, other_model], image, boxes, "top left", method="falip")
    torch.testing.assert_close(g.scores, (single(model, "falip") + single(other_model, "falip"))[0])
    assert method_label(parse_methods("crop,blur"), "max", True) == "crop,blur:max+P"
    assert method_label(parse_methods("falip"), "max", False) == "falip"
    with pytest.raises(ValueError, match="twice"):
        parse_methods("crop,crop")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("falip,sparkles")
    with pytest.raises(ValueError, match="aggregate"):
        RegionScorer([model], "falip", aggregate="mean")
    with pytest.raises(ValueError, match="mode must be one of"):
        RegionScorer([model], "falip", mode="fast")
    with pytest.raises(ValueError, match="needs a '{}'"):
        RegionScorer([model], "falip", template="a photo")


def test_score_subtraction_is_seeded_and_excludes_the_own_expression(model, data):
    pool = [f"thing {i}" for i in range(30)]
    drawn = draw_captions(pool + pool[:5], n=10, seed=3)
    assert drawn == draw_captions(pool, n=10, seed=3) and len(drawn) == 11 and len(set(drawn)) == 11
    assert drawn != draw_captions(pool, n=10, seed=4)
    assert sorted(draw_captions(pool[:4], n=10)) == sorted(pool[:4])
    with pytest.raises(FalipError, match="at least 2 distinct"):
        draw_captions(["only one", "only one"])

    image = Image.open(data / "train2014" / file_name(1)).convert("RGB")
    boxes = np.array([(5, 5, 45, 35), (60, 40, 110, 80)], float)
    plain = RegionScorer([model], "falip")
    sub = RegionScorer([model], "falip", captions=drawn, n_captions=10)
    feats = plain.encode(image, boxes)
    own = drawn[0]  # an expression that is itself in the pool: the other 10 are its negatives
    for text in (own, "the red box"):
        negatives = [c for c in drawn if c != text][:10]
        assert len(negatives) == 10
        mean = model.encode_text([f"a photo of {c}" for c in negatives]).mean(0)
        expected = plain.score(feats, [text])[0] - model.runtime.clip.logit_scale.exp() * feats[0][0] @ mean
        torch.testing.assert_close(sub.score(feats, [text])[0], expected, atol=1e-4, rtol=0)


def test_each_image_is_encoded_once_per_method_and_model(model, other_model, data, tmp_path, monkeypatch):
    calls, texts = [], []
    real = rec_module.encode_with_method_batch

    def record(m, images, boxes_per_image, *, method, **kw):
        calls.append((method.name, len(images)))
        return real(m, images, boxes_per_image, method=method, **kw)

    monkeypatch.setattr(rec_module, "encode_with_method_batch", record)
    real_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda t: texts.extend(t) or real_text(t))
    scorer = RegionScorer([model, other_model], "falip,blur")
    result = run(scorer, refer(data), data, tmp_path / "r.json")
    assert result["metrics"]["n"] == 4 and result["run"]["images_encoded"] == 2
    # one batched call per (model, method), each with both images (whose proposals serve all their 4 sentences)
    assert sorted(calls) == [("blur", 2), ("blur", 2), ("falip", 2), ("falip", 2)]
    assert sorted(texts) == sorted(f"a photo of {s}" for s in ["the red box", "left thing", "blue circle", "top left"])


# ------------------------------------------------------------------------------------------------
# Evaluation runs


def test_gold_run_records_everything_and_counts_skips(model, data, tmp_path):
    result = run(
        RegionScorer([model], "falip"), refer(data), data, tmp_path / "r.json", dataset="refcoco", split="testA", method="falip"
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == result and result["proposals"] == "gold" and result["task"] == "rec"
    m = result["metrics"]
    assert m["n"] == 4 and m["skipped"] == 3 and m["expr_per_s"] > 0 and m["images_per_s"] > 0
    assert result["skipped"]["by_reason"] == {"unknown annotation": 1, "missing image": 1, "unreadable image": 1}
    details = {e["reason"]: e["detail"] for e in result["skipped"]["examples"]}
    assert file_name(3) in details["missing image"] and file_name(4) in details["unreadable image"]
    records = {r["id"]: r for r in lines(tmp_path / "r.predictions.jsonl")}
    ok = [r for r in records.values() if "skipped" not in r]
    assert len(records) == 7 and len(ok) == 4
    for r in ok:  # gold proposals: the prediction is an annotation, correct iff it is the target
        assert r["n_proposals"] == len(r["scores"]) == len(IMAGES[int(r["image_id"])][2])
        assert r["correct"] == (r["pred_ann_id"] in r["target_ann_ids"]) and r["scores"][r["pred_index"]] == max(r["scores"])
    assert m["acc"] == pytest.approx(100 * sum(r["correct"] for r in ok) / 4)
    assert m["acc_all"] == pytest.approx(100 * sum(r["correct"] for r in ok) / 7)
    assert records["1000"]["sentence"] == "The red box" and records["1000"]["image_id"] == "1"
    assert records["1004"]["skipped"] == "unknown annotation" and records["1004"]["sentence"] == "ghost"


def test_detector_run_clamps_and_drops_proposals_and_skips_images_without_any_when_asked(model, data, tmp_path):
    d = load_reclip(data / "refcoco_testA.jsonl", split="testA", name="refcoco", detections=data / "dets.json")
    result = run(RegionScorer([model], "crop"), d, data, tmp_path / "r.json", no_proposals="skip", allow_lost_inputs=True)
    assert result["proposals"] == "detector" and result["lost_inputs"]["count"] == 4
    assert result["skipped"]["by_reason"] == {
        "unknown annotation": 1,
        "missing image": 1,
        "unreadable image": 1,
        "no proposals": 1,
    }
    assert result["run"]["proposals_clamped"] == 1 and result["run"]["proposals_dropped"] == 1
    assert result["run"]["no_proposals"] == {"policy": "skip", "images": 0, "expressions": 0}
    for r in lines(tmp_path / "r.predictions.jsonl"):
        if "skipped" not in r:
            assert r["n_proposals"] == 4 and len(r["scores"]) == 3 and r["pred_index"] in (0, 1, 2) and r["pred_ann_id"] is None
            assert r["pred_box"] == DETECTIONS["1"][r["pred_index"]]  # reported unclamped, as in the file
            assert r["correct"] == (r["iou"] > 0.5)


def test_image_without_proposals_is_scored_on_the_whole_image_and_counted_by_default(model, data, tmp_path):
    """The reference (main.py): no detections for an image → the whole image is the only proposal."""
    d = load_reclip(data / "refcoco_testA.jsonl", split="testA", name="refcoco", detections=data / "dets.json")
    result = run(RegionScorer([model], "crop"), d, data, tmp_path / "r.json", allow_lost_inputs=True)
    assert "no proposals" not in result["skipped"]["by_reason"] and result["config"]["edit_style"] == "reference"
    records = [r for r in lines(tmp_path / "r.predictions.jsonl") if r.get("image_id") == "2" and "skipped" not in r]
    assert records and result["run"]["no_proposals"] == {"policy": "whole-image", "images": 1, "expressions": len(records)}
    W, H = IMAGES[2][:2]
    for r in records:
        assert r["fallback"] == "whole image" and r["n_proposals"] == 1 and r["pred_box"] == [0.0, 0.0, W, H]
        targets = [IMAGES[2][2][int(t)] for t in r["target_ann_ids"]]
        assert r["correct"] == (max(iou([0, 0, W, H], t) for t in targets) > 0.5)
    assert result["metrics"]["n"] == sum(1 for r in lines(tmp_path / "r.predictions.jsonl") if "correct" in r)
    with pytest.raises(ValueError, match="no_proposals"):
        run(RegionScorer([model], "crop"), d, data, tmp_path / "x.json", no_proposals="ignore")


def test_reverse_blur_run_uses_the_segmentations(model, data, tmp_path):
    scorer = RegionScorer([model], "reverse_blur")
    result = run(scorer, refer(data), data, tmp_path / "r.json")
    assert result["run"]["masks_missing"] == 3  # annotation 13 (image 1) and both of image 2 have none
    image = Image.open(data / "train2014" / file_name(1)).convert("RGB")
    boxes = np.array([xywh for xywh in IMAGES[1][2].values()], float)
    boxes[:, 2:] += boxes[:, :2]
    square = np.zeros((90, 120), bool)
    square[50:70, 30:50] = True
    masks = [segmentation_mask(POLYGON_11, image.size), blob_mask(), square]
    expected = scorer.score(scorer.encode(image, boxes, masks), ["The red box"])[0]
    (record,) = [r for r in lines(tmp_path / "r.predictions.jsonl") if r["id"] == "1000"]
    np.testing.assert_allclose(record["scores"], expected.numpy(), atol=1e-3)
    assert (
        result["config"]["methods"] == ["reverse_blur"] and result["method"] == "reverse_blur" and result["dataset"] == "refcoco"
    )
    assert run(RegionScorer([model], "blur"), refer(data), data, tmp_path / "b.json")["run"]["masks_missing"] is None


@pytest.mark.parametrize(
    "box, ann_ids, correct",
    [
        ([0, 0, 10, 10], 1, False),  # IoU exactly 0.5: not correct (strictly greater)
        ([0, 0, 10.5, 10], 1, True),  # IoU 0.525
        ([0, 0, 10, 10], [1, 2], True),  # any of several targets counts: IoU 1 with annotation 2
    ],
)
def test_correct_iff_iou_strictly_above_half(model, tmp_path, box, ann_ids, correct):
    Image.new("RGB", (40, 20), (10, 200, 10)).save(tmp_path / "COCO_train2014_000000000005.jpg")
    anns = [{"id": 1, "bbox": [0, 0, 20, 10]}, {"id": 2, "bbox": [0, 0, 10, 10]}]
    line = dict(
        file_name="COCO_train2014_000000000005_1.jpg", image_id=5, anns=anns, ann_id=ann_ids, sentences=[{"raw": "green"}]
    )
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")
    d = load_reclip(tmp_path / "a.jsonl", detections={"5": [tuple(box)]})
    result = evaluate(RegionScorer([model], "falip"), d, tmp_path, tmp_path / "r.json", progress=False)
    (record,) = lines(tmp_path / "r.predictions.jsonl")
    assert record["correct"] is correct and result["metrics"]["acc"] == (100.0 if correct else 0.0)


def test_region_outside_the_centre_crop_is_a_counted_skip(data, tmp_path):
    cropping = wrap(tiny_clip(224, 32, layers=3), preprocess="crop")
    d = load_reclip(data / "refcoco_testA.jsonl", detections={"2": [[0, 0, 8, 80]]})  # left strip of a 100x80 image
    result = run(RegionScorer([cropping], "falip"), d, data, tmp_path / "r.json", allow_lost_inputs=True)
    assert result["skipped"]["by_reason"]["invalid region"] == 1
    assert "centre crop" in [e for e in result["skipped"]["examples"] if e["reason"] == "invalid region"][0]["detail"]


def test_resume_continues_and_retries_skips(model, data, tmp_path):
    d = refer(data)
    cfg = {"method": "falip"}
    scorer = RegionScorer([model], "falip")
    first = run(scorer, d, data, tmp_path / "r.json", run_config=cfg, limit=3, predictions=tmp_path / "p" / "preds.jsonl")
    assert first["run"]["computed"] == 3 and first["metrics"]["n"] == 3 and first["predictions"].endswith("preds.jsonl")
    with open(tmp_path / "p" / "preds.jsonl", "a") as f:
        f.write('{"id": "1003", "corr')  # a line cut short by an interrupted run
    draw_image(1).save(data / "train2014" / file_name(3))  # the missing image appears
    try:
        second = run(scorer, d, data, tmp_path / "r.json", run_config=cfg, predictions=tmp_path / "p" / "preds.jsonl")
    finally:
        (data / "train2014" / file_name(3)).unlink()
    assert second["run"]["resumed"] == 3 and second["run"]["computed"] == 2  # 1003 and the retried 1005
    assert second["metrics"]["n"] == 5 and second["metrics"]["skipped"] == 2
    full = run(scorer, d, data, tmp_path / "fresh.json", run_config=cfg)

    def scores(p):
        return {r["id"]: r.get("scores") for r in lines(p)}

    fresh, resumed = scores(tmp_path / "fresh.predictions.jsonl"), scores(tmp_path / "p" / "preds.jsonl")
    assert all(fresh[k] == resumed[k] for k in ("1000", "1001", "1002", "1003"))
    assert full["metrics"]["n"] == 4
    with pytest.raises(ResumeMismatchError):
        run(scorer, d, data, tmp_path / "r.json", run_config={"method": "crop"}, predictions=tmp_path / "p" / "preds.jsonl")


# ------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_clip(224, 32, layers=3).state_dict(), path)
    return path


def test_cli_both_formats_options_and_aggregate(data, checkpoint, tmp_path, capsys):
    common = ["--image-root", str(data / "train2014"), "--model", str(checkpoint), "--quiet"]
    refcoco_a = ["rec", "--dataset", "refcoco", "--split", "testA", "--data-root", str(data / "refer"), *common]
    refcoco_a += ["--output", str(tmp_path / "a.json"), "--predictions", str(tmp_path / "a.jsonl")]
    assert main(refcoco_a) == 0
    out = capsys.readouterr().out
    assert "refcoco testA [falip, gold proposals]: acc" in out and "'missing image': 1" in out
    assert (
        main(
            [
                "rec",
                "--format",
                "reclip",
                "--annotations",
                str(data / "refcoco_testA.jsonl"),
                "--dataset",
                "refcoco",
                "--split",
                "testA",
                "--detections",
                str(data / "dets.json"),
                *common,
                "--model",
                str(checkpoint),
                "--pretrained",
                "none",
                "--method",
                "crop,falip+blur",
                "--aggregate",
                "max",
                "--subtract",
                "--captions",
                "3",
                "--seed",
                "1",
                "--alpha",
                "0.5",
                "--layers",
                "1-2",
                "--mode",
                "naive",
                "--edit-style",
                "clean",
                "--no-proposals",
                "skip",
                "--allow-lost-inputs",
                "--output",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["dataset"] == "refcoco" and a["split"] == "testA" and a["proposals"] == "gold" and a["method"] == "falip"
    assert a["model"] == [str(checkpoint)] or a["model"][0].endswith("tiny.pt")
    assert (
        a["config"]["bias"][0]["alpha"] == 0.2
        and a["config"]["preprocess"] == ["squash"]
        and a["config"]["data"]["split_by"] == "unc"
    )
    assert a["predictions"] == "a.jsonl" and {"acc", "n", "skipped", "expr_per_s"} <= set(a["metrics"])
    assert b["method"] == "crop,falip+blur:max+P" and b["proposals"] == "detector" and len(b["model"]) == 2
    assert (
        [c["alpha"] for c in b["config"]["bias"]] == [0.5, 0.5]
        and b["config"]["bias_layers"] == [[1, 2], [1, 2]]
        and b["config"]["mode"] == "naive"
    )
    assert b["config"]["subtract"]["captions"] == 3 and len(b["config"]["subtract"]["drawn"]) == 4 and b["config"]["seed"] == 1
    assert (tmp_path / "b.predictions.jsonl").is_file()
    # defaults: edits drawn as the reference draws them, images without proposals scored whole; both recorded
    assert a["config"]["edit_style"] is None and a["config"]["no_proposals"] == "whole-image"  # falip draws nothing
    assert b["config"]["edit_style"] == "clean" and b["config"]["no_proposals"] == "skip"
    assert b["run"]["no_proposals"]["policy"] == "skip" and b["skipped"]["by_reason"]["no proposals"] == 1
    capsys.readouterr()
    assert main(["aggregate", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| task | dataset | split | method | model | proposals | ")
    assert table[0].endswith("| acc | n | acc_all | expr_per_s | images_per_s | skipped | file |")
    assert "| edit_style |" in table[0] and "| no_proposals |" in table[0]  # settings that differ between a and b
    assert "| rec | refcoco | testA | crop,falip+blur:max+P |" in table[3] and "| detector |" in table[3]
    # the same command again resumes: nothing is recomputed
    assert main(refcoco_a) == 0
    again = json.loads((tmp_path / "a.json").read_text())
    assert again["run"]["resumed"] == 7 and again["run"]["computed"] == 0 and again["metrics"]["n"] == a["metrics"]["n"]


def test_cli_bad_input_is_one_clear_line(data, checkpoint, tmp_path, capsys):
    common = [
        "--image-root",
        str(data / "train2014"),
        "--model",
        str(checkpoint),
        "--output",
        str(tmp_path / "r.json"),
        "--quiet",
    ]
    cases = [
        (["--format", "reclip"], "needs --annotations"),
        (["--data-root", str(data / "refer")], "needs --data-root DIR and --split"),
        (["--data-root", str(data / "refer"), "--split", "test"], "split 'test' does not exist"),
        (["--format", "reclip", "--annotations", str(data / "nope.jsonl")], "annotations file not found"),
        (
            ["--data-root", str(data / "refer"), "--split", "val", "--detections", str(data / "nope.json")],
            "detections file not found",
        ),
        (["--data-root", str(data / "refer"), "--split", "val", "--method", "sparkles"], "unknown method"),
        (
            ["--data-root", str(data / "refer"), "--split", "val", "--pretrained", "a", "--pretrained", "b"],
            "one --pretrained for all models",
        ),
        (["--data-root", str(data / "refer"), "--split", "val", "--limit", "0"], "--limit must be >= 1"),
    ]
    for extra, message in cases:
        assert main(["rec", *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)


@pytest.mark.parametrize("methods", ["falip", "none,circle"])
def test_batched_run_with_workers_equals_batch_size_1_inline(model, data, tmp_path, methods):
    """Images batched and read by worker processes give the predictions, skips and order of one image at a time."""
    runs = {}
    for name, batch_size, workers in [("single", 1, 0), ("batched", 3, 2)]:
        result = run(
            RegionScorer([model], methods), refer(data), data, tmp_path / f"{name}.json", batch_size=batch_size, workers=workers
        )
        drop = ("expr_per_s", "images_per_s")  # timings
        runs[name] = ({k: v for k, v in result["metrics"].items() if k not in drop}, result["skipped"], result["run"])
        runs[name] += ([r for r in lines(tmp_path / f"{name}.predictions.jsonl")],)
    assert runs["batched"] == runs["single"]
    assert runs["single"][0]["n"] == 4 and runs["single"][0]["skipped"] == 3
