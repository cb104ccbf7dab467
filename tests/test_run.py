"""The run skeleton every task shares (falip.tasks.run) and its one fingerprint rule.

Every task's fingerprint is what its scorer/classifier describes about itself (model, weights digest,
config, method, mode, preprocessing, templates, data digests) merged with the caller's extras, never
replaced by them: a resume with any one of those changed is refused, through the library API (with
``run_config`` None, ``{}`` or a caller's fields) as well as the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import modelnet40_split, random_image, tiny_clip, wrap
from falip import FalipError, FovealConfig
from falip.cli import main
from falip.datasets.generic import load_generic, read_regions_jsonl
from falip.datasets.pointclouds import load_dataset
from falip.datasets.refer import load_reclip
from falip.results import ResumeMismatchError
from falip.tasks import classify, heads, pointcloud, rec
from falip.tasks.run import fingerprint


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / "cache"))


def tiny(seed=0, preprocess="squash", alpha=0.2):
    return wrap(
        tiny_clip(64, 16, layers=2, width=64, seed=seed), preprocess=preprocess, config=FovealConfig(layers=(1,), alpha=alpha)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data of every task: two images, a ReCLIP JSONL, a generic regions JSONL, an HDF5 point-cloud split."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    for i in (1, 2):
        Image.fromarray(random_image(rng, 64, 48)).save(root / f"COCO_train2014_{i:012d}.jpg")
    lines = [
        {"file_name": f"COCO_train2014_{i:012d}_1.jpg", "image_id": i, "anns": [{"id": 0, "bbox": [2, 2, 30, 30]},
         {"id": 1, "bbox": [30, 10, 30, 30]}], "ann_id": 0, "sentences": [{"raw": f"thing {i}"}]}
        for i in (1, 2)
    ]  # fmt: skip
    (root / "refs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    regions = [{"image": f"COCO_train2014_{i:012d}.jpg", "label": ["cat", "dog"][i - 1], "box": [4, 4, 40, 30]} for i in (1, 2)]
    (root / "regions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in regions))
    (root / "classes.txt").write_text("cat\ndog\n")
    modelnet40_split(root, rng.normal(size=(3, 64, 3)))
    torch.save(tiny_clip(64, 16, layers=2, width=64).state_dict(), root / "tiny.pt")
    return root


def test_extras_are_merged_and_never_replace_the_description():
    assert fingerprint({"method": "falip", "mode": "exact"}, {"seed": 1}) == {"seed": 1, "method": "falip", "mode": "exact"}
    assert fingerprint({"method": "falip"}, {"method": "falip"}) == {"method": "falip"}  # the same value: fine
    with pytest.raises(FalipError, match=r"run_config\['method'\] = 'none' contradicts what the run uses \('falip'\)"):
        fingerprint({"method": "falip"}, {"method": "none"})


# ----------------------------------------------------------------------------------------------
# Library: a first run, then a resume with one thing changed → refused, whatever run_config says


def rec_run(files, out, run_config=None, model=None, **scorer):
    data = load_reclip(files / "refs.jsonl")
    return rec.evaluate(
        rec.RegionScorer([model or tiny()], **scorer), data, files, out, run_config=run_config, progress=False, workers=0
    )


REC_CHANGES = {
    "weights": dict(model=tiny(seed=1)),
    "config": dict(model=tiny(alpha=0.5)),
    "method": dict(methods="none"),
    "mode": dict(mode="naive"),
    "preprocessing": dict(model=tiny(preprocess="pad")),
    "template": dict(template="a picture of {}"),
}


@pytest.mark.parametrize("run_config", [None, {}, {"note": "mine"}])
@pytest.mark.parametrize("change", sorted(REC_CHANGES))
def test_rec_resume_with_one_change_is_refused(files, tmp_path, change, run_config):
    first = rec_run(files, tmp_path / "r.json", run_config)
    assert first["metrics"]["n"] == 2 and first["config"]["methods"] == ["falip"]
    with pytest.raises(ResumeMismatchError, match="different configuration or inputs"):
        rec_run(files, tmp_path / "r.json", run_config, **REC_CHANGES[change])
    assert rec_run(files, tmp_path / "r.json", run_config)["run"]["resumed"] == 2  # unchanged: resumes


def test_rec_resume_with_edited_annotations_is_refused(files, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("refs.jsonl", "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"):
        (root / name).write_bytes((files / name).read_bytes())
    rec_run(root, tmp_path / "r.json")
    (root / "refs.jsonl").write_text((root / "refs.jsonl").read_text().replace("thing 1", "thing one"))
    with pytest.raises(ResumeMismatchError, match=r"inputs\.annotations"):
        rec_run(root, tmp_path / "r.json")


def classify_run(files, out, run_config=None, model=None, **options):
    data = load_generic(files / "regions.jsonl", files / "classes.txt", files)
    options = {"templates": "simple", **options}
    return classify.evaluate(model or tiny(), data, out, run_config=run_config, progress=False, workers=0, **options)


CLASSIFY_CHANGES = {
    "weights": dict(model=tiny(seed=1)),
    "config": dict(config=FovealConfig(layers=(1,), alpha=0.5)),
    "method": dict(method="none"),
    "mode": dict(mode="approx"),
    "preprocessing": dict(model=tiny(preprocess="pad")),
    "templates": dict(templates=["a picture of a {}."]),
}


@pytest.mark.parametrize("run_config", [None, {}, {"note": "mine"}])
@pytest.mark.parametrize("change", sorted(CLASSIFY_CHANGES))
def test_classify_resume_with_one_change_is_refused(files, tmp_path, change, run_config):
    assert classify_run(files, tmp_path / "r.json", run_config)["metrics"]["n"] == 2
    with pytest.raises(ResumeMismatchError, match="different configuration or inputs"):
        classify_run(files, tmp_path / "r.json", run_config, **CLASSIFY_CHANGES[change])
    assert classify_run(files, tmp_path / "r.json", run_config)["speed"]["resumed"] == 2


def pointcloud_run(files, out, run_config=None, model=None, **options):
    data = load_dataset("modelnet40", files)
    classifier = pointcloud.PointCloudClassifier(model or tiny(), data.classnames, **options)
    return pointcloud.evaluate(classifier, data, out, run_config, progress=False, workers=0)


POINTCLOUD_CHANGES = {
    "weights": dict(model=tiny(seed=1)),
    "config": dict(config=FovealConfig(layers=(1,), alpha=0.5)),
    "method": dict(method="none"),
    "mode": dict(mode="naive"),
    "projection": dict(projection="ortho_dense"),
    "templates": dict(templates=["a depth map of a {}."]),
    "view weights": dict(view_weights=[1, 1, 1, 1, 2, 2]),
}


@pytest.mark.parametrize("run_config", [None, {}])
@pytest.mark.parametrize("change", sorted(POINTCLOUD_CHANGES))
def test_pointcloud_resume_with_one_change_is_refused(files, tmp_path, change, run_config):
    """The issue's case: a library caller passing {} cannot resume a method='none' run into a 'falip' one."""
    first = pointcloud_run(files, tmp_path / "r.json", run_config)
    assert first["metrics"]["n"] == 3 and first["config"]["method"] == "falip" and first["config"]["projection"] == "pointclip"
    with pytest.raises(ResumeMismatchError, match="different configuration or inputs"):
        pointcloud_run(files, tmp_path / "r.json", run_config, **POINTCLOUD_CHANGES[change])


def heads_run(files, out, model=None, prompt="falip", **options):
    samples = read_regions_jsonl(files / "regions.jsonl", files)
    return heads.evaluate(model or tiny(), samples, prompt, out, progress=False, **options)


HEADS_CHANGES = {
    "weights": dict(model=tiny(seed=1)),
    "config": dict(config=FovealConfig(layers=(1,), alpha=0.5)),
    "prompt": dict(prompt="circle"),
    "statistic": dict(statistic="cosine"),
    "preprocessing": dict(model=tiny(preprocess="pad")),
}


@pytest.mark.parametrize("change", sorted(HEADS_CHANGES))
def test_heads_resume_with_one_change_is_refused(files, tmp_path, change):
    first = heads_run(files, tmp_path / "h")
    assert first["metrics"]["n"] == 2 and (tmp_path / "h" / "heads.png").is_file()
    with pytest.raises(ResumeMismatchError, match="different configuration or inputs"):
        heads_run(files, tmp_path / "h", **HEADS_CHANGES[change])


# ----------------------------------------------------------------------------------------------
# CLI: the same rule, one command line per task


def cli_ok(argv, capsys) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "task,change",
    [
        ("rec", ["--template", "a picture of {}"]),
        ("rec", ["--preprocess", "pad"]),
        ("classify", ["--method", "none"]),
        ("classify", ["--alpha", "0.5"]),
        ("pointcloud", ["--method", "none"]),
        ("pointcloud", ["--mode", "naive"]),
        ("heads", ["--statistic", "cosine"]),
    ],
)
def test_cli_resume_with_one_change_is_refused(files, tmp_path, capsys, task, change):
    model = ["--model", files / "tiny.pt"]
    argv = {
        "rec": ["rec", "--format", "reclip", "--annotations", files / "refs.jsonl", "--image-root", files, "--quiet",
                "--workers", "0", "--output", tmp_path / "r.json"],
        "classify": ["classify", "--annotations", files / "regions.jsonl", "--classes", files / "classes.txt", "--image-root",
                     files, "--templates", "simple", "--workers", "0", "--output", tmp_path / "r.json"],
        "pointcloud": ["pointcloud", "--dataset", "modelnet40", "--data-root", files, "--workers", "0", "--output",
                       tmp_path / "r.json"],
        "heads": ["heads", "--annotations", files / "regions.jsonl", "--image-root", files, "--prompt", "falip", "--output",
                  tmp_path / "h"],
    }[task] + model  # fmt: skip
    cli_ok(argv, capsys)
    capsys.readouterr()
    assert main([str(a) for a in argv + change]) == 2
    err = capsys.readouterr().err
    assert "different configuration or inputs" in err and len(err.strip().splitlines()) == 1
