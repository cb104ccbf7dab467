"""Fault injection: the bad-input, concurrency and crash cases of docs/reliability.md.

Each test names the case and its expected outcome: the right answer, a clear error, or a warning.
Tiny random models and tiny images keep the whole file fast.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import falip
from conftest import modelnet40_split, random_boxes, random_image, tiny_clip, wrap
from falip import FovealConfig
from falip.bias import Unleash
from falip.cli import main
from falip.datasets.generic import load_generic, read_mask, read_regions_jsonl
from falip.datasets.refer import BoxConventionWarning, load_detections, load_reclip, load_refer
from falip.digests import describe_inputs, file_digest
from falip.errors import FalipError, ImageLoadError, InvalidRegionError, ModelLoadError
from falip.images import ExifIgnoredWarning, ImageTooLargeError, RotationNotice, load_image
from falip.methods import score_with_method
from falip.ranking import score_name
from falip.results import (
    OutputInUseError,
    ResumeMismatchError,
    RunRecorder,
    predictions_path,
    process_identity,
)
from falip.tasks.classify import evaluate as classify_evaluate
from falip.tasks.rec import RegionScorer
from falip.tasks.rec import evaluate as rec_evaluate
from falip.tasks.run import LostInputsError


@pytest.fixture(scope="module")
def tiny_model():
    return wrap(tiny_clip(64, 16, layers=4, width=64), config=FovealConfig(layers=(2, 3)))


# ----------------------------------------------------------------------------------------------
# 1. Threads: one model, many threads


def test_threads_on_one_model_give_the_single_threaded_results_and_leave_nothing_swapped(tiny_model):
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64 + 8 * i, 48 + 4 * i) for i in range(4)]
    boxes = [random_boxes(rng, im.shape[1], im.shape[0], 1 + i) for i, im in enumerate(images)]
    unleash = FovealConfig(layers=(2, 3), unleash=(Unleash(layers=(3,), heads=None, lam=1.0),))
    calls = []
    for i in range(4):
        for mode in ("exact", "naive", "approx"):
            calls.append(("regions", i, dict(mode=mode)))
        calls.append(("regions", i, dict(mode="exact", config=unleash)))
        calls.append(("image", i, {}))
        calls.append(("score", i, dict(mode="approx")))
    transformer = tiny_model.runtime.visual.transformer

    def call(job):
        kind, i, kw = job
        if kind == "regions":
            return tiny_model.encode_regions(images[i], boxes[i], **kw)
        if kind == "image":
            return tiny_model.encode_image(images[i])
        return tiny_model.score_regions(images[i], boxes[i], ["a cat", "a dog"], **kw)

    expected = [call(job) for job in calls]
    jobs = calls * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(call, jobs))
    for job, out in zip(jobs, got):
        want = expected[calls.index(job)]
        assert out.shape == want.shape, job
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5, msg=lambda m, job=job: f"{job}: {m}")
    assert tiny_model.runtime.visual.transformer is transformer
    assert tiny_model.encode_image(images[0]).shape[0] == 1


def test_a_call_that_raises_leaves_the_model_intact(tiny_model):
    rng = np.random.default_rng(1)
    image = random_image(rng, 64, 64)
    before = tiny_model.encode_regions(image, [[0, 0, 32, 32]])
    with pytest.raises(InvalidRegionError):
        tiny_model.encode_regions(image, [[0, 0, 32, 32], [100, 100, 120, 120]])

    def failing(x):
        raise RuntimeError("trunk failed")

    with pytest.raises(RuntimeError):
        tiny_model.runtime.run(torch.zeros(1, 3, 64, 64), failing)
    assert type(tiny_model.runtime.visual.transformer).__name__ == "Transformer"
    torch.testing.assert_close(tiny_model.encode_regions(image, [[0, 0, 32, 32]]), before, rtol=0, atol=0)


def test_score_regions_and_score_with_method_return_no_grad_tensors(tiny_model):
    scores = tiny_model.score_regions(random_image(np.random.default_rng(2), 64, 64), [[0, 0, 30, 30]], ["x"])
    assert not scores.requires_grad
    from falip.methods import score_with_method

    assert not score_with_method(
        tiny_model, np.zeros((64, 64, 3), np.uint8), [[0, 0, 30, 30]], ["x"], method="crop"
    ).requires_grad


# ----------------------------------------------------------------------------------------------
# Shared fixtures: a tiny checkpoint file, a tiny generic classification dataset


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / "cache"))


def save_checkpoint(path, seed=0, nan=False):
    state = tiny_clip(64, 16, layers=2, width=64, seed=seed).state_dict()
    if nan:
        state["visual.proj"][0, 0] = float("nan")
    torch.save(state, path)
    return path


@pytest.fixture
def generic(tmp_path):
    """A generic JSONL data set: 2 images of 64x48, 3 boxes, 2 classes."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(random_image(rng, 64, 48)).save(root / "images" / name)
    lines = [
        {"image": "images/a.png", "label": "cat", "box": [4, 4, 40, 30]},
        {"image": "images/a.png", "label": "dog", "box": [20, 10, 60, 44]},
        {"image": "images/b.png", "label": "cat", "box": [0, 0, 32, 32]},
    ]
    (root / "regions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def classify_run(model, root, output, image_root=None, resume=True, **kw):
    dataset = load_generic(root / "regions.jsonl", root / "classes.txt", image_root or root)
    return classify_evaluate(model, dataset, output, templates="simple", resume=resume, workers=0, progress=False, **kw)


# ----------------------------------------------------------------------------------------------
# 2. Runs that cannot mix


def test_resume_refuses_a_replaced_checkpoint_and_names_the_weights(tmp_path, generic):
    ckpt = save_checkpoint(tmp_path / "m.pt", seed=0)
    first = classify_run(falip.load(str(ckpt)), generic, tmp_path / "r.json")
    assert first["inputs"]["weights"][0].startswith("file:") and first["metrics"]["n"] == 3
    again = classify_run(falip.load(str(ckpt)), generic, tmp_path / "r.json")  # same file: resumes
    assert again["speed"]["resumed"] == 3
    save_checkpoint(ckpt, seed=1)  # replaced at the same path
    with pytest.raises(ResumeMismatchError, match=r"inputs\.weights\[0\]|inputs\.weights"):
        classify_run(falip.load(str(ckpt)), generic, tmp_path / "r.json")


def test_resume_refuses_another_image_root_or_an_edited_annotation_file(tmp_path, generic):
    model = falip.load(str(save_checkpoint(tmp_path / "m.pt")))
    classify_run(model, generic, tmp_path / "r.json")
    other = tmp_path / "other"
    shutil.copytree(generic, other)
    with pytest.raises(ResumeMismatchError, match="inputs.image_root"):
        classify_run(model, generic, tmp_path / "r.json", image_root=other)
    with open(generic / "regions.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/b.png", "label": "dog", "box": [1, 1, 30, 30]}) + "\n")
    with pytest.raises(ResumeMismatchError, match="inputs.annotations"):
        classify_run(model, generic, tmp_path / "r.json")
    assert classify_run(model, generic, tmp_path / "r.json", resume=False)["metrics"]["n"] == 4


def test_random_weights_resume_only_when_seeded(tmp_path):
    inputs = [describe_inputs([wrap(tiny_clip(64, 16, layers=2, width=64, seed=s))]) for s in (0, 0, 1)]
    assert inputs[0] == inputs[1] and inputs[0] != inputs[2] and inputs[0]["weights"][0].startswith("random:")
    RunRecorder(tmp_path / "r.json", task="t", config={}, inputs=inputs[0]).finish({})
    with pytest.raises(ResumeMismatchError, match="random weights differs on every load unless torch is seeded"):
        RunRecorder(tmp_path / "r.json", task="t", config={}, inputs=inputs[2])


def test_weights_digest_is_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    first = file_digest(path)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert file_digest(path) == first and not calls  # cached
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(1, 1))
    assert file_digest(path) != first and calls


def test_a_changed_setting_is_named_in_the_refusal(tmp_path):
    RunRecorder(tmp_path / "r.json", task="t", config={"bias": {"alpha": 0.2, "sigma": 100}}).finish({})
    with pytest.raises(ResumeMismatchError, match=r"config\.bias\.alpha: 0\.2 -> 0\.5"):
        RunRecorder(tmp_path / "r.json", task="t", config={"bias": {"alpha": 0.5, "sigma": 100}})


def test_one_results_json_belongs_to_one_predictions_file(tmp_path):
    RunRecorder(tmp_path / "r.json", task="t", config={}, predictions=tmp_path / "a.jsonl").finish({})
    with pytest.raises(ResumeMismatchError, match=r"a\.jsonl.*b\.jsonl"):
        RunRecorder(tmp_path / "r.json", task="t", config={}, predictions=tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------------------------
# 3. Atomic, crash-proof outputs


def test_a_torn_last_line_is_dropped_and_the_final_jsonl_parses(tmp_path):
    rec = RunRecorder(tmp_path / "r.json", task="t", config={})
    for i in range(3):
        rec.add(i, correct=True)
    rec.close()
    pred = predictions_path(tmp_path / "r.json")
    with open(pred, "a") as f:
        f.write('{"id": "3", "correct": tr')  # cut by a crash
    with pytest.warns(UserWarning, match="dropped 1 cut or garbled line"):
        rec = RunRecorder(tmp_path / "r.json", task="t", config={})
    assert sorted(rec.done) == ["0", "1", "2"]
    rec.add(3, correct=True)
    rec.skip(4, "missing image")
    rec.add(4, correct=False)  # a retried sample replaces its skip
    rec.finish({})
    records = [json.loads(line) for line in pred.read_text().splitlines()]  # every line parses
    assert [r.get("id") for r in records] == [None, "0", "1", "2", "3", "4"] and records[-1]["correct"] is False


def test_a_second_process_on_the_same_output_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    pred = predictions_path(tmp_path / "r.json")
    lock = pred.with_name(pred.name + ".lock")
    lock.write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(OutputInUseError, match=f"PID {os.getppid()}"):
        RunRecorder(tmp_path / "r.json", task="t", config={})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**process_identity(), "pid": dead.pid}))  # a dead process of this host and namespace
    rec = RunRecorder(tmp_path / "r.json", task="t", config={})
    assert json.loads(lock.read_text()) == process_identity()
    rec.finish({})
    assert not lock.exists()


def test_two_processes_writing_one_output_do_not_interleave(tmp_path):
    script = (
        "import sys, time; from falip.results import RunRecorder\n"
        "rec = RunRecorder(sys.argv[1], task='t', config={})\n"
        "print('locked', flush=True); time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "r.json")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=f"PID {child.pid}"):
            RunRecorder(tmp_path / "r.json", task="t", config={})
    finally:
        child.kill()
        child.wait()
    RunRecorder(tmp_path / "r.json", task="t", config={}).finish({})  # its lock is stale now


def test_the_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    RunRecorder(tmp_path / "r.json", task="t", config={}).finish({"acc": 1.0})
    before = (tmp_path / "r.json").read_text()

    def crash(*args):
        raise OSError(28, "No space left on device")

    rec = RunRecorder(tmp_path / "r.json", task="t", config={})
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        rec.finish({"acc": 2.0})
    monkeypatch.undo()
    assert (tmp_path / "r.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.predictions.jsonl"]  # no temp file, no lock


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FalipError, match="is a folder"):
        RunRecorder(tmp_path / "out", task="t", config={})
    for output in (tmp_path / "out", tmp_path / "file.txt" / "r.json"):
        # the annotations do not exist: the output is refused first, before data or model loading
        code = main(["classify", "--annotations", "/nope.jsonl", "--classes", "/nope.txt", "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and str(output) in err and "nope" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 4. Honest images


def tagged_jpeg(path, orientation=6, size=(40, 20)):
    """A size[0]xsize[1] bitmap (left half red, right half blue) with an EXIF orientation tag."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    arr[:, size[0] // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_user_photos_are_turned_upright_by_their_exif_tag(tmp_path):
    path = tagged_jpeg(tmp_path / "p.jpg")  # orientation 6: displayed rotated 90° clockwise, 20x40
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[2] > 200  # red on top after turning
    with Image.open(path) as pil:
        assert load_image(pil).size == (20, 40)  # PIL images from the user too
    assert load_image(upright).size == (20, 40)  # an upright image is not turned twice


def test_dataset_images_keep_their_stored_orientation_with_one_warning(tmp_path):
    notice = RotationNotice()
    with pytest.warns(ExifIgnoredWarning) as caught:
        images = [load_image(tagged_jpeg(tmp_path / f"{i}.jpg"), exif=False, on_rotation=notice) for i in range(3)]
    assert [im.size for im in images] == [(40, 20)] * 3 and notice.count == 3 and len(caught) == 1


def test_high_bit_depth_and_float_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 2**30, np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "big.tif")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 · 255
    assert load_image(tmp_path / "f.tif").getpixel((0, 0)) == (64, 64, 64)
    assert load_image(tmp_path / "i.tif").getpixel((0, 0)) == (128, 128, 128)  # 2^30 of 31 bits
    assert load_image(np.full((4, 4, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageLoadError, match=r"must lie in \[0, 1\].*big\.tif"):
        load_image(tmp_path / "big.tif")


def test_images_over_the_bomb_limit_are_refused_alone_and_skipped_in_runs(tmp_path, generic, monkeypatch, capsys):
    for limit in (2000, 1000):  # 64x48 = 3072 pixels: PIL warns over the limit, and refuses over twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(ImageTooLargeError, match=f"decompression-bomb limit of {limit}"):
                load_image(generic / "images" / "a.png")
    ckpt = save_checkpoint(tmp_path / "m.pt")
    code = main(["score", str(generic / "images" / "a.png"), "--box", "0,0,10,10", "--text", "x", "--model", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "decompression-bomb" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(LostInputsError, match=r"3 of 3 regions lost \(3 skipped: image too large\).*--allow-lost-inputs"):
        classify_run(falip.load(str(ckpt)), generic, tmp_path / "r.json")  # every region lost: no results without asking
    result = classify_run(falip.load(str(ckpt)), generic, tmp_path / "r.json", allow_lost_inputs=True)
    assert result["skipped"]["by_reason"] == {"image too large": 3} and result["metrics"]["top1"] is None


# ----------------------------------------------------------------------------------------------
# 5. Every error a sentence: models, devices, files


def test_bad_checkpoints_are_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.pt is empty"):
        falip.load(str(tmp_path / "empty.pt"))
    with pytest.raises(ModelLoadError, match="empty.pt is empty"):
        falip.load("ViT-B-32", pretrained=str(tmp_path / "empty.pt"))
    with pytest.raises(ModelLoadError, match="nan.pt holds NaN"):
        falip.load(str(save_checkpoint(tmp_path / "nan.pt", nan=True)))
    state = torch.load(save_checkpoint(tmp_path / "shape.pt"), weights_only=True)
    state["visual.ln_pre.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match=r"shape.pt does not match .*visual.ln_pre.bias has shape \(3,\)"):
        falip.load(str(tmp_path / "shape.pt"))


def test_nan_outputs_are_an_error(tmp_path):
    model = falip.load(str(save_checkpoint(tmp_path / "m.pt")))
    with torch.no_grad():
        model.runtime.visual.ln_post.weight[0] = float("inf")
    with pytest.raises(ModelLoadError, match="NaN or infinite embeddings"):
        model.encode_image(np.zeros((32, 32, 3), np.uint8))


@pytest.mark.parametrize("device", ["cpuu", "cuda:99", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_devices_that_do_not_exist_are_one_line_errors(device, capsys):
    assert main(["info", "--model", "falip-toy", "--device", device]) == 2
    err = capsys.readouterr().err
    assert repr(device) in err and len(err.strip().splitlines()) == 1


def test_os_errors_and_bad_aggregate_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (["aggregate", str(tmp_path / "missing.json")], "not found"),
        (["aggregate", str(tmp_path)], "is a folder"),
        (["aggregate", str(tmp_path / "bad.json")], "not valid JSON"),
        (["aggregate", str(tmp_path / "bad.json"), "--output", str(tmp_path / "file.txt" / "t.md")], "file.txt"),
        (["bias", "--image-size", "64,64", "--box", "0,0,8,8"], None),
    ]
    for argv, message in cases:
        code = main(argv)
        captured = capsys.readouterr()
        if message is None:
            assert code == 0
            continue
        assert code == 2 and message in captured.err and len(captured.err.strip().splitlines()) == 1, argv


# ----------------------------------------------------------------------------------------------
# Duplicate ids and box conventions


def test_duplicate_ids_name_both_places(tmp_path):
    line = {"file_name": "x.jpg", "image_id": 1, "anns": [{"id": 5, "bbox": [0, 0, 4, 4]}], "ann_id": 5}
    rows = [{**line, "sentences": [{"raw": "a", "sent_id": 7}]}, {**line, "sentences": [{"raw": "b", "sent_id": 7}]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FalipError, match=r"sentence id '7' appears twice: .*r\.jsonl:1 sentence 0 and .*r\.jsonl:2 sentence 0"):
        load_reclip(tmp_path / "r.jsonl")
    folder = tmp_path / "refer" / "ds"
    folder.mkdir(parents=True)
    refs = [{"ref_id": r, "ann_id": 5, "image_id": 1, "split": "val", "sentences": [{"raw": "a", "sent_id": 9}]} for r in (1, 2)]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (folder / "instances.json").write_text(
        json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 4, 4]}]})
    )
    with pytest.raises(FalipError, match=r"'9' appears twice: .*ref 0 \(ref_id 1\).* and .*ref 1 \(ref_id 2\)"):
        load_refer(tmp_path / "refer", "ds", "val")
    (tmp_path / "g.jsonl").write_text(
        '{"image": "a.png", "box": [0,0,4,4], "id": 3}\n\n{"image": "b.png", "box": [0,0,4,4], "id": 3}\n'
    )
    with pytest.raises(FalipError, match=r"g\.jsonl:3: id '3' appears twice \(first on line 1\)"):
        read_regions_jsonl(tmp_path / "g.jsonl")


def test_generic_boxes_written_as_xywh_are_refused(tmp_path):
    rows = [{"image": "a.png", "box": [10 + i, 20, 30, 15]} for i in range(5)] + [{"image": "a.png", "box": [1, 1, 50, 40]}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FalipError, match=r"5 of 6 boxes are not \[x0, y0, x1, y1\].*valid as \[x, y, w, h\]"):
        read_regions_jsonl(tmp_path / "g.jsonl")


def test_detections_written_as_xyxy_are_warned_about(tmp_path):
    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 100, 20), rng.uniform(0, 100, 20)
    xyxy = np.stack([x0, y0, x0 + rng.uniform(5, 50, 20), y0 + rng.uniform(5, 50, 20)], 1)
    (tmp_path / "d.json").write_text(json.dumps({"1": xyxy.tolist()}))
    with pytest.warns(BoxConventionWarning, match="detections must be \\[x, y, w, h\\]"):
        load_detections(tmp_path / "d.json")
    xywh = np.concatenate([xyxy[:, :2] + 60, xyxy[:, 2:] - xyxy[:, :2]], 1)
    (tmp_path / "d.json").write_text(json.dumps({"1": xywh.tolist()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BoxConventionWarning)
        load_detections(tmp_path / "d.json")


def test_reclip_annotations_with_many_clamped_boxes_are_warned_about(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    Image.fromarray(random_image(rng, 64, 48)).save(tmp_path / "COCO_train2014_000000000001.jpg")
    xyxy_as_xywh = [[10, 10, 50, 40], [30, 5, 60, 30], [2, 20, 40, 45]]  # x + w and y + h run past 64x48
    line = {
        "file_name": "COCO_train2014_000000000001_1.jpg",
        "image_id": 1,
        "anns": [{"id": i, "bbox": b} for i, b in enumerate(xyxy_as_xywh)],
        "ann_id": 0,
        "sentences": [{"raw": "the thing"}],
    }
    (tmp_path / "r.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.warns(BoxConventionWarning, match="3 of 3 gold proposal boxes extended past their image"):
        result = rec_evaluate(
            RegionScorer([tiny_model], "falip"), load_reclip(tmp_path / "r.jsonl"), tmp_path, tmp_path / "o.json", progress=False
        )
    assert result["run"]["proposals_clamped"] == 3


def test_binary_01_and_alpha_masks_are_read_and_empty_masks_are_named(tmp_path, capsys):
    m = np.zeros((48, 64), np.uint8)
    m[8:20, 10:30] = 1
    Image.fromarray(m).save(tmp_path / "m01.png")
    rgba = np.full((48, 64, 4), 255, np.uint8)
    rgba[..., 3] = m * 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert read_mask(tmp_path / "m01.png").sum() == 240 and read_mask(tmp_path / "alpha.png").sum() == 240
    Image.fromarray(np.full((48, 64), 100, np.uint8)).save(tmp_path / "dim.png")
    Image.fromarray(random_image(np.random.default_rng(0), 64, 48)).save(tmp_path / "i.png")
    code = main(["score", str(tmp_path / "i.png"), "--mask", str(tmp_path / "dim.png"), "--text", "x", "--model", "falip-toy"])
    err = capsys.readouterr().err
    assert code == 2 and "dim.png is empty" in err and "> 127" in err


def test_a_replaced_image_file_is_computed_again_on_resume(tmp_path, generic):
    model = falip.load(str(save_checkpoint(tmp_path / "m.pt")))
    first = classify_run(model, generic, tmp_path / "r.json")
    Image.fromarray(random_image(np.random.default_rng(5), 64, 48)).save(generic / "images" / "b.png")
    os.utime(generic / "images" / "b.png", ns=(1, 1))  # a different mtime even on coarse clocks
    with pytest.warns(UserWarning, match="1 resumed predictions are computed again"):
        second = classify_run(model, generic, tmp_path / "r.json")
    assert second["speed"]["recomputed_changed_images"] == 1 and second["speed"]["regions"] == 1
    assert second["metrics"]["n"] == first["metrics"]["n"] == 3
    records = [json.loads(line) for line in predictions_path(tmp_path / "r.json").read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in records) == ["1", "2", "3"]  # one line per sample after the recompute


# ----------------------------------------------------------------------------------------------
# Round 3, R3-A: run outputs, fingerprints by content, locks, lost inputs, batch isolation (tasks layer).
# (cases of this family go below this line, above the next section)


def cli_err(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def classify_argv(root, ckpt, output, *extra):
    return ["classify", "--annotations", root / "regions.jsonl", "--classes", root / "classes.txt", "--image-root", root,
            "--model", ckpt, "--templates", "simple", "--workers", "0", "--output", output, *extra]  # fmt: skip


def reclip_file(root, image_boxes, detections=None):
    """A ReCLIP JSONL with one sentence per image (its target: annotation 0) and the images it names (64x48)."""
    rng = np.random.default_rng(3)
    lines = []
    for i, boxes in enumerate(image_boxes, start=1):
        Image.fromarray(random_image(rng, 64, 48)).save(root / f"COCO_train2014_{i:012d}.jpg")
        anns = [{"id": k, "bbox": b} for k, b in enumerate(boxes)]
        lines.append({"file_name": f"COCO_train2014_{i:012d}_1.jpg", "image_id": i, "anns": anns, "ann_id": 0,
                      "sentences": [{"raw": f"thing {i}"}]})  # fmt: skip
    (root / "refs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if detections is not None:
        (root / "dets.json").write_text(json.dumps(detections))
    return root / "refs.jsonl"


def rec_argv(root, ckpt, output, *extra):
    return ["rec", "--format", "reclip", "--annotations", root / "refs.jsonl", "--image-root", root, "--model", ckpt,
            "--quiet", "--workers", "0", "--output", output, *extra]  # fmt: skip


def pointcloud_argv(root, ckpt, output, *extra):
    return ["pointcloud", "--dataset", "modelnet40", "--data-root", root, "--model", ckpt, "--workers", "0", "--output", output,
            *extra]  # fmt: skip


# Fingerprints by content: an input file edited under the same path


def test_an_edited_templates_file_is_refused_on_resume_naming_the_prompts(tmp_path, generic, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    argv = classify_argv(generic, ckpt, tmp_path / "r.json", "--templates", templates)
    assert main([str(a) for a in argv]) == 0
    templates.write_text("a drawing of a {}.\n")  # the same path, other prompts
    code, err = cli_err(argv, capsys)
    assert code == 2 and "config.prompts" in err.splitlines()[-1]  # (above it: the progress bar)
    assert main([str(a) for a in argv + ["--no-resume"]]) == 0  # asked: recomputed with the new prompts


def test_an_edited_pointcloud_templates_file_or_annotation_file_rewritten_in_place_is_refused(tmp_path, capsys):
    root = modelnet40_split(tmp_path / "data", np.random.default_rng(0).normal(size=(3, 64, 3)))
    ckpt, templates = save_checkpoint(tmp_path / "m.pt"), tmp_path / "t.txt"
    templates.write_text("a depth map of a {}.\n")
    argv = pointcloud_argv(root, ckpt, tmp_path / "r.json", "--templates", templates)
    assert main([str(a) for a in argv]) == 0
    stat = templates.stat()
    templates.write_text("a depth map of x {}.\n")  # same size, and the old mtime put back
    os.utime(templates, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, err = cli_err(argv, capsys)
    assert code == 2 and "config.prompts" in err
    classes = root / "modelnet40_ply_hdf5_2048" / "shape_names.txt"
    before, stat = file_digest(classes), classes.stat()
    classes.write_text("airplane\nbathtub\nflower_pit\n")  # same size, old mtime: the digest cache still sees it
    os.utime(classes, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(classes) != before


# Outputs that would destroy inputs or each other


@pytest.mark.parametrize("which", ["annotations", "classes", "image", "checkpoint"])
def test_an_output_naming_an_input_is_refused_before_any_work_without_suggesting_no_resume(tmp_path, generic, capsys, which):
    ckpt = save_checkpoint(tmp_path / "m.pt")
    target = {"annotations": generic / "regions.jsonl", "classes": generic / "classes.txt",
              "image": generic / "images" / "a.png", "checkpoint": ckpt}[which]  # fmt: skip
    before = target.read_bytes()
    for extra in ([], ["--no-resume"]):
        code, err = cli_err(classify_argv(generic, ckpt, target, *extra), capsys)
        assert code == 2 and str(target) in err and "--no-resume" not in err and len(err.splitlines()) == 1
    assert target.read_bytes() == before and not predictions_path(target).exists()


def test_rec_predictions_naming_the_annotations_are_refused_and_no_resume_does_not_overwrite_them(tmp_path, capsys):
    reclip_file(tmp_path, [[[2, 2, 30, 30], [30, 10, 30, 30]]])
    ckpt, annotations = save_checkpoint(tmp_path / "m.pt"), tmp_path / "refs.jsonl"
    before = annotations.read_bytes()
    for extra in (["--predictions", annotations], ["--predictions", annotations, "--no-resume"]):
        code, err = cli_err(rec_argv(tmp_path, ckpt, tmp_path / "o.json", *extra), capsys)
        assert code == 2 and "input of this run" in err and "--no-resume" not in err
    (tmp_path / "notes.json").write_text('{"mine": 1}')  # a file falip did not write is never replaced
    code, err = cli_err(rec_argv(tmp_path, ckpt, tmp_path / "notes.json", "--no-resume"), capsys)
    assert code == 2 and "is not a falip results JSON" in err
    assert annotations.read_bytes() == before and (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_two_runs_on_one_output_with_other_predictions_never_lose_a_results_json(tmp_path, capsys):
    reclip_file(tmp_path, [[[2, 2, 30, 30], [30, 10, 30, 30]]])
    ckpt = save_checkpoint(tmp_path / "m.pt")
    assert main([str(a) for a in rec_argv(tmp_path, ckpt, tmp_path / "o.json", "--predictions", tmp_path / "a.jsonl")]) == 0
    first = (tmp_path / "o.json").read_text()
    for extra in ([], ["--no-resume"]):
        code, err = cli_err(rec_argv(tmp_path, ckpt, tmp_path / "o.json", "--predictions", tmp_path / "b.jsonl", *extra), capsys)
        assert code == 2 and "a.jsonl" in err and "--no-resume" not in err
    assert (tmp_path / "o.json").read_text() == first
    script = (
        "import sys, time; from falip.results import RunRecorder\n"
        "rec = RunRecorder(sys.argv[1], task='t', config={}, predictions=sys.argv[2])\n"
        "print('locked', flush=True); time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "p.json"), str(tmp_path / "c.jsonl")],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:  # a live run writing p.json from c.jsonl: another on p.json, from d.jsonl, is refused at once
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=rf"p\.json is being written by another falip process \(PID {child.pid}"):
            RunRecorder(tmp_path / "p.json", task="t", config={}, predictions=tmp_path / "d.jsonl")
    finally:
        child.kill()
        child.wait()


def test_a_lock_from_another_host_boot_or_pid_namespace_is_never_taken_over(tmp_path):
    pred = predictions_path(tmp_path / "r.json")
    lock = pred.with_name(pred.name + ".lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for other in ({"pid_ns": "pid:[1]"}, {"host": "elsewhere"}, {"boot_id": "another-boot"}, None):
        text = str(dead.pid) if other is None else json.dumps({**process_identity(), "pid": dead.pid, **other})
        lock.write_text(text)  # None: a bare PID (older falip), whose namespace cannot be known
        with pytest.raises(OutputInUseError, match=f"PID {dead.pid}.*delete {lock}"):
            RunRecorder(tmp_path / "r.json", task="t", config={})
        assert lock.read_text() == text
    lock.unlink()
    RunRecorder(tmp_path / "r.json", task="t", config={}).finish({})


@pytest.mark.skipif(
    shutil.which("unshare") is None
    or subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode != 0,
    reason="needs unshare -p (a new PID namespace)",
)
def test_a_writer_in_another_pid_namespace_is_refused(tmp_path):
    """The writer holding the lock has a PID the other namespace cannot see: that is not a stale lock."""
    held = RunRecorder(tmp_path / "r.json", task="t", config={})
    script = (
        "import sys\nfrom falip.results import RunRecorder, OutputInUseError\n"
        "try:\n    RunRecorder(sys.argv[1], task='t', config={})\nexcept OutputInUseError as e:\n    print('refused', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", script, str(tmp_path / "r.json")],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert child.stdout.startswith("refused") and "PID namespace" in child.stdout, child.stderr[-2000:]
    held.finish({})


@pytest.mark.parametrize("where", ["library", "cli"])
def test_a_file_size_limit_names_the_file_being_written(tmp_path, generic, where):
    """EFBIG (and ENOSPC, the same path) while writing: the error names the file; no traceback on the CLI."""
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))\n"
    if where == "library":
        body = "import sys\nfrom falip.results import RunRecorder\nrec = RunRecorder(sys.argv[1], task='t', config={})\nfor i in range(200):\n    rec.add(i, pad='x' * 100)\n"
        argv = [str(tmp_path / "r.json")]
    else:
        ckpt = save_checkpoint(tmp_path / "m.pt")
        body = "import sys\nfrom falip.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        argv = [str(a) for a in classify_argv(generic, ckpt, tmp_path / "r.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FALIP_CACHE_DIR": str(tmp_path / "cache")}
    child = subprocess.run([sys.executable, "-c", limit + body, *argv], capture_output=True, text=True, env=env, timeout=300)
    written = [f"cannot write {path}: File too large" for path in (tmp_path / "r.json", predictions_path(tmp_path / "r.json"))]
    assert child.returncode != 0 and any(w in child.stderr for w in written), child.stderr[-2000:]
    if where == "cli":
        assert child.returncode == 2 and "Traceback" not in child.stderr


def test_a_mask_file_rewritten_in_place_is_computed_again_and_a_heads_image_refused(tmp_path, generic, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt")
    mask = np.zeros((48, 64), np.uint8)
    mask[4:30, 4:40] = 255
    Image.fromarray(mask).save(generic / "m.png")
    with open(generic / "regions.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/b.png", "label": "dog", "mask": "m.png"}) + "\n")
    argv = classify_argv(generic, ckpt, tmp_path / "r.json")
    assert main([str(a) for a in argv]) == 0
    mask[:] = 0
    mask[30:44, 40:60] = 255
    Image.fromarray(mask).save(generic / "m.png")  # the same name, another region
    assert main([str(a) for a in argv]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["speed"]["recomputed_changed_images"] == 1 and result["speed"]["regions"] == 1
    heads = ["heads", "--annotations", generic / "regions.jsonl", "--image-root", generic, "--prompt", "falip", "--model", ckpt,
             "--output", tmp_path / "h"]  # fmt: skip
    assert main([str(a) for a in heads]) == 0
    Image.fromarray(random_image(np.random.default_rng(9), 64, 48)).save(generic / "images" / "a.png")
    code, err = cli_err(heads, capsys)
    assert code == 2 and "inputs.images" in err


def test_a_native_dataset_whose_box_changed_under_the_same_id_is_computed_again(tmp_path, generic):
    """Native readers (CUB, Dogs, …) have no annotation digest: each record keeps what the reader made of its sample."""
    from falip.datasets.generic import RegionDataset, RegionSample

    model = falip.load(str(save_checkpoint(tmp_path / "m.pt")))

    def run(box):
        samples = [
            RegionSample("0", generic / "images" / "a.png", "cat", box=box),
            RegionSample("1", generic / "images" / "b.png", "dog", box=(0, 0, 30, 30)),
        ]
        data = RegionDataset("native", "test", ["cat", "dog"], samples)
        return classify_evaluate(model, data, tmp_path / "r.json", templates="simple", workers=0, progress=False)

    assert run((4, 4, 40, 30))["speed"]["regions"] == 2
    again = run((10, 10, 60, 44))  # the dataset's box file edited: sample 0 reads differently
    assert again["speed"]["regions"] == 1 and again["speed"]["recomputed_changed_images"] == 1 and again["metrics"]["n"] == 2
    assert run((10, 10, 60, 44))["speed"]["regions"] == 0


# One rule for runs that lost most of their inputs; every item lost → null metrics


def test_detections_without_area_are_a_counted_loss_and_refused_past_half(tmp_path, capsys):
    reclip_file(tmp_path, [[[2, 2, 30, 30], [30, 10, 30, 30]]] * 3, detections={"1": [[5, 5, 0, 10]], "2": [[5, 5, -3, 9]],
                "3": [[2, 2, 30, 30], [9, 9, 0, 0]]})  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "m.pt")
    argv = rec_argv(tmp_path, ckpt, tmp_path / "o.json", "--detections", tmp_path / "dets.json")
    code, err = cli_err(argv, capsys)
    assert code == 2 and "2 of 3 expressions lost (2 scored on the whole image" in err and "--allow-lost-inputs" in err
    assert "falip: warning: 3 of 4 detector proposal boxes dropped (no area inside their image)" in err.splitlines()
    assert not (tmp_path / "o.json").exists()
    code, err = cli_err(argv + ["--allow-lost-inputs"], capsys)  # resumes what was computed
    assert code == 0 and "falip: warning: 2 of 3 expressions lost (2 scored on the whole image (no usable proposal))" in err
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["lost_inputs"]["count"] == 2 and result["lost_inputs"]["allowed"] and result["run"]["resumed"] == 3


def test_a_gold_target_box_without_area_is_a_lost_expression(tmp_path, tiny_model):
    reclip_file(tmp_path, [[[2, 2, -20, 30], [30, 10, 30, 30]]])  # the target's box has a negative width
    data = load_reclip(tmp_path / "refs.jsonl")
    with pytest.raises(LostInputsError, match="1 of 1 expressions lost"):
        rec_evaluate(RegionScorer([tiny_model]), data, tmp_path, tmp_path / "o.json", progress=False, workers=0)


@pytest.mark.parametrize("task", ["rec", "classify", "pointcloud"])
def test_every_item_lost_gives_null_metrics_not_zero(tmp_path, generic, capsys, task):
    ckpt = save_checkpoint(tmp_path / "m.pt")
    if task == "rec":
        reclip_file(tmp_path, [[[2, 2, 30, 30]]])
        (tmp_path / "COCO_train2014_000000000001.jpg").unlink()
        argv = rec_argv(tmp_path, ckpt, tmp_path / "o.json")
    elif task == "classify":
        shutil.rmtree(generic / "images")
        argv = classify_argv(generic, ckpt, tmp_path / "o.json")
    else:
        clouds = np.random.default_rng(0).normal(size=(2, 64, 3))
        clouds[:, 3] = np.nan
        argv = pointcloud_argv(modelnet40_split(tmp_path / "data", clouds), ckpt, tmp_path / "o.json")
    code, err = cli_err(argv, capsys)
    assert code == 2 and "--allow-lost-inputs" in err
    assert main([str(a) for a in argv + ["--allow-lost-inputs"]]) == 0
    assert "n/a" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "o.json").read_text())["metrics"]
    accuracies = {k: v for k, v in metrics.items() if k in ("acc", "acc_all", "top1", "top5")}
    assert accuracies and all(v is None for v in accuracies.values()) and metrics["n"] == 0


# One bad item does not poison its batch


def test_a_cloud_with_huge_coordinates_fails_alone_whatever_the_batch_size(tmp_path):
    clouds = np.random.default_rng(0).normal(size=(4, 64, 3))
    clouds[1] *= 1e30  # finite, but its depth views overflow in the model
    root, ckpt = modelnet40_split(tmp_path / "data", clouds), save_checkpoint(tmp_path / "m.pt")
    runs = {}
    for batch in ("4", "1"):
        assert main([str(a) for a in pointcloud_argv(root, ckpt, tmp_path / f"b{batch}.json", "--batch-size", batch)]) == 0
        result = json.loads((tmp_path / f"b{batch}.json").read_text())
        records = [json.loads(x) for x in predictions_path(tmp_path / f"b{batch}.json").read_text().splitlines()[1:]]
        runs[batch] = (result["metrics"], [{k: v for k, v in r.items() if k != "detail"} for r in records])
    assert runs["4"] == runs["1"] and runs["4"][0]["n"] == 3 and runs["4"][0]["skipped"] == 1
    assert [r["id"] for r in runs["4"][1] if "skipped" in r] == ["ply_data_test0.h5:1"]


# ----------------------------------------------------------------------------------------------
# Round 3, R3-B: damaged and odd input files: images, masks, annotation formats, texts, resource bounds (readers).
# (cases of this family go below this line, above the next section)


def png_bytes(arr) -> bytes:
    buf = io_bytes(b"")
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_r3b_damaged_images_are_refused_everywhere_and_skipped_in_runs(tmp_path, generic):
    from falip.images import read_image

    data = png_bytes(random_image(np.random.default_rng(1), 64, 48))
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # one flipped byte inside the pixel data: PIL alone decodes it to garbage
    damaged = {"truncated.png": data[: len(data) * 2 // 3], "corrupt.png": bytes(corrupt)}
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageLoadError, match=f"{name}: damaged or truncated"):
            load_image(tmp_path / name)
        with pytest.raises(ImageLoadError, match="upload.png: damaged or truncated"):
            load_image(content, name="upload.png")  # the bytes entry point (server uploads) decodes the same way
        with pytest.raises(ImageLoadError):
            read_image(content)
    with Image.open(tmp_path / "truncated.png") as lazy:  # a PIL image the user opened: decoded here, not swallowed
        with pytest.raises(ImageLoadError, match="damaged or truncated"):
            load_image(lazy)
    assert (np.asarray(load_image(data)) == np.asarray(load_image(Image.open(io_bytes(data))))).all()
    (generic / "images" / "b.png").write_bytes(damaged["corrupt.png"])
    result = classify_run(falip.load(str(save_checkpoint(tmp_path / "m.pt"))), generic, tmp_path / "r.json")
    assert result["skipped"]["by_reason"] == {"unreadable file": 1} and result["metrics"]["n"] == 2


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def reclip_lines(path, *lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


RECLIP_OK = dict(file_name="a.jpg", image_id=1, anns=[{"id": 1, "bbox": [1, 2, 3, 4]}], ann_id=1, sentences=[{"raw": "x"}])


@pytest.mark.parametrize(
    "line, message",
    [
        ("3", r"r\.jsonl:2: expected a JSON object, got the number 3"),
        ({**RECLIP_OK, "file_name": 7}, r"r\.jsonl:2: 'file_name' must be a string, got the number 7"),
        ({**RECLIP_OK, "anns": [{"id": 1, "bbox": [1, 2, 1e400, 4]}]}, r"r\.jsonl:2: anns\[0\]: 'bbox' must be \[x, y, w, h\]"),
        (
            '{"file_name": "a", "image_id": 1, "anns": [{"id": 1, "bbox": [1, 2, 1' + "0" * 400 + ', 4]}], "ann_id": 1, '
            '"sentences": ["x"]}',
            r"r\.jsonl:2: anns\[0\]: 'bbox' must be .*is not a finite number",
        ),
        ({**RECLIP_OK, "anns": [{"id": 1, "bbox": [True, 2, 3, 4]}]}, r"anns\[0\]: 'bbox' must be .*true is not a finite number"),
        ({**RECLIP_OK, "anns": {"id": 1}}, r"r\.jsonl:2: 'anns' must be a list, got an object"),
        ({**RECLIP_OK, "sentences": [{"raw": 5}]}, r"r\.jsonl:2 sentence 0: 'raw' must be a string"),
        ({**RECLIP_OK, "ann_id": [1.5]}, r"r\.jsonl:2: 'ann_id' must be an id"),
    ],
)
def test_r3b_malformed_reclip_lines_name_the_line_and_the_field(tmp_path, line, message):
    reclip_lines(tmp_path / "r.jsonl", {**RECLIP_OK, "image_id": 0}, line)  # another image: line 2's anns are read
    with pytest.raises(FalipError, match=message):
        load_reclip(tmp_path / "r.jsonl")


def write_refer(root, refs, instances) -> None:
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))


def test_r3b_malformed_refer_files_and_jsonl_regions_name_the_record_and_the_field(tmp_path):
    ref = dict(ref_id=1, ann_id=1, image_id=1, split="val", sentences=[{"raw": "the cat", "sent_id": 1}])
    good = dict(images=[{"id": 1, "file_name": "a.jpg"}], annotations=[{"id": 1, "image_id": 1, "bbox": [0, 0, 9, 9]}])
    cases = [
        ([ref], {**good, "images": [{"id": 1}]}, r"instances\.json: images\[0\]: 'file_name' is missing"),
        (
            [ref],
            {**good, "images": {"1": "a.jpg"}},
            r"instances\.json \(COCO instances\): 'images' must be a list, got an object",
        ),
        ([{**ref, "split": 0}], good, r"refs\(unc\)\.p: ref 0: 'split' must be a string, got the number 0"),
        ([ref], {**good, "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, True, 9]}]}, r"annotations\[0\]: 'bbox'"),
        ({"refs": [ref]}, good, r"refs\(unc\)\.p: the refs pickle must be a list"),
    ]
    for refs, instances, message in cases:
        write_refer(tmp_path, refs, instances)
        with pytest.raises(FalipError, match=message):
            load_refer(tmp_path, "refcoco", "val")
    rows = {
        "5": r"g\.jsonl:1: expected a JSON object, got the number 5",
        '{"image": 3, "box": [0, 0, 9, 9]}': r"g\.jsonl:1: 'image' must be a string, got the number 3",
        '{"image": "a.png", "box": [0, false, 9, 9]}': r"g\.jsonl:1: 'box' must be \[x0, y0, x1, y1\].*false is not a finite",
        '{"image": "a.png", "box": [0, 0, 1' + "0" * 400 + ", 9]}": r"g\.jsonl:1: 'box' must be .*too large",
    }
    for row, message in rows.items():
        (tmp_path / "g.jsonl").write_text(row + "\n")
        with pytest.raises(FalipError, match=message):
            read_regions_jsonl(tmp_path / "g.jsonl")
    import h5py

    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("data")
        f["label"] = np.zeros(2)
    from falip.datasets.pointclouds import read_h5

    with pytest.raises(FalipError, match=r"g\.h5: 'data' must be a dataset \(an array\), got a group"):
        read_h5(tmp_path / "g.h5")
    # a generator of boxes is a list of boxes; booleans are not coordinates
    img = random_image(np.random.default_rng(0), 64, 48)
    scores = tiny_wrap().score_regions(img, (b for b in [[0, 0, 30, 30], [10, 10, 60, 40]]), ["x"])
    assert scores.shape == (2, 1)
    with pytest.raises(InvalidRegionError, match="not booleans"):
        tiny_wrap().score_regions(img, [[0, 0, True, 30]], ["x"])


_TINY = {}


def tiny_wrap():
    if "m" not in _TINY:
        _TINY["m"] = wrap(tiny_clip(64, 16, layers=2, width=64))
    return _TINY["m"]


def test_r3b_errors_say_what_a_path_is_and_which_rule_read_a_mask(tmp_path, capsys):
    from falip.datasets.generic import EmptyMaskError, read_classes

    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(tmp_path / "loop2.png", tmp_path / "loop1.png")
    os.symlink(tmp_path / "loop1.png", tmp_path / "loop2.png")
    for name, what in (("folder.png", "is a folder"), ("fifo.png", "is a named pipe"), ("loop1.png", "is a symlink loop")):
        with pytest.raises(ImageLoadError, match=what):
            load_image(tmp_path / name)
        with pytest.raises(FalipError, match=what):
            read_mask(tmp_path / name)
        with pytest.raises(FalipError, match=what):
            read_regions_jsonl(tmp_path / name)
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "m16.png")
    with pytest.raises(EmptyMaskError, match=r"m16\.png is empty: .*value > 32767"):
        read_mask(tmp_path / "m16.png")
    Image.fromarray(np.full((8, 8), 0.4, np.float32)).save(tmp_path / "soft.tif")
    with pytest.raises(EmptyMaskError, match=r"soft\.tif is empty: .*value > 0\.5"):
        read_mask(tmp_path / "soft.tif")
    index = np.zeros((8, 8), np.uint8)
    index[2:5, 2:6] = 1  # class 1, whose VOC palette colour (128, 0, 0) is dark: read through its colour it is empty
    index[1, :] = 255  # VOC's void outline
    voc = Image.fromarray(index, "P")
    voc.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    voc.save(tmp_path / "voc.png")
    assert read_mask(tmp_path / "voc.png").sum() == 12
    only = Image.fromarray(np.where(index == 1, 255, 0).astype(np.uint8), "P")
    only.putpalette([0, 0, 0] * 255 + [255, 255, 255])
    only.save(tmp_path / "p255.png")
    assert read_mask(tmp_path / "p255.png").sum() == 12
    with pytest.raises(InvalidRegionError, match=r"mask 0 is empty: no value > 0\.5"):
        tiny_wrap().score_regions(np.zeros((48, 64, 3), np.uint8), None, ["x"], masks=[np.full((48, 64), 0.3)])
    (tmp_path / "latin1.jsonl").write_bytes(
        b'{"image": "a.png", "box": [0, 0, 9, 9]}\n{"image": "caf\xe9.png", "box": [0, 0, 9, 9]}\n'
    )
    with pytest.raises(FalipError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        read_regions_jsonl(tmp_path / "latin1.jsonl")
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\ndog\n".encode())
    assert read_classes(tmp_path / "bom.txt") == ["cat", "dog"]
    (tmp_path / "bom_t.txt").write_bytes("\ufeffa photo of a {}.\n".encode())
    assert falip.zeroshot.load_templates(str(tmp_path / "bom_t.txt")) == ["a photo of a {}."]
    for argv, message in (
        (["bias", "--image-size", "0,0", "--box", "0,0,1,1"], "1 to 1048576 pixels per side"),
        (["synth", "--output", str(tmp_path / "s"), "--size", "8"], "--size, pixels) must be an integer from 32 to 4096"),
        (["synth", "--output", str(tmp_path / "s"), "--images", "0"], "(--images) must be an integer from 1"),
    ):
        with pytest.raises(SystemExit) if argv[0] == "bias" else contextlib.nullcontext():
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_r3b_overlong_and_empty_expressions_are_counted_not_scored_silently(tmp_path, tiny_model):
    from falip.inputs import TextTruncatedWarning

    Image.fromarray(random_image(np.random.default_rng(0), 64, 48)).save(tmp_path / "COCO_train2014_000000000001.jpg")
    line = dict(
        file_name="COCO_train2014_000000000001_1.jpg",
        image_id=1,
        anns=[{"id": 1, "bbox": [2, 2, 30, 30]}, {"id": 2, "bbox": [30, 10, 30, 30]}],
        ann_id=1,
        sentences=[{"raw": "the cat"}, {"raw": " ".join(["cat"] * 90)}, {"raw": "  "}, {"raw": "a dog"}],
    )
    reclip_lines(tmp_path / "r.jsonl", line)
    data = load_reclip(tmp_path / "r.jsonl")
    assert [s.problem[0] if s.problem else None for s in data.samples] == [None, None, "empty expression", None]
    with pytest.warns(TextTruncatedWarning, match="1 of 4 expressions .* text context of 77 tokens"):
        result = rec_evaluate(RegionScorer([tiny_model], "falip"), data, tmp_path, tmp_path / "o.json", progress=False)
    assert result["run"]["expressions_truncated"] == 1
    assert result["skipped"]["by_reason"] == {"empty expression": 1} and result["metrics"]["n"] == 3


def test_r3b_token_counts_agree_between_the_open_clip_and_transformers_tokenizers(tmp_path):
    from adapters import openai_to_hf
    from falip.inputs import overlong_texts, token_counts
    from falip.runtimes.open_clip_loading import infer_openai_config

    clip = tiny_clip(64, 16, layers=2, width=64)
    state = {k: v.contiguous() for k, v in clip.state_dict().items() if k != "attn_mask"}
    openai_to_hf.save_hf_clip(state, infer_openai_config(state), tmp_path / "hf")
    texts = ["a cat", " ".join(["the"] * 75), " ".join(["the"] * 76), "naïve café, 12 € — ok?"]
    hf, oc = falip.load(str(tmp_path / "hf")), tiny_wrap()
    assert token_counts(hf.runtime, texts) == token_counts(oc.runtime, texts) == ([4, 77, 78, 13], 77)
    assert overlong_texts(hf, texts) == {texts[2]: 78}


def test_r3b_sizes_a_file_states_are_checked_before_allocating(tmp_path, capsys):
    import h5py

    from falip.datasets.pointclouds import load_cloud, read_h5

    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 2000000000\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    (tmp_path / "big.ply").write_bytes(header + b"\0" * 120)
    code = main(["render-depth", str(tmp_path / "big.ply"), "--output", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert code == 2 and "announces 2000000000 vertices" in err and "holds only 120 bytes" in err
    buf = io_bytes(b"")
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (3_000_000_000, 3)})
    (tmp_path / "big.npy").write_bytes(buf.getvalue() + b"\0" * 96)  # a header claiming 72 GB, 96 bytes of data
    with pytest.raises(FalipError, match=r"big\.npy: the header announces an array of shape \(3000000000, 3\)"):
        load_cloud(tmp_path / "big.npy")
    (tmp_path / "big.off").write_text("OFF\n100000000 2 0\n0 0 0\n1 0 0\n")
    with pytest.raises(FalipError, match=r"big\.off: the OFF header announces 100000000 vertices"):
        load_cloud(tmp_path / "big.off")
    with h5py.File(tmp_path / "huge.h5", "w") as f:
        f.create_dataset("data", shape=(10**6, 2048, 3), dtype="f4", chunks=(1, 2048, 3))
        f["label"] = np.zeros(10**6)
    with pytest.raises(FalipError, match=r"'data' of shape \(1000000, 2048, 3\) would take 22\.9 GiB"):
        read_h5(tmp_path / "huge.h5")
    Image.fromarray(random_image(np.random.default_rng(0), 64, 48)).save(tmp_path / "p.png")
    for tile in ("100000", "8"):
        code = main(
            ["attention", str(tmp_path / "p.png"), "--box", "0,0,9,9", "--tile", tile, "--output", str(tmp_path / "a.png")]
        )
        err = capsys.readouterr().err
        assert code == 2 and "--tile (pixels per map) must be an integer from 16 to 1024" in err


# ----------------------------------------------------------------------------------------------
# Round 3, R3-C: numbers that overflow, non-finite scores, threads, the CLI's one-line error handler (core and CLI).
# (cases of this family go below this line, above the next section)


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(sigma=1e-200), "FovealConfig.sigma"),  # 2σ² underflows to 0: the float64 bump would be 0/0
        (dict(sigma=1e200), "FovealConfig.sigma"),  # 2σ² overflows
        (dict(alpha=1e39), "FovealConfig.alpha"),  # finite in float64, inf in the float32 bias
        (dict(alpha=10**400), "FovealConfig.alpha"),  # too large for any float
        (dict(hard_value=-1e39, shape="hard"), "FovealConfig.hard_value"),
        (dict(heads={0: 1e300}), "FovealConfig.heads[0]"),  # was a RuntimeError converting to float32
        (dict(alpha=10.0, heads={0: 1e38}), "alpha × its scale"),  # each fits, their product does not
        (dict(eps=0.0), "FovealConfig.eps"),  # a one-token region divides by eps
        (dict(alpha=True), "FovealConfig.alpha"),
        (dict(unleash=[dict(layers=(3,), lam=1e39)]), "Unleash.lam"),
    ],
)
def test_bias_numbers_are_checked_as_the_bias_holds_them(fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        FovealConfig(**fields)


def test_bias_numbers_are_checked_in_the_models_attention_dtype():
    FovealConfig(alpha=1e5).check_dtype(torch.float32, 4)
    with pytest.raises(ValueError, match="overflows float16, the attention dtype"):
        FovealConfig(alpha=1e5).check_dtype(torch.float16, 4)
    with pytest.raises(ValueError, match="an unleash λ = 100000 overflows float16"):
        FovealConfig(unleash=[Unleash(layers=(3,), lam=1e5)]).check_dtype(torch.float16, 4)


def test_a_bias_that_overflows_the_attention_is_blamed_on_the_bias_not_the_weights(tiny_model):
    image = random_image(np.random.default_rng(3), 64, 64)
    huge = FovealConfig(layers=(2, 3), unleash=[Unleash(layers=(2, 3), lam=3e38)])
    with pytest.raises(ValueError, match=r"FALIP bias settings .* \(its plain image pass is finite\)"):
        tiny_model.encode_regions(image, [[0, 0, 30, 30]], config=huge)


def test_sixteen_threads_on_a_cold_zero_shot_cache_all_succeed(tiny_model, tmp_path, monkeypatch):
    from falip.zeroshot import zero_shot_classifier

    names = ["cat", "dog", "bird"]
    want = zero_shot_classifier(tiny_model, names, ["a photo of a {}."], use_cache=False)
    barrier = threading.Barrier(16)

    def call(i):
        barrier.wait()  # every thread finds the cache cold and writes the same entry at once
        return zero_shot_classifier(tiny_model, names, ["a photo of a {}."])

    for round_ in range(3):
        monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / f"cache{round_}"))
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(call, range(16)))
        assert all(torch.allclose(g, want, atol=1e-6) for g in got)
        left = sorted(p.name for p in (tmp_path / f"cache{round_}" / "zeroshot").iterdir())
        assert len(left) == 1 and left[0].endswith(".pt")  # no temporary file left behind


def test_a_config_dict_is_accepted_and_a_bad_one_named(tiny_model):
    image = random_image(np.random.default_rng(4), 64, 64)
    as_dict = tiny_model.encode_regions(image, [[0, 0, 30, 30]], config={"alpha": 2.0, "layers": [2, 3]})
    as_config = tiny_model.encode_regions(image, [[0, 0, 30, 30]], config=FovealConfig(alpha=2.0, layers=(2, 3)))
    torch.testing.assert_close(as_dict, as_config, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown FovealConfig field\(s\) \['alpa'\]"):
        tiny_model.encode_regions(image, [[0, 0, 30, 30]], config={"alpa": 2.0})
    with pytest.raises(ValueError, match="config must be a FovealConfig or a dict of its fields, got str"):
        tiny_model.encode_regions(image, [[0, 0, 30, 30]], config="alpha=2")
    model = wrap(tiny_clip(64, 16, layers=4, width=64), config={"alpha": 1.0, "layers": [3]})  # what falip.load passes on
    assert model.config == FovealConfig(alpha=1.0, layers=(3,))


def test_a_generator_of_boxes_is_the_list_it_yields(tiny_model):
    image = random_image(np.random.default_rng(5), 64, 64)
    boxes = [[0, 0, 30, 30], [10, 10, 60, 50]]
    want = tiny_model.score_regions(image, boxes, ["a", "b"])
    torch.testing.assert_close(tiny_model.score_regions(image, (b for b in boxes), ["a", "b"]), want, rtol=0, atol=0)
    got = score_with_method(tiny_model, image, (b for b in boxes), ["a", "b"], method="crop")
    assert got.shape == (2, 2)


@pytest.fixture(scope="module")
def score_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3c")
    torch.save(tiny_clip(224, 32, layers=4, width=64).state_dict(), root / "tiny.pt")
    Image.fromarray(random_image(np.random.default_rng(6), 320, 240)).save(root / "photo.png")
    return root


def score_argv(files, *extra):
    return ["score", str(files / "photo.png"), "--model", str(files / "tiny.pt"), *extra]


def test_score_json_has_the_shape_of_the_score_table_with_ties_and_repeated_texts(score_files, capsys):
    assert main(score_argv(score_files, "--box", "0,0,100,100", "--box", "50,50,200,200", "--text", "a", "--text", "a",
                           "--method", "none", "--json")) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["texts"] == ["a", "a"] and out["best"] == [0, 0] and out["tie"] == [True, True] and out["tied"] == [[0, 1]] * 2
    assert out["score"] == {"kind": "softmax", "name": score_name("softmax")} and len(out["scores"]) == 2
    assert main(score_argv(score_files, "--box", "0,0,100,100", "--box", "50,50,200,200", "--text", "a", "--method", "none")) == 0
    table = capsys.readouterr().out
    assert "<- best (tie: 1, 2)" in table and f"scores: {score_name('softmax')}" in table


def test_score_checks_its_regions_before_loading_the_model(score_files, tmp_path, capsys):
    missing_model = ["score", str(score_files / "photo.png"), "--model", str(tmp_path / "nope.pt"), "--text", "a"]
    assert main([*missing_model, "--box", "400,300,500,400"]) == 2
    assert "box 0" in capsys.readouterr().err  # the box, not the missing checkpoint
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "small.png")
    assert main([*missing_model, "--mask", str(tmp_path / "small.png")]) == 2
    assert "mask 0 has shape (10, 10)" in capsys.readouterr().err


def test_a_negative_box_is_a_box_and_zero_grids_are_refused(score_files, capsys):
    assert main(score_argv(score_files, "--box", "-50,-50,100,100", "--text", "a")) == 0
    captured = capsys.readouterr()
    assert "-50,-50,100,100" in captured.out and "falip: warning: box 0 (-50, -50, 100, 100) extends outside" in captured.err
    for option in ("--grid", "--patch"):
        assert main(["bias", "--image-size", "100,100", "--box", "0,0,50,50", option, "0"]) == 2
        assert f"{option} (" in capsys.readouterr().err  # refused, not the default


def test_non_finite_scores_are_an_error_not_a_table(score_files, capsys, monkeypatch):
    import falip.cli.score as score_cli

    monkeypatch.setattr(score_cli, "score_with_method", lambda *a, **k: torch.tensor([[float("nan")]]))
    assert main(score_argv(score_files, "--box", "0,0,100,100", "--text", "a", "--json")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "NaN or infinite scores" in captured.err


@pytest.mark.parametrize(
    "exc, line",
    [
        (OverflowError("int too large to convert to float"), "falip: error: a number is too large: int too large"),
        (RecursionError("maximum recursion depth exceeded"), "falip: error: an input file is nested too deeply to read"),
        (FileNotFoundError(2, "No such file or directory", "x.json"), "falip: error: No such file or directory: x.json"),
        (MemoryError(), "falip: error: out of memory"),
        (ValueError("bad value"), "falip: error: bad value"),
    ],
)
def test_every_user_caused_exception_is_one_line(exc, line, capsys):
    from falip.cli import _main

    def command(args):
        raise exc

    assert _main(argparse.Namespace(func=command, command="x")) == 2
    assert capsys.readouterr().err.strip().startswith(line)


def test_a_genuine_bug_keeps_its_traceback():
    from falip.cli import _main

    def command(args):
        return {}["missing"]

    with pytest.raises(KeyError):
        _main(argparse.Namespace(func=command, command="x"))


def test_version_and_no_abbreviated_options(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"falip {falip.__version__}"
    with pytest.raises(SystemExit):  # --mode is not --model where a command has no --mode
        main(["attention", "x.png", "--box", "0,0,1,1", "--mode", "naive", "--output", "o.png"])
    assert "unrecognized arguments: --mode" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Round 3, R3-D: the server: Host/Origin, time and size bounds, decoding as the CLI does (falip serve).
# (cases of this family go below this line, above the next section)


def _app_client(model, **limits):
    """A TestClient of ``falip serve``'s app (Guard included) for ``model``, addressed as http://127.0.0.1:7860."""
    pytest.importorskip("fastapi", reason="the app extra is not installed")
    from fastapi.testclient import TestClient

    from falip.app.server import create_app
    from falip.app.service import Limits

    return TestClient(create_app(model, Limits(**limits)), base_url="http://127.0.0.1:7860")


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _score_form(image: bytes, boxes, texts, **fields):
    data = dict(boxes=json.dumps(boxes) if not isinstance(boxes, str) else boxes, texts=json.dumps(texts), **fields)
    return dict(files={"image": ("i.png", image, "image/png")}, data=data)


def test_server_answers_only_to_its_own_host_names_and_refuses_cross_origin_posts(tiny_model):
    client = _app_client(tiny_model)
    form = _score_form(_png_bytes(Image.fromarray(random_image(np.random.default_rng(0), 64, 48))), [[4, 4, 40, 30]], ["a cat"])
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "LOCALHOST"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    rebound = client.get("/api/health", headers={"host": "attacker.example:7860"})
    assert rebound.status_code == 400 and "--allow-host attacker.example" in rebound.json()["error"]
    assert client.post("/api/score", headers={"host": "evil.test"}, **form).status_code == 400
    for origin in ("http://attacker.example", "http://127.0.0.1:9999", "null"):
        r = client.post("/api/score", headers={"origin": origin}, **form)
        assert r.status_code == 403 and "cross-origin" in r.json()["error"], origin
    assert client.post("/api/score", headers={"origin": "http://127.0.0.1:7860"}, **form).status_code == 200  # the page
    assert client.post("/api/score", **form).status_code == 200  # no Origin: curl, scripts


def test_allowed_hosts_follow_the_bind_address_and_the_allow_list():
    pytest.importorskip("fastapi", reason="the app extra is not installed")
    from falip.app.server import allowed_hosts

    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("0.0.0.0") == {"localhost", "127.0.0.1", "::1"}  # a wildcard names no host
    assert "192.168.1.5" in allowed_hosts("192.168.1.5") and "lab.box" in allowed_hosts("0.0.0.0", ["Lab.Box"])
    assert allowed_hosts("0.0.0.0", ["*"]) is None


def test_stalled_uploads_are_closed_and_health_answers_meanwhile(tiny_model):
    """A bounded number of stalled clients on 127.0.0.1: 6 send headers and part of a body, 3 send nothing."""
    import select
    import socket
    import threading

    httpx = pytest.importorskip("httpx", reason="the app extra is not installed")
    pytest.importorskip("fastapi", reason="the app extra is not installed")
    from falip.app.server import make_server, url_of
    from falip.app.service import Limits

    server, sock = make_server(tiny_model, "127.0.0.1", 0, Limits(read_timeout_s=1.0, max_connections=32), "warning")
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(timeout=0.05)
    url = url_of(sock)
    port = sock.getsockname()[1]
    try:
        stalled = []
        for i in range(9):
            conn = socket.create_connection(("127.0.0.1", port), timeout=60)
            if i < 6:
                head = f"POST /api/score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n\r\n"
                conn.sendall(head.encode() + b"x" * 10)
            stalled.append(conn)
        assert httpx.get(url + "api/health", timeout=60).status_code == 200
        answers = []
        for conn in stalled:  # each is answered 408 (body) or closed (no request) by the server, not by us
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            conn.close()
            answers.append(data)
        assert all(a.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in a for a in answers[:6]), answers
        assert answers[6:] == [b"", b"", b""]
        # A kept-alive connection: one answer, then a second request's headers trickled a byte at a time.
        trickle = socket.create_connection(("127.0.0.1", port), timeout=60)
        trickle.sendall(f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert trickle.recv(4096).startswith(b"HTTP/1.1 200")
        closed = False
        for _ in range(40):  # up to 10 s of trickling; the server must close about 1 s after its answer
            try:
                if select.select([trickle], [], [], 0.25)[0] and trickle.recv(4096) == b"":
                    closed = True
                    break
                trickle.sendall(b"G")
            except ConnectionError:  # reset by the server: closed too
                closed = True
                break
        trickle.close()
        assert closed, "a kept-alive connection trickling its next request's headers was never closed"
        assert httpx.get(url + "api/health", timeout=60).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_pixel_limit_holds_for_what_crop_preprocessing_makes_of_an_image():
    model = wrap(tiny_clip(64, 16, layers=2, width=64), preprocess="crop")
    client = _app_client(model)  # default limit: 16 000 000 pixels, so the 200000x1 upload itself passes
    strip = _png_bytes(Image.new("RGB", (200_000, 1), "gray"))
    r = client.post("/api/score", **_score_form(strip, [[0, 0, 100, 1]], ["a line"]))
    assert r.status_code == 413 and "resized to 12800000x64" in r.json()["error"], r.text
    client = _app_client(model, max_pixels=1_000_000)
    square = _png_bytes(Image.new("RGB", (400, 400), "gray"))  # fine as an image; its crop of a 400x1 box (25600x64) is not
    r = client.post("/api/score", **_score_form(square, [[0, 0, 400, 1]], ["a line"], method="crop"))
    assert r.status_code == 413 and "box 0's crop of 400x1 is resized to 25600x64" in r.json()["error"], r.text
    assert client.post("/api/score", **_score_form(square, [[0, 0, 400, 1]], ["a line"])).status_code == 200  # falip


@pytest.mark.parametrize("kind", ["16-bit", "float"])
def test_uploads_are_decoded_as_falip_score_decodes_the_file(tmp_path, tiny_model, kind):
    import io

    from falip.methods import score_with_method

    rng = np.random.default_rng(3)
    if kind == "16-bit":  # a 16-bit grayscale PNG
        image, name = Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16)), "i.png"
    else:  # a float TIFF in [0, 1]
        image, name = Image.fromarray(rng.uniform(0, 1, (48, 64)).astype(np.float32)), "i.tif"
    image.save(tmp_path / name)
    data = (tmp_path / name).read_bytes()
    boxes, texts = [[4, 4, 40, 30], [20, 10, 60, 44]], ["a cat", "a dog"]
    r = _app_client(tiny_model).post(
        "/api/score", files={"image": (name, data)}, data=dict(boxes=json.dumps(boxes), texts=json.dumps(texts))
    )
    assert r.status_code == 200, r.text
    want = score_with_method(tiny_model, tmp_path / name, boxes, texts)  # the file, read as the CLI reads it
    np.testing.assert_allclose(r.json()["scores"], want.numpy(), rtol=0, atol=1e-5)
    clipped = score_with_method(tiny_model, Image.open(io.BytesIO(data)).convert("RGB"), boxes, texts)
    assert not np.allclose(clipped.numpy(), want.numpy(), atol=1e-3)  # the old decoding (clipping) differs


BAD_NUMBERS = {
    "deeply nested texts": ("texts", "[" * 100_000 + "]" * 100_000, "texts: JSON nested too deeply"),
    "deeply nested boxes": ("boxes", "[" * 100_000, "boxes: JSON nested too deeply"),
    "integer over the digit limit": ("boxes", "[[1, 2, 3, 1" + "0" * 5000 + "]]", "boxes: not valid JSON"),
    "integer too large for a float": ("boxes", "[[1, 2, 3, 1" + "0" * 400 + "]]", "too large for a float"),
    "huge layer index": ("layers", "[10000000000000000000000000]", "FALIP options"),
    "huge alpha": ("alpha", "1e400", "alpha"),
}


@pytest.mark.parametrize("name", list(BAD_NUMBERS))
def test_deep_json_and_huge_numbers_are_a_400_not_a_500(tiny_model, name):
    field, value, fragment = BAD_NUMBERS[name]
    form = _score_form(_png_bytes(Image.fromarray(random_image(np.random.default_rng(0), 64, 48))), [[4, 4, 40, 30]], ["a cat"])
    form["data"][field] = value
    r = _app_client(tiny_model).post("/api/score", **form)
    assert r.status_code == 400 and fragment in r.json()["error"], r.text


def test_health_names_a_checkpoint_by_its_file_name_not_its_path(tmp_path):
    ckpt = save_checkpoint(tmp_path / "secret-folder" / "weights.pt") if (tmp_path / "secret-folder").mkdir() is None else None
    info = _app_client(falip.load(str(ckpt))).get("/api/health").json()
    assert info["model"] == "weights.pt" and str(tmp_path) not in json.dumps(info)


# ----------------------------------------------------------------------------------------------
# Round 3, R3-E: models that disagree with their weights (loading).
# (cases of this family go below this line, above the next section)


def _hf_clip_dir(root, seed=0):
    """A save_pretrained CLIPModel directory of a tiny OpenAI-layout CLIP (tools/openai_to_hf.py)."""
    import importlib.util

    from falip.runtimes.open_clip_loading import infer_openai_config

    spec = importlib.util.spec_from_file_location(
        "openai_to_hf", os.path.join(os.path.dirname(__file__), "..", "tools", "openai_to_hf.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    state = {
        k: v.contiguous() for k, v in tiny_clip(64, 16, layers=3, width=64, seed=seed).state_dict().items() if k != "attn_mask"
    }
    tool.save_hf_clip(state, infer_openai_config(state), root)
    return root


def _cli_error(argv, capsys) -> str:
    """The CLI's one-line error for argv, which must exit 2 (transformers' progress bars aside)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("falip: error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("tower, layers, says", [("vision", 2, "unexpected"), ("vision", 4, "missing"), ("text", 2, "missing")])
def test_r3e_hf_config_with_other_layer_counts_than_its_weights_is_refused(tmp_path, capsys, tower, layers, says):
    pytest.importorskip("transformers")
    directory = _hf_clip_dir(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    held = config[f"{tower}_config"]["num_hidden_layers"]
    config[f"{tower}_config"]["num_hidden_layers"] = layers
    (directory / "config.json").write_text(json.dumps(config))
    line = _cli_error(["score", _photo_file(tmp_path), "--box", "0,0,10,10", "--text", "x", "--model", directory], capsys)
    assert str(directory / "model.safetensors") in line and says in line
    assert f"config.json gives the {tower} tower {layers} layers, the weights hold {held}" in line


def _photo_file(tmp_path):
    Image.fromarray(random_image(np.random.default_rng(0), 64, 48)).save(tmp_path / "p.png")
    return tmp_path / "p.png"


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_r3e_integer_tensors_are_never_cast_into_float_parameters(tmp_path, capsys, dtype):
    state = tiny_clip(64, 16, layers=2, width=64).state_dict()
    state["visual.proj"] = (state["visual.proj"] * 50).to(dtype)
    torch.save(state, tmp_path / "int.pt")
    line = _cli_error(
        ["score", _photo_file(tmp_path), "--box", "0,0,10,10", "--text", "x", "--model", tmp_path / "int.pt"], capsys
    )
    assert str(tmp_path / "int.pt") in line and f"visual.proj is {str(dtype).removeprefix('torch.')}" in line
    pytest.importorskip("transformers")
    directory = _hf_clip_dir(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors["text_projection.weight"] = tensors["text_projection.weight"].to(dtype)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"model.safetensors does not match .*text_projection.weight is {str(dtype)[6:]}"):
        falip.load(str(directory))


def test_r3e_logit_scale_that_overflows_is_refused_at_load(tmp_path, capsys):
    state = tiny_clip(64, 16, layers=2, width=64).state_dict()
    state["logit_scale"] = torch.tensor(90.0)  # exp(90) > float32's largest value
    torch.save(state, tmp_path / "hot.pt")
    line = _cli_error(
        ["score", _photo_file(tmp_path), "--box", "0,0,10,10", "--text", "x", "--model", tmp_path / "hot.pt", "--json"],
        capsys,
    )
    assert "hot.pt has logit_scale 90" in line and "overflows float32" in line
    state["logit_scale"] = torch.tensor(10.0)  # exp(10) fits float32 but not float16: HF models keep it in their dtype
    torch.save(state, tmp_path / "warm.pt")
    assert falip.load(str(tmp_path / "warm.pt"), precision="fp16").runtime.clip.logit_scale.dtype == torch.float32
