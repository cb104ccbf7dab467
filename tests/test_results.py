"""Results files: resume, skipped accounting, aggregation; zero-shot classifiers and their cache."""

import copy
import json
import os
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import tiny_clip, wrap
from falip import FalipModel
from falip.cli import main
from falip.errors import FalipError
from falip.experiments import aggregate
from falip.results import ResumeMismatchError, RunRecorder, predictions_path
from falip.runtimes import OpenClipRuntime
from falip.zeroshot import cache_dir, class_prompts, load_templates, text_fingerprint, zero_shot_classifier


def run(path, config, ids, fail=()):
    rec = RunRecorder(path, task="demo", config=config)
    computed = []
    for i in ids:
        if str(i) in rec.done:
            continue
        computed.append(i)
        if i in fail:
            rec.skip(i, "missing image", f"img{i}.jpg not found")
        else:
            rec.add(i, correct=i % 2 == 0)
    ok = rec.records()
    result = rec.finish({"acc": 100.0 * sum(r["correct"] for r in ok) / len(ok), "n": len(ok)}, dataset="toy", split="val")
    return rec, computed, result


def test_results_json_layout_and_skips(tmp_path):
    _, computed, result = run(tmp_path / "r.json", {"method": "falip"}, range(6), fail=(3,))
    assert computed == list(range(6))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == result
    assert saved["metrics"] == {"acc": 60.0, "n": 5} and saved["config"] == {"method": "falip"}
    assert saved["skipped"]["count"] == 1 and saved["skipped"]["by_reason"] == {"missing image": 1}
    assert saved["skipped"]["examples"][0]["detail"] == "img3.jpg not found"
    lines = predictions_path(tmp_path / "r.json").read_text().splitlines()
    assert json.loads(lines[0])["config"] == {"method": "falip"} and len(lines) == 7


def test_resume_computes_only_the_missing_samples(tmp_path):
    run(tmp_path / "r.json", {"m": 1}, range(4))
    with open(predictions_path(tmp_path / "r.json"), "a") as f:
        f.write('{"id": "9", "corr')  # a line cut short by a crash
    rec, computed, result = run(tmp_path / "r.json", {"m": 1}, range(10))
    assert computed == [4, 5, 6, 7, 8, 9] and rec.resumed == 4
    assert result["metrics"]["n"] == 10


def test_resume_refuses_a_different_config(tmp_path):
    run(tmp_path / "r.json", {"m": 1}, range(2))
    with pytest.raises(ResumeMismatchError, match="different configuration"):
        RunRecorder(tmp_path / "r.json", task="demo", config={"m": 2})
    rec = RunRecorder(tmp_path / "r.json", task="demo", config={"m": 2}, resume=False)
    assert rec.done == {}


def test_aggregate_markdown_and_csv(tmp_path, capsys):
    run(tmp_path / "a.json", {"method": "falip", "model": "ViT-B-16"}, range(4))
    run(tmp_path / "b.json", {"method": "crop", "model": "ViT-B-16"}, range(4), fail=(0,))
    table = aggregate([tmp_path / "a.json", tmp_path / "b.json"])
    lines = table.splitlines()
    assert lines[0].startswith("| task | dataset | split | method | model | acc | n | skipped")
    assert "| demo | toy | val | crop | ViT-B-16 | 33.33 | 3 | 1 |" in lines[3]
    assert main(["aggregate", str(tmp_path / "a.json"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("demo,toy,val,falip,ViT-B-16,50.0,4,0")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(FalipError, match="x.json has no 'metrics': not a falip results file"):
        aggregate([tmp_path / "x.json"])


def test_templates(tmp_path):
    assert len(load_templates()) == 80 and all("{}" in t for t in load_templates())
    assert load_templates("simple") == ["a photo of a {}."]
    (tmp_path / "t.txt").write_text("a {} bird\n\nthe {}.\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a {} bird", "the {}."]
    (tmp_path / "p.json").write_text(json.dumps({"cat": ["meow"], "dog": ["woof", "bark"]}))
    prompts = class_prompts(["dog", "cat"], load_templates(str(tmp_path / "p.json")))
    assert prompts == [["woof", "bark"], ["meow"]]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(FalipError, match="placeholder"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(FalipError, match="no prompts for classes"):
        class_prompts(["bird"], load_templates(str(tmp_path / "p.json")))


def test_zero_shot_classifier_averages_prompts_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path))
    model = wrap(tiny_clip(224, 32, layers=2))
    weights = zero_shot_classifier(model, ["cat", "dog"], ["a {}.", "the {}!"])
    emb = model.encode_text(["a cat.", "the cat!"])
    torch.testing.assert_close(weights[0], torch.nn.functional.normalize(emb.mean(0), dim=-1), atol=1e-6, rtol=0)
    assert len(list((tmp_path / "zeroshot").glob("*.pt"))) == 1
    torch.testing.assert_close(zero_shot_classifier(model, ["cat", "dog"], ["a {}.", "the {}!"]), weights)
    other = wrap(tiny_clip(224, 32, layers=2, seed=5))  # different weights: a different cache entry
    assert not torch.allclose(zero_shot_classifier(other, ["cat", "dog"], ["a {}.", "the {}!"]), weights)
    with pytest.raises(FalipError, match="unique"):
        zero_shot_classifier(model, ["cat", "cat"])


def test_zero_shot_cache_key_covers_the_whole_text_tower_dtype_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path))
    clip = tiny_clip(224, 32, layers=2)
    base = text_fingerprint(wrap(clip))
    assert text_fingerprint(wrap(clip)) == base  # deterministic
    changed = copy.deepcopy(clip)
    with torch.no_grad():
        changed.transformer.resblocks[-1].mlp.c_proj.weight[-1, -1] += 1e-3  # one weight deep in the last text block
    assert text_fingerprint(wrap(changed)) != base
    seeing = copy.deepcopy(clip)
    with torch.no_grad():
        seeing.visual.proj.mul_(2)  # the image tower does not change text embeddings
    assert text_fingerprint(wrap(seeing)) == base
    shorter = FalipModel(OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer(context_length=16)))
    assert text_fingerprint(shorter) != base  # a different tokenizer (context length)
    half = copy.deepcopy(clip).to(torch.bfloat16)
    assert text_fingerprint(wrap(half)) != base  # the same values in another dtype
    zero_shot_classifier(wrap(clip), ["cat"], ["a {}."])
    zero_shot_classifier(wrap(changed), ["cat"], ["a {}."])
    assert len(list((tmp_path / "zeroshot").glob("*.pt"))) == 2


def test_tests_never_write_to_the_home_cache():
    assert (
        os.environ["FALIP_CACHE_DIR"]
        and Path(os.environ["FALIP_CACHE_DIR"]).resolve() != Path("~/.cache/falip").expanduser().resolve()
    )
    assert cache_dir() == Path(os.environ["FALIP_CACHE_DIR"]) / "zeroshot"  # set by conftest for the whole session
