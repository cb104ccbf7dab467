"""Region-aware zero-shot classification: dataset layouts, regions, metrics, bad input, resume, CLI."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import falip.tasks.classify as cls
from conftest import random_image, tiny_clip, wrap
from falip import FovealConfig
from falip.cli import main
from falip.datasets.classification import load_cub, load_dataset, load_dogs, load_imagenet_s, load_waterbirds
from falip.datasets.generic import RegionDataset, RegionSample, load_generic, read_classes, read_regions_jsonl
from falip.errors import FalipError, InvalidRegionError
from falip.results import ResumeMismatchError, predictions_path


@pytest.fixture(autouse=True)
def text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_clip(224, 32, layers=4, seed=1))


def save_image(path, w=96, h=72, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(np.random.default_rng(seed), w, h)).save(path)
    return path


def save_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Native layouts


def make_cub(root, with_segmentations=True):
    """CUB_200_2011 with 3 classes × 2 images; image i is train iff i is odd."""
    cub = root / "CUB_200_2011"
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, boxes, split = [], [], [], []
    for i in range(1, 7):
        folder = folders[(i - 1) // 2]
        rel = f"{folder}/{folder.split('.')[1]}_{i:04d}.jpg"
        save_image(cub / "images" / rel, 80, 60, seed=i)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {(i - 1) // 2 + 1}")
        boxes.append(f"{i} {i}.0 {2 * i}.0 30.5 20.0")
        split.append(f"{i} {i % 2}")
        if with_segmentations:
            seg = np.zeros((60, 80), bool)
            seg[2 * i : 2 * i + 20, i : i + 30] = True
            save_mask(root / "segmentations" / rel.replace(".jpg", ".png"), seg)
    write(cub / "images.txt", "\n".join(images) + "\n")
    write(cub / "image_class_labels.txt", "\n".join(labels) + "\n")
    write(cub / "bounding_boxes.txt", "\n".join(boxes) + "\n")
    write(cub / "train_test_split.txt", "\n".join(split) + "\n")
    write(cub / "classes.txt", "\n".join(f"{k + 1} {f}" for k, f in enumerate(folders)) + "\n")
    return cub


def test_cub_layout_names_boxes_splits_and_masks(tmp_path):
    cub = make_cub(tmp_path)
    test = load_cub(tmp_path)  # the parent of CUB_200_2011 is accepted too
    assert test.classnames == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert [s.id for s in test.samples] == ["2", "4", "6"]
    s4 = test.samples[1]
    assert s4.label == "Laysan Albatross" and s4.box == (4.0, 8.0, 34.5, 28.0) and s4.mask is None
    assert s4.image == cub / "images/002.Laysan_Albatross/Laysan_Albatross_0004.jpg" and s4.image.is_file()
    assert [s.id for s in load_cub(cub, split="train").samples] == ["1", "3", "5"]
    assert len(load_cub(cub, split="all").samples) == 6
    masked = load_cub(cub, region="mask")
    m = masked.samples[1].load_mask()
    assert masked.samples[1].box is None and m.shape == (60, 80) and m[8:28, 4:34].all() and m.sum() == 600
    with pytest.raises(FalipError, match="split must be one of"):
        load_cub(cub, split="val")


def test_cub_without_segmentations_says_where_it_looked(tmp_path):
    cub = make_cub(tmp_path, with_segmentations=False)
    assert len(load_cub(cub).samples) == 3  # boxes need no segmentations
    with pytest.raises(FalipError, match="segmentations not found.*--region box"):
        load_cub(cub, region="mask")
    with pytest.raises(FalipError, match="images.txt not found"):
        load_cub(tmp_path / "nowhere")


def voc_xml(boxes, w=96, h=72):
    objects = "".join(
        f"<object><name>dog</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"


def save_mat_list(path, files):
    cells = np.empty((len(files), 1), dtype=object)
    for k, f in enumerate(files):
        cells[k, 0] = f
    scipy.io.savemat(str(path), {"file_list": cells, "labels": np.ones((len(files), 1))})


def make_dogs(root):
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    files = {
        "n02085620-Chihuahua/n02085620_1.jpg": [(10, 5, 40, 50)],
        "n02085782-Japanese_spaniel/n02085782_2.jpg": [(20, 30, 60, 70), (5, 40, 30, 60)],
        "n02085782-Japanese_spaniel/n02085782_3.jpg": None,  # its annotation is missing
    }
    for k, (rel, boxes) in enumerate(files.items()):
        save_image(root / "Images" / rel, seed=k)
        if boxes:
            write(root / "Annotation" / rel.replace(".jpg", ""), voc_xml(boxes))
    (root / "Images" / folders[0]).mkdir(parents=True, exist_ok=True)
    save_mat_list(root / "test_list.mat", list(files))
    save_mat_list(root / "train_list.mat", list(files)[:1])
    return root


def test_dogs_layout_names_enclosing_box_and_official_lists(tmp_path):
    root = make_dogs(tmp_path / "dogs")
    ds = load_dogs(root)
    assert ds.classnames == ["Chihuahua", "Japanese spaniel"]
    assert [(s.label, s.box) for s in ds.samples] == [
        ("Chihuahua", (10.0, 5.0, 40.0, 50.0)),
        ("Japanese spaniel", (5.0, 30.0, 60.0, 70.0)),  # the box around both dogs
    ]
    assert ds.samples[1].image == root / "Images/n02085782-Japanese_spaniel/n02085782_2.jpg"
    assert ds.problems[0][0] == "n02085782-Japanese_spaniel/n02085782_3.jpg" and ds.problems[0][1] == "missing file"
    assert len(load_dogs(root, split="train").samples) == 1
    with pytest.raises(FalipError, match="list not found.*file_list.mat"):
        load_dogs(root, split="all")
    with pytest.raises(FalipError, match="boxes only"):
        load_dataset("dogs", root, region="mask")


def encode_ids(ids):
    """An ImageNet-S mask: class id ``R + 256·G`` per pixel."""
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)


def make_imagenet_s(root, n_classes=50):
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()[1 : 1 + n_classes]  # n01443537 = goldfish, ...
    val, seg = root / "validation", root / "validation-segmentation"
    for w in wnids:
        (val / w).mkdir(parents=True, exist_ok=True)
        (seg / w).mkdir(parents=True, exist_ok=True)
    for k, class_id in enumerate((1, 2)):
        ids = np.zeros((72, 96), np.int64)
        ids[10:30, 20:50] = class_id
        ids[40:60, 60:90] = 3 if class_id == 1 else 1  # another category in the same image
        ids[0:5, :] = 1000  # ignored
        save_image(val / wnids[class_id - 1] / f"ILSVRC2012_val_{k:08d}.JPEG", seed=k)
        Image.fromarray(encode_ids(ids)).save(seg / wnids[class_id - 1] / f"ILSVRC2012_val_{k:08d}.png")
    return root, wnids


def test_imagenet_s_layout_class_ids_readable_names_and_box_option(tmp_path):
    root, wnids = make_imagenet_s(tmp_path / "ImageNetS50")
    ds = load_imagenet_s(root)
    assert ds.name == "imagenet-s50" and len(ds.classnames) == 50 and ds.classnames[:2] == ["goldfish", "great white shark"]
    s0, s1 = ds.samples
    assert s0.id == f"{wnids[0]}/ILSVRC2012_val_00000000" and s0.label == "goldfish" and s0.mask_id == 1
    m0, m1 = s0.load_mask(), s1.load_mask()
    assert m0.shape == (72, 96) and m0[10:30, 20:50].all() and m0.sum() == 600  # its own class only
    assert m1[10:30, 20:50].all() and m1.sum() == 600 and s1.label == "great white shark"
    boxed = load_imagenet_s(root, region="box").samples[0]
    assert boxed.mask_as_box
    assert np.array_equal(cls._sample_region(boxed, (96, 72), {"goldfish": 0}), [20, 10, 50, 30])
    (root / "validation" / "n99999999").mkdir()
    with pytest.raises(FalipError, match="51 class folders.*50, 300 or 919"):
        load_imagenet_s(root)


def make_waterbirds(root, cub):
    """Waterbirds images are CUB images (same names and sizes) on new backgrounds."""
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (rel, y, place) in enumerate(
        [
            ("001.Black_footed_Albatross/Black_footed_Albatross_0001.jpg", 1, 1),
            ("001.Black_footed_Albatross/Black_footed_Albatross_0002.jpg", 1, 0),
            ("002.Laysan_Albatross/Laysan_Albatross_0003.jpg", 0, 0),
            ("002.Laysan_Albatross/Laysan_Albatross_0004.jpg", 0, 1),
            ("003.Sooty_Albatross/Sooty_Albatross_0005.jpg", 0, 0),
            ("999.Not_In_CUB/x.jpg", 0, 0),
        ],
        start=1,
    ):
        save_image(root / rel, 80, 60, seed=10 + i)
        rows.append(f"{i},{rel},{y},{2 if i != 5 else 1},{place},/x/y.jpg")
    write(root / "metadata.csv", "\n".join(rows) + "\n")
    return root


def test_waterbirds_layout_groups_and_cub_regions(tmp_path):
    cub = make_cub(tmp_path)
    wb = make_waterbirds(tmp_path / "waterbird_complete95_forest2water2", cub)
    ds = load_waterbirds(wb, cub)
    assert ds.classnames == ["landbird", "waterbird"] and [s.id for s in ds.samples] == ["1", "2", "3", "4"]
    assert [s.group for s in ds.samples] == ["waterbird_on_water", "waterbird_on_land", "landbird_on_land", "landbird_on_water"]
    assert (
        ds.samples[2].box == (3.0, 6.0, 33.5, 26.0)
        and ds.samples[2].image == wb / "002.Laysan_Albatross/Laysan_Albatross_0003.jpg"
    )
    assert ds.problems == [("6", "missing annotation", f"999.Not_In_CUB/x.jpg is not a CUB-200-2011 image with a box in {cub}")]
    assert [s.id for s in load_waterbirds(wb, cub, split="val").samples] == ["5"]
    assert load_waterbirds(wb, cub, region="mask").samples[0].load_mask()[2:22, 1:31].all()
    with pytest.raises(FalipError, match="--cub-root"):
        load_dataset("waterbirds", wb)


def test_generic_jsonl_reader_and_its_errors(tmp_path):
    save_image(tmp_path / "imgs/a.png")
    lines = [
        {"image": "imgs/a.png", "label": "cat", "box": [1, 2, 30, 40]},
        {"image": "imgs/a.png", "label": "dog", "mask": "m.png", "id": "x7", "group": "g1"},
    ]
    write(tmp_path / "ann.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    write(tmp_path / "classes.txt", "cat\n\ndog\n")
    a, b = read_regions_jsonl(tmp_path / "ann.jsonl")
    assert (a.id, a.image, a.label, a.box, a.mask) == ("1", tmp_path / "imgs/a.png", "cat", (1.0, 2.0, 30.0, 40.0), None)
    assert (b.id, b.mask, b.box, b.group) == ("x7", tmp_path / "m.png", None, "g1")
    other = read_regions_jsonl(tmp_path / "ann.jsonl", image_root=tmp_path / "imgs")
    assert other[0].image == tmp_path / "imgs/imgs/a.png"
    ds = load_generic(tmp_path / "ann.jsonl", tmp_path / "classes.txt")
    assert ds.classnames == ["cat", "dog"] and len(ds.samples) == 2
    bad = {
        "not json": "not valid JSON",
        json.dumps({"label": "cat", "box": [1, 2, 3, 4]}): "'image' is missing",
        json.dumps({"image": "a", "box": [1, 2, 3, 4], "mask": "m.png"}): "give exactly one of 'box' or 'mask'",
        json.dumps({"image": "a", "box": [1, 2, 3]}): r"'box' must be \[x0, y0, x1, y1\]",
    }
    for line, message in bad.items():
        write(tmp_path / "bad.jsonl", json.dumps(lines[0]) + "\n" + line + "\n")
        with pytest.raises(FalipError, match=f"bad.jsonl:2: {message}"):
            read_regions_jsonl(tmp_path / "bad.jsonl")
    write(tmp_path / "dup.jsonl", json.dumps(lines[1]) + "\n" + json.dumps(lines[1]) + "\n")
    with pytest.raises(FalipError, match="id 'x7' appears twice"):
        read_regions_jsonl(tmp_path / "dup.jsonl")
    write(tmp_path / "dup.txt", "cat\ndog\ncat\n")
    with pytest.raises(FalipError, match=r"more than once: \['cat'\]"):
        read_classes(tmp_path / "dup.txt")
    with pytest.raises(FalipError, match="annotation file not found"):
        read_regions_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------------------
# Metrics on known answers


def fake_model():
    """Scores only: no preprocessing (the loader ships the decoded images), runs on the CPU."""
    runtime = SimpleNamespace(logits=lambda image, text: 100.0 * image @ text.T)
    return SimpleNamespace(
        runtime=runtime,
        config=FovealConfig(),
        device=torch.device("cpu"),
        preprocessor=lambda: None,
        info=lambda: {"name": "fake"},
        preprocess="squash",
    )


def test_top1_top5_and_groups_on_constructed_embeddings(tmp_path, monkeypatch):
    """7 classes, classifier = identity: each region's embedding ranks the classes in a chosen order."""
    classes = [f"c{i}" for i in range(7)]
    rankings = {  # image → classes from best to worst; label
        "a": ([3, 1, 2, 0, 4, 5, 6], "c3"),  # top-1 right
        "b": ([1, 2, 3, 4, 0, 5, 6], "c0"),  # in the top 5 only
        "c": ([0, 1, 2, 3, 4, 5, 6], "c6"),  # wrong in both
        "d": ([6, 5, 4, 3, 2, 1, 0], "c6"),  # top-1 right
    }
    names = {40 + k: name for k, name in enumerate(rankings)}  # images told apart by their width
    samples = [
        RegionSample(
            name,
            save_image(tmp_path / f"{name}.png", w, 30),
            rankings[name][1],
            box=(1, 1, 20, 20),
            group="even" if w % 2 == 0 else "odd",
        )
        for w, name in names.items()
    ]

    def fake_encode(model, image, boxes):
        v = torch.zeros(len(boxes), 7)
        for rank, c in enumerate(rankings[names[image.size[0]]][0]):
            v[:, c] = 1.0 - 0.1 * rank
        return torch.nn.functional.normalize(v, dim=-1)

    def fake_encode_batch(model, images, boxes_per_image=None, *, method, masks_per_image=None, **kwargs):
        return [fake_encode(model, image, boxes) for image, boxes in zip(images, boxes_per_image)]

    monkeypatch.setattr(cls, "encode_with_method_batch", fake_encode_batch)
    monkeypatch.setattr(cls, "text_classifier", lambda model, names, templates, method: torch.eye(7))
    result = cls.evaluate(fake_model(), RegionDataset("toy", "test", classes, samples), tmp_path / "r.json", progress=False)
    m = result["metrics"]
    assert m["top1"] == 50.0 and m["top5"] == 75.0 and m["n"] == 4 and m["skipped"] == 0
    assert m["top1_even"] == 50.0 and m["top1_odd"] == 50.0 and m["worst_group"] == 50.0
    preds = {r["id"]: r for r in map(json.loads, predictions_path(tmp_path / "r.json").read_text().splitlines()[1:])}
    assert preds["b"]["pred"] == "c1" and preds["b"]["top5"] == ["c1", "c2", "c3", "c4", "c0"] and preds["b"]["correct5"]
    assert result["speed"]["images"] == 4 and result["speed"]["images_per_s"] > 0


def test_group_metrics_and_worst_group():
    records = [
        dict(correct=c, correct5=True, group=g)
        for c, g in [
            (1, "landbird_on_land"),
            (1, "landbird_on_land"),
            (0, "landbird_on_water"),
            (1, "landbird_on_water"),
            (0, "waterbird_on_land"),
            (0, "waterbird_on_land"),
            (0, "waterbird_on_land"),
            (1, "waterbird_on_water"),
        ]
    ]
    metrics, groups = cls.classification_metrics(records, num_classes=2, skipped=3)
    assert metrics["top1"] == 50.0 and metrics["top5"] is None and metrics["skipped"] == 3
    assert metrics["top1_landbird_on_water"] == 50.0 and metrics["top1_waterbird_on_land"] == 0.0
    assert metrics["worst_group"] == 0.0 and metrics["mean_group"] == 62.5
    assert groups["waterbird_on_land"] == {"n": 3, "top1": 0.0}


# ----------------------------------------------------------------------------------------------
# The real pipeline on a tiny random CLIP


def test_classify_api_boxes_masks_and_methods(model):
    image = random_image(np.random.default_rng(5), 224, 224)
    names = ["cat", "dog", "bird"]
    box = (65, 33, 160, 128)  # patches 2-4 × 1-3 of the 7×7 grid (an edge on a border would also take the patch before)
    mask = np.zeros((224, 224), bool)
    mask[32:128, 64:160] = True
    p_box = cls.classify(model, image, box, names, templates="simple")
    p_mask = cls.classify(model, image, mask, names, templates="simple")
    assert p_box.shape == (3,) and torch.isclose(p_box.sum(), torch.tensor(1.0))
    assert torch.allclose(p_box, p_mask, atol=1e-5)
    p_none = cls.classify(model, image, box, names, templates="simple", method="none")
    clf = cls.text_classifier(model, names, "simple", "none")
    expected = (model.runtime.clip.logit_scale.exp() * model.encode_image(image) @ clf.T).softmax(-1)[0]
    assert torch.allclose(p_none, expected, atol=1e-5) and not torch.allclose(p_box, p_none, atol=1e-4)
    for method in ("crop", "falip+blur", "grayscale"):
        assert torch.isclose(cls.classify(model, image, mask, names, templates="simple", method=method).sum(), torch.tensor(1.0))
    with pytest.raises(InvalidRegionError, match=r"a box \(x0, y0, x1, y1\) or an \(H, W\) mask"):
        cls.classify(model, image, (1, 2, 3), names)


def test_shade_appends_its_text_suffix_to_every_prompt(model):
    with_suffix = cls.text_classifier(model, ["cat", "dog"], ["a {}.", "the {}"], "shade")
    expected = cls.zero_shot_classifier(
        model,
        ["cat", "dog"],
        {
            "cat": ["a cat. is in red color.", "the cat is in red color."],
            "dog": ["a dog. is in red color.", "the dog is in red color."],
        },
    )
    assert torch.allclose(with_suffix, expected)


@pytest.fixture
def generic_data(tmp_path):
    """Regions of two images (two per image), plus one of every kind of bad input."""
    save_image(tmp_path / "img/a.png", 224, 160, seed=1)
    save_image(tmp_path / "img/b.png", 200, 200, seed=2)
    ok = np.zeros((160, 224), bool)
    ok[20:90, 30:120] = True
    save_mask(tmp_path / "m/ok.png", ok)
    save_mask(tmp_path / "m/small.png", np.ones((100, 100), bool))
    save_mask(tmp_path / "m/empty.png", np.zeros((160, 224), bool))
    write(tmp_path / "m/broken.png", "not a png")
    lines = [
        {"id": "a-box", "image": "img/a.png", "label": "cat", "box": [10, 10, 100, 120]},
        {"id": "a-box2", "image": "img/a.png", "label": "dog", "box": [120, 30, 220, 150]},
        {"id": "a-mask", "image": "img/a.png", "label": "dog", "mask": "m/ok.png"},
        {"id": "b-box", "image": "img/b.png", "label": "bird", "box": [0, 0, 200, 200], "group": "g"},
        {"id": "unknown", "image": "img/b.png", "label": "zebra", "box": [0, 0, 50, 50]},
        {"id": "no-image", "image": "img/missing.png", "label": "cat", "box": [0, 0, 50, 50]},
        {"id": "mask-size", "image": "img/a.png", "label": "cat", "mask": "m/small.png"},
        {"id": "mask-empty", "image": "img/a.png", "label": "cat", "mask": "m/empty.png"},
        {"id": "mask-missing", "image": "img/a.png", "label": "cat", "mask": "m/nope.png"},
        {"id": "mask-broken", "image": "img/a.png", "label": "cat", "mask": "m/broken.png"},
        {"id": "box-outside", "image": "img/a.png", "label": "cat", "box": [300, 10, 400, 50]},
    ]
    write(tmp_path / "regions.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    write(tmp_path / "classes.txt", "cat\ndog\nbird\n")
    return tmp_path


def test_bad_inputs_are_skipped_with_clear_reasons(model, generic_data, monkeypatch):
    calls = []
    real = cls.encode_with_method_batch
    monkeypatch.setattr(
        cls, "encode_with_method_batch", lambda *a, **k: calls.append(dict(k, boxes_per_image=a[2])) or real(*a, **k)
    )
    ds = load_generic(generic_data / "regions.jsonl", generic_data / "classes.txt")
    result = cls.evaluate(model, ds, generic_data / "out/r.json", templates="simple", progress=False, allow_lost_inputs=True)
    m, skipped = result["metrics"], result["skipped"]
    assert result["lost_inputs"]["count"] == 7 and result["lost_inputs"]["allowed"]
    assert m["n"] == 4 and m["skipped"] == 7 and m["top5"] is None and m["top1_g"] in (0.0, 100.0)
    assert skipped["by_reason"] == {
        "unknown label": 1,
        "missing file": 2,
        "mask size mismatch": 1,
        "empty mask": 1,
        "unreadable file": 1,
        "bad region": 1,
    }
    detail = {e["id"]: e["detail"] for e in skipped["examples"]}
    assert "'zebra' is not one of the 3 classes" in detail["unknown"]
    assert "missing.png" in detail["no-image"] and "m/nope.png" in detail["mask-missing"]
    assert "small.png is 100x100 but image" in detail["mask-size"] and "a.png is 224x160" in detail["mask-size"]
    assert "empty.png is empty" in detail["mask-empty"] and "entirely outside" in detail["box-outside"]
    # one batched call: the two good boxes of a.png, its mask, the box of b.png
    assert len(calls) == 1
    regions = [b if b is not None else m for b, m in zip(calls[0]["boxes_per_image"], calls[0]["masks_per_image"])]
    assert [len(r) for r in regions] == [2, 1, 1] and calls[0]["masks_per_image"][1] is not None
    assert result["speed"]["images"] == 2 and result["speed"]["regions"] == 4


def test_every_kind_of_method_runs_on_boxes_and_masks(model, generic_data):
    ds = load_generic(generic_data / "regions.jsonl", generic_data / "classes.txt")
    ds.samples = ds.samples[:4]
    out = {}
    for method in ("falip", "none", "blur", "falip+crop"):
        cls.evaluate(model, ds, generic_data / f"{method}.json", method=method, templates="simple", progress=False)
        lines = predictions_path(generic_data / f"{method}.json").read_text().splitlines()[1:]
        out[method] = {r["id"]: r for r in map(json.loads, lines)}
        assert len(out[method]) == 4 and all("pred" in r for r in out[method].values())
    assert out["none"]["a-box"]["top5"] == out["none"]["a-box2"]["top5"]  # the whole image either way


def test_resume_encodes_only_new_samples_and_refuses_other_settings(model, generic_data, monkeypatch):
    ds = load_generic(generic_data / "regions.jsonl", generic_data / "classes.txt")
    first = RegionDataset(ds.name, ds.split, ds.classnames, ds.samples[:2], [])
    out = generic_data / "resume.json"
    cls.evaluate(model, first, out, templates="simple", progress=False)
    calls = []
    real = cls.encode_with_method_batch
    monkeypatch.setattr(cls, "encode_with_method_batch", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = cls.evaluate(model, first, out, templates="simple", progress=False)
    assert calls == [] and again["metrics"]["n"] == 2 and again["speed"]["resumed"] == 2
    more = RegionDataset(ds.name, ds.split, ds.classnames, ds.samples[:4], [])
    result = cls.evaluate(model, more, out, templates="simple", progress=False)
    assert len(calls) == 1 and len(calls[0]) == 2 and result["metrics"]["n"] == 4  # the 2 new images
    with pytest.raises(ResumeMismatchError):
        cls.evaluate(model, more, out, method="blur", templates="simple", progress=False)


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_clip(224, 32, layers=4, seed=1).state_dict(), path)
    return path


def test_cli_generic_and_waterbirds_and_aggregate(checkpoint, generic_data, tmp_path, capsys):
    out = tmp_path / "g.json"
    code = main(
        [
            "classify",
            "--annotations",
            str(generic_data / "regions.jsonl"),
            "--classes",
            str(generic_data / "classes.txt"),
            "--model",
            str(checkpoint),
            "--templates",
            "simple",
            "--layers",
            "2-3",
            "--allow-lost-inputs",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "top1" in printed and "skipped 7" in printed and "images/s" in printed
    result = json.loads(out.read_text())
    assert result["task"] == "classify" and result["config"]["bias"]["layers"] == [2, 3]
    assert set(result["metrics"]) >= {"top1", "top5", "n", "skipped"} and result["speed"]["images_per_s"] > 0

    cub = make_cub(tmp_path)
    wb = make_waterbirds(tmp_path / "wb", cub)
    code = main(
        [
            "classify",
            "--dataset",
            "waterbirds",
            "--data-root",
            str(wb),
            "--cub-root",
            str(cub),
            "--model",
            str(checkpoint),
            "--method",
            "falip+blur",
            "--templates",
            "simple",
            "--output",
            str(tmp_path / "wb.json"),
            "--workers",
            "0",
        ]
    )
    printed = capsys.readouterr().out
    wbr = json.loads((tmp_path / "wb.json").read_text())
    assert code == 0 and "worst" in printed and wbr["metrics"]["n"] == 4 and wbr["metrics"]["skipped"] == 1
    assert set(wbr["groups"]) == {"landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"}
    assert main(["aggregate", str(out), str(tmp_path / "wb.json")]) == 0
    table = capsys.readouterr().out
    assert "| classify | waterbirds | test | falip+blur |" in table and "worst_group" in table


def test_cli_dataset_options_and_errors(checkpoint, tmp_path, capsys):
    cub = make_cub(tmp_path)
    write(tmp_path / "names.txt", "Black-footed Albatross\nLaysan Albatross\nSooty Albatross\n")
    code = main(
        [
            "classify",
            "--dataset",
            "cub",
            "--data-root",
            str(cub),
            "--region",
            "mask",
            "--classnames",
            str(tmp_path / "names.txt"),
            "--model",
            str(checkpoint),
            "--templates",
            "simple",
            "--limit",
            "2",
            "--output",
            str(tmp_path / "c.json"),
        ]
    )
    result = json.loads((tmp_path / "c.json").read_text())
    assert code == 0 and result["metrics"]["n"] == 2 and result["config"]["region"] == "mask"
    first = json.loads(predictions_path(tmp_path / "c.json").read_text().splitlines()[1])
    assert first["label"] == "Black-footed Albatross"
    capsys.readouterr()
    for args, message in [
        ([], "either --dataset"),
        (["--annotations", "x.jsonl"], "needs --classes"),
        (["--dataset", "cub"], "needs --data-root"),
        (
            ["--dataset", "cub", "--data-root", str(cub), "--classnames", str(write(tmp_path / "one.txt", "x\n"))],
            "lists 1 names but cub has 3",
        ),
        (["--dataset", "cub", "--data-root", str(cub), "--method", "sparkles"], "unknown method 'sparkles'"),
    ]:
        assert main(["classify", "--model", str(checkpoint), "--output", str(tmp_path / "e.json"), *args]) == 2
        assert message in capsys.readouterr().err


def test_a_region_outside_the_centre_crop_fails_alone(model, generic_data):
    ds = load_generic(generic_data / "regions.jsonl", generic_data / "classes.txt")
    outside = RegionSample("outside-crop", ds.samples[0].image, "cat", box=(0.0, 10.0, 20.0, 50.0))  # a.png is 224x160
    data = RegionDataset(ds.name, ds.split, ds.classnames, [ds.samples[0], outside, ds.samples[1]], [])
    result = cls.evaluate(model, data, generic_data / "crop.json", templates="simple", progress=False)
    assert result["metrics"]["n"] == 2 and result["skipped"]["by_reason"] == {"bad region": 1}
    assert "outside the centre crop" in result["skipped"]["examples"][0]["detail"]


@pytest.mark.parametrize("method", ["falip", "none", "blur"])
def test_batched_run_with_workers_equals_batch_size_1_inline(model, generic_data, method):
    """Batches of images read by worker processes give the predictions of one image at a time, read inline."""
    ds = load_generic(generic_data / "regions.jsonl", generic_data / "classes.txt")
    runs = {}
    for name, batch_size, workers in [("single", 1, 0), ("batched", 8, 2)]:
        out = generic_data / f"{method}-{name}.json"
        result = cls.evaluate(
            model, ds, out, method=method, templates="simple", batch_size=batch_size, workers=workers, progress=False,
            allow_lost_inputs=True,
        )  # fmt: skip
        lines = predictions_path(out).read_text().splitlines()[1:]
        runs[name] = (result["metrics"], result["skipped"], [json.loads(line) for line in lines])
    assert runs["batched"] == runs["single"]
    assert runs["single"][0]["n"] == 4 and runs["single"][0]["skipped"] == 7
